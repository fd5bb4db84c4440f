"""Post-processing of the ONNX Runtime backend: the last position's logits reduced where they live.

    top = OrtTopK(ort, providers, threads=2)
    values, ids = top(logits_value, k=2)   # logits OrtValue (B, S, V) -> host (B, k) float32, int64

One tiny ONNX graph (Gather of the last position, then TopK, largest first) run on the session's
execution provider, like the KV operations in ``ort_kv``: on CUDA the full (B, V) logits stay on
the device and only B x k values and ids are copied to the host. ``host_top_k`` is the same
reduction in numpy (what a backend that cannot reduce leaves to the host, and the tests' oracle).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_OPSET = 18


def top_k_graph() -> Any:
    """``values, ids = TopK(logits[:, -1, :], k)`` with logits (B, S, V) float32 and k an int64 [1]."""
    from onnx import TensorProto as tp
    from onnx import helper

    last = helper.make_tensor("last", tp.INT64, [], [-1])
    nodes = [
        helper.make_node("Constant", [], ["last_index"], value=last),
        helper.make_node("Gather", ["logits", "last_index"], ["row"], axis=1),  # (B, V)
        helper.make_node("TopK", ["row", "k"], ["values", "ids"], axis=-1, largest=1, sorted=1),
    ]
    inputs = [
        helper.make_tensor_value_info("logits", tp.FLOAT, ["batch", "seq", "vocab"]),
        helper.make_tensor_value_info("k", tp.INT64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("values", tp.FLOAT, ["batch", "k"]),
        helper.make_tensor_value_info("ids", tp.INT64, ["batch", "k"]),
    ]
    graph = helper.make_graph(nodes, "last_top_k", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])


def host_top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same reduction on the host: (B, V) -> values (B, k) largest first, ids (B, k)."""
    logits = np.asarray(logits, dtype=np.float32)
    v = logits.shape[-1]
    k = min(int(k), v)
    if k < v:
        part = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(v), logits.shape)
    vals = np.take_along_axis(logits, part, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(vals, order, -1), np.take_along_axis(part, order, -1).astype(np.int64)


class OrtTopK:
    """The top-k of the last position's logits, run on the backend's execution provider.

    Args:
        ort: The onnxruntime module.
        providers: The main session's providers (the reduction runs where the logits are).
        threads: Intra-op threads (None: ORT decides).
    """

    def __init__(self, ort: Any, providers: list[Any], threads: int | None = None):
        self._ort = ort
        self._providers = providers
        self._threads = threads
        self._session: Any = None

    def _sess(self) -> Any:
        if self._session is None:
            so = self._ort.SessionOptions()
            if self._threads:
                so.intra_op_num_threads = int(self._threads)
            self._session = self._ort.InferenceSession(
                top_k_graph().SerializeToString(), sess_options=so, providers=self._providers
            )
        return self._session

    def __call__(self, logits: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``logits``: an OrtValue (B, S, V) on the execution device. Returns host (values, ids)."""
        b, _, v = logits.shape()
        k = min(int(k), v)
        sess = self._sess()
        io = sess.io_binding()
        io.bind_ortvalue_input("logits", logits)
        io.bind_cpu_input("k", np.asarray([k], dtype=np.int64))  # TopK reads k on the host (CUDA too)
        values = np.empty((b, k), dtype=np.float32)
        ids = np.empty((b, k), dtype=np.int64)
        # Written straight into host buffers we own (copied from the device when it runs on CUDA).
        io.bind_output("values", "cpu", 0, np.float32, [b, k], values.ctypes.data)
        io.bind_output("ids", "cpu", 0, np.int64, [b, k], ids.ctypes.data)
        sess.run_with_iobinding(io)
        return values, ids

    def warm_up(self, device: tuple[str, int]) -> None:
        """Create the session and run it once now (at load), not inside the first reduced step."""
        kind, index = device
        self(self._ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, 2), np.float32), kind, index), 1)

    def close(self) -> None:
        self._session = None
