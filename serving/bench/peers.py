"""The peers: CTranslate2, Optimum (in its own venv) and llama.cpp, on the reference weights.

Each converts the bundle's ``reference/`` checkpoint with the peer's own tool (cached under
OUT/peers), and raises ``Skipped`` with the install line when the peer is not installed here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.bench.core import Progress, Run
from serving.bench.systems import Context, Skipped, System

BENCH_EXTRA = "pip install 'gpt2-deploy[bench]'"
# what each peer needs importable, and the line that installs it
PEER_MODULES = {"ctranslate2": "ctranslate2", "llama.cpp": "llama_cpp"}
PEER_INSTALL = {
    "ctranslate2": f"{BENCH_EXTRA}  (or: pip install ctranslate2)",
    "llama.cpp": f"{BENCH_EXTRA}  (or: pip install llama-cpp-python; builds llama.cpp from source)",
    "optimum": "nothing to install here: the bench creates OUT/peers/optimum-venv itself "
    "(pip install 'optimum-onnx[onnxruntime]' 'transformers<4.58'); needs PyPI access once",
}
OPTIMUM_REQUIREMENTS = ("optimum-onnx[onnxruntime]", "transformers<4.58")


def _require_module(peer: str) -> None:
    module = PEER_MODULES[peer]
    if importlib.util.find_spec(module) is None:
        raise Skipped(f"{module} is not installed", PEER_INSTALL[peer])


# --- CTranslate2 ----------------------------------------------------------------------------------
class CTranslate2System(System):
    """CTranslate2's ``Generator``, converted from the reference with its TransformersConverter."""

    QUANTS = ("float32", "int8")

    def __init__(self, label: str, ctx: Context):
        super().__init__(label, ctx)
        self.quant = label.partition(":")[2] or "int8"
        self.tolerance = "fp32" if self.quant == "float32" else "int8"

    def prepare(self) -> None:
        _require_module("ctranslate2")
        if self.quant not in self.QUANTS:
            raise Skipped(
                f"quantization {self.quant!r} is not benchmarked; use one of {', '.join(self.QUANTS)}"
            )
        import ctranslate2

        out = self.ctx.peers_dir / f"ct2-{self.ctx.key}-{self.quant}"
        if not (out / "model.bin").is_file():
            self.ctx.progress(f"converting the reference to CTranslate2 {self.quant} -> {out} ...")
            converter = ctranslate2.converters.TransformersConverter(str(self.ctx.hf_dir()))
            converter.convert(str(out), quantization=self.quant, force=True)
        self.model_path = out
        self.notes.append(f"ctranslate2 {ctranslate2.__version__}, compute_type {self.quant}")

    def load(self) -> None:
        import ctranslate2

        self._gen = ctranslate2.Generator(
            str(self.model_path),
            device="cpu",
            compute_type=self.quant,
            intra_threads=self.ctx.threads,
            inter_threads=1,
        )
        assert self.model_path is not None, "prepare() first"
        self._vocab = json.loads((self.model_path / "vocabulary.json").read_text())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Run:
        stamps: dict[int, float] = {}

        def step(result: Any) -> bool:
            stamps.setdefault(result.step, time.perf_counter())  # first row of each step
            return False

        t0 = time.perf_counter()
        results = self._gen.generate_batch(
            [[self._vocab[i] for i in p] for p in prompts],
            max_length=new_tokens,
            min_length=0,
            sampling_topk=1,
            beam_size=1,
            include_prompt_in_result=False,
            end_token=[],
            callback=step,
        )
        t_end = time.perf_counter()
        tokens = [r.sequences_ids[0] for r in results]
        return Run.from_stamps(tokens, t0, [stamps[k] for k in sorted(stamps)], t_end)

    def logits(self, sequences: list[list[int]]) -> np.ndarray:
        return np.asarray(self._gen.forward_batch(sequences), dtype=np.float32)

    def close(self) -> None:
        self._gen = None


