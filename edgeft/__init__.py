"""edgeft: quantization-aware QLoRA fine-tuning for small devices."""

__version__ = "0.1.0"
