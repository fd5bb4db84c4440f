"""TensorRT backend: a bundle's engine (``gpt2-deploy build``) on the full or the lean TensorRT runtime.

    backend = create_backend("tensorrt", bundle, BackendOptions(device="cuda")).load()

Device memory, allocated once in ``load()`` at the engine's maximum shapes:

    inputs      input_ids, position_ids (B_max, S_max); attention_mask (B_max, T_max)
    logits      (B_max, 1, V): engines are built from the last-position graph
    KV slots    KV_CACHES x two sides (ping-pong) of every past tensor (B_max, nh, T_max, hs)
    scratch     one activation buffer shared by both execution contexts

One execution context per optimization profile (0: prefill, past = 0; 1: generation, seq = 1).
TensorRT writes ``present.*`` densely for the step's shape, exactly what the next step reads as
its past, so a step writes into the other side of its slot and flips: no copy, no host round
trip. Rows join and leave by device copies planned in ``kv_layout``. Steps the profiles do not
cover (long prompts, tokens on a past, every position's logits) run token by token through the
generation profile, which is exact for a causal decoder. CUDA goes through cuda-python, not torch
(the small edge image; docs/tensorrt.md).
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import numpy as np

from deploy.cuda import TENSORRT_MODULES, cuda_check, cuda_device_info, cudart, import_tensorrt_runtime
from deploy.engine import EngineEntry, RuntimeInfo, check_engine
from deploy.presets import CONTEXT_PROFILE, GENERATION_PROFILE
from export.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS
from export.deps import MissingDependencyError
from export.manifest import Bundle
from serving.backends.base import Backend, BackendLimits, BackendOptions, KVCache, StepOutput, parse_device
from serving.backends.kv_layout import Plan, join_plan, select_plan
from serving.errors import BackendUnavailable, InvalidInput, OutOfRange, Unavailable

RUNTIMES = tuple(TENSORRT_MODULES)  # auto, tensorrt, tensorrt_lean
# KV caches live at once: the running batch, a prefilled group before it joins, a solo run.
KV_CACHES = 3


def import_tensorrt(prefer: str = "auto") -> tuple[Any, str]:
    """The TensorRT module to run with and its kind ("tensorrt" or "tensorrt_lean").

    ``auto`` prefers the full runtime and falls back to the lean one (``deploy.cuda.TENSORRT_MODULES``
    lists the import names tried).

    Raises:
        BackendUnavailable: none imports (the message names what was tried and how to install it).
    """
    if prefer not in RUNTIMES:
        raise BackendUnavailable(f"TensorRT runtime {prefer!r} is not one of {', '.join(RUNTIMES)}")
    try:
        return import_tensorrt_runtime(prefer)
    except ImportError as e:
        errors = str(e)
    raise BackendUnavailable(
        "the TensorRT backend needs TensorRT, which cannot be imported here (" + errors + "); "
        "install the full runtime (pip install 'gpt2-deploy[tensorrt]' with NVIDIA's index, a TensorRT "
        "container, or JetPack) or the lean runtime for version-compatible engines "
        "(pip install 'gpt2-deploy[tensorrt-lean]')"
    )


class _DeviceBuffer:
    """One cudaMalloc'ed buffer (never zero bytes: empty tensors still need a non-null address)."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 256)
        self.ptr = int(cuda_check(cudart().cudaMalloc(self.nbytes), "cudaMalloc"))

    def free(self) -> None:
        if self.ptr:
            cuda_check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class _KVSlot:
    """Ping-pong device buffers for one live KV cache: ``sides[s][i]`` is tensor i of side s.

    ``current`` is the side holding the cache's past; a step (or a join/select) writes the new
    cache to the other side and flips. ``version`` counts those moves so a superseded cache object
    is recognized and refused. Slots are allocated at load and handed out and back explicitly
    (``in_use``), never freed by garbage collection.
    """

    def __init__(self, index: int):
        self.index = index
        self.sides: list[list[_DeviceBuffer]] = [[], []]
        self.current = 0
        self.version = 0  # bumped whenever the data moves: older cache objects are stale
        self.in_use = False
        self.lease = 0  # which hand-out of the slot a cache belongs to (release frees only its own)

    def allocate(self, n_tensors: int, nbytes: int) -> None:
        for side in self.sides:  # appended one by one: after a failed cudaMalloc, free() frees the rest
            for _ in range(n_tensors):
                side.append(_DeviceBuffer(nbytes))

    def release(self) -> None:
        for side in self.sides:
            for buf in side:
                buf.free()


