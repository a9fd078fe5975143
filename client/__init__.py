"""condgen.client: Python client for the condgen gRPC API, with DataFrame output."""
from condgen.client.client import AsyncClient, Client, GenerateError, Record, build_request

__all__ = ["AsyncClient", "Client", "GenerateError", "Record", "build_request"]
