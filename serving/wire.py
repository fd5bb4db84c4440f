"""Servicers registered with the project's own request deserializers.

    add_servicer(server, gpt2_deploy_pb2.DESCRIPTOR.services_by_name["Gpt2Deploy"], servicer,
                 max_request_bytes=16 << 20, trimmer=MemoryTrimmer())

The generated ``add_*Servicer_to_server`` functions hand grpcio ``Message.FromString`` as the
deserializer, so bytes protobuf cannot decode (garbage, a truncated message, invalid UTF-8 in a
string field) fail inside grpcio: INTERNAL and an ERROR traceback in the log before project code
runs. Here decoding never raises: an undecodable message arrives as ``Undecodable`` and the
handler refuses it with INVALID_ARGUMENT and a message (for a request stream, when the stream
reaches it), through the usual error mapping (``serving.grpc_errors``). A request above
``max_request_bytes`` is refused before protobuf decodes it, with RESOURCE_EXHAUSTED naming the
limit and the flag.

``MemoryTrimmer``: glibc keeps memory that grpcio's threads freed in per-thread arenas, so after a
burst of large requests the process's RSS stays high although nothing holds the data; the server
returns it to the system (``malloc_trim``, at most once a second) once a megabyte of requests has
gone through.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from serving.errors import InvalidInput, ResourceExhausted


class Undecodable:
    """A request message that could not be decoded, and why."""

    def __init__(self, type_name: str, size: int, error: Exception):
        self.type_name = type_name
        self.size = size
        self.error = error

    def refuse(self) -> Exception:
        if isinstance(self.error, ResourceExhausted):
            return self.error
        reason = str(self.error)[:200] or type(self.error).__name__
        return InvalidInput(
            f"the request is not a valid {self.type_name} message ({self.size} bytes; protobuf: {reason})"
        )


class MemoryTrimmer:
    """Counts large payloads; ``maybe_trim()`` (called periodically) hands freed heap back to the OS."""

    def __init__(self, threshold: int = 1 << 20):
        self.threshold = threshold
        self.pending = 0
        self.trims = 0
        libc = _glibc()
        self._trim = None if libc is None else libc.malloc_trim
        if libc is not None:
            # Large buffers (a received request is one) always in their own mapping, returned to the
            # OS when freed: glibc otherwise raises this threshold after the first large free and
            # serves later ones from the heap, which fragments and keeps RSS up.
            libc.mallopt(_M_MMAP_THRESHOLD, 256 << 10)

    def note(self, nbytes: int) -> None:
        self.pending += nbytes

    def maybe_trim(self) -> bool:
        if self._trim is None or self.pending < self.threshold:
            return False
        self.pending = 0
        gc.collect()  # request objects caught in reference cycles (exception tracebacks) go first
        self._trim(0)
        self.trims += 1
        return True


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _glibc() -> Any:
    """glibc (with malloc_trim and mallopt), or None where there is none (musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


def safe_deserializer(
    cls: Any, max_bytes: int | None = None, trimmer: MemoryTrimmer | None = None
) -> Callable[[bytes], Any]:
    """``cls.FromString`` that returns ``Undecodable`` instead of raising (or decoding too much)."""
    name = cls.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        if trimmer is not None:
            trimmer.note(len(data))
        if max_bytes is not None and len(data) > max_bytes:
            return Undecodable(
                name,
                len(data),
                ResourceExhausted(
                    f"the request has {len(data)} bytes; the server accepts requests of at most "
                    f"{max_bytes >> 20} MiB (gpt2-deploy serve --max-request-mb)"
                ),
            )
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as e:  # upb raises DecodeError; be broad on types
            return Undecodable(name, len(data), e)

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.refuse()
        yield request


def _guard(behavior: Callable, client_streaming: bool, server_streaming: bool) -> Callable:
    """``behavior`` refusing an Undecodable request before it sees it."""
    if client_streaming:
        if server_streaming:

            async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                async for response in behavior(_checked(requests), context):
                    yield response

            return stream_stream

        async def stream_unary(requests: Any, context: Any) -> Any:
            return await behavior(_checked(requests), context)

        return stream_unary
    if server_streaming:

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                raise request.refuse()
            async for response in behavior(request, context):
                yield response

        return unary_stream

    async def unary_unary(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            raise request.refuse()
        return await behavior(request, context)

    return unary_unary


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(
    server: grpc.aio.Server,
    service: Any,
    servicer: Any,
    *,
    max_request_bytes: int | None = None,
    trimmer: MemoryTrimmer | None = None,
) -> None:
    """Register every method of ``service`` (a ServiceDescriptor) on ``servicer`` with safe decoding.

    Only coroutine methods are registered: a method left to the generated base class (a plain
    function that says UNIMPLEMENTED) stays unregistered, which grpcio answers UNIMPLEMENTED too.
    """
    handlers = {}
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            continue
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        key = (method.client_streaming, method.server_streaming)
        handlers[method.name] = _FACTORIES[key](
            _guard(behavior, *key),
            request_deserializer=safe_deserializer(request_cls, max_request_bytes, trimmer),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
