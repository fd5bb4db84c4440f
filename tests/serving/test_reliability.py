"""The runner under hostile and unlucky conditions: undecodable and oversized requests, protocol
violations, echo caps, drain, the hard stop deadline, failing backends, clients that vanish, and
memory after a storm of bad requests."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.backends.ort_backend import OrtBackend
from serving.client import Gpt2DeployClient
from serving.proto import gpt2_deploy_pb2 as pb
from serving.proto import grpc_service_pb2 as kpb
from serving.proto import grpc_service_pb2_grpc as kgrpc
from serving.runtime import FAULT_LIMIT
from serving.server import STOP_MARGIN_S, ServeOptions, build_server, free_port

ROOT = Path(__file__).resolve().parents[2]
GENERATE = "/gpt2_deploy.v1.Gpt2Deploy/Generate"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


def _opts(bundle, **kw) -> ServeOptions:
    kw = {"grace_s": 2.0, **kw}
    return ServeOptions(bundle=bundle.root, port=0, threads=1, parity="off", **kw)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with build_server(_opts(tiny_bundle)) as running:
        yield running


def _serve_process(bundle, port: int, *extra: str) -> subprocess.Popen:
    """A real `gpt2-deploy serve` of ``bundle`` on ``port`` (parity off, one thread)."""
    cli = [sys.executable, "-m", "serving.cli", "serve", str(bundle.root), "--port", str(port)]
    return subprocess.Popen(
        [*cli, "--parity", "off", "--threads", "1", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _raw(channel: grpc.Channel, method: str, streaming_out: bool = False, bidi: bool = False):
    ident = lambda b: b  # noqa: E731 - bytes straight to the wire
    if bidi:
        return channel.stream_stream(method, request_serializer=ident, response_deserializer=ident)
    if streaming_out:
        return channel.unary_stream(method, request_serializer=ident, response_deserializer=ident)
    return channel.unary_unary(method, request_serializer=ident, response_deserializer=ident)


UNDECODABLE = {
    "garbage": b"\xff\xff\xff\xff\x07",
    "truncated": pb.GenerateRequest(text="Hello there", max_new_tokens=4).SerializeToString()[:-3],
    "invalid utf-8 in a string": b"\x0a\x02\xff\xfe",  # field 1 (text), 2 bytes that are not UTF-8
}


@pytest.mark.parametrize("what", list(UNDECODABLE))
def test_undecodable_requests_are_invalid_argument_without_a_traceback(server, caplog, what):
    caplog.set_level(logging.ERROR)
    with grpc.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(_raw(ch, GENERATE, streaming_out=True)(UNDECODABLE[what], timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "not a valid gpt2_deploy.v1.GenerateRequest message" in info.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_malformed_bidi_stream_is_refused_and_stop_still_finishes(tiny_bundle):
    running = build_server(_opts(tiny_bundle, grace_s=1.0))
    ch = grpc.insecure_channel(running.address)
    calls = []
    try:
        for _ in range(20):  # malformed messages on bidirectional streams, left open
            call = _raw(ch, STREAM_INFER, bidi=True)(iter([b"\xff\xff\xff", b"\x0a\x02\xff\xfe"]), timeout=30)
            calls.append(call)
        codes = set()
        for call in calls:
            try:
                list(call)
            except grpc.RpcError as e:
                codes.add(e.code())
        assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
        hanging = _raw(ch, STREAM_INFER, bidi=True)(iter(lambda: time.sleep(60) or b"", None), timeout=120)
        t0 = time.perf_counter()
        assert running.stop() in (True, False)
        assert time.perf_counter() - t0 < 1.0 + STOP_MARGIN_S + 2  # within grace + margin
        hanging.cancel()
    finally:
        ch.close()
        running.stop()


def test_sigterm_ends_the_process_within_grace_plus_margin(tiny_bundle):
    """A real `gpt2-deploy serve` with malformed and never-ending bidi streams open: SIGTERM ends it."""
    port = free_port()
    proc = _serve_process(tiny_bundle, port, "--grace", "1")
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        with Gpt2DeployClient(f"127.0.0.1:{port}") as c:
            c.wait_until_serving(120, alive=lambda: proc.poll() is None)
        open_calls = [
            _raw(ch, STREAM_INFER, bidi=True)(iter([b"\xff\xfe"] + [b""] * 0), timeout=120) for _ in range(20)
        ]
        stuck = [
            _raw(ch, STREAM_INFER, bidi=True)(iter(lambda: time.sleep(30) or b"", None), timeout=120)
            for _ in range(5)
        ]
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=1 + STOP_MARGIN_S + 10)
        took = time.monotonic() - t0
    finally:
        ch.close()
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 4), err[-2000:]  # 4 = it had to cut calls at the hard deadline
    assert took < 1 + STOP_MARGIN_S + 3, took
    del open_calls, stuck


BAD_KSERVE = [
    (
        "element count overflow",
        kpb.ModelInferRequest(
            model_name="tiny",
            inputs=[
                kpb.ModelInferRequest.InferInputTensor(
                    name="input_ids", datatype="INT64", shape=[2**32, 2**32]
                )
            ],
            raw_input_contents=[b"\x00" * 8],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "more than the",
    ),
    (
        "raw and typed contents",
        kpb.ModelInferRequest(
            model_name="tiny",
            inputs=[
                kpb.ModelInferRequest.InferInputTensor(
                    name="input_ids",
                    datatype="INT64",
                    shape=[1, 1],
                    contents=kpb.InferTensorContents(int64_contents=[1]),
                )
            ],
            raw_input_contents=[np.asarray([[1]], np.int64).tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "one or the other",
    ),
    (
        "too many tensors",
        kpb.ModelInferRequest(
            model_name="tiny",
            inputs=[
                kpb.ModelInferRequest.InferInputTensor(name=f"t{i}", datatype="INT64", shape=[1])
                for i in range(3000)
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at most 16",
    ),
    (
        "a 20 KB model name",
        kpb.ModelInferRequest(model_name="m" * 20000),
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'mmmm",
    ),
    (
        "unknown names, quoted a few",
        kpb.ModelInferRequest(
            model_name="tiny",
            inputs=[
                kpb.ModelInferRequest.InferInputTensor(name="x" * 5000 + str(i), datatype="INT64", shape=[1])
                for i in range(12)
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at most 16" if False else "more)",
    ),
    (
        "a parameter of the wrong type",
        kpb.ModelInferRequest(
            model_name="tiny",
            parameters={"priority": kpb.InferParameter(string_param="high")},
            inputs=[kpb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=[1, 1])],
            raw_input_contents=[np.asarray([[1]], np.int64).tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "parameter 'priority' is string_param",
    ),
]


@pytest.mark.parametrize("what,req,code,needle", BAD_KSERVE, ids=[b[0] for b in BAD_KSERVE])
def test_kserve_protocol_rules_and_bounded_messages(server, what, req, code, needle):
    with grpc.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            kgrpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    assert info.value.code() == code, (what, info.value.details()[:500])
    assert needle in info.value.details(), (what, info.value.details()[:500])
    assert len(info.value.details()) < 2000  # never the client's input echoed in full


def test_oversized_prompts_are_refused_before_tokenising(server):
    with Gpt2DeployClient(server.address, timeout=60) as c:
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:  # under the request limit: the prompt bound
            c.generate("a" * (3 << 20), max_new_tokens=2).result()
        assert time.perf_counter() - t0 < 2.0  # no tokenising of megabytes (seconds, and hundreds of MB)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "--max-prompt-bytes" in info.value.details() and str(3 << 20) in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # above it: refused before protobuf decodes it
            c.generate("a" * (10 << 20), max_new_tokens=2).result()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-request-mb" in info.value.details() and "at most 4 MiB" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # a token id list: bounded by the context
            c.generate(list(range(100_000)), max_new_tokens=2).result()
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "100000 token ids" in info.value.details()


def test_drain_answers_not_serving_on_new_connections_while_still_serving(tiny_bundle):
    import threading

    running = build_server(_opts(tiny_bundle, drain_delay_s=2.0))
    stopper = threading.Thread(target=running.stop)
    stopper.start()
    try:
        time.sleep(0.5)  # inside the drain delay
        with Gpt2DeployClient(running.address, timeout=10) as c:  # a new connection
            t0 = time.perf_counter()
            assert c.health() == "NOT_SERVING"
            assert time.perf_counter() - t0 < 0.5
            assert len(c.generate("Hi", max_new_tokens=2, ignore_eos=True).result().token_ids) == 2
    finally:
        stopper.join(30)
    assert not stopper.is_alive()


class FailingOrt(OrtBackend):
    """The real backend failing (or running out of memory) on inputs holding a marker token."""

    FAIL, OOM = 4242, 4343

    def _forward(self, input_ids, *args):
        if (input_ids == self.FAIL).any():
            raise RuntimeError("injected backend failure")
        if (input_ids == self.OOM).any():
            raise MemoryError("injected")
        return super()._forward(input_ids, *args)


def test_failing_steps_fail_their_streams_then_health_goes_not_serving(tiny_bundle):
    with (
        build_server(_opts(tiny_bundle), backend=FailingOrt(tiny_bundle)) as running,
        Gpt2DeployClient(running.address, timeout=60) as c,
    ):
        keep = c.generate("Hello", max_new_tokens=30, ignore_eos=True)
        it = iter(keep)
        next(it)
        with pytest.raises(grpc.RpcError) as info:
            c.generate([1, FailingOrt.OOM], max_new_tokens=2).result()
        assert (
            info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "ran out of memory" in info.value.details()
        )
        with pytest.raises(grpc.RpcError) as info:
            c.generate([1, FailingOrt.FAIL], max_new_tokens=2).result()
        assert info.value.code() == grpc.StatusCode.INTERNAL and "incident" in info.value.details()
        assert "injected" not in info.value.details()
        for _ in it:
            pass
        assert len(keep.token_ids) == 30  # the others kept running
        assert c.health() == "SERVING"
        for _ in range(FAULT_LIMIT):
            with pytest.raises(grpc.RpcError):
                c.generate([FailingOrt.FAIL], max_new_tokens=1).result()
        assert c.health() == "NOT_SERVING" and c.health("liveness") == "NOT_SERVING"
        info = c.model_info()
        assert "backend failures" in info.not_serving_reason and not info.ready
        with pytest.raises(grpc.RpcError) as refused:
            c.generate("Hi", max_new_tokens=2).result()
        assert (
            refused.value.code() == grpc.StatusCode.UNAVAILABLE
            and "backend failures" in refused.value.details()
        )


def test_a_killed_client_frees_its_row(tiny_bundle):
    from tests.serving.test_server import SlowOrtBackend

    with build_server(_opts(tiny_bundle), backend=SlowOrtBackend(tiny_bundle)) as running:
        client = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
            from serving.client import Gpt2DeployClient
            with Gpt2DeployClient("{running.address}") as c:
                for i, _ in enumerate(c.generate("Hello", max_new_tokens=200, ignore_eos=True)):
                    if i == 2:
                        print("streaming", flush=True)
            """),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert client.stdout.readline().strip() == "streaming"
            sched = running.runtime.scheduler
            assert sched.active_rows() == 1
            client.kill()  # gone without a cancel
            client.wait(10)
            deadline = time.monotonic() + 15
            while sched.active_rows():
                assert time.monotonic() < deadline, "the vanished client's row was never freed"
                time.sleep(0.05)
        finally:
            if client.poll() is None:
                client.kill()
        assert running.metrics.value("gpt2_deploy_generated_tokens_total") < 150


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_memory_returns_after_a_storm_of_bad_requests(tiny_bundle):
    port = free_port()
    proc = _serve_process(tiny_bundle, port, "--log-level", "ERROR")
    try:
        address = f"127.0.0.1:{port}"
        with Gpt2DeployClient(address, timeout=60) as c, grpc.insecure_channel(address) as ch:
            c.wait_until_serving(120, alive=lambda: proc.poll() is None)
            for _ in range(5):  # warm up the paths the storm takes
                c.generate("Hello", max_new_tokens=4, ignore_eos=True).result()
            before = _rss_kib(proc.pid)
            kserve = kgrpc.GRPCInferenceServiceStub(ch)
            storm = [
                lambda: c.generate("a" * (10 << 20), max_new_tokens=2).result(),
                lambda: c.generate("a" * (3 << 20), max_new_tokens=2).result(),
                lambda: c.generate(list(range(100_000)), max_new_tokens=2).result(),
                lambda: c.generate("Hi", max_new_tokens=10**6).result(),
                lambda: c.score("x" * (4 << 20)),
                lambda: list(_raw(ch, GENERATE, streaming_out=True)(b"\xff" * 1000, timeout=10)),
                lambda: kserve.ModelInfer(BAD_KSERVE[0][1], timeout=10),
                lambda: kserve.ModelInfer(BAD_KSERVE[2][1], timeout=10),
                lambda: kserve.ModelInfer(BAD_KSERVE[4][1], timeout=10),
                lambda: kserve.ModelInfer(kpb.ModelInferRequest(model_name="m" * 20000), timeout=10),
            ]
            failures = 0
            for _ in range(40):  # 400 bad requests
                for bad in storm:
                    try:
                        bad()
                    except grpc.RpcError as e:
                        assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                            e.details()
                        )
                        failures += 1
            assert failures == 40 * len(storm)
            assert c.health() == "SERVING"
            time.sleep(1.0)
            after = _rss_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    print(f"\nserver RSS before {before / 1024:.0f} MiB, after 400 bad requests {after / 1024:.0f} MiB")
    assert after <= before * 1.10, (before, after)
