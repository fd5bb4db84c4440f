"""TensorRT backend: a bundle's engine (``gpt2-deploy build``) on the full or the lean TensorRT runtime.

Layout on the device, allocated once in ``load()`` for the engine's maximum shapes and reused:

    inputs      input_ids, position_ids (B_max, S_max); attention_mask (B_max, T_max)   engine dtype
    logits      (B_max, S_max, V)                                                      engine dtype
    KV slots    per slot, two buffers per past/present tensor (B_max, nh, T_max, hs)   "ping-pong"
    scratch     one activation buffer shared by both execution contexts

One execution context per optimization profile (0: context/prefill, past = 0; 1: generation,
seq = 1). A step sets the input shapes on the profile's context, binds addresses and runs
``execute_async_v3`` on the backend's stream. TensorRT writes ``present.*`` contiguously for the
step's shape (B, nh, P + S, hs), which is exactly the layout ``past_key_values.*`` of the next step
expects, so the next step binds the same buffers as its past and writes its present into the other
half of the pair: present of step t becomes past of step t + 1 with no copy and no host round trip.
Only the logits (or just the last position's, with ``last_only``) come back to the host.

Steps the two profiles do not cover directly are decomposed, which is exact for a causal decoder:
a prompt longer than the context profile's max seq, or new tokens on top of a non-empty past, run
the remaining tokens one at a time through the generation profile.

CUDA binding: cuda-python (``cuda.bindings.runtime``), not torch. The point of this backend on the
edge is the small image: the lean runtime (~45 MB) plus cuda-python (a few MB of bindings over
the driver's CUDA runtime) against a CUDA build of torch of several GB. torch is already needed
by the reference backend, but that one is for parity checks on a workstation, not for the image
that ships, and the serving path must not import it (the ORT path does not either). cuda-python is
in the ``tensorrt`` and ``tensorrt-lean`` extras.

Patterns checked against Polygraphy's ``TrtRunner`` (v3 path: ``get_tensor_mode``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``, ``set_optimization_profile_async``
on the runner's stream) and TensorRT's Python API docs (``set_device_memory``,
``ExecutionContextAllocationStrategy.USER_MANAGED``, ``Runtime.engine_host_code_allowed``,
``Runtime.load_runtime``).
"""

from __future__ import annotations

import importlib
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from deploy.cuda import cuda_check, cuda_device_info, cudart
from deploy.engine import EngineEntry, RuntimeInfo, check_compatibility
from deploy.presets import CONTEXT_PROFILE, GENERATION_PROFILE
from export.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS
from export.deps import MissingDependencyError
from serving.backends.base import Backend, KVCache, StepOutput, parse_device
from serving.errors import BackendUnavailable, InvalidInput, OutOfRange, Unavailable

RUNTIMES = ("auto", "tensorrt", "tensorrt_lean")


