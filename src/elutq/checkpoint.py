"""Quantized checkpoints: a Hugging Face-style directory with packed HLQ linears.

Layout (no pickle anywhere)::

    config.json          the model's config + "quantization_config" (quant_method "hlq")
    model.safetensors    per quantized linear NAME: NAME.qweight uint8 [bits, out, ceil(in/8)],
                         NAME.scales fp16 [out, ng, bits], NAME.zeros fp16 [out, ng] (+ NAME.bias);
                         quantized embeddings (optional) the same, as model.embed_tokens with
                         out = vocabulary, in = hidden -- or none of their own when the source
                         ties them to lm_head and both are quantized alike: modules[embed_tokens]
                         then says "shared_with": "lm_head" and the embedding looks its rows up
                         in lm_head's tensors (one copy, as in the source); every other tensor in
                         fp16 (bf16 if the source model was bf16); a rotated checkpoint
                         (quantization_config.rotation, version 2: rotation.py) holds the rotated
                         network, norms of ones, and for a tied head model.norm.rotation fp16
                         [hidden, hidden], applied after the final norm
    tokenizer files      as the tokenizer saves them

This module is the single owner of that format: it writes checkpoints (``save_quantized``) and reads
and validates them (``read_quantization_config``, ``load_quantized``, the integrity checks); the
torch modules that hold the tensors (``HLQLinear``, ``HLQEmbedding``) live in ``modules.py``.  The
native kernels and runtime consume the same tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .hlq import dequantize, num_groups, unpack_bitplanes
from .models import check_architecture, meta_model, rotary_embedding
from .modules import HLQEmbedding, HLQLinear, rotate_modules, set_module
from .rotation import NORM_MATRIX, NORM_ROTATION, rotation_from_spec
from .utils import ElutqError, atomic_dir

QUANT_METHOD = "hlq"
CHECKPOINT_VERSION = 2  # the newest this elutq reads; 2: rotated weights (quantization_config.rotation)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"  # the source model's sampling defaults, carried along
EMBED = "model.embed_tokens"  # the embedding's name, as a module and as a tensor prefix
SHARED = "shared_with"  # modules[EMBED][SHARED] == "lm_head": the embedding is the head's quantized tensor


def module_group_size(spec: dict[str, Any], in_features: int) -> int:
    """A ``quantization_config`` module entry's group size; -1 (per channel) is one group of ``in_features``."""
    g = int(spec["group_size"])
    return in_features if g == -1 else g


def embedding_prefix(qc: dict[str, Any]) -> str:
    """The tensor prefix of a checkpoint's quantized embedding: its own, or ``lm_head`` where the two share one
    quantized tensor (a tied source model, head and embeddings quantized alike)."""
    spec = qc.get("modules", {}).get(EMBED) or {}
    return spec.get(SHARED, EMBED)


def stored_embedding(get, qc: dict[str, Any], hidden: int) -> torch.Tensor:
    """The embedding a checkpoint embeds with, float32 ``[vocab, hidden]``: its 16-bit tensor, or its
    quantized one dequantized.  ``get(name)``: the checkpoint's tensor ``name``."""
    spec = qc.get("modules", {}).get(EMBED)
    if spec is None:
        return get(f"{EMBED}.weight").to(torch.float32)
    p = embedding_prefix(qc)
    codes = unpack_bitplanes(get(f"{p}.qweight"), hidden)
    return dequantize(codes, get(f"{p}.scales"), get(f"{p}.zeros"), module_group_size(spec, hidden))


def _is_plain_float(name: str, t: torch.Tensor) -> bool:
    """Float tensors stored in the model's 16-bit type (HLQ scales/zeros are always fp16)."""
    return t.is_floating_point() and not name.endswith((".scales", ".zeros"))


def storage_dtype(t: torch.Tensor, prefer: torch.dtype = torch.float16) -> torch.dtype:
    """The 16-bit type a plain float tensor is stored in: ``prefer``, or bf16 where fp16 would overflow."""
    if prefer == torch.float16 and t.abs().max() > torch.finfo(torch.float16).max:
        return torch.bfloat16
    return prefer


