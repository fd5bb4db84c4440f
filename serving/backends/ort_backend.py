"""ONNX Runtime backend: the bundle's ONNX decoder in an ``InferenceSession`` with IO binding.

The KV cache stays where ORT put it. Each step binds the previous step's ``present.*`` OrtValues
as this step's ``past_key_values.*`` inputs and lets ORT allocate the new presents on the
execution device, so the cache never round-trips through numpy. The logits come back to the
host, written by ORT straight into a preallocated numpy buffer, or, for a step asked for its
``top_k`` (on CUDA by default), stay on the device and only the top-k crosses (``ort_reduce``).
What crosses when, and why: docs/gpu.md.

This module imports numpy and onnxruntime only (never torch): it is the default serving path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from export.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, POSITION_IDS
from export.deps import require
from export.errors import OptionsError
from export.manifest import Bundle
from serving.backends.base import Backend, BackendOptions, KVCache, StepOutput, parse_device
from serving.backends.ort_kv import OrtKVOps
from serving.backends.ort_reduce import OrtTopK
from serving.errors import BackendUnavailable

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() not in ("0", "false", "no", "off", "")


_SWITCH = {
    **dict.fromkeys(("1", "true", "on", "yes"), True),
    **dict.fromkeys(("0", "false", "off", "no"), False),
}


def parse_switch(name: str, value: Any) -> bool | None:
    """``extra[name]`` as True/False, or None for the runtime's default (unset, "default", "auto").

    Raises:
        OptionsError: anything else.
    """
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("default", "auto"):
        return None
    if text not in _SWITCH:
        raise OptionsError(f"{name} must be on/off (1/0, true/false) or default/auto, got {value!r}")
    return _SWITCH[text]


def cuda_provider_options(index: int, tf32: bool | None = None) -> dict[str, str]:
    """The CUDA EP's options: its device, and ``use_tf32`` when stated (None: ORT's default, on)."""
    opts = {"device_id": str(index)}
    if tf32 is not None:
        opts["use_tf32"] = "1" if tf32 else "0"
    return opts


class OrtKVCache(KVCache):
    """Past keys/values as OrtValues in contract order (layer 0 key, layer 0 value, ...)."""

    def __init__(self, batch: int, length: int, values: list[Any]):
        super().__init__(batch, length)
        self.values = values


def choose_providers(
    device: str, requested: list[str] | None, available: list[str], *, tf32: bool | None = None
) -> list[Any]:
    """The providers to create the session with, checked against ``available``.

    ``requested`` wins when given; otherwise the device decides (cpu -> CPU EP; cuda:N -> CUDA EP
    on device N with the CPU EP as fallback for the nodes CUDA does not take). The CUDA EP gets
    ``cuda_provider_options(N, tf32)``.

    Raises:
        BackendUnavailable: a requested provider is not in this onnxruntime build.
    """
    kind, index = parse_device(device)
    if requested:
        wanted = list(requested)
    elif kind == "cuda":
        wanted = [CUDA, CPU]
    else:
        wanted = [CPU]
    missing = [p for p in wanted if p not in available]
    if missing:
        hint = (
            " (the CUDA provider comes with onnxruntime-gpu: pip install 'gpt2-deploy[gpu]', "
            "plus an NVIDIA GPU and driver)"
            if CUDA in missing
            else ""
        )
        raise BackendUnavailable(
            f"onnxruntime execution provider(s) {missing} are not available for "
            f"device {device!r}; this onnxruntime offers {available}{hint}"
        )
    if kind == "cuda" and CUDA not in wanted:
        raise BackendUnavailable(f"device {device!r} needs {CUDA} among the providers, got {wanted}")
    return [(p, cuda_provider_options(index, tf32)) if p == CUDA else p for p in wanted]


class OrtBackend(Backend):
    """The bundle's ONNX graph on ONNX Runtime (CPU, or CUDA with onnxruntime-gpu).

    Options read: ``device``, ``providers``, ``threads`` (intra-op threads; None lets ORT decide),
    ``extra["inter_op_threads"]``, ``extra["graph_optimization"]`` ("all" default, "extended",
    "basic", "disable"), ``extra["serving_graph"]`` (default on: run the bundle's serving graph,
    whose ``logits_to_keep`` input gives ``last_only`` steps the lm_head of the last position only;
    off, or a bundle without one: ``model.onnx``, sliced on the host), ``extra["tf32"]`` (the CUDA
    EP's ``use_tf32``: on/off; default: ORT's, on), ``extra["device_top_k"]`` (``forward(...,
    top_k=K)`` reduces on the execution provider: on/off; default auto = on for CUDA, where it
    saves the (B, V) device-to-host copy; on CPU the logits are host memory already).
    """

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, options: BackendOptions | None = None) -> None:
        super().__init__(bundle, options)
        self._ort: Any = None
        self._session: Any = None
        self._device: tuple[str, int] = ("cpu", 0)
        self._providers: list[str] = []
        self._kv: OrtKVOps | None = None  # KV-cache operations on the session's device (load())
        self._top_k: OrtTopK | None = None  # last-position top-k on the session's device (load())
        self._tf32: bool | None = None  # the CUDA EP's use_tf32 as loaded (None: no CUDA EP)

    # --- lifecycle -----------------------------------------------------------------------------
    def _load_impl(self) -> None:
        ort = require("onnxruntime")
        self._device = parse_device(self.options.device)
        tf32 = parse_switch("tf32", self.options.extra.get("tf32"))
        device_top_k = parse_switch("device_top_k", self.options.extra.get("device_top_k"))
        providers = choose_providers(
            self.options.device, self.options.providers, ort.get_available_providers(), tf32=tf32
        )
        so = ort.SessionOptions()
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        level = self.options.extra.get("graph_optimization", "all")
        if level not in levels:
            raise BackendUnavailable(f"graph_optimization {level!r} is not one of {list(levels)}")
        so.graph_optimization_level = levels[level]
        if self.options.threads:
            so.intra_op_num_threads = int(self.options.threads)
        if "allow_spinning" in self.options.extra:  # idle worker threads busy-wait (ORT default: on)
            so.add_session_config_entry(
                "session.intra_op.allow_spinning",
                "1" if _truthy(self.options.extra["allow_spinning"]) else "0",
            )
        if self.options.extra.get("inter_op_threads"):
            so.inter_op_num_threads = int(self.options.extra["inter_op_threads"])
        # One session: the serving graph does both (logits_to_keep 0: every position, 1: the last),
        # so the weights are held once (a second session would prepack its own copy).
        self._onnx_path, self._graph_contract = self.bundle.onnx_path, self.contract
        serving = self.bundle.manifest.serving
        if serving is not None and _truthy(self.options.extra.get("serving_graph", True)):
            self._onnx_path, self._graph_contract = self.bundle.root / serving.file, serving.contract
        try:
            session = ort.InferenceSession(str(self._onnx_path), sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BackendUnavailable(f"onnxruntime cannot load {self._onnx_path}: {e}") from e
        self._check_io(session)
        self._ort, self._session = ort, session
        self._providers = session.get_providers()
        if CUDA in [p if isinstance(p, str) else p[0] for p in providers] and CUDA not in self._providers:
            # ORT falls back to the CPU when the CUDA EP cannot start (libraries, driver): say so
            raise BackendUnavailable(
                f"onnxruntime could not start {CUDA} (the session fell back to {self._providers}); "
                "check the CUDA/cuDNN libraries (onnxruntime.preload_dlls(), docs/gpu.md)"
            )
        self._tf32 = loaded_tf32(session, tf32) if CUDA in self._providers else None
        self._kv = OrtKVOps(ort, providers, self._device, len(self.contract.past_names))
        self._kv.warm_up(self.contract.n_head, self.contract.head_dim)
        if device_top_k if device_top_k is not None else CUDA in self._providers:
            self._top_k = OrtTopK(ort, providers, self.options.threads)
            self._top_k.warm_up(self._device)

    def _check_io(self, session: Any) -> None:
        c = self._graph_contract
        ins = [i.name for i in session.get_inputs()]
        outs = [o.name for o in session.get_outputs()]
        problems = []
        if sorted(ins) != sorted(c.input_names):
            problems.append(f"inputs {ins} != contract {c.input_names}")
        if sorted(outs) != sorted(c.output_names):
            problems.append(f"outputs {outs} != contract {c.output_names}")
        if problems:
            raise BackendUnavailable(
                f"{self._onnx_path} does not follow the bundle's I/O contract: {'; '.join(problems)}"
            )

    @property
    def _keeps_logits(self) -> bool:
        """The loaded graph takes ``logits_to_keep`` (the serving graph)."""
        return self._graph_contract.logits_positions == "kept"

    def _close_impl(self) -> None:
        self._session = None
        if self._kv is not None:
            self._kv.close()
            self._kv = None
        if self._top_k is not None:
            self._top_k.close()
            self._top_k = None

    @property
    def reduces_top_k(self) -> bool:
        return self._top_k is not None

    # --- the step ------------------------------------------------------------------------------
    def _empty_cache_impl(self, batch: int) -> KVCache:
        c = self.contract
        kind, index = self._device
        shape = [batch, c.n_head, 0, c.head_dim]
        values = [
            self._ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, kind, index)
            for _ in c.past_names
        ]
        return OrtKVCache(batch, 0, values)

    def _forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: KVCache,
        last_only: bool,
    ) -> StepOutput:
        return self._step(input_ids, attention_mask, position_ids, past, last_only, None)

    def _forward_top_k(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: KVCache,
        k: int,
    ) -> StepOutput:
        return self._step(input_ids, attention_mask, position_ids, past, True, k)

    def _step(
        self, input_ids, attention_mask, position_ids, past, last_only: bool, k: int | None
    ) -> StepOutput:
        """One run of the graph; ``k``: leave the logits on the device and return their top-k."""
        past = self._ort_cache(past)
        c = self.contract
        kind, index = self._device
        b, s = input_ids.shape
        io = self._session.io_binding()
        # Host inputs: ids, mask and positions are made on the host each step (the next token is
        # chosen there). bind_cpu_input copies each once, at bind time, to where its consuming node
        # runs (the device, or the CPU for shape arithmetic): a device OrtValue made here would be
        # the same copy plus an allocation (docs/gpu.md "What crosses to the host").
        io.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids))
        io.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(attention_mask))
        io.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(position_ids))
        for name, value in zip(c.past_names, past.values):
            io.bind_ortvalue_input(name, value)
        keep = self._keeps_logits and last_only
        if self._keeps_logits:  # 1: the lm_head runs on the last position only; 0: on every one
            io.bind_cpu_input(LOGITS_TO_KEEP, np.array(1 if last_only else 0, dtype=np.int64))
        if k is None:
            # Logits go straight into host memory we own; ORT writes them there (copying from the
            # device when it runs on CUDA), so no extra copy happens on our side.
            logits = np.empty((b, 1 if keep else s, c.vocab_size), dtype=np.float32)
            io.bind_output(LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        else:
            io.bind_output(LOGITS, kind, index)  # stays on the device for the reduction
        for name in c.present_names:
            io.bind_output(name, kind, index)  # ORT allocates on the execution device
        self._session.run_with_iobinding(io)
        outputs = io.get_outputs()  # OrtValues in output-binding order; logits first
        present = OrtKVCache(b, past.length + s, list(outputs[1:]))
        if k is not None:
            assert self._top_k is not None, "reduces_top_k"
            device_logits = outputs[0]
            values, ids = self._top_k(device_logits, k)
            return StepOutput(
                logits=None,
                present=present,
                top_ids=ids,
                top_values=values,
                fetch_logits=lambda: device_logits.numpy()[:, -1],  # a fallback: one (B, S, V) copy
            )
        if last_only and not keep and s > 1:
            logits = logits[:, -1:, :].copy()  # (B, 1, V); frees the (B, S, V) buffer
        return StepOutput(logits=logits, present=present)

    # --- KV-cache operations (on the execution device: tiny ORT graphs, see ort_kv) ---------------
    def _ort_cache(self, cache: KVCache) -> OrtKVCache:
        if not isinstance(cache, OrtKVCache):
            raise TypeError(f"OrtBackend needs an OrtKVCache, got {type(cache).__name__}")
        return cache

    @property
    def _ops(self) -> OrtKVOps:
        assert self._kv is not None, "loaded"
        return self._kv

    def _join_impl(self, caches: list[KVCache], length: int) -> KVCache:
        ort_caches = [self._ort_cache(c) for c in caches]
        values = self._ops.join([c.values for c in ort_caches], [c.length for c in ort_caches], length)
        return OrtKVCache(sum(c.batch for c in ort_caches), length, values)

    def _select_impl(self, cache: KVCache, rows: list[int], length: int) -> KVCache:
        c = self._ort_cache(cache)
        return OrtKVCache(len(rows), length, self._ops.select(c.values, rows, c.length - length))

    def _info_impl(self) -> dict[str, Any]:
        return {
            "providers": list(self._providers),
            "onnx": str(getattr(self, "_onnx_path", self.bundle.onnx_path)),
            "precision": self.bundle.manifest.precision,
            "onnxruntime": getattr(self._ort, "__version__", None),
            "tf32": bool(self._tf32),  # fp32 matmuls in TF32 (the CUDA EP's use_tf32; never on CPU)
            "device_top_k": self.reduces_top_k,
        }


def loaded_tf32(session: Any, asked: bool | None) -> bool:
    """The CUDA EP's ``use_tf32`` as the session reports it; else what was asked (None: ORT's default, on)."""
    try:
        value = session.get_provider_options()[CUDA]["use_tf32"]
    except Exception:  # noqa: BLE001 - an ORT that does not report it: what was asked decides
        return True if asked is None else asked
    return _SWITCH.get(str(value).strip().lower(), True)
