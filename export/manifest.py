"""The bundle: a directory the export stage writes and the deploy and serving stages read.

    BUNDLE/
      manifest.json      schema version, model name and dims, I/O contract, files + sha256,
                         export settings, validation results, TensorRT engines (deploy stage)
      model.onnx         the decoder graph (+ model.onnx.data when written with external data)
      model_serving.onnx the same graph with its lm_head on the last position(s) only (``ServingGraph``)
      config.json        the transformers GPT2Config
      tokenizer.json, vocab.json, merges.txt, ...   the tokenizer
      golden.json        the reference's answers on the canary prompts (export.golden)

``Bundle.open`` checks the schema and every recorded hash and reports every problem at once, so a
corrupted or foreign directory is named precisely instead of failing later inside a runtime.
Only the standard library is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from export.contract import IOContract

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

SCHEMA = "gpt2-deploy.bundle"
SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
# Serialises manifest updates (``manifest_lock``); not recorded in the manifest.
LOCK_FILE = MANIFEST_FILE + ".lock"
LOCK_TIMEOUT_S = 120.0
# The PyTorch checkpoint the graph was exported from (torch reference backend, parity checks).
REFERENCE_DIR = "reference"
# The reference's answers on the canary prompts (export.golden), role "golden".
GOLDEN_FILE = "golden.json"


class BundleError(Exception):
    """A bundle directory is missing, foreign, corrupted or of an unsupported schema.

    ``problems`` holds every problem found; the message lists them all.
    """

    def __init__(self, path: str | os.PathLike, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path} is not a usable gpt2-deploy bundle:\n{lines}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelDims:
    """The model's shape, read from its config (the context length is never assumed)."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    eos_token_id: int | None = None
    bos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        return cls(
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            vocab_size=config.vocab_size,
            n_positions=config.n_positions,
            eos_token_id=getattr(config, "eos_token_id", None),
            bos_token_id=getattr(config, "bos_token_id", None),
        )


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int
    role: str  # "onnx", "onnx-data", "config", "tokenizer", "golden", "engine", "timing-cache", "other"


