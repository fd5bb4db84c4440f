"""``make demo``: export the tiny preset, serve it, stream a generation, check parity, stop cleanly.

    python -m serving.demo [--bundle bundles/tiny] [--backend onnxruntime] [--prompt TEXT]

Runs the real thing: ``gpt2-deploy serve`` in a subprocess on a free port, the Python client
against it, then SIGTERM and a check that the server exited 0.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

DEFAULT_PROMPT = "The quick brown fox"


@dataclass
class DemoOptions:
    """What the demo does.

    Args:
        bundle: Bundle directory; the tiny preset is exported there when it holds no bundle.
        backend: Backend the server runs.
        prompt: Prompt to stream a generation for.
        max_new_tokens: Tokens to generate (and to check for parity).
        startup_timeout_s: How long the server may take to report SERVING.
    """

    bundle: Path = Path("bundles/tiny")
    backend: str = "onnxruntime"
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 24
    startup_timeout_s: float = 120.0


def ensure_bundle(path: Path, out: TextIO) -> Path:
    """Export the tiny preset to ``path`` unless a bundle is already there."""
    if (path / "manifest.json").is_file():
        print(f"[demo] using the bundle in {path}", file=out)
        return path
    from export.api import ExportOptions, export_bundle

    print(f"[demo] exporting the tiny preset to {path} ...", file=out, flush=True)
    t0 = time.perf_counter()
    export_bundle(ExportOptions(model="tiny", out=path, quiet=True))
    print(f"[demo] exported in {time.perf_counter() - t0:.1f} s", file=out)
    return path


def server_command(opts: DemoOptions, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "serving.cli",
        "serve",
        str(opts.bundle),
        "--backend",
        opts.backend,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parity",
        "warn",
        "--log-level",
        "WARNING",
    ]


def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> int:
    """The whole demo; returns the server's exit code after SIGTERM (0 = clean shutdown).

    Raises:
        TimeoutError: the server did not report SERVING in time.
        RuntimeError: the server exited before it was stopped.
    """
    from serving.client import Gpt2DeployClient
    from serving.server import free_port

    ensure_bundle(opts.bundle, out)
    port = free_port()
    cmd = server_command(opts, port)
    print(f"[demo] starting: {' '.join(cmd[1:])}", file=out, flush=True)
    proc = subprocess.Popen(cmd)
    try:
        with Gpt2DeployClient(f"127.0.0.1:{port}", timeout=60) as client:
            t0 = time.perf_counter()
            client.wait_until_serving(opts.startup_timeout_s, alive=lambda: proc.poll() is None)
            info = client.model_info()
            print(
                f"[demo] SERVING after {time.perf_counter() - t0:.1f} s: {info.name} "
                f"({info.n_layer} layers, vocab {info.vocab_size}, context {info.n_positions}) on "
                f"{info.backend}/{info.device}, startup canary {info.canary}",
                file=out,
            )

            print(f"[demo] generate (greedy, {opts.max_new_tokens} tokens):", file=out)
            out.write(opts.prompt)
            stream = client.generate(opts.prompt, max_new_tokens=opts.max_new_tokens)
            for chunk in stream:
                out.write(chunk.text)
                out.flush()
            f = stream.finish
            if f is None:
                raise RuntimeError("the Generate stream ended without its Finish message")
            per_tok = sum(f.per_token_s) / max(len(f.per_token_s), 1) * 1e3
            print(
                f"\n[demo] finish: {stream.finish_reason}, {f.completion_tokens} tokens, first token "
                f"{f.time_to_first_token_s * 1e3:.1f} ms, {per_tok:.2f} ms/token",
                file=out,
            )

            report = client.check_parity(opts.prompt, max_new_tokens=opts.max_new_tokens)
            print("[demo] CheckParity (teacher-forced, per step):", file=out)
            print(report.report, file=out)
            if not report.passed:
                print("[demo] WARNING: parity failed", file=out)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"the server exited on its own with code {proc.returncode}")
    print("[demo] sending SIGTERM ...", file=out, flush=True)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError("the server did not stop within 60 s of SIGTERM") from None
    print(f"[demo] server exited with code {rc}", file=out)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", type=Path, default=DemoOptions.bundle)
    p.add_argument("--backend", default=DemoOptions.backend)
    p.add_argument("--prompt", default=DemoOptions.prompt)
    p.add_argument("--max-new-tokens", type=int, default=DemoOptions.max_new_tokens)
    a = p.parse_args(argv)
    rc = run_demo(
        DemoOptions(bundle=a.bundle, backend=a.backend, prompt=a.prompt, max_new_tokens=a.max_new_tokens)
    )
    if rc != 0:
        print(f"[demo] FAILED: the server exited with {rc} after SIGTERM (expected 0)", file=sys.stderr)
        return 1
    print("[demo] OK", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
