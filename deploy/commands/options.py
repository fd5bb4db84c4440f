"""Typer options shared by several commands (the backend a bundle runs on), defined once."""

from __future__ import annotations

import typer

BUNDLE = typer.Argument(..., help="Bundle directory (from `gpt2-deploy export`).")
BACKEND = typer.Option("onnxruntime", "--backend", "-b", help="onnxruntime, torch or tensorrt.")
DEVICE = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda for tensorrt, else cpu).")
ENGINE = typer.Option(
    None, "--engine", help="TensorRT engine in the bundle (default: the newest one that can run here)."
)
TRT_RUNTIME = typer.Option(
    "auto",
    "--trt-runtime",
    help="TensorRT runtime: auto, tensorrt or tensorrt_lean (version-compatible engines only).",
)
