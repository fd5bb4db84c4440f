"""The TensorRT backend: refusal paths on any machine; real engines (marked trt) where TensorRT runs.

No test here pretends an engine ran: without TensorRT only the checks that come before TensorRT
(device, manifest, imports, compatibility decisions) are exercised.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from deploy.cuda import tensorrt_unavailable_reason
from deploy.engine import EngineEntry, RuntimeInfo, upsert_engine
from export.manifest import Bundle
from serving.backends import BackendOptions, create_backend
from serving.backends.trt_backend import TensorRTBackend, import_tensorrt
from serving.errors import BackendUnavailable, InvalidInput, OutOfRange, Unavailable

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_bundle.root, dst, ignore=shutil.ignore_patterns("engines"))
    return Bundle.open(dst, verify_hashes=False)


def _record(bundle: Bundle, **over) -> EngineEntry:
    """A manifest entry for a (non-runnable) engine file: enough to reach the checks before TensorRT."""
    m = bundle.manifest
    e = EngineEntry(
        file="engines/x.engine",
        tensorrt_version="10.13.3.9",
        gpu_name="NVIDIA H100",
        compute_capability="9.0",
        precision="fp16",
        profiles=[],
        onnx_file=m.model_file,
        onnx_sha256=m.files[m.model_file].sha256,
        flags={"version_compatible": False},
        preset="server",
    )
    e = replace(e, **over)
    (bundle.root / "engines").mkdir(exist_ok=True)
    (bundle.root / e.file).write_bytes(b"not a plan")
    bundle.update_manifest(replace(m, engines=upsert_engine(m.engines, e)))
    return e


def test_registered_and_cheap_to_construct(tiny_bundle):
    be = create_backend("tensorrt", tiny_bundle, BackendOptions(device="cuda"))
    assert isinstance(be, TensorRTBackend) and not be.is_loaded  # no TensorRT, no CUDA touched yet


def test_refuses_a_cpu_device(tiny_bundle):
    with pytest.raises(BackendUnavailable, match="CUDA devices only; device 'cpu' given"):
        create_backend("tensorrt", tiny_bundle).load()


def test_kv_slots_are_leased_and_released_explicitly(tiny_bundle):
    """The slot bookkeeping (no CUDA involved): a released cache frees its slot at once, a stale
    cache can neither be used nor free a slot that was leased again, and a cache invalidated by a
    failed step still releases its slot (no leak after errors)."""
    from serving.backends.trt_backend import KV_CACHES, TrtKVCache, _KVSlot

    be = TensorRTBackend(tiny_bundle, BackendOptions(device="cuda"))
    be._slots = [_KVSlot(i) for i in range(KV_CACHES)]  # buffers are allocated at load; none here
    be._loaded = True  # release() is a no-op on an unloaded backend
    caches = [TrtKVCache(1, 0, be._take_slot(), id(be)) for _ in range(KV_CACHES)]
    with pytest.raises(Unavailable, match=f"all {KV_CACHES} KV caches"):
        be._take_slot()
    be.release(caches[0])
    again = TrtKVCache(1, 0, be._take_slot(), id(be))  # the freed slot, leased again
    assert again.slot is caches[0].slot
    be.release(caches[0])  # stale: must not free the new lease
    assert again.slot.in_use
    with pytest.raises(InvalidInput, match="already advanced"):
        be._own(caches[0])
    caches[1].slot.version += 1  # what a failed forward does to its slot
    with pytest.raises(InvalidInput):
        be._own(caches[1])
    be.release(caches[1])  # still its own lease: the slot comes back
    assert not caches[1].slot.in_use


def test_refuses_a_bundle_without_engines(bundle_copy):
    with pytest.raises(BackendUnavailable, match="has no TensorRT engine; build one with `gpt2-deploy build"):
        create_backend("tensorrt", bundle_copy, BackendOptions(device="cuda")).load()


def test_refuses_an_unrecorded_engine_path(bundle_copy):
    _record(bundle_copy)
    be = create_backend("tensorrt", bundle_copy, BackendOptions(device="cuda", engine="engines/other.engine"))
    with pytest.raises(
        BackendUnavailable, match=r"not recorded in the bundle; recorded engines: \['engines/x.engine'\]"
    ):
        be.load()


@pytest.mark.skipif(tensorrt_unavailable_reason("tensorrt") is None, reason="TensorRT is installed here")
def test_error_when_tensorrt_is_absent_names_both_runtimes_and_extras(bundle_copy):
    _record(bundle_copy)
    with pytest.raises(BackendUnavailable) as e:
        create_backend(
            "tensorrt", bundle_copy, BackendOptions(device="cuda", extra={"runtime": "tensorrt"})
        ).load()
    assert "cannot be imported here" in str(e.value) and "gpt2-deploy[tensorrt]" in str(e.value)
    assert "gpt2-deploy[tensorrt-lean]" in str(e.value)
    with pytest.raises(BackendUnavailable, match="runtime 'tensorrt_rtx' is not one of auto, tensorrt"):
        import_tensorrt("tensorrt_rtx")


def test_engine_selection_reports_every_engine_it_refused(bundle_copy):
    _record(bundle_copy, file="engines/old.engine", tensorrt_version="10.8.0.43")
    _record(bundle_copy, file="engines/stale.engine", onnx_sha256="0" * 64)
    _record(bundle_copy, file="engines/orin.engine", compute_capability="8.7", gpu_name="Orin")
    be = TensorRTBackend(Bundle.open(bundle_copy.root), BackendOptions(device="cuda"))
    here = RuntimeInfo("tensorrt", "10.13.3.9", "9.0", "NVIDIA H100")
    with pytest.raises(BackendUnavailable) as e:
        be._select_entry(here)
    msg = str(e.value)
    assert "engines/old.engine: the engine was built with TensorRT 10.8.0.43" in msg
    assert "engines/stale.engine: it was built from a different model.onnx" in msg
    assert "engines/orin.engine: the engine was built on Orin (compute capability 8.7)" in msg
    # newest first: a runnable engine recorded last wins
    _record(bundle_copy, file="engines/good.engine")
    be = TensorRTBackend(Bundle.open(bundle_copy.root), BackendOptions(device="cuda"))
    assert be._select_entry(here).file == "engines/good.engine"


def test_an_untrusted_host_code_engine_is_passed_over_here_and_in_the_image_check(bundle_copy, monkeypatch):
    """The backend and the image's engine check (entrypoint.sh) pick by one rule: an older native
    engine runs when the newest embeds host code nobody trusted (before, the image check said "engine
    ok" for the older one and `serve` then refused the newest)."""
    _record(bundle_copy, file="engines/native.engine")
    _record(bundle_copy, file="engines/vc.engine", flags={"version_compatible": True})  # newest
    here = RuntimeInfo("tensorrt", "10.13.3.9", "9.0", "NVIDIA H100")
    bundle = Bundle.open(bundle_copy.root)
    assert (
        TensorRTBackend(bundle, BackendOptions(device="cuda"))._select_entry(here).file
        == "engines/native.engine"
    )
    trusting = BackendOptions(device="cuda", extra={"trust_engine_host_code": True})
    assert TensorRTBackend(bundle, trusting)._select_entry(here).file == "engines/vc.engine"

    spec = importlib.util.spec_from_file_location(
        "engine_status", ROOT / "deploy" / "images" / "engine_status.py"
    )
    assert spec is not None and spec.loader is not None
    engine_status = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine_status)
    # runtime_info asks TensorRT and the GPU, which this machine lacks: answer with the same runtime
    monkeypatch.setattr(engine_status, "runtime_info", lambda device, runtime: here)
    assert engine_status.engine_status(str(bundle.root)) == (
        0,
        "engine ok: engines/native.engine runs on NVIDIA H100 with tensorrt 10.13.3.9",
    )
    assert engine_status.engine_status(str(bundle.root), trust_host_code=True)[1].startswith(
        "engine ok: engines/vc.engine"
    )


