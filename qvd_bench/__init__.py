"""qvd-bench: post-training quantization analysis and benchmarks for video diffusion models."""

__version__ = "0.1.0"
