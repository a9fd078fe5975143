"""Transport security and authentication of the server.

TLS from PEM files (`--tls-cert`, `--tls-key`; with `--tls-client-ca` clients must present
a certificate signed by that CA: mutual TLS), and an optional bearer token
(`--auth-token-file`): every call but the health service must send the metadata
`authorization: Bearer <token>`, or it gets UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from condgen.errors import CondgenError

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class SecurityError(CondgenError, ValueError):
    """Security settings that cannot be used; the message says which file or flag."""


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise SecurityError(f"{what} file {path} does not exist")
    return Path(path).read_bytes()


@dataclass(frozen=True)
class SecurityConfig:
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    client_ca: bytes | None = None
    auth_token: str | None = None

    @classmethod
    def from_files(
        cls, cert: Path | None, key: Path | None, client_ca: Path | None, token_file: Path | None
    ) -> SecurityConfig:
        if (cert is None) != (key is None):
            raise SecurityError("--tls-cert and --tls-key go together: give both or neither")
        if client_ca is not None and cert is None:
            raise SecurityError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        token = _read(token_file, "auth token")
        token_text = token.decode().strip() if token is not None else None
        if token is not None and not token_text:
            raise SecurityError(f"auth token file {token_file} is empty")
        return cls(_read(cert, "TLS certificate"), _read(key, "TLS key"), _read(client_ca, "client CA"), token_text)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def interceptors(self, on_denied: Callable[[str, object], None] | None = None) -> list:
        """Server interceptors; `on_denied(method, context)` hears of every refused call."""
        return [TokenAuthInterceptor(self.auth_token, on_denied)] if self.auth_token else []


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the bearer token (UNAUTHENTICATED); health checks pass freely."""

    def __init__(self, token: str, on_denied: Callable[[str, object], None] | None = None):
        self._expected = f"Bearer {token}".encode()
        self._on_denied = on_denied or (lambda method, context: None)

    def _allowed(self, details) -> bool:
        if details.method.startswith(HEALTH_PREFIX):
            return True
        metadata = dict(details.invocation_metadata or ())
        return hmac.compare_digest(str(metadata.get("authorization", "")).encode(), self._expected)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._allowed(handler_call_details):
            return handler
        return _denying(handler, handler_call_details.method, self._on_denied)


def _denying(handler: grpc.RpcMethodHandler, method: str, on_denied) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call."""

    async def _deny(request, context):
        on_denied(method, context)
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong auth token: send metadata `authorization: Bearer <token>`",
        )

    async def _deny_stream(request, context):
        await _deny(request, context)
        yield  # pragma: no cover - never reached, makes this an async generator

    args = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny, **args)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, **args)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny, **args)
    return grpc.stream_stream_rpc_method_handler(_deny_stream, **args)
