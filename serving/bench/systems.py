"""The systems the benchmark compares, all on the same weights (the bundle's ``reference/`` checkpoint).

    hf-generate            transformers' own ``generate(do_sample=False)``, sdpa attention: the baseline
    torch, onnxruntime[:P] the project's backends through ``Generator.run_batch`` (P: a precision
                           variant of the same preset, exported and cached: int8, int4, fp16, ...)
    ctranslate2:Q          CTranslate2 (Q: float32, int8), converted with its transformers converter
    optimum                Optimum's ``ORTModelForCausalLM``, in its own venv (``peers.optimum_env``)
    llama.cpp:Q            llama-cpp-python (Q: q8_0, f32), converted to GGUF with the converter of
                           the llama-cpp-python sdist

The peers live in ``serving.bench.peers``. A system that cannot run here raises ``Skipped`` with
the reason and the install line. Each system times prefill and decode steps at the point where its
API hands over logits (a stamp per forward), and gives its logits along the reference sequences
for the parity check.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from export.compare import compare_logits, tolerance_for
from export.manifest import MANIFEST_FILE, REFERENCE_DIR, Bundle, BundleError
from serving.bench.core import BASELINE, BenchOptions, Parity, Progress, Run

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


class Skipped(Exception):
    """This system cannot run here: ``reason``, and ``install`` says how to make it run."""

    def __init__(self, reason: str, install: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.install = install


def _dir_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


class Context:
    """What every system shares: options, the fp32 bundle, prompts, the reference model and answers."""

    def __init__(self, opts: BenchOptions, progress: Progress, bundle: Bundle | None = None):
        self.opts = opts
        self.progress = progress
        self.threads = opts.threads_used
        self.out = Path(opts.out)
        self.peers_dir = self.out / "peers"
        self.bundle = bundle or self._fp32_bundle()
        self._hf_model: Any = None
        self._hf_dir: Path | None = None
        self._reference: dict[str, Any] = {}
        self.prompts: list[list[int]] = []

    # --- bundles --------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """Names this model's cached conversions: the bundle name + its reference weights' hash."""
        entry = self.bundle.manifest.files.get(f"{REFERENCE_DIR}/model.safetensors")
        digest = entry.sha256[:12] if entry is not None else "noref"
        return f"{self.bundle.name}-{digest}"

    def _export(self, model: str, seed: int, precision: str, root: Path) -> Bundle:
        if (root / MANIFEST_FILE).is_file():
            try:
                return Bundle.open(root)
            except BundleError as e:
                self.progress(f"re-exporting: {e}")
        from export.api import USER_ERRORS, ExportOptions, export_bundle

        self.progress(f"exporting {model} {precision} (seed {seed}) to {root} (cached) ...")
        try:
            return export_bundle(
                ExportOptions(
                    model=model,
                    out=root,
                    seed=seed,
                    precision=precision,
                    reference=precision == "fp32",
                    quiet=True,
                )
            )
        except USER_ERRORS as e:
            raise Skipped(f"exporting the {precision} variant failed: {e}") from None

    def _fp32_bundle(self) -> Bundle:
        opts = self.opts
        if opts.bundle is not None:
            return Bundle.open(opts.bundle)
        return self._export(
            opts.model, opts.seed, "fp32", self.out / "bundles" / f"{opts.model}-seed{opts.seed}"
        )

    def variant_bundle(self, precision: str) -> Bundle:
        """The bundle's ``precision`` variant, exported once from the bundle's own source (preset +
        seed, or model directory), so its weights are the reference's; cached in OUT/bundles."""
        if precision == "fp32":
            return self.bundle
        m = self.bundle.manifest
        seed = m.export.get("seed")
        root = self.out / "bundles" / f"{self.key}-{precision}"
        variant = self._export(m.source, seed if seed is not None else 0, precision, root)
        if variant.manifest.source != m.source or variant.manifest.export.get("seed") != seed:
            raise Skipped(f"{root} was exported from another source than {self.bundle.root}")
        return variant

    def hf_dir(self) -> Path:
        """A transformers model directory of the reference weights + the bundle's tokenizer
        (symlinks), the input of every peer's converter."""
        if self._hf_dir is None:
            ref = self.bundle.root / REFERENCE_DIR
            if not (ref / "config.json").is_file():
                raise Skipped(f"{ref} holds no checkpoint: the bundle was exported with --no-reference")
            d = self.peers_dir / f"hf-{self.key}"
            d.mkdir(parents=True, exist_ok=True)
            sources = [p for p in ref.iterdir() if p.is_file()]
            sources += [self.bundle.root / n for n in TOKENIZER_FILES if (self.bundle.root / n).is_file()]
            for src in sources:
                link = d / src.name
                if link.is_symlink() or link.exists():
                    link.unlink()
                if src.name == "config.json":
                    # transformers 5 no longer writes GPT-2's n_ctx (an alias of n_positions that
                    # the hub's gpt2 config carries); llama.cpp's GPT-2 converter reads it
                    config = json.loads(src.read_text())
                    config.setdefault("n_ctx", config["n_positions"])
                    link.write_text(json.dumps(config, indent=2))
                else:
                    link.symlink_to(src.resolve())
            self._hf_dir = d
        return self._hf_dir

    # --- the reference ----------------------------------------------------------------------------
    def hf_model(self) -> Any:
        """transformers' GPT2LMHeadModel on the reference weights, fp32, sdpa (loaded once)."""
        if self._hf_model is None:
            import torch
            import transformers
            from transformers import GPT2LMHeadModel

            torch.set_num_threads(self.threads)
            transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars in the log
            self._hf_model = GPT2LMHeadModel.from_pretrained(
                self.bundle.root / REFERENCE_DIR, dtype=torch.float32, attn_implementation="sdpa"
            ).eval()
        return self._hf_model

    def hf_generate(self, prompts: list[list[int]], new_tokens: int, stamp: Callable[[], None] | None = None):
        """Greedy ``generate`` on ``prompts`` (equal lengths), ``new_tokens`` each, EOS not stopping.

        ``stamp`` is called each time logits are ready (a LogitsProcessor runs right after each
        forward). Returns the generated ids per row.
        """
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        class _Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if stamp is not None:
                    stamp()
                return scores

        model = self.hf_model()
        ids = torch.tensor(prompts, dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=0,
                eos_token_id=None,
                pad_token_id=self.bundle.dims.eos_token_id or 0,
                logits_processor=LogitsProcessorList([_Stamp()]),
            )
        return out[:, ids.shape[1] :].tolist()

    def reference_tokens(self, batch: int) -> list[list[int]]:
        """transformers' greedy tokens for the first ``batch`` prompts (computed once, untimed)."""
        key = f"tokens-{batch}"
        if key not in self._reference:
            self._reference[key] = self.hf_generate(self.prompts[:batch], self.opts.new_tokens)
        return self._reference[key]

    def parity_sequences(self) -> list[list[int]]:
        """Prompt + transformers' greedy continuation, for the first ``parity_sequences`` prompts."""
        k = min(self.opts.parity_sequences, len(self.prompts))
        return [p + t for p, t in zip(self.prompts[:k], self.reference_tokens(max(self.opts.batches))[:k])]

    def reference_logits(self) -> np.ndarray:
        """transformers' logits (k, L, V) over the parity sequences: one full forward, fp32."""
        if "logits" not in self._reference:
            import torch

            seqs = torch.tensor(self.parity_sequences(), dtype=torch.long)
            with torch.inference_mode():
                self._reference["logits"] = self.hf_model()(seqs).logits.float().numpy()
        return self._reference["logits"]

    def close(self) -> None:
        self._hf_model = None


