"""elutq: LUT-aware low-bit (HLQ) quantization of LLMs and fast CPU inference."""

__version__ = "0.1.0"
