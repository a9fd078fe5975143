"""condgen.client: Python client for the condgen gRPC API, with DataFrame output."""
