"""Logits reduced to their top-k where they live (serving.backends.ort_reduce, run here on the CPU
EP: the same graph the CUDA EP runs) and tokens chosen from the top-k (serving.sampling): the same
token as from the full row, for greedy and top-k sampling, in the scheduler batched and solo; and
the TF32 provider option and the tolerance it picks."""

from __future__ import annotations

import queue

import numpy as np
import onnxruntime as ort
import pytest

from export.compare import tolerance_for_run
from export.errors import OptionsError
from serving.backends import BackendOptions, create_backend
from serving.backends.ort_backend import (
    CPU,
    CUDA,
    OrtBackend,
    choose_providers,
    cuda_provider_options,
    loaded_tf32,
    parse_switch,
)
from serving.backends.ort_reduce import OrtTopK, host_top_k
from serving.errors import InvalidInput
from serving.parity import served_tolerance
from serving.sampling import (
    MAX_REDUCED_TOP_K,
    SamplingParams,
    greedy_from_top,
    reduced_top_k,
    select_from_top,
    select_next,
)
from serving.scheduler import Done, Scheduler, Work

WIDE = 50257  # GPT-2's vocabulary


def rows_with_ties(rng: np.random.Generator, n: int, v: int) -> np.ndarray:
    """Continuous rows, and rows rounded to a coarse grid (ties everywhere, as fp16 logits have)."""
    x = rng.standard_normal((n, v)).astype(np.float32) * 3
    x[n // 2 :] = np.round(x[n // 2 :] * 2) / 2
    return x


@pytest.fixture(scope="module")
def device_top_k():
    return OrtTopK(ort, [CPU], threads=1)


def test_top_k_graph_equals_the_host_reduction(device_top_k):
    rng = np.random.default_rng(0)
    logits = rows_with_ties(rng, 6, 3000)
    seq = np.stack([rng.standard_normal(logits.shape).astype(np.float32), logits], axis=1)  # (B, 2, V)
    for k in (1, 2, 65):
        values, ids = device_top_k(ort.OrtValue.ortvalue_from_numpy(seq), k)
        want_values, want_ids = host_top_k(logits, k)
        assert values.shape == ids.shape == (6, k) and ids.dtype == np.int64
        assert np.array_equal(values, want_values)  # the last position's k largest, largest first
        assert np.array_equal(np.take_along_axis(logits, ids, 1), values)  # each id carries its value
        for r in range(6):  # ids agree wherever no tie crosses the k-th value
            above = values[r] > values[r, -1]
            assert set(ids[r][above]) == set(want_ids[r][want_values[r] > want_values[r, -1]])


def test_reduced_top_k_says_what_a_step_needs():
    greedy, t0 = SamplingParams(), SamplingParams(do_sample=True, temperature=0, top_k=0)
    k40 = SamplingParams(do_sample=True, top_k=40, top_p=0.9)
    assert reduced_top_k([greedy, t0]) == 2  # one value + one that shows a tie going on
    assert reduced_top_k([greedy, k40]) == 41
    assert reduced_top_k([SamplingParams(do_sample=True, top_k=MAX_REDUCED_TOP_K)]) == MAX_REDUCED_TOP_K + 1
    assert reduced_top_k([greedy, SamplingParams(do_sample=True, top_k=MAX_REDUCED_TOP_K + 1)]) is None
    assert reduced_top_k([greedy, SamplingParams(do_sample=True)]) is None  # top_k 0: the full row
    assert reduced_top_k([]) is None


def test_greedy_from_top_is_argmax_or_says_it_cannot_tell():
    rng = np.random.default_rng(1)
    logits = rows_with_ties(rng, 400, 200)
    logits[0, [3, 9]] = logits[0].max() + 1  # a tie at the top, inside the K
    logits[1, :] = 0.0  # a tie of everything: K cannot tell
    for k in (2, 3, 8):
        values, ids = host_top_k(logits, k)
        picks, ok = greedy_from_top(ids, values, 200)
        want = np.argmax(logits, -1)
        assert np.array_equal(picks[ok], want[ok])
        assert np.array_equal(ok, values[:, 0] > values[:, -1])
        assert (ok[0] and picks[0] == 3) if k > 2 else not ok[0]  # two equal maxima: a third?
        assert not ok[1]
    picks, ok = greedy_from_top(*host_top_k(logits, 200)[::-1], 200)  # K == V always decides
    assert ok.all() and np.array_equal(picks, np.argmax(logits, -1))


def _params(rng: np.random.Generator) -> SamplingParams:
    if rng.random() < 0.2:
        return SamplingParams()
    return SamplingParams(
        do_sample=True,
        temperature=float(rng.choice([0.5, 1.0, 1.3])),
        top_k=int(rng.choice([1, 2, 5, 17, 40, MAX_REDUCED_TOP_K])),
        top_p=float(rng.choice([1.0, 1.0, 0.9, 0.5])),
    )


@pytest.mark.parametrize("vocab", [500, WIDE])
def test_select_from_top_gives_the_full_rows_token(vocab, device_top_k):
    """Many random rows, parameters and seeds: the token chosen from the top-k (as the scheduler
    asks for it, via the real TopK graph) is the full row's token; where the top-k cannot decide
    it says so without touching the random stream, and the full row then gives the same draw."""
    rng = np.random.default_rng(vocab)
    n = 600 if vocab < WIDE else 60
    logits = rows_with_ties(rng, n, vocab)
    decided = undecided = 0
    for i in range(n):
        params = _params(rng)
        k = reduced_top_k([params])
        values, ids = device_top_k(ort.OrtValue.ortvalue_from_numpy(logits[i : i + 1, None]), k)
        order = rng.permutation(k)  # any order of the K: the draw walks token ids, not ranks
        seed = int(rng.integers(2**63))
        full_rng, top_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        want = select_next(logits[i], params, None if params.greedy else full_rng)
        got = select_from_top(
            ids[0][order], values[0][order], params, None if params.greedy else top_rng, vocab
        )
        if got is None:  # a tie at the row's boundary reaches the smallest of the K
            assert i >= n // 2, "a continuous row is always decided"
            undecided += 1
            x = np.sort(values[0])[::-1]
            assert x[(1 if params.greedy else params.top_k) - 1] == x[-1]
            got = select_next(logits[i], params, None if params.greedy else top_rng)
        else:
            decided += 1
        assert got == want, (i, params)
        assert top_rng.random() == full_rng.random()  # both consumed the same draws
    assert decided > n // 2 and undecided > 0  # both paths were exercised


def test_select_from_top_over_the_whole_vocabulary():
    rng = np.random.default_rng(5)
    row = rng.standard_normal(30).astype(np.float32)
    values, ids = host_top_k(row[None], 30)
    for params in (
        SamplingParams(),
        SamplingParams(do_sample=True, top_p=0.8),
        SamplingParams(do_sample=True),
    ):
        a, b = np.random.default_rng(3), np.random.default_rng(3)
        assert select_from_top(ids[0], values[0], params, b, 30) == select_next(row, params, a)


# --- the backend ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reducing(tiny_bundle):
    be = create_backend("onnxruntime", tiny_bundle, BackendOptions(threads=1, extra={"device_top_k": "on"}))
    with be:
        yield be


@pytest.fixture(scope="module")
def plain(tiny_bundle):
    with create_backend("onnxruntime", tiny_bundle, BackendOptions(threads=1)) as be:
        yield be


def test_forward_top_k_leaves_the_logits_behind(reducing, plain):
    ids = np.array([[0, 0, 5, 9, 13], [7, 8, 9, 10, 11]])
    mask = (np.arange(5) >= np.array([[2], [0]])).astype(np.int64)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    assert reducing.reduces_top_k and not plain.reduces_top_k  # auto: on for CUDA only
    assert reducing.info()["device_top_k"] and not plain.info()["device_top_k"]
    full = plain.forward(ids, mask, pos, last_only=True)
    got = reducing.forward(ids, mask, pos, last_only=True, top_k=5)
    assert got.logits is None and got.top_ids.shape == got.top_values.shape == (2, 5)
    values, _ = host_top_k(full.logits[:, -1], 5)
    assert np.array_equal(got.top_values, values)
    assert np.array_equal(np.take_along_axis(full.logits[:, -1], got.top_ids, 1), got.top_values)
    assert np.array_equal(got.last_logits(), full.logits[:, -1])  # fetched on demand
    # a decode step on the reduced step's KV cache equals one on the full step's
    step = (np.array([[3], [4]]), np.concatenate([mask, np.ones((2, 1), np.int64)], 1), pos[:, -1:] + 1)
    a = plain.forward(*step, full.present, last_only=True)
    b = reducing.forward(*step, got.present, last_only=True, top_k=2)
    assert np.array_equal(b.top_ids[:, 0], np.argmax(a.logits[:, -1], -1))
    # a backend that does not reduce ignores top_k and returns its full logits
    assert np.array_equal(plain.forward(ids, mask, pos, last_only=True, top_k=5).logits, full.logits)


@pytest.mark.parametrize("top_k", [0, -1, True, 2.5])
def test_forward_refuses_a_bad_top_k(reducing, top_k):
    ids, mask, pos = np.array([[1, 2]]), np.ones((1, 2), np.int64), np.array([[0, 1]])
    with pytest.raises(InvalidInput, match="top_k"):
        reducing.forward(ids, mask, pos, last_only=True, top_k=top_k)
    with pytest.raises(InvalidInput, match="last_only"):
        reducing.forward(ids, mask, pos, top_k=2)  # every position's logits cannot be reduced


# --- the scheduler --------------------------------------------------------------------------------
def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50000, int(k)).tolist() for k in rng.choice(np.arange(2, 30), n, replace=False)]


