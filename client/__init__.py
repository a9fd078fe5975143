"""condgen.client: Python client for the condgen gRPC API, with DataFrame output."""

from condgen.client.client import (
    AsyncClient,
    Client,
    GenerateError,
    IncompleteError,
    Record,
    TlsSettings,
    build_request,
)
from condgen.client.resume import RetryPolicy

__all__ = [
    "AsyncClient",
    "Client",
    "GenerateError",
    "IncompleteError",
    "Record",
    "RetryPolicy",
    "TlsSettings",
    "build_request",
]
