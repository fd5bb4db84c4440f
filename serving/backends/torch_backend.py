"""PyTorch backend: transformers' ``GPT2LMHeadModel``, the reference every other backend answers to.

It loads the checkpoint the export stage stored in ``BUNDLE/reference`` (the very weights the ONNX
graph was exported from) with the attention implementation the exporter used, and runs each step
through ``export.cache_adapter`` -- the one place that knows transformers' cache API.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from export.deps import require
from export.manifest import REFERENCE_DIR, Bundle
from export.sources import ATTN_IMPLEMENTATION
from serving.backends.base import Backend, BackendOptions, KVCache, StepOutput, parse_device
from serving.errors import BackendUnavailable


class TorchKVCache(KVCache):
    """One (key, value) pair of torch tensors per layer, each (B, nh, T, hs); empty when T = 0."""

    def __init__(self, batch: int, length: int, layers: list[tuple[Any, Any]]):
        super().__init__(batch, length)
        self.layers = layers


class TorchBackend(Backend):
    """``GPT2LMHeadModel.from_pretrained(bundle.root / "reference")`` on CPU or CUDA.

    Options read: ``device`` ("cpu", "cuda", "cuda:N"), ``threads`` (torch intra-op threads; note
    that this setting is process-wide in PyTorch), ``extra["attn_implementation"]``.
    """

    name = "torch"

    def __init__(self, bundle: Bundle, options: BackendOptions | None = None) -> None:
        super().__init__(bundle, options)
        self._torch: Any = None
        self._model: Any = None
        self._device: Any = None

    @property
    def model(self) -> Any:
        """The loaded ``GPT2LMHeadModel`` (for tests and the parity tools)."""
        self._require_loaded()
        return self._model

    def _load_impl(self) -> None:
        torch = require("torch")
        transformers = require("transformers")
        device = self.options.device
        kind, _ = parse_device(device)
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"device {device!r} was asked for but torch {torch.__version__} "
                "sees no CUDA GPU (torch.cuda.is_available() is False); "
                "use --device cpu or a CUDA build of PyTorch on a GPU machine"
            )
        ref = self.bundle.root / REFERENCE_DIR
        if not (ref / "config.json").is_file():
            raise BackendUnavailable(
                f"{ref} holds no PyTorch checkpoint; re-export the bundle with "
                "the reference checkpoint (export_bundle(..., reference=True))"
            )
        attn = (
            self.options.extra.get("attn_implementation")
            or self.bundle.manifest.export.get("attn_implementation")
            or ATTN_IMPLEMENTATION
        )
        if self.options.threads:
            torch.set_num_threads(int(self.options.threads))
        tf_logging = transformers.utils.logging
        bar = tf_logging.is_progress_bar_enabled()
        tf_logging.disable_progress_bar()  # no tqdm bar in server logs and CLI reports
        try:
            model = transformers.GPT2LMHeadModel.from_pretrained(
                ref, dtype=torch.float32, attn_implementation=attn
            )
        finally:
            if bar:
                tf_logging.enable_progress_bar()
        self._device = torch.device(device)
        self._model = model.to(self._device).eval()
        self._torch = torch

    def _close_impl(self) -> None:
        self._model = None
        if self._torch is not None and self._device is not None and self._device.type == "cuda":
            self._torch.cuda.empty_cache()

    def _empty_cache_impl(self, batch: int) -> KVCache:
        return TorchKVCache(batch, 0, [])

    def _forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: KVCache,
        last_only: bool,
    ) -> StepOutput:
        from export.cache_adapter import forward_with_cache

        past = self._layers(past)
        torch, dev = self._torch, self._device
        with torch.inference_mode():
            logits, layers = forward_with_cache(
                self._model,
                past.layers,
                input_ids=torch.from_numpy(input_ids).to(dev),
                attention_mask=torch.from_numpy(attention_mask).to(dev),
                position_ids=torch.from_numpy(position_ids).to(dev),
            )
            if last_only:
                logits = logits[:, -1:, :]
            host = logits.float().cpu().numpy()  # (B, S, V) or (B, 1, V)
        b, s = input_ids.shape
        return StepOutput(logits=host, present=TorchKVCache(b, past.length + s, layers))

    # --- KV-cache operations (torch tensors where the model runs) -------------------------------
    def _layers(self, cache: KVCache) -> TorchKVCache:
        if not isinstance(cache, TorchKVCache):
            raise TypeError(f"TorchBackend needs a TorchKVCache, got {type(cache).__name__}")
        return cache

    def _join_impl(self, caches: list[KVCache], length: int) -> KVCache:
        torch = self._torch
        parts = [self._layers(c) for c in caches]
        if all(not c.layers for c in parts):  # every cache is empty (length 0)
            return TorchKVCache(sum(c.batch for c in parts), 0, [])

        def padded(t: Any, n: int) -> Any:  # (b, nh, n, hs) -> (b, nh, length, hs), zeros on the left
            return torch.nn.functional.pad(t, (0, 0, length - n, 0)) if n < length else t

        layers = []
        for i in range(self.dims.n_layer):
            keys = [padded(c.layers[i][0], c.length) for c in parts]
            values = [padded(c.layers[i][1], c.length) for c in parts]
            layers.append((torch.cat(keys, 0), torch.cat(values, 0)))
        return TorchKVCache(sum(c.batch for c in parts), length, layers)

    def _select_impl(self, cache: KVCache, rows: list[int], length: int) -> KVCache:
        c = self._layers(cache)
        if not c.layers:
            return TorchKVCache(len(rows), 0, [])
        index = self._torch.as_tensor(rows, device=self._device)
        start = c.length - length

        def keep(t: Any) -> Any:  # (B, nh, T, hs) -> (k, nh, length, hs)
            return t.index_select(0, index)[:, :, start:].contiguous()

        layers = [(keep(k), keep(v)) for k, v in c.layers]
        return TorchKVCache(len(rows), length, layers)

    def _info_impl(self) -> dict[str, Any]:
        torch = self._torch
        info: dict[str, Any] = {"checkpoint": str(self.bundle.root / REFERENCE_DIR), "precision": "fp32"}
        if torch is not None:
            info["torch"] = torch.__version__
            info["attn_implementation"] = (
                getattr(self._model.config, "_attn_implementation", None) if self._model is not None else None
            )
        return info
