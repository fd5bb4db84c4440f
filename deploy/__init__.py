"""Deploy stage: ONNX -> TensorRT engine (profiles, precision, timing cache), edge presets, CLI."""
