"""Property-based fuzzing (hypothesis) of the runner's request handling against one real server.

Random Generate, Score, ModelInfer and ModelStreamInfer requests (valid ones, invalid field
combinations, extreme numbers, odd shapes and datatypes, empty / huge / unicode strings, repeated
fields, unknown tensor names, mismatched raw contents) and mutated wire bytes go to one server on a
real port. Properties: no request gets UNKNOWN or INTERNAL (or any code a bad input must not get);
every error has a non-empty message under 4 KB; requests built to be valid succeed with a
well-formed answer; no warning (an overflow, a NaN) comes from serving/ code; nothing is logged
at ERROR; no scheduler row is left behind; health stays SERVING.

    HYPOTHESIS_PROFILE=ci    (default) derandomized, a bounded number of examples: `make test`
    HYPOTHESIS_PROFILE=fuzz  `make fuzz`: FUZZ_EXAMPLES (default 2000) random examples per test;
                             failing examples are kept in .pytest_cache/hypothesis and replayed first
"""

from __future__ import annotations

import functools
import logging
import math
import os
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from serving.kserve import DATATYPES, FINAL_RESPONSE, serialize_bytes
from serving.proto import gpt2_deploy_pb2 as pb
from serving.proto import gpt2_deploy_pb2_grpc as pb_grpc
from serving.proto import grpc_service_pb2 as kpb
from serving.proto import grpc_service_pb2_grpc as kgrpc
from serving.sampling import MIN_TEMPERATURE
from serving.server import ServeOptions, build_server

ROOT = Path(__file__).resolve().parents[2]
_COMMON = {
    "deadline": None,  # one example is a real RPC: its time depends on the (shared) machine
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,  # a failure prints @reproduce_failure(...) to replay it exactly
}
settings.register_profile("ci", max_examples=60, derandomize=True, database=None, **_COMMON)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2000")),
    database=DirectoryBasedExampleDatabase(str(ROOT / ".pytest_cache" / "hypothesis")),
    **_COMMON,
)
PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
OUTCOMES: Counter = Counter()  # of the running test; printed per test by the fuzz profile

# What a bad input may get; anything else (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED = a hang, ...) is a bug.
BAD_INPUT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}
MAX_DETAILS = 4096  # bytes of an error message
TIMEOUT_S = 60.0  # per call: far above any bounded request on the tiny model

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
TOP_P_MIN = float(np.float32(0.01))  # hypothesis wants float32 bounds exact
TEMPERATURE_MIN = float(np.float32(MIN_TEMPERATURE))
GENERATE = "/gpt2_deploy.v1.Gpt2Deploy/Generate"
SCORE = "/gpt2_deploy.v1.Gpt2Deploy/Score"
MODEL_INFO = "/gpt2_deploy.v1.Gpt2Deploy/ModelInfo"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


def _examples(weight: float = 1.0) -> settings:
    return settings(PROFILE, max_examples=max(1, int(PROFILE.max_examples * weight)))


# --- the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_bundle):
    opts = ServeOptions(bundle=tiny_bundle.root, port=0, threads=1, parity="off", grace_s=2.0)
    with build_server(opts) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        yield ch


