"""The one place that touches transformers' KV-cache API, whose keyword differs between 5.x releases.

The keyword (``cache=`` or ``past_key_values=``) is read from the model's signature, never guessed:
a release that silently swallows the wrong one would export a graph without past inputs. Which
release takes which: docs/export.md "The graph".
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def cache_keyword(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    for kw in ("cache", "past_key_values"):
        if kw in params:
            return kw
    raise RuntimeError(
        f"{type(model).__name__}.forward takes neither 'cache' nor 'past_key_values' "
        f"(it takes {list(params)}); this transformers version is not supported"
    )


def make_cache(config: Any, past: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A ``DynamicCache`` holding ``past`` (one (key, value) pair per layer, (B, nh, P, hs))."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(past):
        cache.update(k, v, i)
    return cache


def returned_cache(output: Any) -> Any:
    """The cache object a forward returned (``.cache`` on 5.24, ``.past_key_values`` before)."""
    for attr in ("cache", "past_key_values"):
        value = getattr(output, attr, None)
        if value is not None:
            return value
    raise RuntimeError("the model returned no KV cache; was use_cache=False?")


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (key, value) pair of every layer in a returned cache, each (B, nh, T, hs)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def forward_with_cache(model: Any, past: list[tuple[torch.Tensor, torch.Tensor]], **inputs: Any):
    """Run ``model`` with ``past`` as its cache; return (logits, [(key, value), ...])."""
    cache = make_cache(model.config, past)
    out = model(**inputs, **{cache_keyword(model): cache}, use_cache=True, return_dict=True)
    return out.logits, cache_layers(returned_cache(out))
