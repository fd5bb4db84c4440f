"""The cache keyword is read from the signature (transformers 5.24: ``cache``; 5.17:
``past_key_values``), and the exported graph really has past inputs that are used."""

from __future__ import annotations

import numpy as np
import pytest

from export.cache_adapter import cache_keyword


class _NewForward:
    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, **kw):
        pass


class _OldForward:  # transformers 5.17 (the GPU image): swallows unknown kwargs
    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        pass


class _NoCache:
    def forward(self, input_ids=None):
        pass


def test_keyword_from_signature():
    assert cache_keyword(_NewForward()) == "cache"
    assert cache_keyword(_OldForward()) == "past_key_values"
    with pytest.raises(RuntimeError, match="takes neither 'cache' nor 'past_key_values'"):
        cache_keyword(_NoCache())


def test_installed_transformers_takes_cache():
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    expected = "cache" if (major, minor) >= (5, 24) else "past_key_values"
    assert cache_keyword(model) == expected


def test_exported_graph_has_and_uses_past_inputs(tiny_bundle):
    """The 5.17 pitfall: a swallowed ``cache=`` exports a graph without past inputs."""
    import onnxruntime as ort

    c = tiny_bundle.contract
    sess = ort.InferenceSession(str(tiny_bundle.onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == c.input_names
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": np.array([[5]], np.int64),
        "attention_mask": np.ones((1, 11), np.int64),
        "position_ids": np.array([[10]], np.int64),
    }
    for n in c.past_names:
        feeds[n] = rng.standard_normal(c.concrete_shape(n, batch=1, seq=1, past=10), dtype=np.float32)
    out = sess.run(None, feeds)
    assert out[1].shape == (1, c.n_head, 11, c.head_dim)
    np.testing.assert_array_equal(out[1][:, :, :10], feeds["past_key_values.0.key"])  # past kept
    # and the past changes the logits (it is attended to, not ignored)
    for n in c.past_names:
        feeds[n] = feeds[n] * 3.0
    assert np.abs(sess.run(None, feeds)[0] - out[0]).max() > 1e-4
