"""The one place that turns exceptions into gRPC status codes.

Servicers raise domain errors (``serving.errors``) and never call ``context.abort`` themselves.
``ErrorInterceptor`` wraps every handler (unary, server-streaming, client- and bidi-streaming)
and maps:

    serving.errors.InvalidInput          -> INVALID_ARGUMENT
    serving.errors.OutOfRange            -> OUT_OF_RANGE
    serving.errors.NotFound              -> NOT_FOUND
    serving.errors.Unavailable           -> UNAVAILABLE
    serving.errors.BackendUnavailable    -> FAILED_PRECONDITION
    export.deps.MissingDependencyError   -> FAILED_PRECONDITION
    export.manifest.BundleError          -> FAILED_PRECONDITION

with the error's own message. Anything else is a bug: the client gets INTERNAL with a generic
message and an incident id, the traceback goes to the server log only. Streams that report
errors in-band (KServe ``ModelStreamInfer``) use ``status_for`` to build the same message.
The interceptor is a ``grpc.aio`` one: handlers are coroutines and async generators.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from export.deps import MissingDependencyError
from export.manifest import BundleError
from serving.errors import ServingError

log = logging.getLogger("serving.grpc")

INTERNAL_MESSAGE = "internal server error (incident {incident}); details are in the server log"


def status_for(exc: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message for ``exc``; logs unexpected errors in full."""
    if isinstance(exc, ServingError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        return code, str(exc)
    if isinstance(exc, (MissingDependencyError, BundleError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    incident = uuid.uuid4().hex[:12]
    log.error(
        "unexpected error in %s (incident %s)",
        method or "a handler",
        incident,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(incident=incident)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Map exceptions escaping any handler to status codes; count requests and errors.

    Args:
        on_request: Called with the full method name when a call starts (metrics).
        on_error: Called with (method, status code name) when a call ends in an error.
    """

    def __init__(
        self,
        on_request: Callable[[str], None] | None = None,
        on_error: Callable[[str, str], None] | None = None,
    ):
        self._on_request = on_request or (lambda method: None)
        self._on_error = on_error or (lambda method, code: None)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method))
        return handler

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
        code, message = status_for(exc, method)
        self._on_error(method, code.name)
        await context.abort(code, message)

    def _wrap_unary(self, behavior: Callable, method: str) -> Callable:
        async def wrapper(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            self._on_request(method)
            try:
                return await behavior(request_or_iterator, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the mapping point
                await self._abort(context, exc, method)

        return wrapper

    def _wrap_stream(self, behavior: Callable, method: str) -> Callable:
        if not inspect.isasyncgenfunction(behavior):  # a coroutine that writes with context.write
            return self._wrap_unary(behavior, method)

        async def wrapper(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            self._on_request(method)
            try:
                async for response in behavior(request_or_iterator, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the mapping point
                await self._abort(context, exc, method)

        return wrapper
