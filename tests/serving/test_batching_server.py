"""Many concurrent gRPC streams on one batched server: zero errors, batched == solo, health under
load, deadlines, the batched CheckParity and the scheduler's metrics."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import grpc
import pytest

from serving.client import Gpt2DeployClient
from serving.generation import GenerationRequest
from serving.proto import gpt2_deploy_pb2 as pb
from serving.proto import gpt2_deploy_pb2_grpc as pb_grpc
from serving.sampling import SamplingParams
from serving.server import ServeOptions, build_server


@pytest.fixture(scope="module")
def server(tiny_bundle):
    opts = ServeOptions(
        bundle=tiny_bundle.root, port=0, threads=1, grace_s=5, parity="off", max_batch_size=32
    )
    with build_server(opts) as running:
        yield running


async def _streams(address: str, requests: list[pb.GenerateRequest], timeout: float = 120) -> list:
    """All requests at once over one grpc.aio channel; each result: (token ids, finish) or the error."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.Gpt2DeployStub(channel)

        async def one(req):
            ids, finish = [], None
            try:
                async for r in stub.Generate(req, timeout=timeout):
                    ids += list(r.token_ids)
                    if r.HasField("finish"):
                        finish = r.finish
            except grpc.aio.AioRpcError as e:
                return e
            return ids, finish

        return await asyncio.gather(*(one(r) for r in requests))


def _request(i: int, n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[(i * 37 + k) % 50000 for k in range(1 + i % 23)]),
        max_new_tokens=n,
        ignore_eos=True,
        sampling=pb.SamplingParams(do_sample=True, temperature=1.0, seed=i),
    )


def test_64_streams_x_128_tokens_zero_errors_batched_equal_solo_and_health_answers(server):
    reqs = [_request(i, 128) for i in range(64)]
    latencies: list[float] = []
    stop = threading.Event()

    def probe():  # health on its own channel while every stream runs
        with Gpt2DeployClient(server.address) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert c.health(timeout=5) == "SERVING"
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.perf_counter()
    try:
        results = asyncio.run(_streams(server.address, reqs))
    finally:
        stop.set()
        prober.join(30)
    elapsed = time.perf_counter() - t0
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert all(len(ids) == 128 and f.reason == pb.FINISH_REASON_LENGTH for ids, f in results)
    # Each seeded stream equals the same request run alone (here: through the runtime's generator
    # with nothing else running).
    gen = server.runtime.generator
    for i in (0, 17, 63):
        r = reqs[i]
        solo = gen.generate(
            GenerationRequest(
                list(r.token_ids.ids), 128, SamplingParams(do_sample=True, seed=i), stop_at_eos=False
            )
        )
        assert results[i][0] == solo.token_ids, i
    m = server.metrics
    assert m.value("gpt2_deploy_batch_size_count", {"kind": "decode"}) > 0
    mean_rows = m.value("gpt2_deploy_batch_size_sum", {"kind": "decode"}) / m.value(
        "gpt2_deploy_batch_size_count", {"kind": "decode"}
    )
    assert mean_rows > 8, f"streams were not batched (mean rows per decode step {mean_rows:.1f})"
    assert m.value("gpt2_deploy_rows_joined_total") >= 64 and m.value("gpt2_deploy_rows_removed_total") >= 64
    assert latencies, "the health probe never answered"
    print(
        f"\n64x128 tokens in {elapsed:.1f} s; health p50 {statistics.median(latencies) * 1e3:.1f} ms, "
        f"max {max(latencies) * 1e3:.1f} ms over {len(latencies)} checks"
    )
    assert statistics.median(latencies) < 0.1 and max(latencies) < 2.0


def test_256_concurrent_streams_in_one_process(server):
    results = asyncio.run(_streams(server.address, [_request(i, 8) for i in range(256)]))
    assert not [r for r in results if isinstance(r, Exception)]
    assert all(len(ids) == 8 for ids, _ in results)


def test_a_deadline_removes_the_row_and_frees_its_cache(tiny_bundle):
    from tests.serving.test_server import SlowOrtBackend

    opts = ServeOptions(bundle=tiny_bundle.root, port=0, threads=1, grace_s=2, parity="off")
    with (
        build_server(opts, backend=SlowOrtBackend(tiny_bundle)) as running,
        Gpt2DeployClient(running.address) as c,
    ):
        keep = c.generate("Hello", max_new_tokens=40, ignore_eos=True)  # runs beside it
        it = iter(keep)
        next(it)
        with pytest.raises(grpc.RpcError) as info:
            c.generate("Hi", max_new_tokens=200, ignore_eos=True, timeout=0.3).result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in it:
            pass
        assert len(keep.token_ids) == 40  # undisturbed
        sched = running.runtime.scheduler
        deadline = time.monotonic() + 5
        while sched.active_rows():
            assert time.monotonic() < deadline, "the expired row kept its place"
            time.sleep(0.02)
        m = running.metrics
        assert m.value("gpt2_deploy_generations_total", {"finish_reason": "cancelled"}) == 1
        assert m.value("gpt2_deploy_inflight_generations") == 0


def test_batched_check_parity_names_the_batch_and_compares_with_solo(server):
    with Gpt2DeployClient(server.address, timeout=120) as c:
        report = c.check_parity("Hello, my name is", max_new_tokens=10, batched=True)
    assert report.passed and report.batched and report.batched_vs_solo_passed, report.report
    assert report.batched_vs_solo_max_abs <= 1e-4 and report.batched_vs_solo_first_diverging_step == -1
    assert max(report.batch_sizes) >= 3  # the prompt really ran among companion rows
    assert any("joining after the target's step" in n for n in report.notes)
    assert "batched vs solo" in report.report