def _run(
    backend, works: list[Work], late: dict[int, tuple[int, int]] | None = None
) -> tuple[list[list[int]], Scheduler]:
    """Every work's tokens; work j starts when work i delivered its k-th token (``late[j] = (i, k)``)."""
    late = late or {}
    sinks = [queue.SimpleQueue() for _ in works]
    with Scheduler(backend) as sched:
        pending = dict(late)

        def sink(j):
            def put(e):
                sinks[j].put(e)
                for k, (i, n) in list(pending.items()):
                    if i == j and getattr(e, "step", -1) + 1 >= n:
                        del pending[k]
                        sched.submit(works[k], sink(k))

            return put

        for j, w in enumerate(works):
            if j not in late:
                sched.submit(w, sink(j))
        out = []
        for q in sinks:
            tokens = []
            while not isinstance(e := q.get(timeout=120), Done):
                tokens.append(e.token_id)
            assert e.reason == "length", e
            out.append(tokens)
    return out, sched


def _works(params: list[SamplingParams], seed: int) -> list[Work]:
    return [
        Work(p, max_new_tokens=12 + 3 * i, sampling=sp)
        for i, (p, sp) in enumerate(zip(_prompts(len(params), seed), params))
    ]


MIXED = [
    SamplingParams(),
    SamplingParams(do_sample=True, top_k=40, seed=1),
    SamplingParams(do_sample=True, top_k=5, top_p=0.8, temperature=0.7, seed=2),
    SamplingParams(),
    SamplingParams(do_sample=True, top_k=MAX_REDUCED_TOP_K, temperature=1.3, seed=3),
]