class System:
    """One thing that generates: prepared (converted), loaded, timed, and checked for parity."""

    kind = "peer"
    tolerance = "fp32"  # the project's preset that a system of this precision is judged with

    def __init__(self, label: str, ctx: Context):
        self.label = label
        self.ctx = ctx
        self.model_path: Path | None = None
        self.model_extra: list[Path] = []  # files the model needs beside model_path (external data)
        self.notes: list[str] = []

    def prepare(self) -> None:
        """Convert/export what is needed (cached under OUT); raise Skipped when it cannot run."""

    def load(self) -> None:
        """Create sessions/models."""

    def supports(self, batch: int) -> str | None:
        """None when ``batch`` can be measured, else why not."""
        return None

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Run:
        raise NotImplementedError

    def logits(self, sequences: list[list[int]]) -> np.ndarray:
        """Logits (k, L, V) along ``sequences`` (all positions), the way this system computes them."""
        raise NotImplementedError

    def parity(self) -> Parity:
        ref = self.ctx.reference_logits()
        got = self.logits(self.ctx.parity_sequences())
        tol = tolerance_for(self.tolerance)
        case = compare_logits(ref, got, None, tol, self.label)
        return Parity(tol.name, case.max_abs, case.top1_agreement, case.passed, case.positions)

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tolerance": self.tolerance,
            "model_path": str(self.model_path) if self.model_path else None,
            "model_mb": (
                round(sum(_dir_mb(p) for p in (self.model_path, *self.model_extra)), 1)
                if self.model_path
                else None
            ),
            "notes": self.notes,
        }

    def close(self) -> None:
        """Free what ``load`` created."""


# --- transformers ---------------------------------------------------------------------------------
class HFGenerate(System):
    """transformers' ``generate(do_sample=False)`` with sdpa attention: what a user runs by default."""

    kind = "baseline"

    def load(self) -> None:
        self.ctx.hf_model()
        self.model_path = self.ctx.bundle.root / REFERENCE_DIR / "model.safetensors"
        self.notes.append("steps stamped by a LogitsProcessor (runs right after each forward)")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Run:
        stamps: list[float] = []
        t0 = time.perf_counter()
        tokens = self.ctx.hf_generate(prompts, new_tokens, stamp=lambda: stamps.append(time.perf_counter()))
        return Run.from_stamps(tokens, t0, stamps, time.perf_counter())

    def logits(self, sequences: list[list[int]]) -> np.ndarray:
        return self.ctx.reference_logits()  # this is the reference


