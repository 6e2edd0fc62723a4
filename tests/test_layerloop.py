"""The layer loop on its own: a toy plug-in over three "layers", no model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from elutq.layerloop import PROGRESS_FILE, Activations, LayerStep, Run, fingerprint, run_layers
from elutq.utils import ElutqError

FRESH = {"layers_done": 0, "hidden": {}, "layers": []}


def toy_step(offload_root=None):
    """Layer i adds i + 1 to every activation; its 'tensors' record what it saw."""

    def step(i: int, layer: nn.Module, acts: dict[str, Activations]) -> LayerStep:
        seen = torch.cat(list(acts["h"]))
        directory = None if offload_root is None else offload_root / f"layer-{i + 1:05d}"
        new = acts["h"].map(lambda x: x + (i + 1), directory)
        return LayerStep({f"model.layers.{i}.seen": seen}, {"h": new}, float(seen.sum()), {"i": str(i)})

    return step


@pytest.mark.parametrize("offload", [False, True])
def test_run_layers_writes_each_layer_and_resumes_where_it_stopped(tmp_path, offload, monkeypatch):
    root = tmp_path / "acts" if offload else None
    first = Activations([torch.zeros(2, 3), torch.ones(2, 3)])
    if offload:
        first = first.map(lambda x: x, root / "layer-00000")
    run = Run.open(tmp_path / "out", fingerprint({"x": 1}), FRESH, resume=False, overwrite=False, inputs="x")
    calls = []

    def crash_after_two(i, layer, acts):
        calls.append(i)
        if i == 2:
            raise RuntimeError("killed")
        return toy_step(root)(i, layer, acts)

    layers = nn.ModuleList([nn.Linear(1, 1) for _ in range(3)])
    with pytest.raises(RuntimeError):
        run_layers(run, layers, crash_after_two, {"h": first}, progress=False)
    state = json.loads((tmp_path / "out.partial" / PROGRESS_FILE).read_text())
    assert state["layers_done"] == 2 and len(state["layers"]) == 2
    if offload:  # only the newest activations are kept
        assert sorted(p.name for p in root.iterdir()) == ["layer-00002"]

    again = Run.open(tmp_path / "out", fingerprint({"x": 1}), FRESH, resume=True, overwrite=False, inputs="x")
    acts = run_layers(again, nn.ModuleList([nn.Identity()] * 3), toy_step(root), again.activations(), progress=False)
    assert calls == [0, 1, 2]
    assert torch.equal(torch.cat(list(acts["h"])), torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]) + 6)
    seen = load_file(str(tmp_path / "out.partial" / "model-layer-00002.safetensors"))["model.layers.2.seen"]
    assert torch.equal(seen, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]) + 3)
    assert again.entries == [6.0, 18.0, 42.0]  # what layers 0, 1, 2 saw, summed
    again.close()
    assert sorted(p.name for p in (tmp_path / "out.partial").iterdir()) == [
        f"model-layer-{i:05d}.safetensors" for i in range(3)
    ]
    if offload:
        assert not any(root.iterdir())


def test_resume_refuses_other_inputs_and_progress_of_an_earlier_format(tmp_path):
    run = Run.open(tmp_path / "out", fingerprint({"x": 1}), FRESH, resume=False, overwrite=False, inputs="x")
    run.save(layers_done=1)
    with pytest.raises(ElutqError, match="pass --resume"):
        Run.open(tmp_path / "out", fingerprint({"x": 1}), FRESH, resume=False, overwrite=False, inputs="x")
    with pytest.raises(ElutqError, match="another model or settings"):
        Run.open(tmp_path / "out", fingerprint({"x": 2}), FRESH, True, False, "model or settings")
    run.save(hidden="snapshot", errors=[0.1])  # progress.json as elutq wrote it before the shared loop
    with pytest.raises(ElutqError, match="earlier elutq.*--overwrite"):
        Run.open(tmp_path / "out", fingerprint({"x": 1}), FRESH, resume=True, overwrite=False, inputs="x")
    fresh = Run.open(tmp_path / "out", fingerprint({"x": 1}), FRESH, resume=False, overwrite=True, inputs="x")
    assert fresh.layers_done == 0 and not (tmp_path / "out.partial" / PROGRESS_FILE).exists()