# --- llama.cpp -------------------------------------------------------------------------------------
def llama_cpp_converter(peers_dir: Path, progress: Progress) -> Path:
    """``convert_hf_to_gguf.py`` of the installed llama-cpp-python's own sdist (downloaded once
    from PyPI with pip, unpacked under OUT/peers). Returns the script's path."""
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    root = peers_dir / f"llama.cpp-convert-{ver}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    dl = peers_dir / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = dl / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.is_file():
        progress(f"downloading the llama-cpp-python {ver} sdist for its GGUF converter ...")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(dl),
            f"llama-cpp-python=={ver}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not sdist.is_file():
            raise Skipped(
                f"cannot fetch the llama-cpp-python {ver} sdist (its convert_hf_to_gguf.py): "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['pip failed']}",
                f"pip download --no-deps --no-binary :all: -d {dl} llama-cpp-python=={ver}",
            )
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name[len(prefix) :] if m.name.startswith(prefix) else None
            if rel and rel.startswith(wanted) and (m.isfile() or m.isdir()):
                m.name = rel
                tar.extract(m, tmp, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        raise Skipped(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return script


class LlamaCppSystem(System):
    """llama-cpp-python on a GGUF of the reference (``convert_hf_to_gguf.py --outtype Q``)."""

    QUANTS = ("q8_0", "f32", "f16", "bf16")

    def __init__(self, label: str, ctx: Context):
        super().__init__(label, ctx)
        self.quant = label.partition(":")[2] or "q8_0"
        self.tolerance = "fp32" if self.quant == "f32" else ("fp16" if self.quant == "f16" else "int8")
        self._llm: Any = None

    def prepare(self) -> None:
        _require_module("llama.cpp")
        if self.quant not in self.QUANTS:
            raise Skipped(f"GGUF type {self.quant!r} is not benchmarked; use one of {', '.join(self.QUANTS)}")
        out = self.ctx.peers_dir / f"gguf-{self.ctx.key}-{self.quant}.gguf"
        if not out.is_file():
            script = llama_cpp_converter(self.ctx.peers_dir, self.ctx.progress)
            self.ctx.progress(f"converting the reference to GGUF {self.quant} -> {out} ...")
            tmp = out.with_name(out.name + ".tmp")
            proc = subprocess.run(
                [
                    sys.executable,
                    str(script),
                    str(self.ctx.hf_dir()),
                    "--outtype",
                    self.quant,
                    "--outfile",
                    str(tmp),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0 or not tmp.is_file():
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
                raise Skipped(f"convert_hf_to_gguf.py failed (exit {proc.returncode}):\n{tail}")
            tmp.rename(out)
        self.model_path = out
        from importlib.metadata import version

        self.notes.append(f"llama-cpp-python {version('llama-cpp-python')}, GGUF {self.quant}")

    def _make(self, logits_all: bool) -> Any:
        import llama_cpp

        n_ctx = self.ctx.opts.prompt_len + self.ctx.opts.new_tokens + 8
        return llama_cpp.Llama(
            model_path=str(self.model_path),
            n_ctx=n_ctx,
            n_batch=max(n_ctx, 512),
            n_threads=self.ctx.threads,
            n_threads_batch=self.ctx.threads,
            logits_all=logits_all,
            verbose=False,
        )

    def load(self) -> None:
        self._llm = self._make(logits_all=False)
        self.notes.append("B=1 only: llama-cpp-python's Llama API decodes one sequence")

    def supports(self, batch: int) -> str | None:
        return None if batch == 1 else "llama-cpp-python's Llama API decodes one sequence (B=1 only)"

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Run:
        if len(prompts) != 1:
            raise ValueError("llama.cpp: B=1 only")
        import llama_cpp

        llm = self._llm
        llm.reset()
        n_vocab = llm.n_vocab()

        def last() -> np.ndarray:  # the last token's logits, in place (Llama.scores needs logits_all)
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))

        tokens: list[int] = []
        stamps = []
        t0 = time.perf_counter()
        llm.eval(prompts[0])
        stamps.append(time.perf_counter())
        for i in range(new_tokens):
            tok = int(np.argmax(last()))
            tokens.append(tok)
            if i == new_tokens - 1:
                break
            llm.eval([tok])
            stamps.append(time.perf_counter())
        return Run.from_stamps([tokens], t0, stamps, time.perf_counter())

    def logits(self, sequences: list[list[int]]) -> np.ndarray:
        llm = self._make(logits_all=True)
        try:
            out = []
            for seq in sequences:
                llm.reset()
                llm.eval(seq)
                out.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
            return np.stack(out)
        finally:
            llm.close()

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


# --- Optimum (own venv, subprocess) ------------------------------------------------------------------
WORKER = Path(__file__).with_name("optimum_worker.py")
REPLY = "@@bench "


def optimum_env(peers_dir: Path, progress: Progress) -> Path:
    """OUT/peers/optimum-venv: a venv with optimum-onnx and the transformers it pins (<4.58),
    which cannot be installed beside the project's transformers 5. The project's CPU torch is
    linked into it rather than installed a second time (a plain ``pip install torch`` would
    resolve a multi-GB CUDA build). Returns its python."""
    venv = peers_dir / "optimum-venv"
    py = venv / "bin" / "python"
    stamp = venv / ".bench-ready"
    if stamp.is_file():
        return py
    import torch

    progress(f"creating {venv} (optimum-onnx + transformers<4.58; minutes, once) ...")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    from importlib.metadata import distribution

    dist = distribution("torch")
    torch_site = Path(torch.__file__).resolve().parents[1]
    tops = {Path(str(f)).parts[0] for f in dist.files or []}
    for top in sorted(tops):
        src = torch_site / top
        if src.exists() and not top.endswith(".data") and top != "..":
            (site / top).symlink_to(src)
    log = peers_dir / "optimum-venv-install.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [str(py), "-m", "pip", "install", *OPTIMUM_REQUIREMENTS], stdout=f, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().strip().splitlines()[-5:])
        raise Skipped(
            f"installing optimum-onnx into {venv} failed (log: {log}):\n{tail}",
            f"{py} -m pip install {' '.join(repr(r) for r in OPTIMUM_REQUIREMENTS)}",
        )
    stamp.write_text(json.dumps({"requirements": OPTIMUM_REQUIREMENTS}))
    return py


class OptimumSystem(System):
    """Optimum's ``ORTModelForCausalLM`` (its own ONNX export of the reference) and ``generate``,
    run by ``optimum_worker.py`` in OUT/peers/optimum-venv, driven over a pipe round by round."""

    def __init__(self, label: str, ctx: Context):
        super().__init__(label, ctx)
        self._proc: subprocess.Popen | None = None
        self.versions: dict[str, Any] = {}

    def prepare(self) -> None:
        if self.ctx.opts.quick:
            raise Skipped(
                "not run by --quick (creating its venv and exporting take minutes); `make bench` runs it"
            )
        self._py = optimum_env(self.ctx.peers_dir, self.ctx.progress)
        self.model_path = self.ctx.peers_dir / f"optimum-{self.ctx.key}"
        self.notes.append(f"subprocess in {self._py.parents[1]} (transformers<4.58, optimum-onnx)")

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()
        while True:
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the optimum worker exited (log: {self._log})")
            if line.startswith(REPLY):
                reply = json.loads(line[len(REPLY) :])
                if "error" in reply:
                    raise RuntimeError(f"optimum worker: {reply['error']}")
                return reply

    def load(self) -> None:
        assert self.model_path is not None, "prepare() first"
        self._log = self.ctx.peers_dir / "optimum-worker.log"
        if not (self.model_path / "model.onnx").is_file():
            self.ctx.progress(
                f"Optimum: exporting the reference with ORTModelForCausalLM -> {self.model_path} ..."
            )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self._log_file = open(self._log, "a")  # closed in close()
        self._proc = subprocess.Popen(
            [str(self._py), str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env=env,
        )
        try:
            self.versions = self._call(
                {
                    "cmd": "load",
                    "model_dir": str(self.ctx.hf_dir()),
                    "export_dir": str(self.model_path),
                    "threads": self.ctx.threads,
                    "eos": self.ctx.bundle.dims.eos_token_id or 0,
                }
            )["versions"]
        except RuntimeError as e:
            self.close()
            raise Skipped(f"{e}; see {self._log}") from None
        self.notes.append(", ".join(f"{k} {v}" for k, v in self.versions.items()))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Run:
        r = self._call({"cmd": "generate", "prompts": prompts, "new_tokens": new_tokens})
        return Run(r["tokens"], r["prefill_s"], r["step_s"], r["total_s"])

    def logits(self, sequences: list[list[int]]) -> np.ndarray:
        path = self.ctx.peers_dir / "optimum-logits.npy"
        self._call({"cmd": "logits", "sequences": sequences, "out": str(path)})
        try:
            return np.load(path)
        finally:
            path.unlink(missing_ok=True)

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["versions"] = self.versions
        return d

    def close(self) -> None:
        if self._proc is not None:
            try:
                if self._proc.poll() is None and self._proc.stdin:
                    self._proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    self._proc.stdin.flush()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
            self._proc = None
            self._log_file.close()


PEERS: dict[str, type[System]] = {
    "ctranslate2": CTranslate2System,
    "llama.cpp": LlamaCppSystem,
    "optimum": OptimumSystem,
}