def test_reduced_and_full_paths_give_the_same_tokens_batched_and_solo(reducing, plain):
    late = {3: (0, 3), 4: (1, 5)}  # joins mid-way: left padding, joins and removals
    full, _ = _run(plain, _works(MIXED, 0), late)
    reduced, sched = _run(reducing, _works(MIXED, 0), late)
    assert reduced == full
    assert sched.reduced_steps == sched.steps and sched.steps > 12  # every forward was reduced
    solo = [_run(reducing, [w])[0][0] for w in _works(MIXED, 0)]
    assert solo == reduced  # batched == solo on the reduced path too


def test_a_row_that_needs_full_logits_turns_reduction_off_while_it_runs(reducing, plain):
    params = [SamplingParams(do_sample=True, seed=9), *MIXED[:2]]  # top_k 0 (the shortest row): full rows
    full, _ = _run(plain, _works(params, 1))
    reduced, sched = _run(reducing, _works(params, 1))
    assert reduced == full
    assert 0 < sched.reduced_steps < sched.steps  # full steps while the top_k=0 row ran, then reduced


class OneValueOrt(OrtBackend):
    """The real ONNX Runtime backend reducing to one value whatever is asked: no row can be decided
    from its top-k, so every token must come from the full row fetched back (the fallback)."""

    def _forward_top_k(self, input_ids, attention_mask, position_ids, past, k):
        return super()._forward_top_k(input_ids, attention_mask, position_ids, past, 1)


