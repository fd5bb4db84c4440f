"""Domain errors of the serving stage. ``serving.grpc_errors`` maps each to one gRPC status code.

Raise these with a message that says what was seen and what is allowed; never a bare ValueError
from code a client can reach.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class; ``code`` names the gRPC status the error maps to."""

    code = "INTERNAL"


class InvalidInput(ServingError):
    """The request is malformed: bad token ids, sampling values, tensor names/dtypes/shapes."""

    code = "INVALID_ARGUMENT"


class OutOfRange(ServingError):
    """The request asks past a limit: prompt + max_new_tokens beyond the context length."""

    code = "OUT_OF_RANGE"


class NotFound(ServingError):
    """Unknown model name (KServe) or similar."""

    code = "NOT_FOUND"


class Unavailable(ServingError):
    """The server cannot take this request now; retrying later may work.

    Raised while the model loads or shuts down, while every KV cache the backend can hold is in
    use (the admission limit), and for inference requests while the server is NOT_SERVING after
    a failed startup parity canary (``--parity warn``; the message carries the canary summary).
    """

    code = "UNAVAILABLE"


class ResourceExhausted(ServingError):
    """A limit of the server is reached: the request queue is full, or memory ran out in a step."""

    code = "RESOURCE_EXHAUSTED"


class BackendUnavailable(ServingError):
    """A backend cannot run here: missing package, provider or device; or an incompatible engine."""

    code = "FAILED_PRECONDITION"


class Cancelled(ServingError):
    """The client cancelled (or went away) while the work ran; the work stopped early."""

    code = "CANCELLED"


QUOTE_CHARS = 64  # client-supplied text quoted in an error message is cut to this
QUOTE_ITEMS = 5  # and lists of it to this many items


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message never echoes a client's input
    unbounded (status details beyond the client's metadata limit arrive as RESOURCE_EXHAUSTED)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def quote_list(values: list, limit: int = QUOTE_ITEMS) -> str:
    """The first ``limit`` items, quoted, and how many more."""
    head = ", ".join(quote(v) for v in values[:limit])
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return f"[{head}{more}]"
