"""elutq: LUT-aware low-bit (HLQ) quantization of LLMs and fast CPU inference."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `elutq.load` without importing torch and the native code at `import elutq`.
    if name == "load":
        from .runtime import load

        return load
    raise AttributeError(f"module 'elutq' has no attribute {name!r}")