@dataclass(frozen=True)
class ServingGraph:
    """The serving graph: ``model_file`` with its lm_head on the kept positions only.

    Args:
        file: Bundle-relative path (``model_serving.onnx``); it refers to the same external data
            file as ``model_file`` when that has one.
        contract: Its I/O contract (``logits_positions="kept"``: the ``logits_to_keep`` input).
        derived_from: The graph it was derived from (``Manifest.model_file``).
        validation: Its validation against ``derived_from`` (``export.validate.validate_serving_graph``).
        details: What the rewrite did (lm_head node and op, nodes added, shared external data).
    """

    file: str
    contract: IOContract
    derived_from: str
    validation: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "contract": self.contract.to_json(),
            "derived_from": self.derived_from,
            "validation": self.validation,
            "details": self.details,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ServingGraph:
        return cls(
            file=d["file"],
            contract=IOContract.from_json(d["contract"]),
            derived_from=d["derived_from"],
            validation=d.get("validation", {}),
            details=d.get("details", {}),
        )


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` as a frozen dataclass.

    Args:
        name: The model's name: hub name, preset name or local directory name, unless overridden.
        source: What ``--model`` said.
        dims: Model dimensions read from its config.
        contract: The ONNX I/O contract of ``model_file``.
        model_file: Bundle-relative path of the ONNX graph.
        precision: fp32, fp16, int8 or ort-fused (the variant ``model_file`` holds).
        files: Bundle-relative path -> FileEntry for every file the bundle owns.
        export: Export settings (opset, exporter, versions, seed, ...).
        validation: The export-time validation report (``ValidationReport.to_json()``).
        engines: TensorRT engines built from this bundle (deploy stage), newest last.
        serving: The serving graph (last-position logits for generation), or None in bundles
            exported without one.
    """

    name: str
    source: str
    dims: ModelDims
    contract: IOContract
    model_file: str
    precision: str
    files: dict[str, FileEntry]
    export: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    engines: list[dict[str, Any]] = field(default_factory=list)
    serving: ServingGraph | None = None
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "schema_version": self.schema_version,
            "name": self.name,
            "source": self.source,
            "dims": asdict(self.dims),
            "contract": self.contract.to_json(),
            "model_file": self.model_file,
            "precision": self.precision,
            "files": {k: asdict(v) for k, v in sorted(self.files.items())},
            "export": self.export,
            "validation": self.validation,
            "engines": self.engines,
            **({"serving": self.serving.to_json()} if self.serving is not None else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            schema=d["schema"],
            schema_version=int(d["schema_version"]),
            name=d["name"],
            source=d["source"],
            dims=ModelDims(**d["dims"]),
            contract=IOContract.from_json(d["contract"]),
            model_file=d["model_file"],
            precision=d["precision"],
            files={k: FileEntry(**v) for k, v in d["files"].items()},
            export=d.get("export", {}),
            validation=d.get("validation", {}),
            engines=list(d.get("engines", [])),
            serving=ServingGraph.from_json(d["serving"]) if d.get("serving") else None,
        )

    def with_files(self, root: str | os.PathLike, roles: dict[str, str]) -> Manifest:
        """A copy whose ``files`` also records (hashes) the given bundle-relative paths."""
        files = dict(self.files)
        for rel, role in roles.items():
            p = Path(root) / rel
            files[rel] = FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size, role=role)
        return replace(self, files=files)

    def write(self, root: str | os.PathLike) -> Path:
        """Write ``manifest.json`` atomically: a unique temporary file in the same directory,
        flushed to disk, then renamed over it (a reader never sees half a manifest, and two
        writers never share a temporary file). To change the manifest of a bundle others may
        update too, use ``Bundle.update_manifest``, which also serialises the writers."""
        path = Path(root) / MANIFEST_FILE
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{MANIFEST_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.to_json(), indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            # mkstemp makes it 0600: give it the bundle directory's read/write bits (0755 -> 0644)
            os.chmod(tmp, stat.S_IMODE(os.stat(path.parent).st_mode) & 0o666)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False when another writer holds it."""
    try:
        if sys.platform == "win32":
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # PermissionError: msvcrt's "locked by another"
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def manifest_lock(root: str | os.PathLike, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the bundle's manifest lock (an exclusive lock on ``BUNDLE/manifest.json.lock``).

    Every read-modify-write of a shared bundle's manifest happens inside it, so concurrent writers
    (two ``gpt2-deploy build`` runs, threads or processes) take turns instead of losing entries.

    Raises:
        BundleError: the lock was not obtained within ``timeout`` seconds.
    """
    path = Path(root) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                raise BundleError(
                    root, [f"{LOCK_FILE} is held by another writer for more than {timeout:g} s; retry later"]
                )
            time.sleep(0.01)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def _read_manifest(root: Path) -> Manifest:
    """Parse ``root/manifest.json``: schema and version checked, every field read.

    Raises:
        BundleError: it is missing, not JSON, foreign, of another schema version or malformed.
    """
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        present = sorted(p.name for p in root.iterdir())[:10]
        raise BundleError(
            root,
            [
                f"no {MANIFEST_FILE} (found: {present or 'nothing'}); "
                "create a bundle with `gpt2-deploy export`"
            ],
        )
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(root, [f"{MANIFEST_FILE} is not valid JSON: {e}"]) from None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        seen = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
        raise BundleError(
            root, [f"{MANIFEST_FILE} has schema {seen!r}, expected {SCHEMA!r} (a foreign directory?)"]
        )
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            root,
            [
                f"schema_version {raw.get('schema_version')!r} is not "
                f"supported; this gpt2-deploy reads version {SCHEMA_VERSION}"
            ],
        )
    try:
        manifest = Manifest.from_json(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(root, [f"{MANIFEST_FILE} is malformed: {type(e).__name__}: {e}"]) from None
    return manifest


class Bundle:
    """An opened, checked bundle directory. Use ``Bundle.open(path)``."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify_hashes: bool = True) -> Bundle:
        """Open ``path``, checking schema, file presence and (by default) every sha256.

        Raises:
            BundleError: listing every problem found.
        """
        root = Path(path)
        if not root.is_dir():
            raise BundleError(
                root,
                [
                    "the directory does not exist"
                    if not root.exists()
                    else "it is a file, not a bundle directory"
                ],
            )
        manifest = _read_manifest(root)

        problems: list[str] = []
        if manifest.model_file not in manifest.files:
            problems.append(f"model_file {manifest.model_file!r} is not listed in files")
        if manifest.serving is not None and manifest.serving.file not in manifest.files:
            problems.append(f"serving graph {manifest.serving.file!r} is not listed in files")
        for rel, entry in manifest.files.items():
            p = root / rel
            if not p.is_file():
                problems.append(f"{rel}: missing ({entry.role}, {entry.bytes} bytes expected)")
                continue
            size = p.stat().st_size
            if size != entry.bytes:
                problems.append(f"{rel}: size is {size} bytes, manifest says {entry.bytes}")
            elif verify_hashes and (digest := sha256_file(p)) != entry.sha256:
                problems.append(
                    f"{rel}: sha256 is {digest[:16]}..., manifest says "
                    f"{entry.sha256[:16]}... (modified after export?)"
                )
        if problems:
            raise BundleError(root, problems)
        return cls(root, manifest)

    # --- convenience -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def contract(self) -> IOContract:
        return self.manifest.contract

    @property
    def dims(self) -> ModelDims:
        return self.manifest.dims

    @property
    def onnx_path(self) -> Path:
        return self.root / self.manifest.model_file

    @property
    def serving_onnx_path(self) -> Path | None:
        """The serving graph (``ServingGraph``); None in a bundle exported without one."""
        s = self.manifest.serving
        return None if s is None else self.root / s.file

    @property
    def tokenizer_dir(self) -> Path:
        return self.root

    @property
    def golden_path(self) -> Path | None:
        """The golden parity record (``export.golden``); None when exported without one."""
        rel = next((r for r, f in self.manifest.files.items() if f.role == "golden"), None)
        return None if rel is None else self.root / rel

    @property
    def has_golden(self) -> bool:
        return self.golden_path is not None

    def update_manifest(self, change: Callable[[Manifest], Manifest] | Manifest) -> Manifest:
        """Change ``manifest.json`` under the bundle's lock and return the manifest written.

        ``change`` gets the manifest as it is on disk now (not as it was at ``open``, which another
        writer may have changed since) and returns the new one; a ``Manifest`` instead replaces it
        whole. The read, the change and the atomic write happen inside ``manifest_lock``.

        Raises:
            BundleError: the manifest on disk is unreadable, or the lock timed out.
        """
        with manifest_lock(self.root):
            if isinstance(change, Manifest):
                new = change
            else:
                new = change(_read_manifest(self.root))
            new.write(self.root)
        self.manifest = new
        return new

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, name={self.name!r}, precision={self.manifest.precision!r})"
