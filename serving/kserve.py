"""KServe v2 / Triton ``inference.GRPCInferenceService`` over a ``ModelRuntime``.

Two models are served, so an unmodified ``tritonclient.grpc`` client works against them:

    <name>            one forward:   input_ids INT64 [B, S], optional attention_mask INT64 [B, S]
                                     -> logits FP32 [B, S, vocab]
    <name>-generate   generation, following Triton's LLM models:
                                     text_input BYTES [1], max_tokens INT32 [1], optional
                                     temperature FP32, top_k INT32, top_p FP32,
                                     random_seed UINT64 (or INT64), stream BOOL
                                     -> text_output BYTES [1]

``<name>-generate`` is decoupled when ``stream`` is true: over ModelStreamInfer each decoded step
is one response (its text delta) with the parameter ``triton_final_response`` false, and a last
response carries the remaining text, ``finish_reason`` and ``completion_tokens`` with
``triton_final_response`` true. Without ``stream``, one response holds the whole text. Sampling
is on when temperature, top_k or top_p is given (temperature 0 means greedy); random_seed alone
does not switch it on.

Outputs go in ``raw_output_contents``. Inputs are accepted as ``raw_input_contents`` (what
tritonclient sends) or as typed ``contents``. Errors: per-request errors of ModelStreamInfer are
reported in-stream (``error_message``, the stream stays open), as Triton does; the unary RPCs
raise ``serving.errors`` that ``serving.grpc_errors`` maps to status codes.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from export.contract import ATTENTION_MASK, INPUT_IDS, LOGITS
from serving.errors import InvalidInput, NotFound, quote, quote_list
from serving.generation import FinalEvent, GenerationRequest, remaining_text
from serving.grpc_errors import status_for
from serving.metrics import ServerMetrics
from serving.proto import grpc_service_pb2 as pb
from serving.proto import grpc_service_pb2_grpc as pb_grpc
from serving.runtime import ModelRuntime
from serving.sampling import SamplingParams

GENERATE_SUFFIX = "-generate"
MAX_TENSORS = 16  # inputs (and requested outputs) per request: the models take at most 7
MAX_DIMS = 8
# Parameters of the protocol this server reads or that Triton defines, and the types they must have.
PARAMETER_TYPES = {
    "priority": ("int64_param", "uint64_param"),
    "timeout": ("int64_param", "uint64_param"),
    "binary_data_output": ("bool_param",),
    "binary_data_size": ("int64_param", "uint64_param"),
    "sequence_start": ("bool_param",),
    "sequence_end": ("bool_param",),
}
MODEL_VERSION = "1"
FINAL_RESPONSE = "triton_final_response"
DEFAULT_MAX_TOKENS = 16

# Protocol datatype -> numpy dtype (little-endian on the wire) and the typed-contents field.
DATATYPES: dict[str, tuple[Any, str | None]] = {
    "BOOL": (np.bool_, "bool_contents"),
    "UINT8": (np.uint8, "uint_contents"),
    "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"),
    "UINT64": (np.uint64, "uint64_contents"),
    "INT8": (np.int8, "int_contents"),
    "INT16": (np.int16, "int_contents"),
    "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"),
    "FP16": (np.float16, None),
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
    "BYTES": (np.object_, "bytes_contents"),
}


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output of a served model: what ModelMetadata says and validation accepts."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 = variable
    accepts: tuple[str, ...] = ()  # datatypes accepted besides ``datatype``
    required: bool = True

    def describe(self) -> str:
        dts = "|".join((self.datatype, *self.accepts))
        opt = "" if self.required else "optional "
        return f"{opt}{self.name} {dts} {list(self.shape)}"


# --- tensor (de)serialization ----------------------------------------------------------------
def deserialize_bytes(raw: bytes) -> list[bytes]:
    """Split a BYTES tensor's raw content: each element is a 4-byte LE length + the bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidInput(
                f"malformed BYTES content: {len(raw) - i} trailing byte(s) where a "
                "4-byte length prefix was expected"
            )
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise InvalidInput(f"malformed BYTES content: element of {n} bytes but only {len(raw) - i} left")
        out.append(raw[i : i + n])
        i += n
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def element_count(shape: tuple[int, ...] | list[int]) -> int:
    """Elements of a shape, in Python integers (numpy's product overflows for [2**32, 2**32])."""
    return math.prod(int(d) for d in shape)


def decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    """The input as a numpy array of its shape (BYTES -> object array of bytes).

    The shape and datatype were validated (``KServeServicer._inputs``): the count is bounded.
    """
    dt, field = DATATYPES[tensor.datatype]
    shape = tuple(int(d) for d in tensor.shape)
    count = element_count(shape)
    name = quote(tensor.name)
    if tensor.datatype == "BYTES":
        items = deserialize_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
        if len(items) != count:
            raise InvalidInput(
                f"input {name}: shape {list(shape)} needs {count} element(s), got {len(items)}"
            )
        arr = np.empty(count, dtype=np.object_)
        arr[:] = items
        return arr.reshape(shape)
    if raw is not None:
        itemsize = np.dtype(dt).itemsize
        if len(raw) != count * itemsize:
            raise InvalidInput(
                f"input {name}: shape {list(shape)} of {tensor.datatype} needs {count * itemsize} bytes, "
                f"got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=np.dtype(dt).newbyteorder("<")).astype(dt).reshape(shape)
    if field is None:
        raise InvalidInput(f"input {name}: {tensor.datatype} data must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input {name}: shape {list(shape)} needs {count} element(s), got {len(values)} in "
            f"contents.{field}"
        )
    return np.asarray(values, dtype=dt).reshape(shape)


def output_tensor(
    name: str, array: np.ndarray, datatype: str
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """An output's metadata and its raw content."""
    if datatype == "BYTES":
        raw = serialize_bytes([x if isinstance(x, bytes) else str(x).encode() for x in array.ravel()])
    else:
        dt = np.dtype(DATATYPES[datatype][0]).newbyteorder("<")
        raw = np.ascontiguousarray(array, dtype=dt).tobytes()
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(array.shape)), raw


# --- the servicer ----------------------------------------------------------------------------
class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 over one runtime.

    Args:
        runtime: What is served.
        metrics: For errors reported in-stream (the interceptor counts the others).
    """

    def __init__(self, runtime: ModelRuntime, metrics: ServerMetrics | None = None):
        self.runtime = runtime
        self.metrics = metrics
        self.forward_model = runtime.name
        self.generate_model = runtime.name + GENERATE_SUFFIX
        vocab = runtime.bundle.dims.vocab_size
        self.specs: dict[str, tuple[list[TensorMetadata], list[TensorMetadata]]] = {
            self.forward_model: (
                [
                    TensorMetadata(INPUT_IDS, "INT64", (-1, -1)),
                    TensorMetadata(ATTENTION_MASK, "INT64", (-1, -1), required=False),
                ],
                [TensorMetadata(LOGITS, "FP32", (-1, -1, vocab))],
            ),
            self.generate_model: (
                [
                    TensorMetadata("text_input", "BYTES", (1,)),
                    TensorMetadata("max_tokens", "INT32", (1,), ("INT64",)),
                    TensorMetadata("temperature", "FP32", (1,), ("FP64",), required=False),
                    TensorMetadata("top_k", "INT32", (1,), ("INT64",), required=False),
                    TensorMetadata("top_p", "FP32", (1,), ("FP64",), required=False),
                    TensorMetadata("random_seed", "UINT64", (1,), ("INT64",), required=False),
                    TensorMetadata("stream", "BOOL", (1,), required=False),
                ],
                [TensorMetadata("text_output", "BYTES", (1,))],
            ),
        }
        # Per model, what validating a request looks up: inputs by name, their description, output names.
        self._lookup = {
            model: ({s.name: s for s in ins}, ", ".join(s.describe() for s in ins), {s.name for s in outs})
            for model, (ins, outs) in self.specs.items()
        }

    @property
    def models(self) -> list[str]:
        return list(self.specs)

    # --- health and metadata -------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    async def ModelReady(self, request, context):
        self._model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.runtime.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="gpt2-deploy", version=_server_version(), extensions=[])

    async def ModelMetadata(self, request, context):
        name = self._model(request.name, request.version)
        inputs, outputs = self.specs[name]
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=name,
            versions=[MODEL_VERSION],
            platform=f"gpt2-deploy_{self.runtime.backend.name}",
            inputs=[meta(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in inputs],
            outputs=[meta(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in outputs],
        )

    # --- inference -----------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        name = self._model(request.model_name, request.model_version)
        inputs = self._inputs(name, request)
        if name == self.forward_model:
            return await self._forward(request, inputs)
        if _scalar(inputs, "stream", False):
            raise InvalidInput(
                f"stream=true needs ModelStreamInfer (decoupled responses); "
                f"ModelInfer on {name!r} returns the whole text with stream=false"
            )
        final = None
        async for event in self.runtime.generate(self._generation_request(inputs)):
            if isinstance(event, FinalEvent):
                final = event
        return self._text_response(request, final.text, final)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            try:
                async for response in self._stream_one(request):
                    yield response
            except Exception as exc:  # noqa: BLE001 - reported in-stream, the stream stays open
                code, message = status_for(exc, "/inference.GRPCInferenceService/ModelStreamInfer")
                if self.metrics is not None:
                    self.metrics.error("/inference.GRPCInferenceService/ModelStreamInfer", code.name)
                yield pb.ModelStreamInferResponse(
                    error_message=f"{code.name}: {message}",
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version, id=request.id
                    ),
                )

    async def _stream_one(self, request) -> AsyncIterator[pb.ModelStreamInferResponse]:
        name = self._model(request.model_name, request.model_version)
        inputs = self._inputs(name, request)
        if name == self.forward_model:
            response = await self._forward(request, inputs)
            response.parameters[FINAL_RESPONSE].bool_param = True
            yield pb.ModelStreamInferResponse(infer_response=response)
            return
        stream = bool(_scalar(inputs, "stream", False))
        streamed = ""
        async for event in self.runtime.generate(self._generation_request(inputs)):
            if isinstance(event, FinalEvent):
                text = remaining_text(event.text, streamed) if stream else event.text
                yield pb.ModelStreamInferResponse(infer_response=self._text_response(request, text, event))
            elif stream:
                streamed += event.text
                response = self._text_response(request, event.text, None)
                yield pb.ModelStreamInferResponse(infer_response=response)

    # --- helpers -------------------------------------------------------------------------------
    def _model(self, name: str, version: str) -> str:
        if name not in self.specs:
            raise NotFound(f"unknown model {quote(name)}; available models: {', '.join(self.specs)}")
        if version not in ("", MODEL_VERSION):
            raise NotFound(
                f"model {name!r} has no version {quote(version)}; available versions: {MODEL_VERSION}"
            )
        return name

    def _inputs(self, model: str, request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
        """Validate names, then datatypes and shapes, then contents of a request's inputs; decode.

        Enforces the protocol rules the decoding relies on: one of raw or typed contents per
        input, shape x datatype size == bytes, BYTES framing, known parameter types; and bounds
        the work before it starts (tensor count, dimensions, element count against the message).
        """
        specs = self.specs[model][0]
        by_name, expected, out_names = self._lookup[model]
        problems: list[str] = []
        if len(request.inputs) > MAX_TENSORS or len(request.outputs) > MAX_TENSORS:
            raise InvalidInput(
                f"model {model!r}: {len(request.inputs)} inputs and {len(request.outputs)} requested "
                f"outputs; at most {MAX_TENSORS} of each are accepted. Expected inputs: {expected}"
            )
        names = [t.name for t in request.inputs]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            problems.append(f"unknown input(s) {quote_list(unknown)}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"input(s) given more than once: {quote_list(dupes)}")
        missing = [s.name for s in specs if s.required and s.name not in names]
        if missing:
            problems.append(f"missing required input(s) {missing}")
        bad_outputs = [o.name for o in request.outputs if o.name not in out_names]
        if bad_outputs:
            problems.append(
                f"unknown requested output(s) {quote_list(bad_outputs)} (outputs: {sorted(out_names)})"
            )
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            problems.append(
                f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} "
                "inputs; send raw contents for every input or for none"
            )
        problems += _parameter_problems("request", request.parameters)
        if problems:
            raise InvalidInput(f"model {model!r}: " + "; ".join(problems) + f". Expected inputs: {expected}")

        max_bytes = max(request.ByteSize(), 1)  # no tensor holds more than the message carried
        for t in request.inputs:
            spec = by_name[t.name]
            allowed = (spec.datatype, *spec.accepts)
            name = quote(t.name)
            if t.datatype not in allowed:
                problems.append(
                    f"input {name} has datatype {quote(t.datatype)}; expected {' or '.join(allowed)}"
                )
            if len(t.shape) > MAX_DIMS:
                problems.append(f"input {name} has {len(t.shape)} dimensions; at most {MAX_DIMS}")
            elif any(d < 0 for d in t.shape):
                problems.append(f"input {name} has shape {list(t.shape)}; dimensions must be >= 0")
            elif -1 in spec.shape and len(t.shape) != len(spec.shape):
                problems.append(
                    f"input {name} has shape {list(t.shape)}; expected "
                    f"{len(spec.shape)} dimensions {list(spec.shape)} (-1 = any size)"
                )
            elif -1 not in spec.shape and element_count(t.shape) != element_count(spec.shape):
                problems.append(
                    f"input {name} has shape {list(t.shape)}; expected {list(spec.shape)} "
                    "(one request at a time)"
                )
            elif element_count(t.shape) > max_bytes:  # >= 1 byte per element (BYTES: 4 for the length)
                problems.append(
                    f"input {name} has shape {list(t.shape)} = {element_count(t.shape)} elements, more than "
                    f"the {max_bytes} bytes the request carries could hold"
                )
            typed = t.contents.ByteSize() > 0
            if raw and typed:
                problems.append(
                    f"input {name} has both raw_input_contents and typed contents; the protocol "
                    "allows one or the other"
                )
            elif not raw and not typed and element_count(t.shape) > 0 and t.datatype in allowed:
                problems.append(f"input {name} has no data (neither raw_input_contents nor contents)")
            problems += _parameter_problems(f"input {name}", t.parameters)
        if problems:
            raise InvalidInput(f"model {model!r}: " + "; ".join(problems))
        return {t.name: decode_input(t, raw[i] if raw else None) for i, t in enumerate(request.inputs)}

    async def _forward(
        self, request: pb.ModelInferRequest, inputs: dict[str, np.ndarray]
    ) -> pb.ModelInferResponse:
        ids = inputs[INPUT_IDS]
        mask = inputs.get(ATTENTION_MASK)
        problems = []
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            problems.append(f"input_ids has shape {list(ids.shape)}; batch and sequence must be >= 1")
        if mask is not None:
            if mask.shape != ids.shape:
                problems.append(
                    f"attention_mask has shape {list(mask.shape)}; expected the shape of "
                    f"input_ids {list(ids.shape)}"
                )
            elif mask.size and not np.isin(mask, (0, 1)).all():
                problems.append("attention_mask values must be 0 (padding) or 1 (token)")
            elif mask.size and not mask.any(axis=1).all():
                problems.append("every attention_mask row needs at least one 1")
        if problems:
            raise InvalidInput(f"model {self.forward_model!r}: " + "; ".join(problems))
        # Token ids and the context length are checked by the runtime (InvalidInput/OutOfRange).
        logits = await self.runtime.forward(ids, mask)
        meta, raw = output_tensor(LOGITS, logits, "FP32")
        return pb.ModelInferResponse(
            model_name=request.model_name,
            model_version=MODEL_VERSION,
            id=request.id,
            outputs=[meta],
            raw_output_contents=[raw],
        )

    def _generation_request(self, inputs: dict[str, np.ndarray]) -> GenerationRequest:
        raw_text = inputs["text_input"].ravel()[0]
        self.runtime.check_prompt_size(len(raw_text))
        try:
            text = raw_text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"text_input must be UTF-8 text: {e}") from None
        sampled = [k for k in ("temperature", "top_k", "top_p") if k in inputs]
        seed = _scalar(inputs, "random_seed", None)
        sampling = SamplingParams(
            temperature=float(_scalar(inputs, "temperature", 1.0)),
            top_k=int(_scalar(inputs, "top_k", 0)),
            top_p=float(_scalar(inputs, "top_p", 1.0)),
            seed=None if seed is None else int(seed),
            do_sample=bool(sampled),
        )
        return GenerationRequest(
            prompt_ids=self.runtime.encode(text),
            max_new_tokens=int(_scalar(inputs, "max_tokens", DEFAULT_MAX_TOKENS)),
            sampling=sampling,
        )

    def _text_response(
        self, request: pb.ModelInferRequest, text: str, final: FinalEvent | None
    ) -> pb.ModelInferResponse:
        meta = pb.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=[1])
        response = pb.ModelInferResponse(
            model_name=request.model_name,
            model_version=MODEL_VERSION,
            id=request.id,
            outputs=[meta],
            raw_output_contents=[serialize_bytes([text.encode("utf-8")])],
        )
        response.parameters[FINAL_RESPONSE].bool_param = final is not None
        if final is not None:
            response.parameters["finish_reason"].string_param = final.finish_reason
            response.parameters["prompt_tokens"].int64_param = final.prompt_tokens
            response.parameters["completion_tokens"].int64_param = final.completion_tokens
        return response


@functools.cache
def _server_version() -> str:
    try:
        return metadata.version("gpt2-deploy")
    except metadata.PackageNotFoundError:
        return "unknown"


def _parameter_problems(where: str, parameters: Any) -> list[str]:
    """Known parameters with the wrong type (unknown ones are extensions: ignored)."""
    problems = []
    if len(parameters) > MAX_TENSORS * 4:
        return [f"{where} has {len(parameters)} parameters; at most {MAX_TENSORS * 4}"]
    for key, value in parameters.items():
        allowed = PARAMETER_TYPES.get(key)
        kind = value.WhichOneof("parameter_choice")
        if allowed is not None and kind not in allowed:
            problems.append(
                f"{where} parameter {key!r} is {kind or 'unset'}; expected {' or '.join(allowed)}"
            )
    return problems


def _scalar(inputs: dict[str, np.ndarray], name: str, default: Any) -> Any:
    a = inputs.get(name)
    return default if a is None else a.ravel()[0].item()
