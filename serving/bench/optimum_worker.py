"""Optimum's ``ORTModelForCausalLM`` for serving.bench, run in the bench's own venv (OUT/peers/optimum-venv).

Optimum pins an older transformers than the project's, so it runs in a subprocess: this script
reads one JSON command per line on stdin and answers one line on stdout, prefixed with
``@@bench `` (other stdout lines are libraries' chatter). It imports nothing from the project.

    {"cmd": "load", "model_dir": ..., "export_dir": ..., "threads": 2, "eos": 50256}
    {"cmd": "generate", "prompts": [[...]], "new_tokens": 64}  -> tokens, prefill_s, step_s, total_s
    {"cmd": "logits", "sequences": [[...]], "out": "x.npy"}     -> logits (k, L, V) saved to out
    {"cmd": "quit"}
"""

from __future__ import annotations

import json
import sys
import time
import traceback

REPLY = "@@bench "


def _reply(obj: dict) -> None:
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _load(cmd: dict) -> tuple:
    from pathlib import Path

    import onnxruntime as ort
    import optimum
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(int(cmd["threads"]))
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(cmd["threads"])
    so.inter_op_num_threads = 1
    export_dir = Path(cmd["export_dir"])
    if (export_dir / "model.onnx").is_file():
        model = ORTModelForCausalLM.from_pretrained(export_dir, session_options=so, use_cache=True)
    else:
        model = ORTModelForCausalLM.from_pretrained(
            cmd["model_dir"], export=True, use_cache=True, session_options=so
        )
        model.save_pretrained(export_dir)
    from importlib.metadata import version

    versions = {
        "optimum": getattr(optimum, "__version__", None) or version("optimum"),
        "optimum-onnx": version("optimum-onnx"),
        "transformers": transformers.__version__,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }
    return model, versions


def main() -> int:
    model = None
    eos = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "load":
                model, versions = _load(cmd)
                eos = int(cmd.get("eos", 0))
                _reply({"versions": versions})
            elif model is None:
                _reply({"error": f"{cmd['cmd']!r} before 'load'"})
            elif cmd["cmd"] == "generate":
                import torch
                from transformers import LogitsProcessor, LogitsProcessorList

                class _Stamp(LogitsProcessor):
                    def __init__(self) -> None:
                        self.stamps: list[float] = []

                    def __call__(self, input_ids, scores):
                        self.stamps.append(time.perf_counter())
                        return scores

                stamp = _Stamp()

                ids = torch.tensor(cmd["prompts"], dtype=torch.long)
                t0 = time.perf_counter()
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=int(cmd["new_tokens"]),
                    min_new_tokens=0,
                    eos_token_id=None,
                    pad_token_id=eos,
                    logits_processor=LogitsProcessorList([stamp]),
                )
                total = time.perf_counter() - t0
                _reply(
                    {
                        "tokens": out[:, ids.shape[1] :].tolist(),
                        "prefill_s": stamp.stamps[0] - t0,
                        "step_s": [b - a for a, b in zip(stamp.stamps, stamp.stamps[1:])],
                        "total_s": total,
                    }
                )
            elif cmd["cmd"] == "logits":
                import numpy as np
                import torch

                ids = torch.tensor(cmd["sequences"], dtype=torch.long)
                with torch.inference_mode():
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                np.save(cmd["out"], np.asarray(logits, dtype=np.float32))
                _reply({"ok": True})
            else:
                _reply({"error": f"unknown command {cmd['cmd']!r}"})
        except Exception as e:  # noqa: BLE001 - every failure goes back to the bench
            traceback.print_exc(file=sys.stderr)
            _reply({"error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
