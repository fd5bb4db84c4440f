"""Export stage: PyTorch GPT-2 -> ONNX decoder with a KV cache, validated, packed as a bundle."""