def test_rows_the_top_k_cannot_decide_fall_back_to_their_full_logits(tiny_bundle, plain):
    params = MIXED[:3]
    full, _ = _run(plain, _works(params, 2))
    with OneValueOrt(tiny_bundle, BackendOptions(threads=1, extra={"device_top_k": True})) as be:
        got, sched = _run(be, _works(params, 2))
    assert got == full
    assert sched.top_k_fallbacks == sum(len(t) for t in got)  # every chosen token fell back


# --- TF32 and the tolerance -----------------------------------------------------------------------
def test_cuda_provider_options_state_tf32():
    available = [CUDA, CPU]
    assert choose_providers("cuda:1", None, available) == [(CUDA, {"device_id": "1"}), CPU]  # ORT's default
    assert choose_providers("cuda", None, available, tf32=False) == [
        (CUDA, {"device_id": "0", "use_tf32": "0"}),
        CPU,
    ]
    assert cuda_provider_options(2, True) == {"device_id": "2", "use_tf32": "1"}
    assert choose_providers("cpu", None, available, tf32=False) == [CPU]  # TF32 is a CUDA setting
    assert [parse_switch("tf32", v) for v in (None, "default", "auto", True, "off", "1", "No")] == [
        None,
        None,
        None,
        True,
        False,
        True,
        False,
    ]
    with pytest.raises(OptionsError, match="tf32 must be on/off"):
        parse_switch("tf32", "maybe")


class _ReportsProviderOptions:
    """What ``InferenceSession.get_provider_options()`` returns on a CUDA machine (none here)."""

    def __init__(self, use_tf32: str):
        self.options = {CUDA: {"device_id": "0", "use_tf32": use_tf32}, CPU: {}}

    def get_provider_options(self):
        return self.options


def test_loaded_tf32_reads_what_the_session_runs_with(plain):
    assert loaded_tf32(_ReportsProviderOptions("0"), None) is False
    assert loaded_tf32(_ReportsProviderOptions("1"), False) is True  # the session's word wins
    assert loaded_tf32(plain._session, None) is True  # not reported: ORT's default, on
    assert loaded_tf32(plain._session, False) is False
    assert plain.info()["tf32"] is False  # a CPU session never runs TF32


def test_the_tolerance_follows_the_reported_tf32(tiny_bundle, plain):
    assert tolerance_for_run("fp32", device="cuda", tf32=True).name == "tf32"
    assert tolerance_for_run("fp32", device="cuda", tf32=False).name == "fp32"
    assert tolerance_for_run("fp16", device="cuda", tf32=True).name == "fp16"
    assert served_tolerance(plain).name == "fp32"

    class CudaLikeOrt(OrtBackend):
        """The real backend, run on the CPU, reporting TF32 as a CUDA session would (no GPU here)."""

        tf32: bool | None = None

        def _info_impl(self):
            return {**super()._info_impl(), "tf32": self.tf32}

    with CudaLikeOrt(tiny_bundle, BackendOptions(threads=1)) as be:
        be.options.device = "cuda:0"
        for reported, name in ((True, "tf32"), (False, "fp32"), (None, "tf32")):
            be.tf32 = reported
            assert served_tolerance(be).name == name, reported


# --- on a GPU -------------------------------------------------------------------------------------
def _ort_cuda_reason() -> str | None:
    if CUDA not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no {CUDA} (providers: {ort.get_available_providers()})"
    return None


@pytest.mark.gpu
def test_on_cuda_the_reduced_path_is_on_and_exact(tiny_bundle):
    reason = _ort_cuda_reason()
    if reason:
        pytest.skip(reason)
    with (
        create_backend("onnxruntime", tiny_bundle, BackendOptions(device="cuda")) as on,
        create_backend(
            "onnxruntime", tiny_bundle, BackendOptions(device="cuda", extra={"device_top_k": "off"})
        ) as off,
    ):
        assert on.reduces_top_k and not off.reduces_top_k and on.info()["tf32"] is True
        full, _ = _run(off, _works(MIXED, 3))
        reduced, sched = _run(on, _works(MIXED, 3))
    assert reduced == full and sched.reduced_steps == sched.steps


@pytest.mark.gpu
def test_on_cuda_tf32_off_is_what_the_session_runs(tiny_bundle):
    reason = _ort_cuda_reason()
    if reason:
        pytest.skip(reason)
    with create_backend(
        "onnxruntime", tiny_bundle, BackendOptions(device="cuda", extra={"tf32": "off"})
    ) as be:
        assert be.info()["tf32"] is False and served_tolerance(be).name == "fp32"
