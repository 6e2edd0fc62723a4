"""One decoder layer at a time: the resumable loop that quantization and block finetuning plug into.

    run = Run.open(out, fingerprint(...), ...)     OUT.partial + progress.json: a new run or the one to resume
    layers = meta_model(config).model.layers       the module tree on the meta device (models.py)
    acts = run.activations() or <embedded ids>     what enters the first layer not done yet
    acts = run_layers(run, layers, step, acts)     for each layer not done yet:
                                                     step(i, meta layer, acts) → LayerStep
                                                       the plug-in materialises the layer, does its
                                                       work, runs the activations through it
                                                     write model-layer-i.safetensors (atomically),
                                                     keep the new activations, progress.json,
                                                     free the layer
    ... head tensors, index, config ...
    run.close()                                    progress and activations go: OUT.partial is a checkpoint

Plug-ins: GPTQ and RTN quantization (pipeline.py), block reconstruction (finetune.py).

``progress.json`` names only layers whose shard and next activations are complete, with a fingerprint
of the inputs and settings, so a killed run continues from its last finished layer and produces the
same files as an uninterrupted one.  Activations live in RAM (snapshotted into the work directory
after every layer) or in chunk files a plug-in writes with ``Activations.map(fn, directory)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from . import __version__
from .checkpoint import PARTIAL_MARKER, check_output, make_partial, remove_partial
from .utils import ElutqError, peak_rss_mb, release_free_memory

PROGRESS_FILE = "progress.json"
SNAPSHOT = "snapshot"  # where RAM activations are kept: WORK/<stream>.safetensors


def layer_prefix(i: int) -> str:
    """Tensor-name prefix of decoder layer ``i``."""
    return f"model.layers.{i}."


def layer_file(i: int) -> str:
    return f"model-layer-{i:05d}.safetensors"


# ----------------------------------------------------------------------------- writing safely


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """A failed write (disk full, quota, permissions) mid-run becomes a user error that says how to go on.

    Nothing is lost: progress.json only ever names layers whose files and next activations are
    complete, so a rerun with --resume continues from the last finished layer.
    """
    try:
        yield
    except OSError as e:
        raise ElutqError(
            f"cannot write {path} ({e.strerror or e}); free space there or choose another location "
            "(-o, --offload-dir), then rerun the same command with --resume: finished layers are kept"
        ) from e


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with disk_errors(path):
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)


def atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- activations


class Activations:
    """Hidden states of the calibration samples in chunks of ``[batch, seqlen, d]``, in RAM or on disk."""

    def __init__(self, chunks: list[torch.Tensor | Path]):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for c in self.chunks:
            yield load_file(str(c))["x"] if isinstance(c, Path) else c

    @property
    def directory(self) -> Path | None:
        """The directory of on-disk chunks; None in RAM."""
        return self.chunks[0].parent if self.chunks and isinstance(self.chunks[0], Path) else None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], directory: Path | None) -> Activations:
        """Apply ``fn`` to every chunk; results go to files in ``directory`` (if given) or RAM."""
        out: list[torch.Tensor | Path] = []
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        for k, x in enumerate(self):
            y = fn(x)
            if directory is None:
                out.append(y)
            else:
                path = directory / f"chunk-{k:05d}.safetensors"
                with disk_errors(path):
                    save_file({"x": y.contiguous()}, str(path))
                out.append(path)
        return Activations(out)

    def keep(self, work: Path, name: str) -> str:
        """Make these activations survive a crash; returns where they are, for progress.json."""
        if self.directory is not None:
            return str(self.directory)  # chunk files are already persistent
        atomic_save({f"chunk.{k}": c.contiguous() for k, c in enumerate(self.chunks)}, work / f"{name}.safetensors")
        return SNAPSHOT

    @classmethod
    def restore(cls, work: Path, name: str, where: str) -> Activations:
        """The activations ``keep`` recorded as ``where``."""
        if where != SNAPSHOT:
            return cls(sorted(Path(where).glob("chunk-*.safetensors")))
        state = load_file(str(work / f"{name}.safetensors"))
        return cls([state[f"chunk.{k}"] for k in range(len(state))])


# ----------------------------------------------------------------------------- the run directory


def fingerprint(inputs: dict[str, Any]) -> str:
    """What a run's result depends on (input fingerprints, settings) and this elutq's version, hashed."""
    blob = json.dumps({**inputs, "elutq": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Run:
    """``OUT.partial``, where a resumable run writes, and its ``progress.json`` (``state``)."""

    out: Path
    work: Path
    state: dict[str, Any]
    overwrite: bool

    @classmethod
    def open(
        cls, out: str | Path, fingerprint: str, fresh: dict[str, Any], resume: bool, overwrite: bool, inputs: str
    ) -> Run:
        """A new run with state ``fresh``, or (``resume``) the unfinished one with the same fingerprint.
        The caller has checked the output (``checkpoint.check_output``) before any work.

        ``inputs`` names what the fingerprint covers, for the error when it differs."""
        out = Path(out)
        work = out.with_name(out.name + ".partial")
        progress = work / PROGRESS_FILE
        state = {"fingerprint": fingerprint, **fresh}
        if work.exists() and not progress.is_file():
            remove_partial(work)  # a run that failed before finishing a step: nothing in it to keep
        if work.exists():
            if not resume and not overwrite:
                raise ElutqError(
                    f"an unfinished run exists at {work}; pass --resume to continue it or --overwrite to start over"
                )
            if overwrite and not resume:
                remove_partial(work)
            else:
                state = json.loads(progress.read_text())
                if state["fingerprint"] != fingerprint:
                    raise ElutqError(
                        f"the unfinished run at {work} was started with another {inputs}; "
                        "rerun with the same ones, or pass --overwrite to start over"
                    )
                if "layers_done" in state and not isinstance(state.get("hidden"), dict):
                    raise ElutqError(  # progress.json from before the layer loop kept its activations so
                        f"the unfinished run at {work} was written by an earlier elutq; pass --overwrite to start over"
                    )
        make_partial(work)
        return cls(out, work, state, overwrite)

    def save(self, **updates: Any) -> None:
        """Update the state and write progress.json (atomically)."""
        self.state.update(updates)
        atomic_json(self.state, self.work / PROGRESS_FILE)

    # The layer loop's state: layers_done, per-layer report entries, where the activations are.

    @property
    def layers_done(self) -> int:
        return self.state.get("layers_done", 0)

    @property
    def entries(self) -> list:
        """The finished layers' report entries."""
        return self.state.setdefault("layers", [])

    def activations(self) -> dict[str, Activations]:
        """The activations that enter layer ``layers_done``, as the last finished layer left them."""
        hidden = self.state.get("hidden", {})
        return {name: Activations.restore(self.work, name, where) for name, where in hidden.items()}

    def close(self) -> None:
        """The run is complete: progress.json, the activations it kept and the unfinished-run marker
        are removed.  The output is checked again first (it may have changed since the start): a
        refusal then leaves the progress, so --resume keeps the finished work."""
        check_output(self.out, self.overwrite)
        for name, where in self.state.get("hidden", {}).items():
            if where == SNAPSHOT:
                (self.work / f"{name}.safetensors").unlink(missing_ok=True)
            else:
                shutil.rmtree(where, ignore_errors=True)
        for f in (PROGRESS_FILE, PARTIAL_MARKER):
            (self.work / f).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the loop


