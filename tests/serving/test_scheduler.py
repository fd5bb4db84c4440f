"""The batching scheduler on real backends: batched == solo token for token, joins, removals,
failure isolation, cancellation, fairness and the queue limit."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from serving.backends import BackendOptions, create_backend
from serving.backends.ort_backend import OrtBackend
from serving.errors import ResourceExhausted
from serving.generation import Completion, FinalEvent, GenerationRequest, Generator
from serving.sampling import SamplingParams
from serving.scheduler import Done, Scheduler, SchedulerOptions, Token, Work
from serving.tokenizer import Tokenizer

WORDS = "The a of cat dog run big small red blue house tree car one two three it is was and or but".split()


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle):
    return Tokenizer.from_dir(tiny_bundle.tokenizer_dir)


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def backend(request, tiny_bundle):
    be = create_backend(request.param, tiny_bundle, BackendOptions(threads=1)).load()
    yield be
    be.close()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Random token prompts of n different lengths (1..40)."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice(np.arange(1, 41), size=n, replace=False)
    return [rng.integers(0, 50000, int(k)).tolist() for k in lengths]


def first_new(tokens: list[int], start: int = 4) -> int:
    """A token that first appears at index >= start: a stop on it ends the row there, mid-way."""
    return next(t for i, t in enumerate(tokens) if i >= start and t not in tokens[:i])


def seeded(seed: int, **kw) -> SamplingParams:
    return SamplingParams(do_sample=True, temperature=kw.pop("temperature", 1.0), seed=seed, **kw)


def requests(gen: Generator) -> list[GenerationRequest]:
    """Greedy and seeded rows, different lengths and max_new_tokens, a stop id, a stop string and
    an 'EOS' (a token the row really produces, made the generator's EOS) that end rows mid-batch.
    (Greedy decoding of the random tiny weights repeats one token; seeded rows vary.)"""
    p = prompts(6)

    def cont(i: int, sp: SamplingParams) -> list[int]:
        return gen.generate(GenerationRequest(p[i], 24, sp, stop_at_eos=False)).token_ids

    stop_id = first_new(cont(2, seeded(3)))
    stop_text = gen.tokenizer.decode([first_new(cont(3, seeded(4)), 8)])
    return [
        GenerationRequest(p[0], 30, stop_at_eos=False),
        GenerationRequest(p[1], 7, seeded(11, top_k=50, top_p=0.95), stop_at_eos=False),
        GenerationRequest(p[2], 24, seeded(3), stop_token_ids=[stop_id], stop_at_eos=False),
        GenerationRequest(p[3], 24, seeded(4), stop_strings=[stop_text], stop_at_eos=False),
        GenerationRequest(p[4], 20, seeded(5, temperature=1.3), stop_at_eos=False),
        GenerationRequest(p[5], 18, seeded(6), stop_at_eos=True),
    ]


def run_staggered(gen: Generator, reqs, start_after: dict[int, tuple[int, int]]) -> list[FinalEvent]:
    """Submit rows to gen's scheduler; row j starts when row i delivered its k-th token
    (``start_after[j] = (i, k)``), the others at once. Returns each row's FinalEvent."""
    sched = gen.scheduler
    sinks = [queue.SimpleQueue() for _ in reqs]
    finals: list[FinalEvent | None] = [None] * len(reqs)
    waiting = {j: ik for j, ik in start_after.items()}
    tickets = {}
    lock = threading.Lock()

    def submit(j: int) -> None:
        tickets[j] = sched.submit(gen.work(reqs[j]), lambda e, j=j: on_event(j, e))

    def on_event(j: int, event) -> None:  # the scheduler thread: later rows join mid-way
        sinks[j].put(event)
        if isinstance(event, Token):
            with lock:
                due = [k for k, (i, n) in waiting.items() if i == j and event.step + 1 >= n]
                for k in due:
                    del waiting[k]
            for k in due:
                submit(k)

    for j in range(len(reqs)):
        if j not in start_after:
            submit(j)
    for j in range(len(reqs)):
        deadline = time.monotonic() + 60
        while j not in tickets:
            assert time.monotonic() < deadline, f"row {j} never started"
            time.sleep(0.005)
        completion = Completion(reqs[j], gen.tokenizer, tickets[j], tickets[j].submitted_at)
        while completion.final is None:
            completion.feed(sinks[j].get(timeout=60))
        finals[j] = completion.final
    return finals


def test_batched_rows_equal_their_solo_runs(backend, tokenizer):
    with Generator(backend, tokenizer) as gen:
        gen.eos_token_id = None
        reqs = requests(gen)
        gen.eos_token_id = first_new(gen.generate(reqs[5]).token_ids)  # reached mid-way, not at once
        solo = [gen.generate(r) for r in reqs]
        # rows 0-2 start together (one grouped prefill), 3 joins after row 0's 3rd token, 4 after
        # row 1's 5th, 5 after row 3's 2nd: joins of longer and shorter prompts, removals between
        batched = run_staggered(gen, reqs, {3: (0, 3), 4: (1, 5), 5: (3, 2)})
    for i, (s, b) in enumerate(zip(solo, batched, strict=True)):
        assert b.token_ids == s.token_ids, f"row {i}: batched {b.token_ids} != solo {s.token_ids}"
        assert (b.finish_reason, b.text) == (s.finish_reason, s.text), i
    assert [s.finish_reason for s in solo][2:] == ["stop", "stop", "length", "eos"]  # stops did happen
    assert max(max(b.batch_sizes) for b in batched) >= 4  # they really shared batches
    assert all(max(s.batch_sizes) == 1 for s in solo)


def test_batched_logits_match_solo_within_1e_4(backend):
    """Teacher-forced rows (what parity runs): every step's logits, batched with joins and removals,
    against each row alone; a wrong mask, position or KV join would move them far more."""
    rng = np.random.default_rng(3)
    seqs = [(pr, rng.integers(0, 50000, n).tolist()) for pr, n in zip(prompts(4, seed=1), (20, 6, 14, 9))]
    with Scheduler(backend) as sched:

        def run(works_and_after):
            sinks = [queue.SimpleQueue() for _ in works_and_after]
            pending = {j: a for j, (_, a) in enumerate(works_and_after) if a is not None}

            def sink(j):
                def put(e):
                    sinks[j].put(e)
                    for k, (i, n) in list(pending.items()):
                        if i == j and isinstance(e, Token) and e.step + 1 >= n:
                            del pending[k]
                            sched.submit(works_and_after[k][0], sink(k))

                return put

            for j, (w, a) in enumerate(works_and_after):
                if a is None:
                    sched.submit(w, sink(j))
            out = []
            for q in sinks:
                steps = []
                while not isinstance(e := q.get(timeout=60), Done):
                    steps.append(e.logits)
                out.append(steps)
            return out

        def work(i):
            pr, forced = seqs[i]
            return Work(pr, forced_ids=forced, return_logits=True)

        solo = [run([(work(i), None)])[0] for i in range(4)]
        batched = run([(work(0), None), (work(1), None), (work(2), (0, 3)), (work(3), (1, 5))])
    for i in range(4):
        assert len(batched[i]) == len(solo[i]) == len(seqs[i][1]) + 1
        worst = max(float(np.abs(b - s).max()) for b, s in zip(batched[i], solo[i], strict=True))
        assert worst <= 1e-4, f"row {i}: max|Δlogits| {worst:.3g} batched vs solo"


def test_padding_shrinks_when_the_longest_row_leaves(backend, tokenizer):
    with Generator(backend, tokenizer) as gen:
        sched = gen.scheduler
        long_prompt, short_prompt = list(range(100, 160)), [5, 6, 7]
        widths = []
        done = threading.Event()

        def watch(event) -> None:  # runs on the scheduler thread, between steps
            widths.append(sched._main.width)
            if isinstance(event, Done):
                done.set()

        sched.submit_group(
            [
                (Work(long_prompt, max_new_tokens=3), lambda e: None),
                (Work(short_prompt, max_new_tokens=20), watch),
            ]
        )
        assert done.wait(60)
    assert max(widths) >= 60  # it shared the long row's width
    assert widths[-2] <= len(short_prompt) + 20  # trimmed back to its own real length


class FailingOrt(OrtBackend):
    """The real ONNX Runtime backend failing every forward that feeds token FAIL."""

    FAIL = 4242

    def _forward(self, input_ids, *args):
        if (input_ids == self.FAIL).any():
            raise RuntimeError("injected failure")
        return super()._forward(input_ids, *args)


def test_a_failing_and_a_cancelled_row_do_not_disturb_the_others(tiny_bundle, tokenizer):
    be = FailingOrt(tiny_bundle, BackendOptions(threads=1)).load()
    failures = []
    try:
        with Generator(be, tokenizer) as gen:
            gen.scheduler.on_failure(failures.append)
            p = prompts(3, seed=2)
            reqs = [GenerationRequest(x, 16, seeded(i), stop_at_eos=False) for i, x in enumerate(p)]
            solo = [gen.generate(r).token_ids for r in reqs]
            sinks = {k: queue.SimpleQueue() for k in ("a", "b", "bad_decode", "bad_prefill", "cancel")}
            seen, holder = [], {}

            def cancel_after_3(e):  # on the scheduler thread: the client goes away after 3 tokens
                sinks["cancel"].put(e)
                if isinstance(e, Token) and len(seen) < 3:
                    seen.append(e)
                    if len(seen) == 3 and "t" in holder:
                        holder["t"].cancel()

            sched = gen.scheduler
            tickets = sched.submit_group(
                [
                    (gen.work(reqs[0]), sinks["a"].put),
                    (gen.work(reqs[1]), sinks["b"].put),
                    (Work(p[2], forced_ids=[1, 2, FailingOrt.FAIL, 3]), sinks["bad_decode"].put),
                    (Work([9, FailingOrt.FAIL, 9], max_new_tokens=4), sinks["bad_prefill"].put),
                    (gen.work(reqs[2]), cancel_after_3),
                ]
            )
            holder["t"] = tickets[-1]
            if len(seen) == 3:
                tickets[-1].cancel()

            def drain(name):
                out = []
                while True:
                    e = sinks[name].get(timeout=60)
                    if isinstance(e, Done):
                        return out, e
                    out.append(e.token_id)

            got = {k: drain(k) for k in sinks}
    finally:
        be.close()
    assert got["a"][0] == solo[0] and got["a"][1].reason == "length"
    assert got["b"][0] == solo[1] and got["b"][1].reason == "length"
    assert got["bad_decode"][1].reason == "error" and "injected" in str(got["bad_decode"][1].error)
    assert got["bad_decode"][0] == [1, 2, FailingOrt.FAIL]  # it failed when it fed the bad token
    assert got["bad_prefill"][1].reason == "error" and got["bad_prefill"][0] == []
    assert got["cancel"][1].reason == "cancelled" and 3 <= len(got["cancel"][0]) < 16
    assert got["cancel"][0] == solo[2][: len(got["cancel"][0])]
    assert len(failures) >= 2  # the failure hook saw both (the server's fault counter uses it)


def test_a_full_queue_is_refused_with_the_limit_and_the_flag(tiny_bundle):
    be = create_backend("onnxruntime", tiny_bundle, BackendOptions(threads=1)).load()
    sched = Scheduler(be, SchedulerOptions(max_queue=2))  # not started: nothing leaves the queue
    try:
        sched.submit_group([(Work([1]), lambda e: None)] * 2)
        with pytest.raises(ResourceExhausted, match=r"limit 2.*--max-queue"):
            sched.submit(Work([1]), lambda e: None)
        assert sched.queue_depth() == 2
    finally:
        be.close()


def test_admission_respects_budgets_and_background_share(tiny_bundle):
    be = create_backend("onnxruntime", tiny_bundle, BackendOptions(threads=1)).load()
    try:
        opts = SchedulerOptions(max_batch_size=4, max_prefill_tokens=20, background_share=0.25, max_wait_ms=0)
        sched = Scheduler(be, opts)  # not started: admissions are computed by hand
        live = [Work([1] * 8, label=f"live{i}") for i in range(3)]
        bg = [Work([1] * 2, background=True, label=f"bg{i}") for i in range(3)]
        sched.submit_group([(w, lambda e: None) for w in bg + live])
        with sched._cv:
            taken, isolated = sched._admissions()
        # live first; 8-token prompts: two fit the 20-token prefill budget (3 x 8 = 24 does not)
        assert [t.work.label for t in taken] == ["live0", "live1"] and not isolated
        with sched._cv:
            taken, _ = sched._admissions()
        assert [t.work.label for t in taken] == ["live2", "bg0"]  # then background, within its share
        opts = SchedulerOptions(max_batch_size=2, background_max_wait_s=0.0, max_wait_ms=0)
        sched = Scheduler(be, opts)
        sched.submit_group([(Work([1], background=True, label="old"), lambda e: None)])
        sched.submit_group([(Work([1], label=f"live{i}"), lambda e: None) for i in range(3)])
        with sched._cv:
            taken, _ = sched._admissions()
        assert [t.work.label for t in taken] == ["old", "live0"]  # an overdue background row is not starved
    finally:
        be.close()


def test_isolated_rows_run_alone_beside_the_batch(tiny_bundle):
    be = create_backend("onnxruntime", tiny_bundle, BackendOptions(threads=1)).load()
    try:
        with Scheduler(be).start() as sched:
            sinks = [queue.SimpleQueue() for _ in range(3)]
            tickets = sched.submit_group(
                [
                    (Work([5, 6, 7], max_new_tokens=12), sinks[0].put),
                    (Work([8, 9], max_new_tokens=12), sinks[1].put),
                    (Work([1, 2, 3, 4], forced_ids=[5, 6, 7], isolated=True), sinks[2].put),
                ]
            )
            for q in sinks:
                while not isinstance(q.get(timeout=60), Done):
                    pass
    finally:
        be.close()
    assert max(tickets[0].batch_sizes) == 2 and max(tickets[2].batch_sizes) == 1