def shares_head(model: nn.Module) -> bool:
    """Whether ``model``'s quantized embedding is its quantized lm_head's tensor (``HLQEmbedding.tied_to``)."""
    emb, head = model.get_submodule(EMBED), getattr(model, "lm_head", None)
    return isinstance(emb, HLQEmbedding) and isinstance(head, HLQLinear) and (emb.tied or emb.qweight is head.qweight)


def model_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``quantization_config["modules"]`` of an in-memory model: its HLQ modules' bits and group sizes."""
    modules = {
        name: {"bits": m.bits, "group_size": m.group_size}
        for name, m in model.named_modules()
        if isinstance(m, HLQLinear)
    }
    if shares_head(model):
        modules[EMBED][SHARED] = "lm_head"
    return modules


def quantization_config(modules: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` a checkpoint's config.json carries: the format's fields, ``info`` (how it
    was made) and ``modules`` (what is quantized, how)."""
    return {
        "quant_method": QUANT_METHOD,
        "version": 2 if info.get("rotation") else 1,  # 2: rotated (an elutq that cannot rotate refuses it)
        "packing": "bitplanes-lsb",
        "elutq_version": __version__,
        **info,
        "modules": modules,
    }


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """The tensors a checkpoint of ``model`` (with ``HLQLinear`` modules) stores, and its 16-bit float type:
    a tied lm_head and a shared embedding's tensors left out (stored once), plain floats in 16 bits
    (bf16 if they all are, or where fp16 would overflow), HLQ codes and fp16 scales as they are."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and not isinstance(
        getattr(model, "lm_head", None), HLQLinear
    )
    # The tied lm_head is the embedding itself; tie_weights() restores it on load.
    shared = shares_head(model)  # then the embedding's tensors are lm_head's: stored once
    state = {
        k: t
        for k, t in model.state_dict().items()
        if not (tied and k == "lm_head.weight") and not (shared and k.startswith(EMBED + "."))
    }
    floats = [t for k, t in state.items() if _is_plain_float(k, t)]
    prefer = torch.bfloat16 if floats and all(t.dtype == torch.bfloat16 for t in floats) else torch.float16
    tensors = {
        k: (t.to(storage_dtype(t, prefer)) if _is_plain_float(k, t) else t).detach().contiguous().cpu()
        for k, t in state.items()
    }
    return tensors, prefer


def save_quantized(model: nn.Module, tokenizer, out: Path, info: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``model`` (with ``HLQLinear`` modules) as a checkpoint directory, atomically."""
    out = check_output(out, overwrite)
    tensors, prefer = checkpoint_tensors(model)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(prefer).removeprefix("torch.")
    config["quantization_config"] = quantization_config(model_modules(model), info)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.to_json_file(tmp / GENERATION_FILE)
        finish_checkpoint(tmp, config, tokenizer)
    return out


def finish_checkpoint(directory: Path, config: dict[str, Any], tokenizer=None, generation_from: Path | None = None,
                      index: bool = False, close=None) -> None:
    """Complete a checkpoint whose weights files (``model*.safetensors``) are in ``directory``: the index
    (``index``: for sharded writers), the tokenizer, the source's sampling defaults, then ``close()`` (a
    resumable run's: it removes its progress, so whatever can fail before it must come first), each shard's
    size and sha256 into ``config["quantization_config"]``, and config.json — last, as its presence marks the
    directory complete.  Every writer (``save_quantized``, the streaming quantizer, finetuning) ends here."""
    directory = Path(directory)
    if index:
        weight_map = {}
        for f in sorted(directory.glob("model*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                weight_map.update({k: f.name for k in h.keys()})  # noqa: SIM118
        tmp = directory / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, directory / INDEX_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if generation_from is not None:
        copy_generation_config(generation_from, directory)
    if close is not None:
        close()
    config["quantization_config"][SHARDS_KEY] = shard_records(directory)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def copy_generation_config(src: Path, dst: Path) -> None:
    """Carry the source model's sampling defaults (``generation_config.json``) into a checkpoint."""
    if (Path(src) / GENERATION_FILE).is_file():
        shutil.copyfile(Path(src) / GENERATION_FILE, Path(dst) / GENERATION_FILE)


def read_quantization_config(path: Path) -> dict[str, Any]:
    """The checkpoint's ``quantization_config``, with clear errors for anything that is not ours."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ElutqError(
            f"{path} is not a checkpoint directory (no config.json); pass the directory `elutq quantize` wrote"
        )
    cfg = read_json(cfg_file, "config")
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or not qc:
        raise ElutqError(
            f"{path} is not a quantized checkpoint (config.json has no quantization_config); "
            "quantize it first with `elutq quantize`"
        )
    if qc.get("quant_method") != QUANT_METHOD:
        raise ElutqError(
            f"{path} was quantized with quant_method {qc.get('quant_method')!r}, not {QUANT_METHOD!r}; "
            "elutq reads only its own checkpoints: quantize the original model with `elutq quantize`"
        )
    if not isinstance(qc.get("version", 0), int) or not isinstance(qc.get("modules", {}), dict):
        raise ElutqError(f"{cfg_file}: quantization_config is damaged (version/modules); re-run `elutq quantize`")
    if qc.get("version", 0) > CHECKPOINT_VERSION:
        raise ElutqError(
            f"{path} has checkpoint version {qc.get('version')}, newer than this elutq "
            f"({CHECKPOINT_VERSION}); upgrade elutq"
        )
    return qc


# ----------------------------------------------------------------------------- outputs: what may be replaced

PARTIAL_MARKER = ".elutq-partial"  # in OUT.partial: marks an unfinished run that elutq may remove


def is_elutq_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is recognisably an elutq checkpoint: config.json with quant_method "hlq"."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def is_elutq_partial(path: str | Path) -> bool:
    """Whether ``path`` is an unfinished run's work directory (its marker, or its progress file)."""
    path = Path(path)
    return path.is_dir() and ((path / PARTIAL_MARKER).is_file() or (path / "progress.json").is_file())


def make_partial(path: Path) -> None:
    """Create (or keep) the work directory ``path`` of a run, marked as elutq's."""
    path.mkdir(parents=True, exist_ok=True)
    (path / PARTIAL_MARKER).touch()


def remove_partial(path: Path) -> None:
    """Remove an unfinished run's work directory; refuses anything that is not one."""
    if not path.exists():
        return
    if not is_elutq_partial(path) and (not path.is_dir() or any(path.iterdir())):
        raise ElutqError(
            f"{path} exists but is not an unfinished elutq run; elutq will not delete it: move it away "
            "or choose another output path"
        )
    shutil.rmtree(path)


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work starts, an output that elutq could not write or must not replace:
    the working directory or one above it, a file, a non-empty directory that is not an elutq
    checkpoint (even with ``overwrite``), an existing checkpoint without ``overwrite``, or a parent
    that is not a writable directory.  Returns ``out`` as a Path."""
    out = Path(out)
    full, cwd = Path(os.path.abspath(out)), Path.cwd().resolve()
    if full.resolve() == cwd or full.resolve() in cwd.parents or full == Path(full.anchor):
        raise ElutqError(
            f"the output {out} is the working directory or a directory above it; write the checkpoint to a new "
            "directory, e.g. -o out/model-w2"
        )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ElutqError(f"the output {out} exists and is not a directory; choose a new directory for -o")
        if any(out.iterdir()):
            if not is_elutq_checkpoint(out):
                raise ElutqError(
                    f"the output {out} is a non-empty directory that is not an elutq checkpoint; elutq only ever "
                    "replaces its own checkpoints (even with --overwrite): choose a new or empty directory"
                )
            if not overwrite:
                raise ElutqError(f"{out} already holds a checkpoint; choose another output path or pass --overwrite")
    parent = full.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ElutqError(f"{parent} is not a directory, so the output {out} cannot be created; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ElutqError(f"cannot write in {parent} (permission denied); choose an output path you can write to")
    return out


def read_json(path: Path, what: str = "file") -> Any:
    """A JSON file's content; invalid JSON or unreadable bytes raise an ElutqError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ElutqError(
            f"{path} is not valid JSON ({e}); the {what} is damaged: restore it, or re-run the command that wrote it"
        ) from None
    except OSError as e:
        raise ElutqError(f"cannot read {path} ({e.strerror or e})") from None


def is_quantized_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    data = read_json(cfg, "config")
    return isinstance(data, dict) and "quantization_config" in data


def index_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a safetensors index file, checked (clear errors naming the file)."""
    data = read_json(index, "safetensors index")
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ElutqError(f"{index} has no valid weight_map (tensor name -> file); restore it or re-run "
                         "`elutq quantize`")
    for f in set(wm.values()):
        if Path(f).name != f:
            raise ElutqError(f"{index} names {f!r}, which is not a file in the checkpoint directory")
    return wm


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names, or the single model.safetensors."""
    index = path / INDEX_FILE
    files = sorted({path / f for f in index_weight_map(index).values()}) if index.is_file() else [path / WEIGHTS_FILE]
    for f in files:
        if not f.is_file():
            raise ElutqError(f"{f} is missing; the checkpoint is incomplete: re-run `elutq quantize`")
    return files


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for weights in weight_files(path):
        try:
            with safe_open(str(weights), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ElutqError(
                f"cannot read {weights}: {e}; the file is corrupt or truncated: re-run `elutq quantize`"
            ) from e
    return state


# ----------------------------------------------------------------------------- integrity

SHARDS_KEY = "shards"  # quantization_config["shards"]: {file: {"bytes": n, "sha256": hex}}, at write time
VERIFIED_FILE = ".verified.json"  # per shard: the stat it had when its sha256 was last checked
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPES = {torch.uint8: "U8", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
FLOAT_DTYPES = ("F16", "BF16", "F32")
MAX_HEADER = 100 * 2**20


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsDir:
    """Tensors of a single-file or sharded (index json) safetensors directory, read on demand: the one reader
    of the weights elutq reads, a source model's (quantization, finetuning) and a checkpoint's (finetuning, the
    runtime)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        index = self.dir / INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = index_weight_map(index)
            for f in sorted(set(self.weight_map.values())):
                if not (self.dir / f).is_file():
                    raise ElutqError(
                        f"{index} points at {f}, which is missing from {self.dir}; "
                        "download the missing shard or re-save the model (a checkpoint: re-run `elutq quantize`)"
                    )
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise ElutqError(
                    f"{self.dir} has no *.safetensors files; elutq reads safetensors weights (re-save the model "
                    "with save_pretrained(..., safe_serialization=True), or re-run `elutq quantize`)"
                )
            self.weight_map = {}
            for f in files:
                with safe_open(str(self.dir / f), framework="pt") as h:
                    self.weight_map.update({k: f for k in h.keys()})  # noqa: SIM118
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _info(self, name: str) -> tuple[str, int, dict[str, Any]]:
        """(file, data start, header entry) of tensor ``name``."""
        if name not in self.weight_map:
            raise ElutqError(
                f"tensor {name} is not in the weights at {self.dir}; the model's layers cannot be "
                "walked (is it a llama-family model with standard tensor names, and does its config.json match?)"
            )
        f = self.weight_map[name]
        if f not in self._headers:
            with open(self.dir / f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[f] = (8 + n, json.loads(fh.read(n)))
        start, header = self._headers[f]
        return f, start, header[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor ``name``'s shape, from the file's header (nothing read)."""
        return tuple(self._info(name)[2]["shape"])

    def get(self, name: str) -> torch.Tensor:
        # Plain reads, not safe_open's memory map: mapped pages a process has touched count towards its
        # RSS for as long as the file stays mapped, so reading a whole model through one map makes the
        # quantizer's RSS grow by every layer it has read.
        f, start, info = self._info(name)
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ElutqError(f"tensor {name} in {self.dir / f} has dtype {info['dtype']}, which elutq cannot read")
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.dir / f, "rb") as fh:
            fh.seek(start + begin)
            if fh.readinto(buf) != len(buf):
                raise ElutqError(f"{self.dir / f} is truncated (tensor {name}); download it again")
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return t.reshape(info["shape"])

    def fingerprint(self) -> str:
        """Names, shapes and dtypes of all tensors plus sizes and edge bytes of each file (cheap, not a full hash)."""
        h = hashlib.sha256()
        for f in sorted(set(self.weight_map.values())):
            path = self.dir / f
            size = path.stat().st_size
            h.update(f"{f}:{size}".encode())
            with open(path, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(size - (1 << 20), 0))
                h.update(fh.read(1 << 20))
        return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A safetensors file's tensors as ``name -> (dtype, shape)``, read from its header alone, with
    every offset checked against the file's size: a truncated or damaged file is a clear error."""
    path = Path(path)

    def bad(why: str) -> ElutqError:
        return ElutqError(f"{path} is not a valid safetensors file ({why}); the file is corrupt or truncated: "
                          "restore it or re-run `elutq quantize`")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the header's length field")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER, size - 8):
                raise bad(f"header length {n} does not fit the file's {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise ElutqError(f"cannot read {path} ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_DTYPES:
            raise bad(f"tensor {name} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"tensor {name} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise bad(f"tensor {name} has invalid data_offsets {offs!r}")
        numel = math.prod(shape)
        if offs[1] - offs[0] != numel * _ST_DTYPES[dtype] or offs[0] < 0:
            raise bad(f"tensor {name}: {dtype} {shape} needs {numel * _ST_DTYPES[dtype]} bytes, its offsets span "
                      f"{offs[1] - offs[0]}")
        spans.append((offs[0], offs[1]))
        out[name] = (dtype, tuple(shape))
    end = 0
    for a, b in sorted(spans):
        if a != end:
            raise bad("tensor data overlaps or leaves gaps")
        end = b
    if 8 + n + end != size:
        raise bad(f"the header describes {8 + n + end} bytes, the file has {size}")
    return out


def shard_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every safetensors file in ``directory`` (recorded in the config at write time)."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(Path(directory).glob("*.safetensors"))}


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def verified_digests(path: Path, files: list[Path], remember: bool = True) -> dict[str, str]:
    """sha256 of each of ``files``; with ``remember``, a digest computed before is reused while the
    file's size, times (the change time included, which no one can set back) and inode are the same."""
    stamps_file = path / VERIFIED_FILE
    stamps: dict[str, Any] = {}
    if remember and stamps_file.is_file():
        try:
            stamps = json.loads(stamps_file.read_text())
            stamps = stamps if isinstance(stamps, dict) else {}
        except (OSError, ValueError):
            stamps = {}
    out, changed = {}, False
    for f in files:
        key = _stat_key(f)
        rec = stamps.get(f.name)
        if remember and isinstance(rec, list) and len(rec) == 5 and rec[:4] == key:
            out[f.name] = rec[4]
        else:
            out[f.name] = file_sha256(f)
            stamps[f.name] = [*key, out[f.name]]
            changed = True
    if remember and changed:
        try:
            tmp = stamps_file.with_name(stamps_file.name + f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(stamps))
            os.replace(tmp, stamps_file)
        except OSError:
            pass  # a read-only checkpoint is verified again next time
    return out


def verify_shards(path: Path, qc: dict[str, Any], files: list[Path], full: bool = True,
                  remember: bool = True) -> dict[str, str]:
    """Check the shards against the sizes and sha256 digests recorded at write time (``full``: the
    digests too, else only the sizes).  Returns the digests (empty when not ``full``)."""
    recorded = qc.get(SHARDS_KEY)
    if recorded is not None and not isinstance(recorded, dict):
        raise ElutqError(f"{path}/config.json: quantization_config.{SHARDS_KEY} is damaged; re-run `elutq quantize`")
    recorded = recorded or {}
    for f in files:
        rec = recorded.get(f.name)
        if rec is not None and f.stat().st_size != rec.get("bytes"):
            raise ElutqError(
                f"{f} has {f.stat().st_size} bytes but {rec.get('bytes')} were written; the file is truncated or "
                "was changed: restore it or re-run `elutq quantize`")
    if not full:
        return {}
    digests = verified_digests(path, files, remember)
    for f in files:
        rec = recorded.get(f.name)
        if rec is not None and digests[f.name] != rec.get("sha256"):
            raise ElutqError(
                f"{f} does not match the checksum recorded when it was written (sha256 {digests[f.name][:16]}... "
                f"!= {str(rec.get('sha256'))[:16]}...); the file is corrupt or was modified: restore it or re-run "
                "`elutq quantize`")
    return digests


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each linear of a llama-family decoder layer, by module suffix."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or hidden // heads
    return {
        "self_attn.q_proj": (hidden, heads * hd), "self_attn.k_proj": (hidden, kv * hd),
        "self_attn.v_proj": (hidden, kv * hd), "self_attn.o_proj": (heads * hd, hidden),
        "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden),
    }


_CONFIG_INTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def load_config(path: Path):
    """The model config of the directory ``path`` (transformers' AutoConfig), with clear errors for a
    config.json that transformers cannot read or whose sizes are not positive integers."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # JSON, unknown model_type, and the config classes' own arithmetic on bad values
        raise ElutqError(f"{path / 'config.json'} cannot be read as a model config ({type(e).__name__}: {e}); "
                         "restore it from the source model, or re-run `elutq quantize`") from None
    config.__dict__.pop("quantization_config", None)
    bad = [k for k in _CONFIG_INTS if not _positive_int(getattr(config, k, None))]
    bad += [k for k in _OPTIONAL_INTS if getattr(config, k, None) is not None and not _positive_int(getattr(config, k))]
    eps = getattr(config, "rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0:
        bad.append("rms_norm_eps")
    kv = getattr(config, "num_key_value_heads", None)
    if not bad and kv is not None and config.num_attention_heads % kv:
        bad.append("num_key_value_heads (must divide num_attention_heads)")
    if not bad and getattr(config, "head_dim", None) is None and config.hidden_size % config.num_attention_heads:
        bad.append("hidden_size (not a multiple of num_attention_heads)")
    if bad:
        raise ElutqError(f"{path / 'config.json'} has invalid values for {', '.join(bad)}; restore it from the "
                         "source model, or re-run `elutq quantize`")
    return config


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_tensors(path: Path, qc: dict[str, Any], config, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """The tensors (``name -> (dtype, shape)``, from the headers) against config.json and the
    quantization_config: the layer count, every quantized module's bits, group size and shapes,
    16-bit tensors' dtypes and shapes.  Raises an ElutqError naming the first mismatch."""
    n_layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    hd = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    shapes = linear_shapes(config)

    def mismatch(what: str) -> ElutqError:
        return ElutqError(f"{path}: {what}; the checkpoint does not match its config.json (or is corrupt): "
                          "re-run `elutq quantize`")

    def features(name: str) -> tuple[int, int] | None:
        if name == EMBED:
            return hidden, vocab
        if name == "lm_head":
            return hidden, vocab
        parts = name.split(".")
        if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
            return shapes.get(".".join(parts[3:]))
        return None

    layers_seen = set()
    for name in tensors:
        parts = name.split(".")
        if len(parts) > 3 and parts[:2] == ["model", "layers"]:
            if not parts[2].isdigit() or int(parts[2]) >= n_layers:
                raise mismatch(f"tensor {name} belongs to no layer of the {n_layers} config.json declares")
            layers_seen.add(int(parts[2]))
    if layers_seen != set(range(n_layers)):
        missing = sorted(set(range(n_layers)) - layers_seen)[:5]
        raise mismatch(f"config.json declares {n_layers} layers but layers {missing} have no tensors")
    modules = qc.get("modules", {})
    if not isinstance(modules, dict):
        raise mismatch("quantization_config.modules is not an object")
    rotation = qc.get("rotation")
    rotation_from_spec(rotation)  # one this elutq cannot apply is refused, never run unrotated
    if bool(isinstance(rotation, dict) and rotation.get(NORM_MATRIX)) != (NORM_ROTATION in tensors):
        raise mismatch(f"tensor {NORM_ROTATION} is {'present' if NORM_ROTATION in tensors else 'missing'} but "
                       f"quantization_config.rotation is {rotation!r}")
    for name, spec in modules.items():
        io = features(name)
        if io is None:
            raise mismatch(f"quantized module {name} is not a linear of a decoder layer, lm_head or the embeddings")
        if not isinstance(spec, dict) or spec.get("bits") not in (1, 2, 3, 4):
            raise mismatch(f"module {name} has invalid bits in quantization_config: {spec!r}")
        if not isinstance(spec.get("group_size"), int) or not (spec["group_size"] == -1 or spec["group_size"] > 0):
            raise mismatch(f"module {name} has an invalid group_size in quantization_config: {spec!r}")
        if SHARED in spec:
            head = modules.get("lm_head")
            if name != EMBED or spec[SHARED] != "lm_head" or not isinstance(head, dict) or (
                head.get("bits"), head.get("group_size")) != (spec["bits"], spec["group_size"]):
                raise mismatch(f"module {name} is shared with {spec[SHARED]!r}, which is not a quantized lm_head "
                               f"of the same bits and group size ({head!r})")
            continue  # its tensors are lm_head's, checked there
        for key, (shape, dt) in _expected_shapes(name, spec, *io).items():
            if key not in tensors:
                raise mismatch(f"missing tensor {key}")
            got = tensors[key]
            if got != (_TORCH_DTYPES[dt], shape):
                names = {v: str(k) for k, v in _TORCH_DTYPES.items()}
                raise mismatch(
                    f"tensor {key} is {names.get(got[0], got[0])} {got[1]}, expected {dt} {shape} (config.json: "
                    f"{spec['bits']}-bit, groups of {spec['group_size']})")
    for name, (dtype, shape) in tensors.items():
        module, _, kind = name.rpartition(".")
        if module in modules and kind in ("qweight", "scales", "zeros"):
            continue
        if dtype not in FLOAT_DTYPES:
            raise mismatch(f"tensor {name} is {dtype}; 16-bit tensors must be F16, BF16 or F32")
        io = features(module)
        want = None
        if kind == "weight" and io is not None:
            want = (io[1], io[0])
        elif kind == "bias" and io is not None:
            want = (io[1],)
        elif name.endswith(("layernorm.weight", "model.norm.weight")):
            want = (hidden,)
        elif name == NORM_ROTATION:
            want = (hidden, hidden)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            want = (hd,)
        if want is not None and shape != want:
            raise mismatch(f"tensor {name} has shape {list(shape)}, expected {list(want)}")


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, after checking that it holds no NaN or infinity (an ElutqError names the tensor)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ElutqError(f"tensor {name} holds NaN or infinite values; the checkpoint is corrupt: restore it or "
                         "re-run `elutq quantize`")
    return t


def validate_checkpoint(path: Path, qc: dict[str, Any], config, full: bool = True,
                        remember: bool = True) -> dict[str, str]:
    """Everything that can be checked before the tensors are used: each shard's header, size and (with
    ``full``) recorded sha256, and the tensors against the config.  Returns the shards' digests."""
    files = weight_files(path)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        for k, v in read_header(f).items():
            if k in tensors:
                raise ElutqError(f"{path}: tensor {k} is stored twice; re-run `elutq quantize`")
            tensors[k] = v
    digests = verify_shards(path, qc, files, full=full, remember=remember)
    check_tensors(path, qc, config, tensors)
    return digests


def load_tokenizer(path: Path, required: bool = True):
    """The checkpoint's tokenizer, with a clear error when its files are missing or unreadable
    (``required=False``: None when there are none)."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).is_file() for n in names):
        if not required:
            return None
        raise ElutqError(f"{path} has no tokenizer files ({', '.join(names[:2])}, ...); copy them from the source "
                         "model's directory, or re-run `elutq quantize`")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises TypeError/ValueError/OSError for missing or damaged files
        raise ElutqError(f"cannot load the tokenizer in {path} ({type(e).__name__}: {e}); restore its tokenizer files "
                         "from the source model, or re-run `elutq quantize`") from None


def _expected_shapes(name: str, spec: dict, in_f: int, out_f: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    bits, g = spec["bits"], module_group_size(spec, in_f)
    ng = num_groups(in_f, g)
    return {
        f"{name}.qweight": ((bits, out_f, math.ceil(in_f / 8)), torch.uint8),
        f"{name}.scales": ((out_f, ng, bits), torch.float16),
        f"{name}.zeros": ((out_f, ng), torch.float16),
    }


_FP16_KV = "elutq_fp16_kv"


def _fp16_kv_attention(module, query, key, value, *args, **kwargs):
    """transformers' SDPA attention over keys (after RoPE) and values rounded to fp16 and back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key, value = key.half().to(key.dtype), value.half().to(value.dtype)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


def attend_with_fp16_kv(model: nn.Module) -> nn.Module:
    """Make a transformers model attend over keys and values rounded to fp16, as the native runtime's KV
    cache stores them: with this it is the runtime's float reference (rounding a cached value again
    changes nothing, so cached generation agrees too).  Returns the model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(_FP16_KV, _fp16_kv_attention)
    AttentionMaskInterface.register(_FP16_KV, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(_FP16_KV)
    return model


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, fp16_kv: bool = False):
    """Load a checkpoint as a torch model with ``HLQLinear`` modules. Returns ``(model, tokenizer, qconfig)``.

    ``fp16_kv``: attend over fp16-rounded keys and values (:func:`attend_with_fp16_kv`), i.e. compute what
    the native runtime computes."""

    path = Path(path)
    qc = read_quantization_config(path)
    config = load_config(path)
    check_architecture(config)
    validate_checkpoint(path, qc, config)
    # The module tree on the meta device: a 1.5B model's random init would cost 7 GB of fp32 for a moment;
    # the quantized modules replace their linears and every other tensor is assigned from the checkpoint.
    model = meta_model(config, dtype)
    state = read_tensors(path)
    for key, t in state.items():
        check_finite(key, t)
    shared = qc["modules"].get(EMBED, {}).get(SHARED)
    if shared:  # the embedding's tensors are the head's: the same tensor objects, one copy in memory too
        for kind in ("qweight", "scales", "zeros"):
            state[f"{EMBED}.{kind}"] = state[f"{shared}.{kind}"]

    for name, spec in qc["modules"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ElutqError(
                f"{path}: quantized module {name} does not exist in a {config.model_type} model; "
                "the checkpoint does not match its config.json"
            ) from None
        embedding = isinstance(linear, nn.Embedding)
        if not embedding and not isinstance(linear, nn.Linear):
            raise ElutqError(
                f"{path}: quantized module {name} is a {type(linear).__name__}, not a linear layer or the embedding; "
                "the checkpoint does not match its config.json"
            )
        in_f, out_f = (
            (linear.embedding_dim, linear.num_embeddings) if embedding else (linear.in_features, linear.out_features)
        )
        for key, (shape, dt) in _expected_shapes(name, spec, in_f, out_f).items():
            if key not in state:
                raise ElutqError(
                    f"{path} is missing tensor {key}; the checkpoint is incomplete: re-run `elutq quantize`"
                )
            t = state[key]
            if tuple(t.shape) != shape or t.dtype != dt:
                raise ElutqError(
                    f"{path}: tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dt} {shape}; "
                    "the checkpoint is corrupt or from another tool: re-run `elutq quantize`"
                )
        if embedding:
            module = HLQEmbedding(in_f, out_f, spec["bits"], module_group_size(spec, in_f), dtype=dtype)
            module.tied = SHARED in spec
        else:
            g = module_group_size(spec, in_f)
            module = HLQLinear(in_f, out_f, spec["bits"], g, bias=linear.bias is not None)
        set_module(model, name, module)
    for key, t in state.items():
        if _is_plain_float(key, t):
            state[key] = t.to(dtype)
    rotate_modules(model, qc.get("rotation"))  # a rotated checkpoint's final norm and MLPs (rotation.py)
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        problem = f"missing tensors {missing[:5]}" if missing else f"unexpected tensors {result.unexpected_keys[:5]}"
        raise ElutqError(f"{path}: {problem}; the checkpoint does not match its config.json: re-run `elutq quantize`")
    if tied:
        if EMBED in qc["modules"]:
            raise ElutqError(
                f"{path}: config.json ties lm_head to quantized embeddings, which elutq never writes (quantizing "
                "the embeddings unties the head); re-run `elutq quantize`"
            )
        model.tie_weights()
    # Non-persistent buffers are computed, not stored: the rotary embedding's inv_freq, rebuilt for real.
    model.model.rotary_emb = rotary_embedding(config, model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ElutqError(f"{path}: tensors {left[:5]} are neither in the checkpoint nor computed; the checkpoint "
                         f"does not match its config.json: re-run `elutq quantize`")
    model.eval()
    if fp16_kv:
        attend_with_fp16_kv(model)
    return model, load_tokenizer(path, required=False), qc
