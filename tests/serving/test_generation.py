"""The generation loop over real backends: greedy == transformers' generate, batches, sampling, stops."""

from __future__ import annotations

import numpy as np
import pytest

from serving.backends import BackendOptions, create_backend
from serving.errors import InvalidInput, OutOfRange
from serving.generation import FinalEvent, GenerationRequest, Generator, TokenEvent
from serving.sampling import SamplingParams, select_next, warp
from serving.tokenizer import Tokenizer

N = 12
WORDS = "The a of cat dog run big small red blue house tree car one two three it is was and or but".split()


def _candidates(n: int = 80) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 10))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle):
    return Tokenizer.from_dir(tiny_bundle.tokenizer_dir)


@pytest.fixture(scope="module")
def backends(tiny_bundle):
    loaded = {
        name: create_backend(name, tiny_bundle, BackendOptions(threads=1)).load()
        for name in ("onnxruntime", "torch")
    }
    yield loaded
    for b in loaded.values():
        b.close()


@pytest.fixture(scope="module")
def prompts(backends, tokenizer) -> list[str]:
    """Three prompts whose greedy continuation is not one repeated token (random tiny weights tend
    to repeat), so that a wrong position id, mask or cache actually changes the tokens."""
    gen = Generator(backends["onnxruntime"], tokenizer)
    picked = []
    for text in _candidates():
        toks = gen.generate(GenerationRequest(tokenizer.encode(text), N, stop_at_eos=False)).token_ids
        if len(set(toks)) > 1 and tokenizer.eos_token_id not in toks:
            picked.append(text)
        if len(picked) == 3:
            return sorted(picked, key=len)
    pytest.fail(f"no 3 of {len(_candidates())} prompts give a varied greedy continuation: {picked}")


@pytest.fixture(scope="module")
def hf_greedy(backends, tokenizer, prompts):
    """transformers' generate(do_sample=False): each prompt alone, and all as one left-padded batch."""
    import torch

    model = backends["torch"].model
    ids = [tokenizer.encode(p) for p in prompts]
    single = []
    for p in ids:
        out = model.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=N,
            do_sample=False,
            pad_token_id=50256,
        )
        single.append(out[0, len(p) :].tolist())
    w = max(map(len, ids))
    x = torch.full((len(ids), w), 50256)
    m = torch.zeros((len(ids), w), dtype=torch.long)
    for i, p in enumerate(ids):
        x[i, w - len(p) :] = torch.tensor(p)
        m[i, w - len(p) :] = 1
    batch = model.generate(x, attention_mask=m, max_new_tokens=N, do_sample=False, pad_token_id=50256)[
        :, w:
    ].tolist()
    assert len({len(p) for p in ids}) > 1  # the batch really is padded
    return ids, single, batch


@pytest.fixture(params=["onnxruntime", "torch"])
def gen(request, backends, tokenizer):
    return Generator(backends[request.param], tokenizer)


def _run(gen, req, cancelled=lambda: False):
    events = list(gen.stream(req, cancelled))
    assert isinstance(events[-1], FinalEvent)
    assert all(isinstance(e, TokenEvent) for e in events[:-1])
    return events[:-1], events[-1]


def test_greedy_stream_equals_transformers_generate(gen, hf_greedy):
    ids, single, _ = hf_greedy
    for prompt, expected in zip(ids, single):
        tokens, final = _run(gen, GenerationRequest(prompt, max_new_tokens=N))
        assert [t for e in tokens for t in e.token_ids] == expected
        assert final.token_ids == expected
        assert final.finish_reason == "length" and final.completion_tokens == N
        assert final.prompt_tokens == len(prompt)
        assert "".join(e.text for e in tokens) == final.text == gen.tokenizer.decode(expected)
        assert final.time_to_first_token_s > 0 and len(final.per_token_s) == N - 1


def test_left_padded_batch_equals_transformers_generate(gen, hf_greedy):
    ids, single, batch = hf_greedy
    assert batch == single  # transformers itself: padding does not change greedy results
    assert gen.generate_batch(ids, N) == batch
    result = gen.run_batch(ids, N)
    assert result.prefill_s > 0 and len(result.step_s) == N - 1


