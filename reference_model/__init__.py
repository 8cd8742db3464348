"""The reference VLM: assembled from packaged trained weights (SmolLM2-135M-Instruct GGUF + DINOv2-small ONNX)
plus a small trained projector and LoRA adapters kept in the repository. See docs/fidelity.md."""