class TrtKVCache(KVCache):
    """A KV cache living in one slot of the backend; valid until the next step advances it."""

    def __init__(self, batch: int, length: int, slot: _KVSlot, backend_id: int):
        super().__init__(batch, length)
        self.slot = slot
        self.version = slot.version
        self.lease = slot.lease
        self.backend_id = backend_id


class TensorRTBackend(Backend):
    """A bundle's TensorRT engine (``Manifest.engines``) on one CUDA device.

    Options read: ``device`` ("cuda" or "cuda:N"), ``engine`` (bundle-relative or absolute path;
    default: the newest engine this runtime may load), ``extra["runtime"]`` (auto|tensorrt|
    tensorrt_lean), ``extra["lean_library"]`` (a libnvinfer_lean to load with
    ``Runtime.load_runtime`` for --exclude-lean-runtime engines), ``extra["trust_engine_host_code"]``
    (load a plan that embeds the lean runtime as host code; off by default, see
    ``deploy.engine.check_host_code``).

    KV memory: ``KV_CACHES`` slots, allocated at load, each two sides (ping-pong) of every past
    tensor at the engine's max batch and context. A scheduler uses one for the running batch,
    one for a group being prefilled before it joins, and one for a solo (isolated) parity run.

    Every CUDA-touching method first makes the backend's device current: the CUDA runtime's current
    device is per host thread, and the server calls in from its worker threads.
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, options: BackendOptions | None = None) -> None:
        super().__init__(bundle, options)
        self._lock = threading.Lock()
        self._leases = itertools.count(1)
        self._notes: list[str] = []
        self.entry: EngineEntry | None = None
        self._device_id = 0

    @property
    def limits(self) -> BackendLimits:
        """The engine's profiles decide (read at load); before that, the model's."""
        if getattr(self, "max_batch", None) is None:
            return super().limits
        return BackendLimits(
            max_batch=self.max_batch,
            max_context=self.max_context,
            max_prompt=self.max_prompt,
            max_caches=KV_CACHES,
        )

    # --- load -----------------------------------------------------------------------------------
    def _device_index(self) -> int:
        try:
            kind, index = parse_device(self.options.device)
        except BackendUnavailable:
            kind, index = "", 0
        if kind != "cuda":
            raise BackendUnavailable(
                f"the TensorRT backend runs on CUDA devices only; device "
                f"{self.options.device!r} given, use 'cuda' or 'cuda:N'"
            )
        return index

    def _set_device(self) -> None:
        """Make this backend's device current on the calling thread."""
        cuda_check(cudart().cudaSetDevice(self._device_id), "cudaSetDevice")

    def _candidate_entries(self) -> list[EngineEntry]:
        raw = self.bundle.manifest.engines
        if not raw:
            raise BackendUnavailable(
                f"bundle {self.bundle.root} has no TensorRT engine; build one with "
                f"`gpt2-deploy build {self.bundle.root}` on the target GPU"
            )
        entries = []
        for d in raw:
            try:
                entries.append(EngineEntry.from_json(d))
            except (TypeError, ValueError) as e:
                raise BackendUnavailable(f"bundle manifest has a malformed engine entry: {e}") from None
        if self.options.engine:
            want = Path(self.options.engine)
            root = self.bundle.root.resolve()
            matches = [
                e for e in entries if e.file == want.as_posix() or (root / e.file).resolve() == want.resolve()
            ]
            if not matches:
                raise BackendUnavailable(
                    f"engine {self.options.engine!r} is not recorded in the bundle; "
                    f"recorded engines: {[e.file for e in entries]}"
                )
            return matches
        return list(reversed(entries))  # newest first

    def _select_entry(self, runtime: RuntimeInfo) -> EngineEntry:
        """The first candidate this runtime may load; otherwise every candidate's reasons."""
        reasons = []
        trusted = bool(self.options.extra.get("trust_engine_host_code"))
        for e in self._candidate_entries():
            verdict = check_engine(self.bundle, e, runtime, trusted)
            if verdict:
                self._notes = verdict.notes
                return e
            reasons.append(f"{e.file}: {verdict}")
        raise BackendUnavailable(
            "no engine in the bundle can run here:\n" + "\n".join(f"  - {r}" for r in reasons)
        )

    def _load_impl(self) -> None:
        try:
            self._load_engine()
        except RuntimeError as e:  # a CUDA call failed (cuda_check): out of memory, bad device...
            raise BackendUnavailable(
                f"the TensorRT backend could not load on CUDA device {self._device_id}: {e}"
            ) from None

    def _load_engine(self) -> None:
        device_index = self._device_id = self._device_index()
        self._candidate_entries()  # "no engine" is reported before anything is imported
        trt, module_kind = import_tensorrt(self.options.extra.get("runtime", "auto"))
        try:
            rt = cudart()
            device = cuda_device_info(device_index)
            self._set_device()
        except (MissingDependencyError, RuntimeError) as e:
            raise BackendUnavailable(
                f"the TensorRT backend cannot use CUDA device {device_index}: {e}"
            ) from None
        lean_library = self.options.extra.get("lean_library")
        runtime_info = RuntimeInfo(
            module_kind, str(trt.__version__), device.compute_capability, device.name, lean_library
        )
        self._notes = []
        entry = self._select_entry(runtime_info)
        self.entry, self.trt, self.device, self.module_kind = entry, trt, device, module_kind

        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = self._parent_runtime = trt.Runtime(self._logger)
        if lean_library:
            # An --exclude-lean-runtime plan: load the lean runtime library it needs (same version).
            # The child runtime is owned by its parent: keep the parent alive until after it.
            runtime = runtime.load_runtime(str(lean_library))
            if runtime is None:
                raise BackendUnavailable(f"Runtime.load_runtime could not load {lean_library}")
        if entry.version_compatible:
            # A version-compatible plan carries the lean runtime as executable host code; a hash in
            # the same bundle is no proof of origin, so ``_select_entry`` picked it only with the
            # explicit opt-in (--trust-engine-host-code -> extra["trust_engine_host_code"]).
            runtime.engine_host_code_allowed = entry.embeds_host_code
        self._runtime = runtime
        engine = runtime.deserialize_cuda_engine((self.bundle.root / entry.file).read_bytes())
        if engine is None:
            raise BackendUnavailable(
                f"TensorRT ({module_kind} {trt.__version__}) could not deserialize "
                f"{entry.file}; the TensorRT log above says why"
            )
        self._engine = engine
        self._check_engine_io()
        self._read_limits()
        self._stream = cuda_check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")
        self._buffers: list[_DeviceBuffer] = []
        self._slots: list[_KVSlot] = []
        self._make_contexts()
        self._allocate_io()

    def _np_dtype(self, name: str) -> np.dtype:
        dt = self._engine.get_tensor_dtype(name)
        try:
            return np.dtype(self.trt.nptype(dt))
        except TypeError:
            raise BackendUnavailable(
                f"engine tensor {name} has type {dt}, which has no numpy equivalent; "
                "rebuild the engine with fp32 I/O (the default)"
            ) from None

    def _check_engine_io(self) -> None:
        """Engine tensors vs the contract: names, modes, dtypes (every problem at once)."""
        e, trt, c = self._engine, self.trt, self.contract
        names = {e.get_tensor_name(i) for i in range(e.num_io_tensors)}
        problems = []
        for expected, mode in (
            (c.input_names, trt.TensorIOMode.INPUT),
            (c.output_names, trt.TensorIOMode.OUTPUT),
        ):
            for n in expected:
                if n not in names:
                    problems.append(f"missing {'input' if mode == trt.TensorIOMode.INPUT else 'output'} {n}")
                elif e.get_tensor_mode(n) != mode:
                    problems.append(f"{n} is an {e.get_tensor_mode(n)}, expected {mode}")
        if not problems:
            for n in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS):
                if self._np_dtype(n) not in (np.int64, np.int32):
                    problems.append(f"{n} is {self._np_dtype(n)}, expected int64 or int32")
            for n in (LOGITS, *c.past_names, *c.present_names):
                if self._np_dtype(n) not in (np.float32, np.float16):
                    problems.append(f"{n} is {self._np_dtype(n)}, expected float32 or float16")
            for past, present in zip(c.past_names, c.present_names, strict=True):
                if self._np_dtype(past) != self._np_dtype(present):
                    problems.append(
                        f"{past} ({self._np_dtype(past)}) and {present} ({self._np_dtype(present)}) "
                        "differ in type: present cannot become the next past"
                    )
            if e.num_optimization_profiles < 2:
                problems.append(
                    f"the engine has {e.num_optimization_profiles} optimization profile(s); "
                    "gpt2-deploy engines have two (context, generation)"
                )
        if problems:
            raise BackendUnavailable(
                f"engine {self._engine_label()} does not match the bundle's I/O contract: "
                + "; ".join(problems)
            )

    def _engine_label(self) -> str:
        e = self.entry
        return "no engine loaded" if e is None else f"{e.file}, preset {e.preset}"

    def _read_limits(self) -> None:
        """Limits from the engine's own profiles (authoritative over the manifest)."""
        e = self._engine
        _, _, ctx_ids_max = e.get_tensor_profile_shape(INPUT_IDS, CONTEXT_PROFILE)
        _, _, gen_ids_max = e.get_tensor_profile_shape(INPUT_IDS, GENERATION_PROFILE)
        _, _, gen_past_max = e.get_tensor_profile_shape(self.contract.past_names[0], GENERATION_PROFILE)
        self.max_batch = min(int(ctx_ids_max[0]), int(gen_ids_max[0]))
        self.max_prompt = int(ctx_ids_max[1])
        self.max_context = int(gen_past_max[2]) + 1
        self.max_batch_alloc = max(int(ctx_ids_max[0]), int(gen_ids_max[0]))
        # An engine built from the generation graph (deploy.trt_build) has logits (B, 1, V): the
        # lm_head of the last position only; an older one built from model.onnx has (B, S, V).
        self._last_logits = int(e.get_tensor_shape(LOGITS)[1]) == 1

    def _make_contexts(self) -> None:
        e, trt, rt = self._engine, self.trt, cudart()
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        shared = hasattr(e, "device_memory_size_v2")
        self._contexts = []
        for profile in (CONTEXT_PROFILE, GENERATION_PROFILE):
            ctx = (
                e.create_execution_context(strategy.USER_MANAGED)
                if shared and strategy is not None
                else e.create_execution_context()
            )
            if ctx is None:
                raise BackendUnavailable(
                    "TensorRT could not create an execution context (out of GPU memory?)"
                )
            if not ctx.set_optimization_profile_async(profile, int(self._stream)):
                raise BackendUnavailable(f"TensorRT refused optimization profile {profile}")
            self._contexts.append(ctx)
        if shared and strategy is not None:
            # Both contexts enqueue on the one stream, so they never run at the same time and can
            # share one activation scratch buffer (the size covers every profile).
            self._scratch = _DeviceBuffer(int(e.device_memory_size_v2))
            self._buffers.append(self._scratch)
            for ctx in self._contexts:
                ctx.set_device_memory(self._scratch.ptr, self._scratch.nbytes)
        cuda_check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def _allocate_io(self) -> None:
        c, b, s, t = self.contract, self.max_batch_alloc, self.max_prompt, self.max_context
        self._dtypes = {n: self._np_dtype(n) for n in (*c.input_names, *c.output_names)}

        def buf(name: str, elements: int) -> _DeviceBuffer:
            b_ = _DeviceBuffer(elements * self._dtypes[name].itemsize)
            self._buffers.append(b_)
            return b_

        self._in = {
            INPUT_IDS: buf(INPUT_IDS, b * s),
            POSITION_IDS: buf(POSITION_IDS, b * s),
            ATTENTION_MASK: buf(ATTENTION_MASK, b * t),
        }
        # A generation engine (built from the last-position graph) returns (B, 1, V) per run: B_max x V
        # here, not B_max x max_prompt x V (3 GiB for the server preset with a full-logits engine).
        self._logits = buf(LOGITS, b * (1 if self._last_logits else s) * c.vocab_size)
        self._kv_item = self._dtypes[c.past_names[0]].itemsize
        self._kv_bytes = b * c.n_head * t * c.head_dim * self._kv_item
        # Every slot at load: an out-of-memory is a clear load error here (partial allocations are
        # freed by _close_impl), never an INTERNAL error in the middle of serving.
        for index in range(KV_CACHES):
            slot = _KVSlot(index)
            self._slots.append(slot)
            slot.allocate(len(c.past_names), self._kv_bytes)

    # --- the step -----------------------------------------------------------------------------------
    def _empty_cache_impl(self, batch: int) -> KVCache:
        if batch > self.max_batch:
            raise OutOfRange(
                f"batch {batch} exceeds the engine's maximum batch {self.max_batch} "
                f"({self._engine_label()}); rebuild with a larger "
                "--max-batch or split the batch"
            )
        with self._lock:
            return TrtKVCache(batch, 0, self._take_slot(), id(self))

    def _take_slot(self) -> _KVSlot:
        """A free slot (under ``_lock``). The scheduler keeps at most ``KV_CACHES`` caches alive
        (``limits.max_caches``), so running out is a caller bug: fail at once, never wait."""
        slot = next((s for s in self._slots if not s.in_use), None)
        if slot is None:
            raise Unavailable(
                f"all {KV_CACHES} KV caches of the TensorRT backend are in use (the running batch, "
                "a prefill and a solo run); retry later"
            )
        slot.in_use = True
        slot.version += 1  # whatever cache held this slot before is superseded
        slot.lease = next(self._leases)
        return slot

    def _own(self, cache: KVCache) -> TrtKVCache:
        """``cache`` if it is this backend's and still current (under ``_lock``)."""
        if not isinstance(cache, TrtKVCache) or cache.backend_id != id(self):
            raise InvalidInput(
                "the TensorRT backend takes only KV caches it created (empty_cache or a "
                f"previous forward of this backend), got {type(cache).__name__}"
            )
        if cache.version != cache.slot.version or not cache.slot.in_use:
            raise InvalidInput(
                "this KV cache was already advanced, joined, selected or released (its device "
                "buffers now hold a newer cache); continue from the cache the last call returned"
            )
        return cache

    # --- KV-cache operations: device-to-device copies planned by kv_layout --------------------------
    def _join_impl(self, caches: list[KVCache], length: int) -> KVCache:
        self._set_device()
        with self._lock:
            own = [self._own(c) for c in caches]
            dst = own[0].slot
            plan = join_plan(
                [(c.batch, c.length) for c in own], self.contract.n_head, self.contract.head_dim, length
            )
            self._run_plan(plan, [c.slot.sides[c.slot.current] for c in own], dst)
            for c in own[1:]:  # consumed: their slots go back to the pool now, in order
                self._free_slot(c.slot)
            return TrtKVCache(plan.rows, length, dst, id(self))

    def _select_impl(self, cache: KVCache, rows: list[int], length: int) -> KVCache:
        self._set_device()
        with self._lock:
            c = self._own(cache)
            slot = c.slot
            plan = select_plan(
                (c.batch, c.length), rows, length, self.contract.n_head, self.contract.head_dim
            )
            self._run_plan(plan, [slot.sides[slot.current]], slot)
            return TrtKVCache(len(rows), length, slot, id(self))

    def _release_impl(self, cache: KVCache) -> None:
        with self._lock:
            if not isinstance(cache, TrtKVCache) or cache.backend_id != id(self):
                return
            if cache.slot.in_use and cache.lease == cache.slot.lease:  # stale data is still ours
                self._free_slot(cache.slot)

    def _free_slot(self, slot: _KVSlot) -> None:
        slot.in_use = False
        slot.version += 1

    def _run_plan(self, plan: Plan, sources: list[list[_DeviceBuffer]], slot: _KVSlot) -> None:
        """The same plan for every past tensor i: copies from ``sources[k][i]`` into tensor i of
        ``slot``'s other side, which becomes its current one (older caches of the slot go stale)."""
        rt, isz = cudart(), self._kv_item
        d2d = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for i, out in enumerate(slot.sides[1 - slot.current]):
            for z in plan.zeros:
                cuda_check(
                    rt.cudaMemset2DAsync(
                        out.ptr + z.dst_offset * isz,
                        z.dst_pitch * isz,
                        0,
                        z.width * isz,
                        z.height,
                        self._stream,
                    ),
                    "zero the KV padding",
                )
            for cp in plan.copies:
                src = sources[cp.src][i]
                cuda_check(
                    rt.cudaMemcpy2DAsync(
                        out.ptr + cp.dst_offset * isz,
                        cp.dst_pitch * isz,
                        src.ptr + cp.src_offset * isz,
                        cp.src_pitch * isz,
                        cp.width * isz,
                        cp.height,
                        d2d,
                        self._stream,
                    ),
                    "copy KV rows",
                )
        cuda_check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        slot.current = 1 - slot.current
        slot.version += 1

    def _forward(self, input_ids, attention_mask, position_ids, past, last_only) -> StepOutput:
        if not isinstance(past, TrtKVCache) or past.backend_id != id(self):
            self._own(past)  # raises with the message
        b, s = input_ids.shape  # within the engine's batch and context (``limits``, ``_validate``)
        p = past.length
        v = self.contract.vocab_size
        out = np.empty((b, 1 if last_only else s, v), dtype=np.float32)
        # Runs: one prefill through the context profile when the past is empty, then one token at a
        # time through the generation profile (exact for a causal decoder). Every position's logits
        # from a last-position engine (Score, the KServe forward) take one run per token.
        runs: list[tuple[int, int, int]] = []  # (profile, start, count)
        start = 0
        if p == 0:
            n0 = min(s, self.max_prompt) if last_only or not self._last_logits else 1
            runs.append((CONTEXT_PROFILE, 0, n0))
            start = n0
        runs += [(GENERATION_PROFILE, i, 1) for i in range(start, s)]
        self._set_device()
        with self._lock:
            slot = self._own(past).slot
            keep_alive: list[np.ndarray] = []
            length = p
            try:
                for k, (profile, a, n) in enumerate(runs):
                    self._run(
                        profile,
                        slot,
                        input_ids[:, a : a + n],
                        attention_mask[:, : length + n],
                        position_ids[:, a : a + n],
                        length,
                        keep_alive,
                    )
                    length += n
                    if not last_only:
                        self._copy_logits(out, a, b, n)
                    elif k == len(runs) - 1:  # the last run always copies, so the stream is synced
                        self._copy_logits(out, 0, b, n, last_position=True)
            except BaseException:
                # Some runs may have flipped the ping-pong side: the slot no longer holds ``past``.
                # Invalidate every cache of this slot so nobody continues from corrupted buffers.
                slot.version += 1
                raise
            slot.version += 1
            present = TrtKVCache(b, p + s, slot, id(self))
        return StepOutput(logits=out, present=present)

    def _run(
        self,
        profile: int,
        slot: _KVSlot,
        ids: np.ndarray,
        mask: np.ndarray,
        pos: np.ndarray,
        past_len: int,
        keep_alive: list[np.ndarray],
    ) -> None:
        """One execute_async_v3: past = slot's current side, present -> the other side, then flip."""
        rt, c, ctx = cudart(), self.contract, self._contexts[profile]
        b, n = ids.shape
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, host in ((INPUT_IDS, ids), (POSITION_IDS, pos), (ATTENTION_MASK, mask)):
            arr = np.ascontiguousarray(host, dtype=self._dtypes[name])  # int64 -> int32 if the engine wants
            keep_alive.append(arr)  # the async copy reads it until the stream syncs
            cuda_check(
                rt.cudaMemcpyAsync(self._in[name].ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream),
                f"copy {name} to the device",
            )
            self._set_shape(ctx, name, arr.shape, profile)
            ctx.set_tensor_address(name, self._in[name].ptr)
        src, dst = slot.sides[slot.current], slot.sides[1 - slot.current]
        for i, (past_name, present_name) in enumerate(zip(c.past_names, c.present_names, strict=True)):
            # With past_len == 0 the past is an empty tensor; its address is still the (non-null)
            # slot buffer, as TensorRT requires a non-null address for every bound tensor.
            self._set_shape(ctx, past_name, (b, c.n_head, past_len, c.head_dim), profile)
            ctx.set_tensor_address(past_name, src[i].ptr)
            ctx.set_tensor_address(present_name, dst[i].ptr)
        ctx.set_tensor_address(LOGITS, self._logits.ptr)
        if not ctx.execute_async_v3(int(self._stream)):
            raise RuntimeError(
                f"TensorRT execute_async_v3 failed (profile {profile}, batch {b}, {n} new tokens, "
                f"past {past_len}); the TensorRT log above says why"
            )
        slot.current = 1 - slot.current

    def _set_shape(self, ctx: Any, name: str, shape: tuple[int, ...], profile: int) -> None:
        if not ctx.set_input_shape(name, tuple(int(d) for d in shape)):
            lo, _, hi = self._engine.get_tensor_profile_shape(name, profile)
            raise OutOfRange(
                f"{name} shape {list(shape)} is outside the engine's profile {profile} "
                f"range {list(lo)}..{list(hi)}"
            )

    def _copy_logits(self, out: np.ndarray, at: int, b: int, n: int, *, last_position: bool = False) -> None:
        """The last run's device logits (it fed n tokens) -> ``out[:, at:...]``: every position it
        produced, or only the last one. A last-position engine produced only that one."""
        rt, v = cudart(), self.contract.vocab_size
        dt = self._dtypes[LOGITS]
        row = v * dt.itemsize
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        produced = 1 if self._last_logits else n
        if last_position and produced > 1:
            host = np.empty((b, 1, v), dtype=dt)
            # b rows of one position each: source pitch n*V, offset (n-1)*V; destination contiguous.
            cuda_check(
                rt.cudaMemcpy2DAsync(
                    host.ctypes.data,
                    row,
                    self._logits.ptr + (n - 1) * row,
                    n * row,
                    row,
                    b,
                    d2h,
                    self._stream,
                ),
                "copy logits to the host",
            )
        else:
            host = np.empty((b, produced, v), dtype=dt)
            cuda_check(
                rt.cudaMemcpyAsync(host.ctypes.data, self._logits.ptr, host.nbytes, d2h, self._stream),
                "copy logits to the host",
            )
        cuda_check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        out[:, at : at + host.shape[1]] = host  # float16 logits widen to float32 here

    # --- close / info -------------------------------------------------------------------------------
    def _close_impl(self) -> None:
        """Free everything; also called after a load that failed part way (attributes may be absent)."""
        try:
            rt = cudart()
            self._set_device()
        except (MissingDependencyError, RuntimeError):
            return  # CUDA never came up: nothing was allocated
        stream = getattr(self, "_stream", None)
        try:
            if stream is not None:
                cuda_check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        finally:
            # TensorRT objects before the memory they use: contexts, engine, runtime (the child
            # lean runtime before the parent that loaded it).
            self._contexts = []
            self._engine = None
            self._runtime = None
            self._parent_runtime = None
            for slot in getattr(self, "_slots", []):
                slot.release()  # every slot, in order: nothing is left to the garbage collector
            for buf in getattr(self, "_buffers", []):
                buf.free()
            self._slots, self._buffers = [], []
            if stream is not None:
                self._stream = None
                cuda_check(rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def _info_impl(self) -> dict[str, Any]:
        if self.entry is None:
            return {}
        e = self.entry
        return {
            "engine": e.file,
            "runtime": self.module_kind,
            "tensorrt_version": str(self.trt.__version__),
            "built_with": e.tensorrt_version,
            "gpu": self.device.name,
            "compute_capability": self.device.compute_capability,
            "precision": e.precision,
            "tolerance": e.tolerance_name,
            "preset": e.preset,
            "max_batch": self.max_batch,
            "max_prompt": self.max_prompt,
            "max_context": self.max_context,
            "version_compatible": e.version_compatible,
            "kv_caches": KV_CACHES,
            "logits_positions": "last" if self._last_logits else "all",
            "activation_bytes": int(getattr(self._engine, "device_memory_size_v2", 0) or 0),
            "kv_bytes_per_tensor_side": self._kv_bytes,
            "notes": list(self._notes),
        }
