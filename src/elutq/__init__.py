"""elutq: LUT-aware low-bit (HLQ) quantization of LLMs and fast CPU inference."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `elutq.load` without importing torch and the native code at `import elutq`.
    if name == "load":
        from .runtime import load

        return load
    raise AttributeError(f"module 'elutq' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """``AutoModelForCausalLM.from_pretrained(CKPT)`` of an elutq checkpoint (``elutq/hf.py``): registered now if
    transformers' quantizers are loaded, else when they are (an import hook: ``import elutq`` stays light, and so
    does elutq's own use of transformers for configs and tokenizers; ``from_pretrained`` imports the quantizers
    before it reads a checkpoint's ``quantization_config``)."""
    import contextlib
    import importlib.util
    import sys

    def register() -> None:
        # hf registers itself when it is first imported: `from elutq.hf import ...` before transformers gets
        # here with elutq.hf half-initialized, and its own last line does the registration.  ImportError: a
        # transformers without custom quantizers (elutq's own loaders still work).
        with contextlib.suppress(ImportError):
            from . import hf  # noqa: F401

    target_name = "transformers.quantizers"
    if target_name in sys.modules:
        register()
        return

    class Hook:  # a meta path finder (the protocol; importlib.abc would cost the import time of elutq)
        def find_spec(self, name, path, target=None):
            if name != target_name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            loader, run = spec.loader, spec.loader.exec_module

            def exec_module(module) -> None:
                run(module)
                register()

            loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, Hook())


_register_with_transformers()
