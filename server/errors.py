"""Server errors and the one place that maps them to gRPC status codes.

Handlers raise these; `grpc_errors` (a decorator for unary and streaming handlers) turns
them into statuses: bad input INVALID_ARGUMENT, overload RESOURCE_EXHAUSTED (with a
`retry-after` hint in the trailing metadata when the server has an estimate), shutting down
UNAVAILABLE, anything else INTERNAL with the error logged under the call's request id.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging

import grpc

from condgen.metadata import RETRY_AFTER_KEY

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """The request is invalid; the message says which field, the limit and how to fix it."""


class Overloaded(RuntimeError):
    """The server's admission queue is full, or the request would not be served before its
    caller's deadline; `retry_after` (seconds), when known, goes to the caller as a hint."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(RuntimeError):
    """The server is draining and takes no new work."""


STATUS_FOR = {
    RequestError: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for `exc`."""
    for kind, code in STATUS_FOR.items():
        if isinstance(exc, kind):
            return code, str(exc)
    log.error("request %s failed", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log"


def _hint_retry_after(exc: Exception, call) -> None:
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(exc, Overloaded) and retry_after is not None:
        call.add_trailing(RETRY_AFTER_KEY, f"{retry_after:.2f}")


def _final_code(context) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _cancelled_code(context) -> grpc.StatusCode:
    """A handler cancelled by gRPC: the caller's deadline passed, or the caller went away."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


def grpc_errors(handler):
    """Wrap an async handler (unary or server-streaming) of a servicer with a `telemetry`
    attribute: errors become gRPC statuses, and every call is tracked (request id, metrics,
    log line) through to its final status."""
    method = handler.__name__
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self, request, context):
            call = self.telemetry.track(method, request, context)
            try:
                async for item in handler(self, request, context):
                    call.sent(item)
                    yield item
                call.end(grpc.StatusCode.OK)
            except grpc.aio.AbortError:
                call.end(_final_code(context))
                raise
            except (GeneratorExit, asyncio.CancelledError):
                call.end(_cancelled_code(context))
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never lost
                code, message = status_for(exc, call.request_id)
                _hint_retry_after(exc, call)
                call.end(code, message)
                await context.abort(code, message)

        return stream

    @functools.wraps(handler)
    async def unary(self, request, context):
        call = self.telemetry.track(method, request, context)
        try:
            response = await handler(self, request, context)
        except grpc.aio.AbortError:
            call.end(_final_code(context))
            raise
        except asyncio.CancelledError:
            call.end(_cancelled_code(context))
            raise
        except Exception as exc:  # noqa: BLE001
            code, message = status_for(exc, call.request_id)
            _hint_retry_after(exc, call)
            call.end(code, message)
            await context.abort(code, message)
        call.end(grpc.StatusCode.OK)
        return response

    return unary