def test_seeded_sampling_is_reproducible(gen, tokenizer, prompts):
    prompt = tokenizer.encode(prompts[0])
    sp = SamplingParams(do_sample=True, temperature=1.5, top_k=200, top_p=0.95, seed=1234)
    a = gen.generate(GenerationRequest(prompt, 10, sp)).token_ids
    b = gen.generate(GenerationRequest(prompt, 10, sp)).token_ids
    c = gen.generate(
        GenerationRequest(
            prompt, 10, SamplingParams(do_sample=True, temperature=1.5, top_k=200, top_p=0.95, seed=99)
        )
    ).token_ids
    assert a == b
    assert a != c
    # a batch row samples like a single request with the same seed
    assert gen.generate_batch([prompt, prompt], 10, sp) == [a, a]


def test_top_k_1_and_tiny_top_p_sample_the_argmax(gen, hf_greedy):
    ids, single, _ = hf_greedy
    for sp in (
        SamplingParams(do_sample=True, top_k=1, seed=0),
        SamplingParams(do_sample=True, top_p=1e-9, temperature=2.0, seed=0),
        SamplingParams(do_sample=True, temperature=0.0),
    ):
        assert gen.generate(GenerationRequest(ids[0], N, sp)).token_ids == single[0]


def test_warpers_keep_the_right_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = warp(logits, SamplingParams(do_sample=True, top_k=2))
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0])
    p = warp(logits, SamplingParams(do_sample=True, top_p=0.75))  # 0.5 + 0.3 reaches 0.75
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0])
    p = warp(logits, SamplingParams(do_sample=True, top_p=0.85))
    np.testing.assert_allclose(p, [0.5, 0.3, 0.15, 0] / np.float64(0.95))
    rng = np.random.default_rng(0)
    draws = [select_next(logits, SamplingParams(do_sample=True, temperature=1.0), rng) for _ in range(4000)]
    freq = np.bincount(draws, minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_stop_token_ends_without_emitting_it(gen, hf_greedy):
    ids, single, _ = hf_greedy
    stop = next(t for t in single[0] if t != single[0][0])  # first token that differs from the first
    k = single[0].index(stop)
    _, final = _run(gen, GenerationRequest(ids[0], N, stop_token_ids=[stop]))
    assert final.finish_reason == "stop"
    assert final.token_ids == single[0][:k]


def test_eos_ends_with_reason_eos(gen, hf_greedy):
    ids, single, _ = hf_greedy
    stop = next(t for t in single[0] if t != single[0][0])
    k = single[0].index(stop)
    gen.eos_token_id = stop  # pretend this model's EOS is a token greedy decoding reaches
    _, final = _run(gen, GenerationRequest(ids[0], N))
    assert final.finish_reason == "eos" and final.token_ids == single[0][:k]
    _, final = _run(gen, GenerationRequest(ids[0], N, stop_at_eos=False))
    assert final.finish_reason == "length" and final.token_ids == single[0]


def test_stop_string_cuts_the_text_and_is_never_streamed(gen, hf_greedy, tokenizer):
    ids, single, _ = hf_greedy
    full = tokenizer.decode(single[0])
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # spans token boundaries in the middle
    cut = full.index(stop)
    tokens, final = _run(gen, GenerationRequest(ids[0], N, stop_strings=["@@never", stop]))
    assert final.finish_reason == "stop"
    assert final.text == full[:cut]
    streamed = "".join(e.text for e in tokens)
    assert streamed == final.text
    assert stop not in streamed
    assert final.token_ids == single[0][: len(final.token_ids)]


def test_cancellation_stops_and_reports(gen, tokenizer, prompts):
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 3  # the check before the 1st forward and after tokens 1-2 pass

    tokens, final = _run(gen, GenerationRequest(tokenizer.encode(prompts[0]), N), cancelled)
    assert final.finish_reason == "cancelled"
    assert final.completion_tokens == 3 == len([e for e in tokens if e.token_ids])
    _, final = _run(gen, GenerationRequest(tokenizer.encode(prompts[0]), N), lambda: True)
    assert final.finish_reason == "cancelled" and final.completion_tokens == 0


@pytest.mark.parametrize(
    "req, error, message",
    [
        (GenerationRequest([]), InvalidInput, "the prompt is empty"),
        (GenerationRequest([1, 50257, -3]), InvalidInput, r"\[0, 50257\).*\[50257, -3\]"),
        (
            GenerationRequest([1], max_new_tokens=0),
            InvalidInput,
            r"max_new_tokens must be an integer in \[1, 4096\]",
        ),
        (GenerationRequest([1], max_new_tokens=10**9), InvalidInput, "max_new_tokens"),
        (
            GenerationRequest([1] * 200, max_new_tokens=100),
            OutOfRange,
            r"300 exceeds the model's context of 256",
        ),
        (
            GenerationRequest([1], sampling=SamplingParams(do_sample=True, temperature=-1.0)),
            InvalidInput,
            r"temperature must be in \[0, 100\]",
        ),
        (
            GenerationRequest([1], sampling=SamplingParams(top_p=0.0, top_k=-1)),
            InvalidInput,
            r"top_k must be an integer in \[0, 50257\].*top_p must be in \(0, 1\]",
        ),
        (GenerationRequest([1], sampling=SamplingParams(seed=-5)), InvalidInput, "seed"),
        (GenerationRequest([1], stop_strings=[""]), InvalidInput, "stop strings must be non-empty"),
        (GenerationRequest([1], stop_token_ids=[60000]), InvalidInput, "stop_token_ids"),
    ],
    ids=[
        "empty",
        "vocab",
        "zero-tokens",
        "absurd-tokens",
        "context",
        "temperature",
        "top-k-top-p",
        "seed",
        "stop-string",
        "stop-id",
    ],
)
def test_bad_requests_are_rejected_with_what_is_allowed(backends, tokenizer, req, error, message):
    gen = Generator(backends["onnxruntime"], tokenizer)
    with pytest.raises(error, match=message):
        gen.validate(req)
    with pytest.raises(error):
        next(gen.stream(req))


def test_score_matches_the_reference_logits(backends, tokenizer):
    import torch

    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    gen = Generator(backends["onnxruntime"], tokenizer)
    full = gen.score(ids)
    with torch.no_grad():
        ref = backends["torch"].model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(full.logits, ref, atol=1e-4)
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1).numpy()
    np.testing.assert_allclose(full.token_logprobs, lp[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    top = gen.score(ids, top_k=5)
    assert top.logits is None and top.top_ids.shape == top.top_logprobs.shape == (len(ids), 5)
    np.testing.assert_array_equal(top.top_ids[:, 0], ref.argmax(-1))
    assert (np.diff(top.top_logprobs, axis=-1) <= 0).all()
    with pytest.raises(InvalidInput, match="top_k"):
        gen.score(ids, top_k=-1)
    with pytest.raises(OutOfRange):
        gen.score([1] * 257)


def test_holdback_keeps_possible_stop_string_prefixes():
    from serving.generation import _find_stop, _holdback

    assert _holdback("hello wor", 0, ["world"]) == 3
    assert _holdback("hello w", 0, ["world", "xyz"]) == 1
    assert _holdback("hello", 0, ["world"]) == 0
    assert _holdback("xab", 1, ["abc"]) == 2
    assert _holdback("xab", 2, ["abc"]) == 0  # only the not-yet-emitted part can be held back
    assert _find_stop("one two three", 0, ["three", "two"]) == 4
    assert _find_stop("one two", 5, ["two"]) == -1


def test_a_backend_limit_below_the_model_is_refused_before_streaming(tiny_bundle, tokenizer):
    """A request the model allows (256 positions) but the backend does not (an engine built for 64)
    is refused by validation, naming the backend's limit, before any token is streamed."""
    from serving.backends.base import BackendLimits
    from serving.backends.ort_backend import OrtBackend

    class Engine64(OrtBackend):
        @property
        def limits(self) -> BackendLimits:
            return BackendLimits(max_batch=4, max_context=64)

    be = Engine64(tiny_bundle, BackendOptions(threads=1)).load()
    try:
        with Generator(be, tokenizer) as gen:
            req = GenerationRequest([1] * 40, max_new_tokens=30)
            with pytest.raises(OutOfRange, match=r"70 exceeds the onnxruntime backend's context of 64"):
                gen.validate(req)
            stream = gen.stream(req)
            with pytest.raises(OutOfRange):
                next(stream)
            assert gen.scheduler.steps == 0  # nothing ran
            assert gen.generate(GenerationRequest([1] * 40, max_new_tokens=24)).completion_tokens == 24
            assert gen.scheduler.max_batch == 4  # the backend's batch limit caps the scheduler
    finally:
        be.close()


def test_per_token_times_count_output_tokens_only(backends, tokenizer):
    """A generation that ends on EOS has one time per token after the first, not one more."""
    with Generator(backends["onnxruntime"], tokenizer) as gen:
        sp = SamplingParams(do_sample=True, seed=6)
        ids = tokenizer.encode("one two three")
        free = gen.generate(GenerationRequest(ids, 24, sp, stop_at_eos=False)).token_ids
        gen.eos_token_id = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])
        final = gen.generate(GenerationRequest(ids, 24, sp))
    assert final.finish_reason == "eos" and final.completion_tokens >= 3
    assert len(final.per_token_s) == final.completion_tokens - 1
