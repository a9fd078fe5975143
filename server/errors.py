"""Server errors and the one place that maps them to gRPC status codes.

Handlers raise these; `grpc_errors` (a decorator for unary and streaming handlers) turns
them into statuses: bad input INVALID_ARGUMENT, overload RESOURCE_EXHAUSTED, shutting down
UNAVAILABLE, anything else INTERNAL with the error logged under a request id.
"""
from __future__ import annotations

import functools
import inspect
import logging
import uuid

import grpc

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """The request is invalid; the message says which field, the limit and how to fix it."""


class Overloaded(RuntimeError):
    """The server's admission queue is full."""


class ShuttingDown(RuntimeError):
    """The server is draining and takes no new work."""


STATUS_FOR = {
    RequestError: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}


async def _abort(context, exc: Exception) -> None:
    for kind, code in STATUS_FOR.items():
        if isinstance(exc, kind):
            await context.abort(code, str(exc))
    request_id = uuid.uuid4().hex[:12]
    log.exception("request %s failed", request_id, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log")


def grpc_errors(handler):
    """Wrap an async handler (unary or server-streaming) so errors become gRPC statuses."""
    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self, request, context):
            try:
                async for item in handler(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never lost
                await _abort(context, exc)
        return stream

    @functools.wraps(handler)
    async def unary(self, request, context):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)
    return unary