@pytest.fixture
def no_errors_logged(caplog, server, channel):
    """After the test: nothing logged at ERROR, no scheduler row left, health SERVING."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(r.getMessage() for r in errors[:5])
    deadline = time.monotonic() + 10
    while server.runtime.scheduler.active_rows() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.runtime.scheduler.active_rows() == 0, "rows were left in the scheduler"
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def served(no_errors_logged, recwarn, request, capsys):
    """A decorator for an example: no warning from serving/ code (an overflow, a NaN) while it ran."""
    OUTCOMES.clear()

    def watch(fn: Callable[[Shown], None]) -> Callable[[Shown], None]:
        @functools.wraps(fn)
        def example(case: Shown) -> None:
            n = len(recwarn.list)
            fn(case)
            new = [w for w in recwarn.list[n:] if f"{os.sep}serving{os.sep}" in w.filename]
            assert not new, (
                f"{new[0].category.__name__} at {new[0].filename}:{new[0].lineno}: {new[0].message}\n"
                f"request: {case!r}"
            )

        return example

    yield watch
    if PROFILE_NAME != "ci":
        with capsys.disabled():
            print(f"\n{request.node.name}: " + ", ".join(f"{k} {n}" for k, n in OUTCOMES.most_common()))


def check_error(e: grpc.RpcError, what: object) -> None:
    code, details = e.code(), e.details() or ""
    OUTCOMES[code.name] += 1
    assert code in BAD_INPUT_CODES, f"{code.name}: {details[:500]!r}\nrequest: {_show(what)}"
    assert details.strip(), f"{code.name} without a message\nrequest: {_show(what)}"
    assert len(details.encode()) < MAX_DETAILS, f"{code.name}: {len(details)} chars\nrequest: {_show(what)}"


def check_in_stream_error(message: str, what: object) -> None:
    """A ModelStreamInfer error_message: "<CODE>: <message>"."""
    name, _, text = message.partition(": ")
    OUTCOMES[f"in-stream {name}"] += 1
    assert name in {c.name for c in BAD_INPUT_CODES}, f"{message[:500]!r}\nrequest: {_show(what)}"
    assert text.strip() and len(message.encode()) < MAX_DETAILS, f"{message[:500]!r}\nrequest: {_show(what)}"


def answered_or_refused(call: Callable, request: object, check: Callable) -> None:
    """``call(request)`` either answers (``check(request, answer)``) or refuses as a bad input may."""
    try:
        response = call(request)
    except grpc.RpcError as e:
        check_error(e, request)
    else:
        check(request, response)


def answered(call: Callable, request: object) -> object:
    """``call(request)`` for a request built to be valid: it must succeed."""
    try:
        return call(request)
    except grpc.RpcError as e:
        raise AssertionError(f"a valid request failed: {e.code().name}: {e.details()}\n{request}") from None


def _show(what: object, limit: int = 3000) -> str:
    text = repr(what) if isinstance(what, (bytes, list, tuple)) else str(what)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class Shown:
    """An example whose repr (what hypothesis prints for a failure) is cut to a readable size."""

    def __init__(self, value: object):
        self.value = value

    def __repr__(self) -> str:
        return _show(self.value)


def shown(strategy: st.SearchStrategy) -> st.SearchStrategy[Shown]:
    return strategy.map(Shown)


# --- values ----------------------------------------------------------------------------------
def ints(lo: int, hi: int, small: tuple[int, int] = (0, 8)) -> st.SearchStrategy[int]:
    """Integers in [lo, hi]: mostly small, often the edges, sometimes anywhere."""
    edges = sorted(
        e for e in {lo, hi, lo + 1, hi - 1, -1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**53 + 1} if lo <= e <= hi
    )
    return st.one_of(st.integers(*small), st.sampled_from(edges), st.integers(lo, hi))


def floats32() -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, 1.0, 1e-45, -1e-45, 1e-38, 3.4028234e38, -3.4028234e38, 100.0, 100.00001, 1.0000001]
    return st.one_of(
        st.floats(0, 2, width=32),
        st.sampled_from(edges + [float("nan"), float("inf"), -float("inf")]),
        st.floats(width=32),
    )


def floats64() -> st.SearchStrategy[float]:
    edges = [5e-324, -5e-324, 1e-310, 1e-300, 1.7976931348623157e308]  # subnormal, tiny, largest
    return st.one_of(floats32(), st.sampled_from(edges), st.floats())


LONG = [300, 5000, 100_000, 1 << 20]  # 1 Mi of a 4-byte character is above the 4 MiB request limit


def texts(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=max_size),
        st.sampled_from(["", " ", "\x00", "\ufffd", "Hello, my name is", "\u202e\u0301", "😀" * 20]),
        st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "😀", " ", "\n"]), st.sampled_from(LONG)),
    )


def token_lists(vocab: int, context: int) -> st.SearchStrategy[list[int]]:
    return st.one_of(
        st.lists(ints(*INT64, small=(0, vocab + 2)), max_size=24),
        st.lists(st.integers(0, vocab - 1), min_size=context - 3, max_size=context + 3),
        st.builds(lambda n: [1] * n, st.sampled_from([0, 100_000])),
    )


def valid_text() -> st.SearchStrategy[str]:
    return st.text(min_size=1, max_size=30)  # <= 120 UTF-8 bytes: <= 120 tokens of the 256 context


# --- our API ---------------------------------------------------------------------------------
@st.composite
def sampling(draw, valid: bool = False) -> pb.SamplingParams:
    s = pb.SamplingParams(do_sample=draw(st.booleans()))
    if valid:
        values = {
            "temperature": st.one_of(st.just(0.0), st.floats(TEMPERATURE_MIN, 2, width=32)),
            "top_k": st.integers(0, 100),
            "top_p": st.floats(TOP_P_MIN, 1.0, width=32),
            "seed": st.integers(0, UINT64_MAX),
        }
    else:
        values = {
            "temperature": floats32(),
            "top_k": ints(*INT32, small=(0, 60000)),
            "top_p": floats32(),
            "seed": ints(0, UINT64_MAX),
        }
    for field, values_of in values.items():
        if draw(st.booleans()):
            setattr(s, field, draw(values_of))
    return s


@st.composite
def generate_requests(draw, vocab: int, context: int) -> pb.GenerateRequest:
    r = pb.GenerateRequest()
    prompt = draw(st.sampled_from(["text", "token_ids", "none"]))
    if prompt == "text":
        r.text = draw(texts())
    elif prompt == "token_ids":
        r.token_ids.ids.extend(draw(token_lists(vocab, context)))
    if draw(st.booleans()):
        r.max_new_tokens = draw(ints(*INT32, small=(-1, 8)))
    if draw(st.booleans()):
        r.sampling.CopyFrom(draw(sampling()))
    r.stop_token_ids.extend(draw(st.lists(ints(*INT64, small=(0, vocab + 1)), max_size=70)))
    r.stop_strings.extend(
        draw(st.lists(st.one_of(texts(8), st.text(min_size=250, max_size=260)), max_size=20))
    )
    r.ignore_eos = draw(st.booleans())
    return r


@st.composite
def valid_generate_requests(draw, vocab: int) -> pb.GenerateRequest:
    r = pb.GenerateRequest(max_new_tokens=draw(st.integers(1, 8)), ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        r.text = draw(valid_text())
    else:
        r.token_ids.ids.extend(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=32)))
    r.sampling.CopyFrom(draw(sampling(valid=True)))
    r.stop_token_ids.extend(draw(st.lists(st.integers(0, vocab - 1), max_size=4)))
    r.stop_strings.extend(draw(st.lists(st.text(min_size=1, max_size=8), max_size=3)))
    return r


@st.composite
def score_requests(draw, vocab: int, context: int) -> pb.ScoreRequest:
    r = pb.ScoreRequest(top_k=draw(ints(*INT32, small=(0, 64))))
    prompt = draw(st.sampled_from(["text", "token_ids", "none"]))
    if prompt == "text":
        r.text = draw(texts())
    elif prompt == "token_ids":
        r.token_ids.ids.extend(draw(token_lists(vocab, context)))
    if draw(st.integers(0, 9)) == 0:
        r.top_k = draw(st.sampled_from([vocab - 1, vocab, vocab + 1]))
    return r


@st.composite
def valid_score_requests(draw, vocab: int) -> pb.ScoreRequest:
    r = pb.ScoreRequest(top_k=draw(st.one_of(st.integers(0, 64), st.just(vocab))))
    if draw(st.booleans()):
        r.text = draw(valid_text())
    else:
        r.token_ids.ids.extend(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=32)))
    return r


def generate(stub: pb_grpc.Gpt2DeployStub, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return list(stub.Generate(request, timeout=TIMEOUT_S))


def check_generation(request: pb.GenerateRequest, responses: list[pb.GenerateResponse]) -> None:
    OUTCOMES["OK"] += 1
    assert responses and responses[-1].HasField("finish"), f"no Finish\nrequest: {_show(request)}"
    assert not any(m.HasField("finish") for m in responses[:-1])
    finish = responses[-1].finish
    limit = request.max_new_tokens if request.HasField("max_new_tokens") else 16
    assert finish.completion_tokens == len(finish.token_ids) <= limit
    assert finish.text == "".join(m.text for m in responses)
    if request.WhichOneof("prompt") == "token_ids":
        assert finish.prompt_tokens == len(request.token_ids.ids)


def test_fuzz_generate(server, channel, served):
    stub = pb_grpc.Gpt2DeployStub(channel)
    dims = server.runtime.bundle.dims
    context = server.runtime.generator.context

    @_examples(1.5)
    @given(
        shown(
            st.one_of(generate_requests(dims.vocab_size, context), valid_generate_requests(dims.vocab_size))
        )
    )
    @served
    def run(case: Shown) -> None:
        answered_or_refused(functools.partial(generate, stub), case.value, check_generation)

    run()


def test_fuzz_valid_generate_succeeds(server, channel, served):
    stub = pb_grpc.Gpt2DeployStub(channel)

    @_examples(0.75)
    @given(shown(valid_generate_requests(server.runtime.bundle.dims.vocab_size)))
    @served
    def run(case: Shown) -> None:
        check_generation(case.value, answered(functools.partial(generate, stub), case.value))

    run()


def check_scores(request: pb.ScoreRequest, r: pb.ScoreResponse, vocab: int) -> None:
    OUTCOMES["OK"] += 1
    n = len(r.token_ids)
    assert n >= 1 and len(r.token_logprobs) == n - 1
    lp = np.asarray(r.token_logprobs)
    assert np.isfinite(lp).all() and (lp <= 1e-4).all(), lp
    if request.top_k == 0:
        assert list(r.logits.shape) == [n, vocab] and len(r.logits.data) == n * vocab * 4
    else:
        assert list(r.top_ids.shape) == [n, request.top_k] == list(r.top_logprobs.shape)


def test_fuzz_score(server, channel, served):
    score = functools.partial(pb_grpc.Gpt2DeployStub(channel).Score, timeout=TIMEOUT_S)
    vocab, context = server.runtime.bundle.dims.vocab_size, server.runtime.generator.context
    check = functools.partial(check_scores, vocab=vocab)

    @_examples(1.0)
    @given(shown(st.one_of(score_requests(vocab, context), valid_score_requests(vocab))))
    @served
    def run(case: Shown) -> None:
        answered_or_refused(score, case.value, check)

    run()

    @_examples(0.5)
    @given(shown(valid_score_requests(vocab)))
    @served
    def run_valid(case: Shown) -> None:
        check(case.value, answered(score, case.value))

    run_valid()


# --- KServe v2 -------------------------------------------------------------------------------
Tensor = kpb.ModelInferRequest.InferInputTensor
TYPED_FIELD = {dt: field for dt, (_, field) in DATATYPES.items()}
ODD_DATATYPES = ["", "int64", "FP8", "BF16", "STRING", "INT128", "x" * 300, "INT64 "]
NP_DTYPE = {dt: np.dtype(t) for dt, (t, _) in DATATYPES.items() if dt != "BYTES"}


def _values(dt: str, count: int) -> st.SearchStrategy[list]:
    """``count`` values of datatype ``dt`` (extremes included)."""
    if dt == "BYTES":
        element = st.one_of(st.binary(max_size=16), valid_text().map(str.encode), st.just(b"\xff\xfe"))
    elif dt == "BOOL":
        element = st.booleans()
    elif dt.startswith("FP"):
        element = floats32() if dt != "FP64" else floats64()
    else:
        info = np.iinfo(NP_DTYPE[dt])
        element = ints(
            int(info.min), int(info.max), small=(max(int(info.min), -1), min(int(info.max), 60000))
        )
    return st.lists(element, min_size=count, max_size=count)


def _raw(dt: str, values: list) -> bytes:
    if dt == "BYTES":
        return serialize_bytes(values)
    le = NP_DTYPE[dt].newbyteorder("<")
    with np.errstate(all="ignore"):  # a float beyond FP16's range becomes inf, as a client's would
        source = np.float64 if dt.startswith("FP") else NP_DTYPE[dt]
        return np.asarray(values, dtype=source).astype(le).tobytes()


def _typed(dt: str, values: list) -> kpb.InferTensorContents:
    field = TYPED_FIELD.get(dt) or "fp32_contents"  # FP16 has none: the wrong field on purpose
    if field in ("int_contents",) and dt != "INT32":
        values = [int(np.clip(v, *INT32)) for v in values]
    if field == "uint_contents":
        values = [int(np.clip(v, 0, UINT32_MAX)) for v in values]
    if field == "bytes_contents":
        values = [v if isinstance(v, bytes) else str(v).encode() for v in values]
    return kpb.InferTensorContents(**{field: values})


SHAPES = st.one_of(
    st.lists(st.integers(0, 4), max_size=3),
    st.lists(
        st.sampled_from([-1, 0, 1, 2, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]), min_size=1, max_size=4
    ),
    st.lists(st.integers(0, 2), min_size=9, max_size=12),
)


@st.composite
def tensors(draw, spec_names: list[str]) -> tuple[Tensor, bytes | None]:
    """One input: a name (often one the model knows), any datatype, any shape, data that may not fit."""
    name = draw(st.one_of(st.sampled_from(spec_names), texts(12), st.just("n" * 5000)))
    dt = draw(st.one_of(st.sampled_from(list(DATATYPES)), st.sampled_from(ODD_DATATYPES)))
    shape = draw(SHAPES)
    t = Tensor(name=name, datatype=dt, shape=shape)
    count = math.prod(shape)
    fits = 0 <= count <= 64 and dt in DATATYPES
    values = draw(_values(dt, count)) if fits else []
    how = draw(st.sampled_from(["raw", "typed", "both", "none", "random raw"]))
    raw = None
    if how in ("raw", "both") and fits:
        raw = _raw(dt, values)
        if draw(st.integers(0, 4)) == 0:  # off by a few bytes
            raw = raw[: max(len(raw) - draw(st.integers(1, 3)), 0)] + draw(st.binary(max_size=2))
    elif how == "random raw":
        raw = draw(st.binary(max_size=64))
    if how in ("typed", "both") and fits:
        t.contents.CopyFrom(_typed(dt, values))
    if draw(st.integers(0, 9)) == 0:
        t.parameters[draw(st.sampled_from(["binary_data_size", "priority", "x"]))].string_param = "1"
    return t, raw


def good_tensor(name: str, dt: str, values: list, shape: list[int], raw: bool) -> tuple[Tensor, bytes | None]:
    t = Tensor(name=name, datatype=dt, shape=shape)
    if raw:
        return t, _raw(dt, values)
    t.contents.CopyFrom(_typed(dt, values))
    return t, None


@st.composite
def valid_forward_inputs(draw, vocab: int, extreme: bool = False) -> list[tuple[Tensor, bytes | None]]:
    """The forward model's inputs, well-formed, values valid; ``extreme``: the ids or the mask any
    INT64 values."""
    b, s = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    raw = draw(st.booleans())
    odd = draw(st.sampled_from(["input_ids", "attention_mask"])) if extreme else None
    valid_ids = st.lists(st.integers(0, vocab - 1), min_size=b * s, max_size=b * s)
    ids = draw(_values("INT64", b * s) if odd == "input_ids" else valid_ids)
    inputs = [good_tensor("input_ids", "INT64", ids, [b, s], raw)]
    if odd == "attention_mask" or draw(st.booleans()):
        pads = draw(st.lists(st.integers(0, s - 1), min_size=b, max_size=b))  # left padding per row
        mask = [int(j >= p) for p in pads for j in range(s)]
        if odd == "attention_mask":
            mask = draw(st.one_of(_values("INT64", b * s), st.just([0] * (b * s))))
        inputs.append(good_tensor("attention_mask", "INT64", mask, [b, s], raw))
    return inputs


@st.composite
def valid_generate_inputs(draw, stream: bool, extreme: bool = False) -> list[tuple[Tensor, bytes | None]]:
    """The generate model's inputs, well-formed, values valid; ``extreme``: one of them any value of
    its datatype."""
    raw = draw(st.booleans())
    text = draw(valid_text()).encode()
    valid = {
        "max_tokens": st.integers(1, 8),
        "temperature": st.one_of(st.just(0.0), st.floats(TEMPERATURE_MIN, 2, width=32)),
        "top_k": st.integers(0, 100),
        "top_p": st.floats(TOP_P_MIN, 1.0, width=32),
        "random_seed": st.integers(0, 2**63 - 1),
    }
    datatypes = {
        "max_tokens": ["INT32", "INT64"],
        "temperature": ["FP32", "FP64"],
        "top_k": ["INT32", "INT64"],
        "top_p": ["FP32", "FP64"],
        "random_seed": ["UINT64", "INT64"],
    }
    odd = draw(st.sampled_from(list(datatypes))) if extreme else None
    inputs = [good_tensor("text_input", "BYTES", [text], [1], raw)]
    for name, dts in datatypes.items():
        if name in ("max_tokens", odd) or draw(st.booleans()):
            dt = draw(st.sampled_from(dts))
            values = _values(dt, 1) if name == odd else valid[name].map(lambda v: [v])
            inputs.append(good_tensor(name, dt, draw(values), [1], raw))
    if stream or draw(st.booleans()):
        inputs.append(good_tensor("stream", "BOOL", [stream], [1], raw))
    return draw(st.permutations(inputs))


def infer_request(model: str, inputs: list[tuple[Tensor, bytes | None]], **kw) -> kpb.ModelInferRequest:
    r = kpb.ModelInferRequest(model_name=model, inputs=[t for t, _ in inputs], **kw)
    if any(raw is not None for _, raw in inputs):
        r.raw_input_contents.extend(raw or b"" for _, raw in inputs)
    return r


@st.composite
def valid_infer_requests(
    draw, forward: str, vocab: int, stream_ok: bool = False, extreme: bool = False
) -> kpb.ModelInferRequest:
    if draw(st.booleans()):
        return infer_request(
            forward, draw(valid_forward_inputs(vocab, extreme)), id=draw(st.text(max_size=8))
        )
    stream = stream_ok and draw(st.booleans())
    inputs = draw(valid_generate_inputs(stream, extreme))
    return infer_request(forward + "-generate", inputs, model_version="1")


@st.composite
def infer_requests(draw, forward: str, vocab: int, specs: dict[str, list[str]]) -> kpb.ModelInferRequest:
    """A valid request with one extreme value, a valid request broken in a few random ways, or one
    made of random tensors."""
    if draw(st.integers(0, 2)) == 0:
        return draw(valid_infer_requests(forward, vocab, stream_ok=True, extreme=True))
    model = draw(
        st.one_of(st.sampled_from(list(specs)), texts(12), st.just("m" * 20000), st.just(forward.upper()))
    )
    if draw(st.booleans()):
        base = draw(valid_infer_requests(forward, vocab, stream_ok=True))
        inputs = list(zip(base.inputs, base.raw_input_contents or [None] * len(base.inputs)))
        model = base.model_name if draw(st.booleans()) else model
    else:
        inputs = []
    names = specs.get(model, [n for ns in specs.values() for n in ns])
    inputs += draw(st.lists(tensors(names), max_size=4))
    if inputs and draw(st.booleans()):
        inputs.append(draw(st.sampled_from(inputs)))  # a repeated input
    if inputs and draw(st.booleans()):
        inputs.pop(draw(st.integers(0, len(inputs) - 1)))
    if draw(st.integers(0, 19)) == 0:
        inputs += [(Tensor(name=f"t{i}", datatype="INT64", shape=[1]), None) for i in range(20)]
    r = infer_request(model, inputs, model_version=draw(st.sampled_from(["", "1", "2", "v" * 3000])))
    r.id = draw(texts(8))
    fix = draw(st.sampled_from(["keep", "drop raw", "extra raw", "no raw"]))
    if fix == "drop raw" and r.raw_input_contents:
        del r.raw_input_contents[-1]
    elif fix == "extra raw":
        r.raw_input_contents.append(draw(st.binary(max_size=16)))
    elif fix == "no raw":
        del r.raw_input_contents[:]
    for name in draw(st.lists(st.one_of(st.just("logits"), st.just("text_output"), texts(8)), max_size=3)):
        r.outputs.add(name=name)
    for key in draw(
        st.lists(
            st.sampled_from(["priority", "timeout", "sequence_start", "binary_data_output", "ext"]),
            max_size=3,
        )
    ):
        kind = draw(
            st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"])
        )
        value = {
            "bool_param": True,
            "int64_param": -1,
            "string_param": "x",
            "double_param": float("nan"),
            "uint64_param": UINT64_MAX,
        }
        setattr(r.parameters[key], kind, value[kind])
    return r


def _specs(server) -> dict[str, list[str]]:
    forward = server.runtime.name
    return {
        forward: ["input_ids", "attention_mask"],
        forward + "-generate": [
            "text_input",
            "max_tokens",
            "temperature",
            "top_k",
            "top_p",
            "random_seed",
            "stream",
        ],
    }


def check_infer(request: kpb.ModelInferRequest, r: kpb.ModelInferResponse, vocab: int) -> None:
    OUTCOMES["OK"] += 1
    (out,) = r.outputs
    assert r.id == request.id and len(r.raw_output_contents) == 1
    if out.name == "logits":
        t = {i.name: (i, raw) for i, raw in zip(request.inputs, request.raw_input_contents or [None] * 9)}
        b, s = t["input_ids"][0].shape
        assert list(out.shape) == [b, s, vocab] and len(r.raw_output_contents[0]) == b * s * vocab * 4
    else:
        assert out.name == "text_output" and list(out.shape) == [1] and out.datatype == "BYTES"
        (n,) = struct.unpack_from("<I", r.raw_output_contents[0])
        assert n + 4 == len(r.raw_output_contents[0])
        r.raw_output_contents[0][4:].decode("utf-8")
        assert r.parameters["finish_reason"].string_param in ("length", "stop", "eos")


def test_fuzz_model_infer(server, channel, served):
    infer = functools.partial(kgrpc.GRPCInferenceServiceStub(channel).ModelInfer, timeout=TIMEOUT_S)
    vocab, forward = server.runtime.bundle.dims.vocab_size, server.runtime.name
    specs = _specs(server)
    check = functools.partial(check_infer, vocab=vocab)

    @_examples(3.0)
    @given(
        shown(
            st.one_of(
                infer_requests(forward, vocab, specs),
                valid_infer_requests(forward, vocab),
                valid_infer_requests(forward, vocab, extreme=True),
            )
        )
    )
    @served
    def run(case: Shown) -> None:
        answered_or_refused(infer, case.value, check)

    run()

    @_examples(0.75)
    @given(shown(valid_infer_requests(forward, vocab)))
    @served
    def run_valid(case: Shown) -> None:
        check(case.value, answered(infer, case.value))

    run_valid()


def test_fuzz_model_stream_infer(server, channel, served):
    stub = kgrpc.GRPCInferenceServiceStub(channel)
    vocab, forward = server.runtime.bundle.dims.vocab_size, server.runtime.name
    specs = _specs(server)
    one = st.tuples(st.booleans(), valid_infer_requests(forward, vocab, stream_ok=True)) | st.tuples(
        st.just(False), infer_requests(forward, vocab, specs)
    )

    @_examples(0.75)
    @given(shown(st.lists(one, min_size=1, max_size=4)))
    @served
    def run(case: Shown) -> None:
        tagged: list[tuple[bool, kpb.ModelInferRequest]] = case.value
        requests = []
        for i, (_, r) in enumerate(tagged):
            r.id = f"r{i}"  # responses carry it: which request each answers
            requests.append(r)
        try:
            responses = list(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT_S))
        except grpc.RpcError as e:  # only a message above --max-request-mb ends the stream
            check_error(e, requests)
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, _show(requests)
            assert any(r.ByteSize() > server.options.max_request_mb << 20 for r in requests)
            return
        ends: dict[str, int] = {}
        for m in responses:
            rid = m.infer_response.id
            if m.error_message:
                check_in_stream_error(m.error_message, requests[int(rid[1:])])
                ends[rid] = ends.get(rid, 0) + 1
                assert not tagged[int(rid[1:])][0], (
                    f"a valid request failed: {m.error_message}\n{requests[int(rid[1:])]}"
                )
            elif m.infer_response.parameters[FINAL_RESPONSE].bool_param:
                ends[rid] = ends.get(rid, 0) + 1
        assert ends == {r.id: 1 for r in requests}, (ends, _show(requests))

    run()


# --- bytes on the wire -----------------------------------------------------------------------
@st.composite
def mutated(draw, message: bytes) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "insert", "append", "random", "as is"]))
    if how == "random" or not message:
        return draw(st.binary(max_size=64))
    if how == "truncate":
        return message[: draw(st.integers(0, len(message) - 1))]
    if how == "append":
        return message + draw(st.binary(min_size=1, max_size=16))
    i = draw(st.integers(0, len(message) - 1))
    if how == "insert":
        return message[:i] + draw(st.binary(min_size=1, max_size=8)) + message[i:]
    if how == "flip":
        return message[:i] + bytes([message[i] ^ draw(st.integers(1, 255))]) + message[i + 1 :]
    return message


def test_fuzz_wire_bytes(server, channel, served):
    """Mutated serialized requests (undecodable ones included) on every method: never INTERNAL."""
    vocab, forward = server.runtime.bundle.dims.vocab_size, server.runtime.name
    context = server.runtime.generator.context
    specs = _specs(server)
    ident = lambda b: b  # noqa: E731 - bytes straight to the wire
    calls = {
        GENERATE: channel.unary_stream(GENERATE, request_serializer=ident, response_deserializer=ident),
        SCORE: channel.unary_unary(SCORE, request_serializer=ident, response_deserializer=ident),
        MODEL_INFO: channel.unary_unary(MODEL_INFO, request_serializer=ident, response_deserializer=ident),
        MODEL_INFER: channel.unary_unary(MODEL_INFER, request_serializer=ident, response_deserializer=ident),
        STREAM_INFER: channel.stream_stream(
            STREAM_INFER, request_serializer=ident, response_deserializer=ident
        ),
    }
    messages = {
        GENERATE: generate_requests(vocab, context),
        SCORE: score_requests(vocab, context),
        MODEL_INFO: st.just(pb.ModelInfoRequest()),
        MODEL_INFER: infer_requests(forward, vocab, specs),
        STREAM_INFER: infer_requests(forward, vocab, specs),
    }

    @st.composite
    def wire(draw) -> tuple[str, list[bytes]]:
        method = draw(st.sampled_from(list(calls)))
        n = draw(st.integers(1, 3)) if method == STREAM_INFER else 1
        return method, [draw(mutated(draw(messages[method]).SerializeToString())) for _ in range(n)]

    @_examples(1.5)
    @given(shown(wire()))
    @served
    def run(case: Shown) -> None:
        method, data = case.value
        try:
            if method == GENERATE:
                list(calls[method](data[0], timeout=TIMEOUT_S))
            elif method == STREAM_INFER:
                for raw in calls[method](iter(data), timeout=TIMEOUT_S):
                    m = kpb.ModelStreamInferResponse.FromString(raw)
                    if m.error_message:
                        check_in_stream_error(m.error_message, case)
            else:
                calls[method](data[0], timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            check_error(e, case)

    run()


# --- findings --------------------------------------------------------------------------------
def test_finding_a_subnormal_temperature_is_refused(server, channel):
    """Found by test_fuzz_model_infer: FP64 temperature 5e-324 passed validation, logits / temperature
    overflowed to inf, every probability was NaN and the draw returned the last token id (50256)."""
    stub = kgrpc.GRPCInferenceServiceStub(channel)
    inputs = [
        good_tensor("text_input", "BYTES", [b"Hello"], [1], raw=False),
        good_tensor("max_tokens", "INT32", [2], [1], raw=False),
        good_tensor("temperature", "FP64", [5e-324], [1], raw=False),
    ]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(infer_request(server.runtime.name + "-generate", inputs), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least 1e-30" in info.value.details()
