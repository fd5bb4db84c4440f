"""The `gpt2-deploy` command line. Commands are thin: they parse options into a dataclass and call
one library function. Each stage's commands live in ``deploy.commands.<stage>`` and import their
heavy dependencies inside the command body, so ``gpt2-deploy --help`` imports neither torch nor
tensorrt.
"""

from __future__ import annotations

import typer

from deploy.commands import build_cmd, export_cmd, parity_cmd, serve_cmd

app = typer.Typer(
    name="gpt2-deploy",
    help="GPT-2 from PyTorch to ONNX (KV cache), TensorRT and a gRPC runner that proves parity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

export_cmd.register(app)
build_cmd.register(app)
serve_cmd.register(app)
parity_cmd.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