# --- real engines ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(tiny_bundle, tmp_path_factory):
    """The tiny bundle with fp32, fp16 and a version-compatible fp32 engine (built once)."""
    reason = tensorrt_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from deploy.trt_build import BuildOptions, build_engine

    dst = tmp_path_factory.mktemp("trt-serve") / "tiny"
    shutil.copytree(tiny_bundle.root, dst)
    b = Bundle.open(dst)
    # a small prompt limit so that longer prompts exercise the token-by-token continuation
    common = dict(preset="orin-nano", max_batch=2, max_prompt=16, opt_level=1, progress=False)
    built = {p: build_engine(b, BuildOptions(precision=p, **common)) for p in ("fp16", "fp32")}
    built["vc"] = build_engine(b, BuildOptions(precision="fp32", version_compatible=True, **common))
    return Bundle.open(dst), built


def _trt(bundle, entry, **extra):
    return create_backend(
        "tensorrt", bundle, BackendOptions(device="cuda", engine=entry.file, extra=extra)
    ).load()


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_teacher_forced_parity_with_the_reference(engines, precision):
    from export.compare import tolerance_for
    from serving.parity import reference_backend, teacher_forced_parity

    bundle, built = engines
    entry = built[precision]
    rng = np.random.default_rng(0)
    # prompt 24 > max_prompt 16: the backend prefills 16 and continues token by token
    seqs = [rng.integers(0, bundle.dims.vocab_size, 24 + 8).tolist() for _ in range(2)]
    with _trt(bundle, entry) as served, reference_backend(bundle, "cpu") as ref:
        report = teacher_forced_parity(served, ref, seqs, tolerance_for(entry.tolerance_name), 24)
        print(report)
        assert report, str(report)
        assert served.info()["precision"] == precision and served.info()["max_prompt"] == 16


