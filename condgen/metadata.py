"""gRPC metadata keys that the client and the server share (one place, so they cannot drift).

`x-request-id` (both ways): the caller's id for a call, echoed in the trailing metadata.
`retry-after` (trailing, on RESOURCE_EXHAUSTED): seconds the caller should wait before it would
be admitted, as the server estimates it (see condgen.server.admission).
"""

REQUEST_ID_KEY = "x-request-id"
RETRY_AFTER_KEY = "retry-after"