def info_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for mod, dist in (
        ("numpy", "numpy"),
        ("onnxruntime", "onnxruntime"),
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("ctranslate2", "ctranslate2"),
        ("llama_cpp", "llama-cpp-python"),
        ("matplotlib", "matplotlib"),
        ("grpc", "grpcio"),
    ):
        try:
            from importlib.metadata import version

            out[mod] = version(dist)
        except Exception:  # noqa: BLE001 - not installed
            out[mod] = None
    return out


# --- the project's backends -----------------------------------------------------------------------
class _Stamped:
    """A backend whose ``forward`` records when its logits were ready; everything else delegates."""

    def __init__(self, backend: Any):
        self._backend = backend
        self.stamps: list[float] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._backend.forward(*args, **kwargs)
        self.stamps.append(time.perf_counter())
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class ProjectSystem(System):
    """``torch`` / ``onnxruntime[:precision]``: a project backend through ``Generator.run_batch``."""

    kind = "project"

    def __init__(self, label: str, ctx: Context):
        super().__init__(label, ctx)
        self.backend_name, _, precision = label.partition(":")
        self.precision = precision or "fp32"
        self.tolerance = self.precision
        self.bundle: Bundle | None = None
        self.backend: Any = None

    def prepare(self) -> None:
        if self.backend_name == "torch" and self.precision != "fp32":
            raise Skipped("the torch backend runs the fp32 reference checkpoint only")
        self.bundle = self.ctx.bundle if self.precision == "fp32" else self.ctx.variant_bundle(self.precision)
        if self.bundle.manifest.precision != self.precision:
            raise Skipped(f"{self.bundle.root} is a {self.bundle.manifest.precision} bundle")
        if self.backend_name == "torch":
            self.model_path = self.bundle.root / REFERENCE_DIR / "model.safetensors"
        else:
            from export.variants import external_locations

            m = self.bundle.manifest
            self.model_path = self.bundle.root / m.model_file
            self.model_extra = [self.bundle.root / loc for loc in sorted(external_locations(self.model_path))]
            validation = m.validation
            if not validation.get("skipped"):
                self.notes.append(
                    f"export validation: max|Δlogits| {validation.get('max_abs', float('nan')):.3g}, "
                    f"top-1 {validation.get('top1_agreement', float('nan')):.2%}"
                )

    def load(self) -> None:
        from serving.backends import BackendOptions, create_backend
        from serving.generation import Generator
        from serving.tokenizer import Tokenizer

        assert self.bundle is not None, "prepare() first"
        self.backend = create_backend(
            self.backend_name, self.bundle, BackendOptions(threads=self.ctx.threads)
        ).load()
        self._stamped = _Stamped(self.backend)
        # the stamping proxy stands in for the backend (it delegates everything but forward)
        self._gen = Generator(cast(Any, self._stamped), Tokenizer.from_dir(self.bundle.tokenizer_dir))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Run:
        self._stamped.stamps.clear()
        t0 = time.perf_counter()
        r = self._gen.run_batch(prompts, new_tokens, stop_at_eos=False)
        return Run.from_stamps(r.tokens, t0, list(self._stamped.stamps), time.perf_counter())

    def logits(self, sequences: list[list[int]]) -> np.ndarray:
        """Teacher-forced through the KV cache path: the prompt's prefill, then one token per step."""
        p = self.ctx.opts.prompt_len
        out = []
        for seq in sequences:
            o = self.backend.forward(
                np.asarray([seq[:p]], np.int64), np.ones((1, p), np.int64), np.arange(p)[None, :], None
            )
            rows, cache = [o.logits[0]], o.present
            for t in range(p, len(seq)):
                o = self.backend.forward(
                    np.asarray([[seq[t]]], np.int64), np.ones((1, t + 1), np.int64), np.asarray([[t]]), cache
                )
                rows.append(o.logits[0])
                cache = o.present
            out.append(np.concatenate(rows)[: len(seq)])
        return np.stack(out)

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["bundle"] = str(self.bundle.root) if self.bundle else None
        if self.bundle is not None:
            d["variant"] = self.bundle.manifest.export.get("variant", {})
            d["export_validation"] = {
                k: self.bundle.manifest.validation.get(k) for k in ("passed", "max_abs", "top1_agreement")
            }
        if self.backend is not None:
            d["backend_info"] = {
                k: v for k, v in self.backend.info().items() if isinstance(v, (str, int, float))
            }
        return d

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


def make_system(label: str, ctx: Context) -> System:
    """The system a label names (see the module docstring)."""
    name = label.partition(":")[0]
    if label == BASELINE:
        return HFGenerate(label, ctx)
    if name in ("torch", "onnxruntime"):
        return ProjectSystem(label, ctx)
    if name in ("ctranslate2", "llama.cpp", "optimum"):
        from serving.bench.peers import PEERS

        return PEERS[name](label, ctx)
    raise ValueError(
        f"unknown system {label!r}: use {BASELINE}, torch, onnxruntime[:precision], "
        "ctranslate2:float32|int8, optimum, llama.cpp:q8_0|f32"
    )
