"""ONNX Runtime backend: the bundle's ONNX decoder in an ``InferenceSession`` with IO binding.

The KV cache stays where ORT put it. Each step binds the previous step's ``present.*`` OrtValues
as this step's ``past_key_values.*`` inputs and lets ORT allocate the new presents on the
execution device, so the cache never round-trips through numpy. Only the logits come back to
the host, written by ORT straight into a preallocated numpy buffer.

This module imports numpy and onnxruntime only (never torch): it is the default serving path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from export.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS
from export.deps import require
from serving.backends.base import Backend, KVCache, StepOutput, parse_device
from serving.errors import BackendUnavailable

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() not in ("0", "false", "no", "off", "")


class OrtKVCache(KVCache):
    """Past keys/values as OrtValues in contract order (layer 0 key, layer 0 value, ...)."""

    def __init__(self, batch: int, length: int, values: list[Any]):
        super().__init__(batch, length)
        self.values = values


def choose_providers(device: str, requested: list[str] | None, available: list[str]) -> list[Any]:
    """The providers to create the session with, checked against ``available``.

    ``requested`` wins when given; otherwise the device decides (cpu -> CPU EP; cuda:N -> CUDA EP
    on device N with the CPU EP as fallback for the nodes CUDA does not take).

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
    return [(p, {"device_id": index}) if p == CUDA else p for p in wanted]


class OrtBackend(Backend):
    """The bundle's ONNX graph on ONNX Runtime (CPU, or CUDA with onnxruntime-gpu).

    Options read: ``device``, ``providers``, ``threads`` (intra-op threads; None lets ORT decide),
    ``extra["inter_op_threads"]``, ``extra["graph_optimization"]`` ("all" default, "extended",
    "basic", "disable").
    """

    name = "onnxruntime"

    def __init__(self, bundle, options=None):
        super().__init__(bundle, options)
        self._ort: Any = None
        self._session: Any = None
        self._device: tuple[str, int] = ("cpu", 0)
        self._providers: list[str] = []

    # --- lifecycle -----------------------------------------------------------------------------
    def _load_impl(self) -> None:
        ort = require("onnxruntime")
        self._device = parse_device(self.options.device)
        providers = choose_providers(
            self.options.device, self.options.providers, ort.get_available_providers()
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
        try:
            session = ort.InferenceSession(str(self.bundle.onnx_path), sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BackendUnavailable(f"onnxruntime cannot load {self.bundle.onnx_path}: {e}") from e
        self._check_io(session)
        self._ort, self._session = ort, session
        self._providers = session.get_providers()

    def _check_io(self, session: Any) -> None:
        ins = [i.name for i in session.get_inputs()]
        outs = [o.name for o in session.get_outputs()]
        problems = []
        if sorted(ins) != sorted(self.contract.input_names):
            problems.append(f"inputs {ins} != contract {self.contract.input_names}")
        if sorted(outs) != sorted(self.contract.output_names):
            problems.append(f"outputs {outs} != contract {self.contract.output_names}")
        if problems:
            raise BackendUnavailable(
                f"{self.bundle.onnx_path} does not follow the bundle's I/O contract: {'; '.join(problems)}"
            )

    def _close_impl(self) -> None:
        self._session = None

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
        if not isinstance(past, OrtKVCache):
            raise TypeError(f"OrtBackend needs an OrtKVCache, got {type(past).__name__}")
        c = self.contract
        kind, index = self._device
        b, s = input_ids.shape
        io = self._session.io_binding()
        io.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids))
        io.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(attention_mask))
        io.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(position_ids))
        for name, value in zip(c.past_names, past.values):
            io.bind_ortvalue_input(name, value)
        # Logits go straight into host memory we own; ORT writes them there (copying from the
        # device when it runs on CUDA), so no extra copy happens on our side.
        logits = np.empty((b, s, c.vocab_size), dtype=np.float32)
        io.bind_output(LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        for name in c.present_names:
            io.bind_output(name, kind, index)  # ORT allocates on the execution device
        self._session.run_with_iobinding(io)
        outputs = io.get_outputs()  # OrtValues in output-binding order; logits first
        present = OrtKVCache(b, past.length + s, list(outputs[1:]))
        if last_only and s > 1:
            logits = logits[:, -1:, :].copy()  # (B, 1, V); frees the (B, S, V) buffer
        return StepOutput(logits=logits, present=present)

    def _info_impl(self) -> dict[str, Any]:
        return {
            "providers": list(self._providers),
            "onnx": str(self.bundle.onnx_path),
            "precision": self.bundle.manifest.precision,
            "onnxruntime": getattr(self._ort, "__version__", None),
        }
