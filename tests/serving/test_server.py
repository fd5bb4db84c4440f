"""The gRPC runner on a real port: streaming generation vs transformers, sampling, cancellation,
health, the startup canary, bad input, metrics and reflection."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.backends.ort_backend import OrtBackend
from serving.client import Gpt2DeployClient
from serving.proto import gpt2_deploy_pb2 as pb
from serving.server import (
    API_SERVICE,
    KSERVE_SERVICE,
    ParityRefused,
    ServeOptions,
    StartupCancelled,
    build_server,
    free_port,
)

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):\n    return"]


class SlowOrtBackend(OrtBackend):
    """The real ONNX Runtime backend, 20 ms slower per step (to cancel or stop mid-stream)."""

    def _forward(self, *args):
        time.sleep(0.02)
        return super()._forward(*args)


class NoisyOrtBackend(OrtBackend):
    """The real ONNX Runtime backend whose logits really diverge from the reference."""

    def _forward(self, *args):
        out = super()._forward(*args)
        out.logits = out.logits + np.random.default_rng(0).normal(0, 0.5, out.logits.shape).astype(np.float32)
        return out


def _opts(bundle, **kw) -> ServeOptions:
    return ServeOptions(bundle=bundle.root, port=0, grace_s=5.0, threads=1, **kw)


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def server(request, tiny_bundle):
    with build_server(_opts(tiny_bundle, backend=request.param, metrics_port=free_port())) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with Gpt2DeployClient(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def hf_model(tiny_bundle):
    transformers = pytest.importorskip("transformers", reason="the reference comparison needs transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_bundle.root / "reference").eval()


# --- generation ------------------------------------------------------------------------------
def test_greedy_stream_equals_transformers_generate(server, client, hf_model):
    import torch

    n = 20
    eos = hf_model.config.eos_token_id
    for prompt in PROMPTS:
        stream = client.generate(prompt, max_new_tokens=n)
        chunks = list(stream)
        ids = server.runtime.tokenizer.encode(prompt)
        with torch.no_grad():
            x = torch.tensor([ids])
            out = hf_model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, pad_token_id=eos
            )
        want = out[0, len(ids) :].tolist()
        got = stream.token_ids
        assert got == want[: len(got)], (prompt, got, want)
        assert len(got) == n or want[len(got)] == eos  # stopped early only at EOS, like transformers
        # One message per token, each carrying its id; the last carries the finish.
        assert [list(c.token_ids) for c in chunks if c.token_ids] == [[t] for t in got]
        assert chunks[-1].HasField("finish") and not any(c.HasField("finish") for c in chunks[:-1])
        f = stream.finish
        assert stream.finish_reason == ("length" if len(got) == n else "eos")
        assert (f.prompt_tokens, f.completion_tokens, list(f.token_ids)) == (len(ids), len(got), got)
        assert stream.text == f.text == server.runtime.tokenizer.decode(got)
        assert f.time_to_first_token_s > 0 and len(f.per_token_s) == len(got) - 1


def test_seeded_sampling_is_reproducible(client):
    def run(seed):
        return (
            client.generate(
                "Once upon a time",
                max_new_tokens=16,
                temperature=0.9,
                top_k=50,
                top_p=0.95,
                seed=seed,
                ignore_eos=True,
            )
            .result()
            .token_ids
        )

    a, b, c = run(1234), run(1234), run(99)
    assert a == b and len(a) == 16
    assert a != c  # a different seed draws differently
    assert a != client.generate("Once upon a time", max_new_tokens=16, ignore_eos=True).result().token_ids


def test_stop_strings_and_token_ids(client):
    greedy = client.generate("Hello, my name is", max_new_tokens=12, ignore_eos=True).result()
    first = greedy.token_ids[0]
    stopped = client.generate("Hello, my name is", max_new_tokens=12, stop_token_ids=[first]).result()
    assert stopped.finish_reason == "stop" and stopped.token_ids == []
    third = client.generate(
        "Hello, my name is", max_new_tokens=12, ignore_eos=True, stop=[greedy.text[-3:]]
    ).result()
    assert third.finish_reason == "stop" and greedy.text.startswith(third.text)
    assert greedy.text[-3:] not in third.text


def test_score_matches_forward_logits(server, client):
    ids = server.runtime.tokenizer.encode("The capital of France is")
    full = client.score(ids)
    assert full.logits.shape == (len(ids), server.runtime.bundle.dims.vocab_size)
    want = asyncio.run(server.runtime.forward(np.asarray([ids]), None))[0]
    np.testing.assert_allclose(full.logits, want, atol=1e-5)
    top = client.score(ids, top_k=5)
    assert top.logits is None and top.top_ids.shape == (len(ids), 5)
    assert (top.top_ids[:, 0] == want.argmax(-1)).all()
    assert top.token_logprobs.shape == (len(ids) - 1,) and (top.token_logprobs <= 0).all()


def test_model_info_and_check_parity(server, client):
    info = client.model_info()
    assert info.name == "tiny" and info.n_positions == 256 and info.vocab_size == 50257
    assert info.backend == server.runtime.backend.name and info.ready and info.canary == "passed"
    assert list(info.kserve_models) == ["tiny", "tiny-generate"]
    report = client.check_parity("Hello, my name is", max_new_tokens=6)
    assert report.passed and report.first_diverging_step == -1 and report.tolerance == "fp32"
    assert len(report.steps) == 7 and report.max_abs < 1e-4  # prefill + 6 teacher-forced steps
    assert "PASS" in report.report


# --- health, metrics, reflection -------------------------------------------------------------
def test_health_serving_after_canary(server, client):
    for service in ("", API_SERVICE, KSERVE_SERVICE):
        assert client.health(service) == "SERVING", service
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
    assert server.runtime.canary == "passed"


def test_metrics_endpoint(server, client):
    client.generate("Hello", max_new_tokens=4).result()
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'gpt2_deploy_requests_total{method="/gpt2_deploy.v1.Gpt2Deploy/Generate"}' in text
    assert 'gpt2_deploy_parity_checks_total{kind="canary",result="pass"} 1.0' in text
    assert server.metrics.value("gpt2_deploy_time_to_first_token_seconds_count") >= 1
    assert server.metrics.value("gpt2_deploy_time_per_output_token_seconds_count") >= 3
    assert server.metrics.value("gpt2_deploy_generated_tokens_total") >= 4


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = stub.ServerReflectionInfo(iter([ask]))
        names = {s.name for s in next(responses).list_services_response.service}
    assert {API_SERVICE, KSERVE_SERVICE, "grpc.health.v1.Health"} <= names


# --- bad input ---------------------------------------------------------------------------------
BAD_REQUESTS = [
    (
        "ids outside the vocabulary",
        dict(token_ids=pb.TokenIds(ids=[5, 50257])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "[0, 50257)",
    ),
    ("negative ids", dict(token_ids=pb.TokenIds(ids=[-1])), grpc.StatusCode.INVALID_ARGUMENT, "[0, 50257)"),
    (
        "prompt + max_new_tokens past the context",
        dict(text="Hello", max_new_tokens=300),
        grpc.StatusCode.OUT_OF_RANGE,
        "context of 256",
    ),
    ("empty prompt", dict(text=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("no prompt", dict(), grpc.StatusCode.INVALID_ARGUMENT, "`text` or `token_ids`"),
    (
        "negative max_new_tokens",
        dict(text="Hi", max_new_tokens=-3),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens must be an integer in [1, 4096]",
    ),
    ("zero max_new_tokens", dict(text="Hi", max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "[1, 4096]"),
    (
        "absurd max_new_tokens",
        dict(text="Hi", max_new_tokens=10**9),
        grpc.StatusCode.INVALID_ARGUMENT,
        "got 1000000000",
    ),
    (
        "negative temperature",
        dict(text="Hi", sampling=pb.SamplingParams(do_sample=True, temperature=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature must be in [0, 100]",
    ),
    (
        "top_p above 1",
        dict(text="Hi", sampling=pb.SamplingParams(do_sample=True, top_p=1.5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p must be in (0, 1]",
    ),
    (
        "negative top_k",
        dict(text="Hi", sampling=pb.SamplingParams(do_sample=True, top_k=-2)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k must be an integer in [0, 50257]",
    ),
    (
        "stop id outside the vocabulary",
        dict(text="Hi", stop_token_ids=[70000]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "stop_token_ids",
    ),
]


@pytest.mark.parametrize("what,fields,code,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_generate_requests(client, what, fields, code, needle):
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Generate(pb.GenerateRequest(**fields), timeout=30))
    assert info.value.code() == code, (what, info.value.details())
    assert needle in info.value.details(), (what, info.value.details())
    assert "Traceback" not in info.value.details()
    # The server keeps serving.
    assert len(client.generate("Hello", max_new_tokens=2).result().token_ids) >= 1


def test_bad_score_and_parity_requests(client):
    with pytest.raises(grpc.RpcError) as info:
        client.score("Hello world", top_k=60000)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[0, 50257]" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.score(list(range(300)))
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE and "256" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.check_parity("Hello", max_new_tokens=1000)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE, info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.check_parity([])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert client.health() == "SERVING"


def test_unexpected_errors_are_internal_without_details(server, client, monkeypatch):
    def boom():
        raise RuntimeError("secret internal state /etc/passwd")

    monkeypatch.setattr(server.runtime, "info", boom)
    with pytest.raises(grpc.RpcError) as info:
        client.model_info()
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details() and "Traceback" not in info.value.details()
    assert "incident" in info.value.details()
    monkeypatch.undo()
    assert client.model_info().name == "tiny"
    assert (
        server.metrics.value(
            "gpt2_deploy_errors_total", {"method": "/gpt2_deploy.v1.Gpt2Deploy/ModelInfo", "code": "INTERNAL"}
        )
        == 1
    )


# --- cancellation and shutdown (a real backend, slowed down) ----------------------------------
def test_client_cancel_stops_the_work(tiny_bundle):
    opts = _opts(tiny_bundle, parity="off")
    with (
        build_server(opts, backend=SlowOrtBackend(tiny_bundle)) as running,
        Gpt2DeployClient(running.address) as c,
    ):
        stream = c.generate("Hello", max_new_tokens=200, ignore_eos=True)
        it = iter(stream)
        for _ in range(3):
            next(it)
        stream.cancel()
        deadline = time.monotonic() + 10
        m = running.metrics
        while m.value("gpt2_deploy_generations_total", {"finish_reason": "cancelled"}) < 1:
            assert time.monotonic() < deadline, "the server never saw the cancel"
            time.sleep(0.02)
        time.sleep(0.3)  # were the work still running, tokens would keep coming (20 ms each)
        assert m.value("gpt2_deploy_inflight_generations") == 0  # its KV cache is gone with it
        assert m.value("gpt2_deploy_generated_tokens_total") < 50
        assert m.value("gpt2_deploy_generations_total", {"finish_reason": "length"}) == 0
        assert c.health() == "SERVING"


def test_shutdown_goes_not_serving_and_lets_streams_finish(tiny_bundle):
    running = build_server(_opts(tiny_bundle, parity="off"), backend=SlowOrtBackend(tiny_bundle))
    c = Gpt2DeployClient(running.address)
    try:
        with grpc.insecure_channel(running.address) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stream = c.generate("Hello", max_new_tokens=30, ignore_eos=True)
            it = iter(stream)
            next(it)  # the generation is in flight
            stopper = threading.Thread(target=running.stop)
            stopper.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # an open Watch is an in-flight RPC too: stop() would wait for it
            for _ in it:  # the in-flight stream runs to its end within the grace period
                pass
            stopper.join(10)
        assert stream.finish_reason == "length" and len(stream.token_ids) == 30
        assert not stopper.is_alive() and running.runtime.state == "stopped"
        assert not running.runtime.backend.is_loaded  # backends closed after the server stopped
    finally:
        c.close()
        running.stop()


# --- the startup canary ------------------------------------------------------------------------
def test_canary_failure_blocks_readiness(tiny_bundle, caplog):
    from serving.proto import grpc_service_pb2 as kpb
    from serving.proto import grpc_service_pb2_grpc as kgrpc

    with (
        build_server(_opts(tiny_bundle), backend=NoisyOrtBackend(tiny_bundle)) as running,
        Gpt2DeployClient(running.address) as c,
    ):
        assert c.health() == "NOT_SERVING" and c.health(API_SERVICE) == "NOT_SERVING"
        assert running.runtime.canary == "failed" and not running.runtime.ready
        assert (
            running.metrics.value("gpt2_deploy_parity_checks_total", {"kind": "canary", "result": "fail"})
            == 1
        )
        assert c.model_info().canary == "failed"
        # Inference is refused with the canary's numbers; --parity off is the way to serve anyway.
        with pytest.raises(grpc.RpcError) as info:
            c.generate("Hello", max_new_tokens=2).result()
        details = info.value.details()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, details
        assert "max|Δlogits|" in details and "top-1" in details and "first divergence" in details
        assert "--parity off" in details
        with pytest.raises(grpc.RpcError) as info:
            c.score("Hello world", top_k=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        ids = np.asarray([[1, 2]], dtype=np.int64)
        with grpc.insecure_channel(running.address) as ch, pytest.raises(grpc.RpcError) as info:
            kgrpc.GRPCInferenceServiceStub(ch).ModelInfer(
                kpb.ModelInferRequest(
                    model_name="tiny",
                    raw_input_contents=[ids.tobytes()],
                    inputs=[
                        kpb.ModelInferRequest.InferInputTensor(
                            name="input_ids", datatype="INT64", shape=[1, 2]
                        )
                    ],
                )
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # CheckParity still works (how the failure is investigated) and reports the divergence.
        report = c.check_parity("Hello", max_new_tokens=2)
        assert not report.passed and report.first_diverging_step == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "startup canary FAILED" in logged and "max|Δlogits|" in logged
    assert "first divergence" in logged and "top-1" in logged


def test_strict_parity_refuses_to_start(tiny_bundle):
    with pytest.raises(ParityRefused, match="strict"):
        build_server(_opts(tiny_bundle, parity="strict"), backend=NoisyOrtBackend(tiny_bundle))


def test_bad_options_and_port_in_use(tiny_bundle, server):
    with pytest.raises(ValueError, match="parity must be one of off, warn, strict"):
        build_server(_opts(tiny_bundle, parity="maybe"))
    with pytest.raises(OSError, match="cannot listen"):
        build_server(ServeOptions(bundle=tiny_bundle.root, port=server.port, parity="off"))


# --- shadow parity -----------------------------------------------------------------------------
def test_shadow_parity_rechecks_live_requests(tiny_bundle):
    with (
        build_server(_opts(tiny_bundle, parity="off", shadow_rate=1.0)) as running,
        Gpt2DeployClient(running.address) as c,
    ):
        c.generate("Hello, my name is", max_new_tokens=6).result()
        c.generate("Once upon a time", max_new_tokens=6, temperature=0.8, seed=1).result()
        shadow = running.runtime.shadow
        assert shadow.join(timeout=30)
        assert shadow.counters()["checked"] == 2 and shadow.last_report  # logits, teacher-forced
        m = running.metrics
        assert m.value("gpt2_deploy_parity_checks_total", {"kind": "shadow", "result": "pass"}) == 2
        assert m.value("gpt2_deploy_shadow_dropped_total") == 0
        assert running.runtime.canary == "off" and c.health() == "SERVING"


# --- queueing, shutdown races ----------------------------------------------------------------
def test_a_full_queue_refuses_at_once_without_stalling_running_streams(tiny_bundle):
    """One row at a time and room for one waiting request: the third request is refused with
    RESOURCE_EXHAUSTED naming the limit and the flag; the running one keeps stepping."""
    with (
        build_server(
            _opts(tiny_bundle, parity="off", max_batch_size=1, max_queue=1),
            backend=SlowOrtBackend(tiny_bundle),
        ) as running,
        Gpt2DeployClient(running.address, timeout=60) as c,
    ):
        first = c.generate("Hello", max_new_tokens=60, ignore_eos=True)  # ~1.2 s of 20 ms steps
        it = iter(first)
        next(it)  # admitted and running
        second = c.generate("Hi", max_new_tokens=2, ignore_eos=True)  # waits in the queue
        deadline = time.monotonic() + 10
        while running.runtime.scheduler.queue_depth() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            c.generate("Hey", max_new_tokens=2).result()
        assert time.monotonic() - t0 < 1.0  # at once, not after a wait
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "limit 1" in info.value.details() and "--max-queue" in info.value.details()
        for _ in it:
            pass
        assert first.finish_reason == "length" and len(first.token_ids) == 60  # never stalled
        assert len(second.result().token_ids) == 2  # the queued one ran after it
        assert running.metrics.value("gpt2_deploy_queue_depth") == 0


def test_time_to_first_token_includes_queueing(tiny_bundle):
    with (
        build_server(
            _opts(tiny_bundle, parity="off", max_batch_size=1), backend=SlowOrtBackend(tiny_bundle)
        ) as running,
        Gpt2DeployClient(running.address, timeout=60) as c,
    ):
        busy = c.generate("Hello", max_new_tokens=20, ignore_eos=True)  # ~0.4 s on the one row
        next(iter(busy))
        f = c.generate("Hello", max_new_tokens=2).result()
        busy.result()
        assert f.finish.time_to_first_token_s >= 0.25
        assert running.metrics.value("gpt2_deploy_queue_wait_seconds_count") >= 2


def test_close_leaves_a_busy_backend_open_and_refuses_queued_work(tiny_bundle):
    from export.compare import tolerance_for
    from serving.errors import Unavailable
    from serving.generation import GenerationRequest
    from serving.metrics import ServerMetrics
    from serving.runtime import ModelRuntime

    release, entered = threading.Event(), threading.Event()

    class StuckOrt(OrtBackend):  # the real backend, stuck inside a forward until released
        def _forward(self, *args):
            if entered.is_set():
                release.wait(30)
            entered.set()
            return super()._forward(*args)

    rt = ModelRuntime(
        tiny_bundle,
        StuckOrt(tiny_bundle),
        metrics=ServerMetrics(),
        tolerance=tolerance_for("fp32"),
        close_timeout_s=0.2,
    )
    rt.load()
    rt.state = "serving"
    events = rt.generator.stream(GenerationRequest(rt.encode("Hello"), max_new_tokens=4))
    next(events)  # the prefill ran; the first decode step is stuck
    closer = threading.Thread(target=rt.close)
    closer.start()
    closer.join(10)
    assert not closer.is_alive() and rt.backend.is_loaded  # skipped, not closed under the step
    release.set()
    with pytest.raises(Unavailable):  # refused at once after close, not INTERNAL
        rt.generate(GenerationRequest([1], 1))
    for _ in events:  # the stuck row ends (cancelled by the stop), it does not hang
        pass
    assert rt.scheduler.stop(10)
    rt.backend.close()


def test_runtime_check_parity_honours_cancellation(server):
    from serving.errors import Cancelled

    ids = server.runtime.tokenizer.encode("Hello")
    with pytest.raises(Cancelled):
        server.runtime.check_parity(ids, 4, cancelled=lambda: True)
    deadline = time.monotonic() + 10
    while server.runtime.scheduler.active_rows() or server.runtime.scheduler.queue_depth():
        assert time.monotonic() < deadline, "the cancelled check's rows stayed"
        time.sleep(0.02)


def test_stop_during_startup_abandons_it(tiny_bundle):
    stop = threading.Event()
    stop.set()
    port = free_port()
    with pytest.raises(StartupCancelled):
        build_server(ServeOptions(bundle=tiny_bundle.root, port=port, parity="off"), stop=stop)
    with build_server(ServeOptions(bundle=tiny_bundle.root, port=port, parity="off", threads=1)):
        pass  # the abandoned server released its port


def test_option_limits(tiny_bundle):
    with pytest.raises(ValueError, match=r"max_message_mb must be in \[2, 2047\]"):
        build_server(_opts(tiny_bundle, max_message_mb=1))
    with pytest.raises(ValueError, match="max_new_tokens_limit must be >= 1"):
        build_server(_opts(tiny_bundle, max_new_tokens_limit=0))


def test_serve_cli_rejects_a_bad_log_level(tiny_bundle):
    from typer.testing import CliRunner

    from serving.cli import app

    result = CliRunner().invoke(app, ["serve", str(tiny_bundle.root), "--log-level", "foo"])
    assert result.exit_code == 2 and "DEBUG, INFO, WARNING, ERROR" in result.output
    assert "Traceback" not in result.output


def test_uint64_seeds_are_accepted(client):
    a = client.generate("Hi", max_new_tokens=3, temperature=0.9, seed=2**64 - 1, ignore_eos=True).result()
    b = client.generate("Hi", max_new_tokens=3, temperature=0.9, seed=2**64 - 1, ignore_eos=True).result()
    assert a.token_ids == b.token_ids and len(a.token_ids) == 3
