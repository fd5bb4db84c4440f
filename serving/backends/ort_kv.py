"""KV-cache operations for the ONNX Runtime backend, as tiny ONNX graphs run where the cache lives.

    ops = OrtKVOps(ort, providers, ("cpu", 0), n_tensors=2 * n_layer)
    joined = ops.join([values_a, values_b], [len_a, len_b], length)   # left-pad each, stack rows
    kept = ops.select(values, rows=[0, 2], start=5)                   # gather rows, drop 5 columns

Each operation is one ``run_with_iobinding`` over every past tensor at once, on the session's
execution provider, so on CUDA the cache never leaves the device when a row joins or leaves
(numpy would need a host round trip). Graphs are built on first use and kept (one per number of
joined groups).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_INT64_MAX = 2**63 - 1
_OPSET = 18


def _kv_info(helper: Any, tp: Any, name: str, batch: str, length: str) -> Any:
    return helper.make_tensor_value_info(name, tp.FLOAT, [batch, "heads", length, "head_dim"])


def select_graph(n_tensors: int) -> Any:
    """``out_i = kv_i[rows][:, :, start:]`` for every tensor i (Gather on rows, Slice on length)."""
    from onnx import TensorProto as tp
    from onnx import helper

    ends = helper.make_tensor("e", tp.INT64, [1], [_INT64_MAX])
    axes = helper.make_tensor("a", tp.INT64, [1], [2])
    nodes = [
        helper.make_node("Constant", [], ["ends"], value=ends),
        helper.make_node("Constant", [], ["axes"], value=axes),
    ]
    inputs, outputs = [], []
    for i in range(n_tensors):
        inputs.append(_kv_info(helper, tp, f"kv{i}", "batch", "length"))
        outputs.append(_kv_info(helper, tp, f"out{i}", "rows", "kept"))
        nodes.append(helper.make_node("Gather", [f"kv{i}", "rows"], [f"g{i}"], axis=0))
        nodes.append(helper.make_node("Slice", [f"g{i}", "start", "ends", "axes"], [f"out{i}"]))
    inputs += [
        helper.make_tensor_value_info("rows", tp.INT64, ["rows"]),
        helper.make_tensor_value_info("start", tp.INT64, [1]),
    ]
    graph = helper.make_graph(nodes, "kv_select", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])


def join_graph(n_tensors: int, groups: int) -> Any:
    """``out_i = concat_j(pad_left(kv_{j,i}, pads_j))`` over ``groups`` caches, rows stacked."""
    from onnx import TensorProto as tp
    from onnx import helper

    nodes, inputs, outputs = [], [], []
    for j in range(groups):
        inputs.append(helper.make_tensor_value_info(f"pads{j}", tp.INT64, [8]))
    for i in range(n_tensors):
        parts = []
        for j in range(groups):
            inputs.append(_kv_info(helper, tp, f"kv{j}_{i}", f"b{j}", f"t{j}"))
            nodes.append(helper.make_node("Pad", [f"kv{j}_{i}", f"pads{j}"], [f"p{j}_{i}"], mode="constant"))
            parts.append(f"p{j}_{i}")
        nodes.append(helper.make_node("Concat", parts, [f"out{i}"], axis=0))
        outputs.append(_kv_info(helper, tp, f"out{i}", "rows", "length"))
    graph = helper.make_graph(nodes, f"kv_join{groups}", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])


class OrtKVOps:
    """Join/select on lists of KV OrtValues (one per past tensor), on the backend's device.

    Args:
        ort: The onnxruntime module.
        providers: The main session's providers (the ops run on the same device).
        device: ("cpu", 0) or ("cuda", N): where outputs are allocated.
        n_tensors: Past tensors per cache (2 * n_layer).
    """

    def __init__(self, ort: Any, providers: list[Any], device: tuple[str, int], n_tensors: int):
        self._ort = ort
        self._providers = providers
        self._device = device
        self._n = n_tensors
        self._sessions: dict[Any, Any] = {}

    def warm_up(self, heads: int, head_dim: int) -> None:
        """Create and run once the sessions every scheduler uses (select, a join of two) now, not in
        the middle of serving (a first use costs ~0.1-0.2 s inside a step on a CPU)."""
        kind, index = self._device
        one = [
            self._ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, 1, head_dim), np.float32), kind, index)
            for _ in range(self._n)
        ]
        self.select(one, [0], 0)
        self.join([one, one], [1, 1], 1)

    def _session(self, key: Any, build: Any) -> Any:
        sess = self._sessions.get(key)
        if sess is None:
            so = self._ort.SessionOptions()
            # A copy is bound by memory bandwidth: one thread, and no spinning pool of its own
            # competing with the model's session for the cores.
            so.intra_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = self._ort.InferenceSession(
                build().SerializeToString(), sess_options=so, providers=self._providers
            )
            self._sessions[key] = sess
        return sess

    def _run(self, sess: Any, bind_inputs: Any) -> list[Any]:
        kind, index = self._device
        io = sess.io_binding()
        bind_inputs(io)
        for i in range(self._n):
            io.bind_output(f"out{i}", kind, index)
        sess.run_with_iobinding(io)
        return list(io.get_outputs())

    def select(self, values: list[Any], rows: list[int], start: int) -> list[Any]:
        """Rows ``rows`` of every tensor, without its first ``start`` positions."""
        sess = self._session("select", lambda: select_graph(self._n))

        def bind(io: Any) -> None:
            for i, v in enumerate(values):
                io.bind_ortvalue_input(f"kv{i}", v)
            io.bind_cpu_input("rows", np.asarray(rows, dtype=np.int64))
            io.bind_cpu_input("start", np.asarray([start], dtype=np.int64))

        return self._run(sess, bind)

    def join(self, groups: list[list[Any]], lengths: list[int], length: int) -> list[Any]:
        """Every group left-padded with zeros from its length to ``length``, rows stacked."""
        k = len(groups)
        sess = self._session(("join", k), lambda: join_graph(self._n, k))

        def bind(io: Any) -> None:
            for j, (values, n) in enumerate(zip(groups, lengths, strict=True)):
                io.bind_cpu_input(f"pads{j}", np.asarray([0, 0, length - n, 0, 0, 0, 0, 0], dtype=np.int64))
                for i, v in enumerate(values):
                    io.bind_ortvalue_input(f"kv{j}_{i}", v)

        return self._run(sess, bind)

    def close(self) -> None:
        self._sessions.clear()