@dataclass
class LayerStep:
    """What a plug-in returns for one decoder layer."""

    tensors: dict[str, torch.Tensor]  # the layer's tensors as the checkpoint stores them (full names)
    acts: dict[str, Activations]  # the activations entering the next layer, by stream name
    entry: Any  # the layer's line of the report (JSON), kept in progress.json
    postfix: dict[str, str]  # shown beside the progress bar


def run_layers(
    run: Run,
    layers: nn.ModuleList,
    step: Callable[[int, nn.Module, dict[str, Activations]], LayerStep],
    acts: dict[str, Activations],
    progress: bool = True,
) -> dict[str, Activations]:
    """Run ``step`` on every decoder layer not done yet (``layers``: meta-device skeletons, each
    replaced by ``nn.Identity`` once written); returns the activations that leave the last layer."""
    bar = tqdm(range(len(layers)), desc="layers", unit="layer", disable=not progress, initial=run.layers_done)
    for i in range(run.layers_done, len(layers)):
        res = step(i, layers[i], acts)
        atomic_save(res.tensors, run.work / layer_file(i), {"format": "pt"})
        hidden = {name: a.keep(run.work, name) for name, a in res.acts.items()}
        run.save(layers_done=i + 1, hidden=hidden, layers=[*run.entries, res.entry])
        # Only now are the previous layer's on-disk inputs no longer needed.
        stale = {a.directory for a in acts.values()} - {a.directory for a in res.acts.values()} - {None}
        for d in stale:
            shutil.rmtree(d, ignore_errors=True)
        acts = res.acts
        layers[i] = nn.Identity()  # free the layer
        postfix = res.postfix
        del res
        release_free_memory()
        bar.update(1)
        bar.set_postfix(**postfix, rss=f"{peak_rss_mb():.0f}M")
        _maybe_stop_for_test(i)
    bar.close()
    return acts


def _maybe_stop_for_test(layer: int) -> None:
    """Tests simulate a crash right after a layer is recorded (ELUTQ_TEST_CRASH_AFTER_LAYER=i)."""
    if os.environ.get("ELUTQ_TEST_CRASH_AFTER_LAYER") == str(layer):
        os._exit(17)


# ----------------------------------------------------------------------------- layers


def materialize(module: nn.Module, source, prefix: str, device: torch.device | str = "cpu") -> nn.Module:
    """Fill a meta-device module with its tensors from ``source`` (``.get(name)``), in float32, on ``device``."""
    module = module.to_empty(device=device)
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        p.data = source.get(f"{prefix}{name}").to(device=device, dtype=torch.float32)
        p.requires_grad_(False)
    return module


@torch.no_grad()
def run_layer(layer: nn.Module, x: torch.Tensor, pos) -> torch.Tensor:
    """One decoder layer on ``x``; runs where the layer lives, the output comes back to ``x``'s device."""
    dev = pos[0].device
    out = layer(x.to(dev), attention_mask=None, position_embeddings=pos)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(x.device)
