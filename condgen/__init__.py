"""condgen: grow a labelled text dataset with synthetic `intent,text` records.

Shared by every part: the record codec (`condgen.codec`), the bundle manifest
(`condgen.bundle`) and the generated gRPC stubs (`condgen.v1`).
"""

__version__ = "0.1.0"