def import_tensorrt(prefer: str = "auto") -> tuple[Any, str]:
    """The TensorRT module to run with and its kind ("tensorrt" or "tensorrt_lean").

    ``auto`` prefers the full runtime and falls back to the lean one. The lean runtime's import name
    is ``tensorrt_lean`` (the ``tensorrt-lean`` meta package); the ``tensorrt-lean-cu13-bindings``
    wheel alone installs it as ``tensorrt_lean_bindings``, which is accepted too.

    Raises:
        BackendUnavailable: none imports (the message names what was tried and how to install it).
    """
    if prefer not in RUNTIMES:
        raise BackendUnavailable(f"TensorRT runtime {prefer!r} is not one of {', '.join(RUNTIMES)}")
    order = {
        "auto": ["tensorrt", "tensorrt_lean", "tensorrt_lean_bindings"],
        "tensorrt": ["tensorrt"],
        "tensorrt_lean": ["tensorrt_lean", "tensorrt_lean_bindings"],
    }[prefer]
    errors = []
    for name in order:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        return mod, ("tensorrt" if name == "tensorrt" else "tensorrt_lean")
    raise BackendUnavailable(
        "the TensorRT backend needs TensorRT, which cannot be imported here (" + "; ".join(errors) + "); "
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

    ``current`` is the side holding the cache's past; a step writes its present to the other side
    and flips. ``version`` counts steps so a superseded cache object is recognized and refused.
    """

    def __init__(self, index: int, n_tensors: int, nbytes: int):
        self.index = index
        self.sides = [[_DeviceBuffer(nbytes) for _ in range(n_tensors)] for _ in range(2)]
        self.current = 0
        self.version = 0
        self.owner: weakref.ref | None = None

    @property
    def free(self) -> bool:
        return self.owner is None or self.owner() is None

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
        self.backend_id = backend_id
        slot.owner = weakref.ref(self)


class TensorRTBackend(Backend):
    """A bundle's TensorRT engine (``Manifest.engines``) on one CUDA device.

    Options read: ``device`` ("cuda" or "cuda:N"), ``engine`` (bundle-relative or absolute path;
    default: the newest engine this runtime may load), ``extra["runtime"]`` (auto|tensorrt|
    tensorrt_lean), ``extra["lean_library"]`` (a libnvinfer_lean to load with
    ``Runtime.load_runtime`` for --exclude-lean-runtime engines), ``extra["kv_slots"]`` (how many KV
    caches may be live at once; default 2, each is 2x the max-shape KV size).

    Every CUDA-touching method first makes the backend's device current: the CUDA runtime's current
    device is per host thread, and the server calls in from its worker threads.
    """

    name = "tensorrt"

    def __init__(self, bundle, options=None):
        super().__init__(bundle, options)
        self._lock = threading.Lock()
        self.entry: EngineEntry | None = None
        self._device_id = 0

    @property
    def max_concurrent_caches(self) -> int:
        """One KV slot per live cache: at most ``extra["kv_slots"]`` generations at once."""
        return int(self.options.extra.get("kv_slots", 2))

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
        for e in self._candidate_entries():
            problems = []
            onnx_entry = self.bundle.manifest.files.get(e.onnx_file)
            if onnx_entry is not None and onnx_entry.sha256 != e.onnx_sha256:
                problems.append(
                    f"it was built from a different {e.onnx_file} (sha256 {e.onnx_sha256[:12]}..., "
                    f"the bundle's is {onnx_entry.sha256[:12]}...): rebuild it"
                )
            if not (self.bundle.root / e.file).is_file():
                problems.append(f"{e.file} is missing")
            compat = check_compatibility(e, runtime)
            problems += compat.problems
            if not problems:
                self._notes = compat.notes
                return e
            reasons.append(f"{e.file}: " + "; ".join(problems))
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
            cuda_check(rt.cudaSetDevice(device_index), "cudaSetDevice")
        except (MissingDependencyError, RuntimeError) as e:
            raise BackendUnavailable(
                f"the TensorRT backend cannot use CUDA device {device_index}: {e}"
            ) from None
        lean_library = self.options.extra.get("lean_library")
        runtime_info = RuntimeInfo(
            module_kind, str(trt.__version__), device.compute_capability, device.name, lean_library
        )
        self._notes: list[str] = []
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
            # A version-compatible plan carries the lean runtime as host code; TensorRT loads it only
            # when told the plan is trusted. It is: its sha256 is checked against the manifest.
            runtime.engine_host_code_allowed = True
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
                f"engine {self.entry.file} does not match the bundle's I/O contract: " + "; ".join(problems)
            )

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

    def _make_contexts(self) -> None:
        e, trt, rt = self._engine, self.trt, cudart()
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        shared = strategy is not None and hasattr(e, "device_memory_size_v2")
        self._contexts = []
        for profile in (CONTEXT_PROFILE, GENERATION_PROFILE):
            ctx = (
                e.create_execution_context(strategy.USER_MANAGED) if shared else e.create_execution_context()
            )
            if ctx is None:
                raise BackendUnavailable(
                    "TensorRT could not create an execution context (out of GPU memory?)"
                )
            if not ctx.set_optimization_profile_async(profile, int(self._stream)):
                raise BackendUnavailable(f"TensorRT refused optimization profile {profile}")
            self._contexts.append(ctx)
        if shared:
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
        self._logits = buf(LOGITS, b * s * c.vocab_size)
        self._kv_bytes = b * c.n_head * t * c.head_dim * self._dtypes[c.past_names[0]].itemsize
        self._max_slots = self.max_concurrent_caches
        self._slots.append(_KVSlot(0, len(c.past_names), self._kv_bytes))

    # --- the step -----------------------------------------------------------------------------------
    def _empty_cache_impl(self, batch: int) -> KVCache:
        if batch > self.max_batch:
            raise OutOfRange(
                f"batch {batch} exceeds the engine's maximum batch {self.max_batch} "
                f"({self.entry.file}, preset {self.entry.preset}); rebuild with a larger "
                "--max-batch or split the batch"
            )
        # Every live cache holds one slot. Callers admit at most ``max_concurrent_caches`` users
        # before they take the backend (ModelRuntime does), so running out here is a caller that
        # skipped admission: fail at once, never wait (the slot owners may need the caller's lock).
        self._set_device()
        with self._lock:
            slot = next((s for s in self._slots if s.free), None)
            if slot is None and len(self._slots) < self._max_slots:
                slot = _KVSlot(len(self._slots), len(self.contract.past_names), self._kv_bytes)
                self._slots.append(slot)
            if slot is None:
                raise Unavailable(
                    f"all {self._max_slots} KV-cache slots of the TensorRT backend are in use "
                    "(one per live generation); retry later or raise the limit "
                    "(gpt2-deploy serve --kv-slots N, or BackendOptions.extra['kv_slots'])"
                )
            slot.version += 1  # whatever cache held this slot before is superseded
            return TrtKVCache(batch, 0, slot, id(self))

    def _forward(self, input_ids, attention_mask, position_ids, past, last_only) -> StepOutput:
        if not isinstance(past, TrtKVCache) or past.backend_id != id(self):
            raise InvalidInput(
                "the TensorRT backend takes only KV caches it created (empty_cache or a "
                f"previous forward of this backend), got {type(past).__name__}"
            )
        b, s = input_ids.shape
        p = past.length
        if b > self.max_batch:
            raise OutOfRange(f"batch {b} exceeds the engine's maximum batch {self.max_batch}")
        if p + s > self.max_context:
            raise OutOfRange(
                f"past ({p}) + new tokens ({s}) = {p + s} exceeds the engine's context of "
                f"{self.max_context} positions ({self.entry.file}, preset {self.entry.preset}); "
                "rebuild with a larger --max-context"
            )
        v = self.contract.vocab_size
        out = np.empty((b, 1 if last_only else s, v), dtype=np.float32)
        # Runs: one prefill through the context profile when the past is empty, then one token at a
        # time through the generation profile (exact for a causal decoder).
        runs: list[tuple[int, int, int]] = []  # (profile, start, count)
        start = 0
        if p == 0:
            n0 = min(s, self.max_prompt)
            runs.append((CONTEXT_PROFILE, 0, n0))
            start = n0
        runs += [(GENERATION_PROFILE, i, 1) for i in range(start, s)]
        self._set_device()
        with self._lock:
            if past.version != past.slot.version:
                raise InvalidInput(
                    "this KV cache was already advanced by a later step (its device buffers now "
                    "hold a newer cache); continue from the cache the last forward returned"
                )
            slot = past.slot
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
                    last = k == len(runs) - 1
                    if not last_only:
                        self._copy_logits(out, b, a, n, s, last_position=False)
                    elif last:
                        self._copy_logits(out, b, 0, n, 1, last_position=True)
                cuda_check(cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
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

    def _copy_logits(self, out: np.ndarray, b: int, a: int, n: int, s: int, *, last_position: bool) -> None:
        """Device logits (b, n, V) of the last run -> ``out[:, a:a+n]`` (or only position n - 1)."""
        rt, v = cudart(), self.contract.vocab_size
        dt = self._dtypes[LOGITS]
        row = v * dt.itemsize
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if last_position:
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
            host = np.empty((b, n, v), dtype=dt)
            cuda_check(
                rt.cudaMemcpyAsync(host.ctypes.data, self._logits.ptr, host.nbytes, d2h, self._stream),
                "copy logits to the host",
            )
        cuda_check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        out[:, a : a + n] = host  # float16 logits widen to float32 here

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
                slot.release()
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
            "kv_slots": self._max_slots,
            "notes": list(self._notes),
        }
