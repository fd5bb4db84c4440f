"""Where a GPT-2 comes from: a built-in preset, a local Hugging Face directory, or a hub name.

Presets need no download: a ``GPT2Config`` of a real GPT-2 shape (or the ``tiny`` test shape) with
weights drawn from a fixed seed. They carry the real 50257-token vocabulary, so the embedded GPT-2
BPE tokenizer works with them.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from export.deps import require

TOKENIZER_DATA = Path(__file__).with_name("tokenizer_data")
GPT2_VOCAB = 50257

# name -> (n_layer, n_embd, n_head, n_positions)
PRESETS: dict[str, tuple[int, int, int, int]] = {
    # Small enough for unit tests; a shorter context (256) so context-limit paths are cheap to hit
    # and nothing downstream can get away with assuming 1024.
    "tiny": (2, 64, 4, 256),
    "gpt2-124m": (12, 768, 12, 1024),
    "gpt2-355m": (24, 1024, 16, 1024),
    "gpt2-774m": (36, 1280, 20, 1024),
    "gpt2-1.5b": (48, 1600, 25, 1024),
}
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# attention kernel used for both export and the torch reference, so they run the same math
ATTN_IMPLEMENTATION = "sdpa"


class SourceError(ValueError):
    """``--model`` names nothing we can load; the message lists what is accepted."""


def _accepted() -> str:
    return (
        f"presets (no download): {', '.join(PRESETS)}; hub names: {', '.join(HUB_NAMES)}; "
        "or a local Hugging Face directory with config.json and weights"
    )


@dataclass
class LoadedModel:
    """A GPT2LMHeadModel in eval mode with its tokenizer and the name the bundle will carry."""

    model: Any  # transformers.GPT2LMHeadModel
    tokenizer: Any  # transformers.GPT2TokenizerFast
    name: str
    kind: str  # "preset" | "local" | "hub"
    source: str

    @property
    def config(self) -> Any:
        return self.model.config


def preset_config(name: str) -> Any:
    transformers = require("transformers")
    n_layer, n_embd, n_head, n_positions = PRESETS[name]
    return transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        vocab_size=GPT2_VOCAB,
        bos_token_id=GPT2_VOCAB - 1,
        eos_token_id=GPT2_VOCAB - 1,
    )


def embedded_tokenizer() -> Any:
    """The GPT-2 BPE tokenizer shipped in the package (OpenAI's vocab.json + merges.txt)."""
    transformers = require("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DATA)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so an offline machine fails fast instead of hanging."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _perturb_preset(model: Any, torch: Any) -> None:
    """Give LayerNorm gains/shifts and linear biases random values (drawn after the weights).

    transformers initialises them to exactly 1 and 0. Left that way, the exporter folds the zero
    biases away (bias-free Gemm) and de-duplicates the identical LayerNorm parameters, so a preset
    graph would be shaped unlike any trained checkpoint's and the fp16/int8 variants would be
    validated on a structure real models never have.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(torch.randn_like(p), alpha=0.1)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.02)


def load_source(model: str, seed: int = 0) -> LoadedModel:
    """Load ``model`` (preset, local directory or hub name) in fp32 eval mode.

    Raises:
        SourceError: for an unknown name, a directory that is not a GPT-2 checkpoint, or a hub
            name while the hub cannot be reached (and the model is not in the local cache).
    """
    torch = require("torch")
    transformers = require("transformers")
    path = Path(model).expanduser()

    if model in PRESETS:
        # Seeded init: the same preset and seed give the same weights on every machine.
        torch.manual_seed(seed)
        config = preset_config(model)
        config._attn_implementation = ATTN_IMPLEMENTATION
        m = transformers.GPT2LMHeadModel(config)
        _perturb_preset(m, torch)
        return LoadedModel(m.eval(), embedded_tokenizer(), model, "preset", model)

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(
                f"{path} has no config.json, so it is not a Hugging Face checkpoint "
                f"directory. --model accepts {_accepted()}"
            )
        with _load_errors(f"{path}"):
            config = transformers.AutoConfig.from_pretrained(path)
            _check_gpt2(config, str(path))
            m = transformers.GPT2LMHeadModel.from_pretrained(
                path, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
            )
            has_tok = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
            if has_tok:
                tok = transformers.GPT2TokenizerFast.from_pretrained(path)
            elif config.vocab_size == GPT2_VOCAB:
                tok = embedded_tokenizer()
            else:
                raise SourceError(
                    f"{path} has no tokenizer files and a vocabulary of "
                    f"{config.vocab_size} (not GPT-2's {GPT2_VOCAB}); add tokenizer.json"
                )
        return LoadedModel(m.eval(), tok, path.resolve().name, "local", str(path))

    if _looks_like_path(model):
        raise SourceError(f"directory {path} does not exist. --model accepts {_accepted()}")

    if model in HUB_NAMES or "/" in model:
        kw = dict(dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION)
        with _load_errors(f"hub model {model!r}"):
            try:  # the local HF cache first: works offline when the model was downloaded before
                config = transformers.AutoConfig.from_pretrained(model, local_files_only=True)
                _check_gpt2(config, model)
                m = transformers.GPT2LMHeadModel.from_pretrained(model, local_files_only=True, **kw)
                tok = transformers.GPT2TokenizerFast.from_pretrained(model, local_files_only=True)
            except OSError:
                if not hub_reachable():
                    raise SourceError(
                        f"{model!r} is a hub name, but the model hub cannot be reached from here and "
                        f"the model is not in the local cache. Use a local directory holding the "
                        f"checkpoint, or a preset: {', '.join(PRESETS)}"
                    ) from None
                config = transformers.AutoConfig.from_pretrained(model)
                _check_gpt2(config, model)
                m = transformers.GPT2LMHeadModel.from_pretrained(model, **kw)
                tok = transformers.GPT2TokenizerFast.from_pretrained(model)
        return LoadedModel(m.eval(), tok, model.replace("/", "--"), "hub", model)

    raise SourceError(
        f"--model {model!r} is not a preset, a hub name or an existing directory. "
        f"--model accepts {_accepted()}"
    )


def _looks_like_path(model: str) -> bool:
    """A filesystem path rather than a hub id: starts with '.', '/' or '~', or holds a path
    separator a hub id cannot (a hub id is ``owner/name``: one '/', no '\\' on Windows)."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)


def _check_gpt2(config: Any, where: str) -> None:
    if config.model_type != "gpt2":
        raise SourceError(
            f"{where} holds a {config.model_type!r} model; only 'gpt2' is supported. "
            f"--model accepts {_accepted()}"
        )


@contextmanager
def _load_errors(what: str) -> Iterator[None]:
    """Turn transformers' loading failures (missing weights, a corrupt config.json, a hub 404 or
    a download failure) into a SourceError naming ``what`` and the accepted sources."""
    try:
        yield
    except SourceError:
        raise
    except (OSError, ValueError, json.JSONDecodeError) as e:  # JSONDecodeError is a ValueError
        detail = " ".join(str(e).split())
        if len(detail) > 400:
            detail = detail[:400] + " ..."
        raise SourceError(
            f"cannot load {what}: {type(e).__name__}: {detail}. --model accepts {_accepted()}"
        ) from None