@pytest.mark.trt
def test_batch_left_padding_and_last_only(engines):
    from export.compare import compare_logits, tolerance_for
    from serving.parity import reference_backend

    bundle, built = engines
    ids = np.array([[11, 12, 13, 14, 15], [50256, 50256, 21, 22, 23]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=np.int64)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    tol = tolerance_for(built["fp32"].tolerance_name)
    with _trt(bundle, built["fp32"]) as served, reference_backend(bundle, "cpu") as ref:
        a, r = served.forward(ids, mask, pos), ref.forward(ids, mask, pos)
        assert compare_logits(r.logits, a.logits, mask.astype(bool), tol, "prefill")
        nxt = np.array([[7], [8]], dtype=np.int64)
        mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos2 = pos[:, -1:] + 1
        a2 = served.forward(nxt, mask2, pos2, a.present, last_only=True)
        r2 = ref.forward(nxt, mask2, pos2, r.present, last_only=True)
        assert a2.logits.shape == (2, 1, bundle.dims.vocab_size)
        assert compare_logits(r2.logits, a2.logits, None, tol, "decode")
        # the superseded cache is refused, not silently reused
        with pytest.raises(InvalidInput, match="already advanced"):
            served.forward(nxt, mask2, pos2, a.present)
        with pytest.raises(OutOfRange, match="maximum batch 2"):
            served.empty_cache(3)


@pytest.mark.trt
def test_lean_runtime_loads_the_version_compatible_engine(engines):
    reason = tensorrt_unavailable_reason("tensorrt_lean")
    if reason:
        pytest.skip(reason)
    from export.compare import tolerance_for
    from serving.parity import reference_backend, teacher_forced_parity

    bundle, built = engines
    seq = list(range(100, 120))
    # a version-compatible plan carries the lean runtime as host code: refused unless trusted
    with pytest.raises(BackendUnavailable, match="--trust-engine-host-code"):
        _trt(bundle, built["vc"], runtime="tensorrt_lean")
    with (
        _trt(bundle, built["vc"], runtime="tensorrt_lean", trust_engine_host_code=True) as served,
        reference_backend(bundle) as ref,
    ):
        assert served.info()["runtime"] == "tensorrt_lean"
        report = teacher_forced_parity(served, ref, [seq], tolerance_for(built["vc"].tolerance_name), 12)
        assert report, str(report)
    # and the lean runtime refuses the plain engine before TensorRT sees it
    with pytest.raises(BackendUnavailable, match="runs only version-compatible engines"):
        _trt(bundle, built["fp32"], runtime="tensorrt_lean")


@pytest.mark.trt
def test_greedy_generation_through_the_grpc_server(engines):
    import grpc

    from serving.backends import create_backend as make
    from serving.generation import GenerationRequest, Generator
    from serving.proto import gpt2_deploy_pb2 as pb
    from serving.proto import gpt2_deploy_pb2_grpc as pb_grpc
    from serving.server import ServeOptions, build_server
    from serving.tokenizer import Tokenizer

    bundle, built = engines
    prompt = [464, 2068, 7586, 21831, 18045]
    # the reference's greedy continuation, generated by the same loop on the torch backend
    tok = Tokenizer.from_dir(bundle.tokenizer_dir)
    with make("torch", bundle) as ref:
        want = Generator(ref, tok).generate(GenerationRequest(prompt, 12, stop_at_eos=False)).token_ids
    opts = ServeOptions(bundle=bundle.root, backend="tensorrt", device="cuda", port=0, parity="strict")
    backend = create_backend("tensorrt", bundle, BackendOptions(device="cuda", engine=built["fp32"].file))
    with build_server(opts, backend=backend) as server:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.Gpt2DeployStub(ch)
            msgs = list(
                stub.Generate(
                    pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_new_tokens=12, ignore_eos=True)
                )
            )
            info = stub.ModelInfo(pb.ModelInfoRequest())
    got = list(msgs[-1].finish.token_ids)
    assert got == want, f"TensorRT greedy {got} != reference {want}"
    assert "tensorrt" in str(info)
