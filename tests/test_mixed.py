"""Mixed precision: the measurement (streamed, reused, refused for other inputs), the allocation (the size it
is given, the errors it trades), per-module widths through the pipeline, torch and the runtime."""

from __future__ import annotations

import json

import pytest
import torch

import elutq
from elutq import mixed
from elutq.calibration import CalibConfig
from elutq.checkpoint import load_quantized, read_quantization_config
from elutq.cli import main
from elutq.hlq import QuantConfig, quantize_weight
from elutq.mixed import CANDIDATE_BITS, MeasureConfig, allocate, measure, option
from elutq.pipeline import PipelineConfig, quantize_streaming
from elutq.utils import ElutqError


def _synthetic(n_mods: int = 40, params: int = 10_000) -> dict:
    """A measurement whose module k loses (k+1)·4^-b at b bits in groups of 128, b·params bits of storage, and
    1.5·(k+1)·4^-b with one group per row, (b - 0.25)·params bits."""

    def options(scale: float) -> dict:
        return {**{option(b, 128): [scale * 4.0**-b, b * params] for b in CANDIDATE_BITS},
                **{option(b, -1): [1.5 * scale * 4.0**-b, (b - 0.25) * params] for b in CANDIDATE_BITS}}  # fmt: skip

    mods = {f"m{k}": {"params": params, "options": options(k + 1)} for k in range(n_mods)}
    mods["lm_head"] = {"params": params, "options": options(50)}
    n = (n_mods + 1) * params
    return {"modules": mods, "tied": True, "embedding_params": params, "n_params": n + 1000}


def test_allocation_fills_the_target_and_favours_costly_modules():
    m = _synthetic()
    for target in (2.25, 2.5, 2.75, 3.0, 3.5):
        choice, bpw = allocate(m, target)
        assert target - 0.03 < bpw <= target, (target, bpw)
        assert choice["m39"][0] >= choice["m0"][0]  # the module that loses most gets at least as many bits
    choice, _ = allocate(m, 2.5)
    assert {g for _, g in choice.values()} == {-1, 128}  # cheap modules pay for costly ones with their groups
    total = sum(m["modules"][n]["options"][option(*v)][0] for n, v in choice.items())
    flat = sum(v["options"]["2g128"][0] for v in m["modules"].values())  # the uniform 2-bit model is smaller...
    assert total < flat  # ...and still loses more
    choice, bpw = allocate(m, 3.0, groups=(128,))
    assert {g for _, g in choice.values()} == {128} and 2.97 < bpw <= 3.0
    with pytest.raises(ElutqError, match="below what the smallest setting everywhere reaches"):
        allocate(m, 1.5)
    with pytest.raises(ElutqError, match="no setting of"):
        allocate(m, 3.0, groups=(32,))


def test_untied_embedding_counts_as_a_copy_of_the_head():
    m = {**_synthetic(), "tied": False}
    m["n_params"] += m["embedding_params"]
    choice, bpw = allocate(m, 3.0)
    mods = m["modules"]
    quantized = sum(v["params"] for v in mods.values()) + m["embedding_params"]
    stored = sum(mods[n]["options"][option(*v)][1] for n, v in choice.items())
    stored += mods["lm_head"]["options"][option(*choice["lm_head"])][1]
    assert bpw == pytest.approx((stored + 16 * (m["n_params"] - quantized)) / m["n_params"])  # the head twice
    assert 2.95 < bpw <= 3.0


def test_measure_is_streamed_reused_and_refused_for_other_inputs(tiny_llama, tmp_path):
    _, path = tiny_llama
    cfg = MeasureConfig(group_sizes=(-1, 32), calib=CalibConfig(n_samples=4, seqlen=16), weighting="none")
    f = tmp_path / "m.json"
    m = measure(str(path), f, cfg, progress=False)
    assert f.is_file() and not (tmp_path / "m.json.partial").exists()
    layer0 = {k: v for k, v in m["modules"].items() if k.startswith("model.layers.0.")}
    assert len(layer0) == 7 and "lm_head" in m["modules"]
    for v in m["modules"].values():  # more bits (or smaller groups): less error and more storage
        for g in cfg.group_sizes:
            costs = [v["options"][option(b, g)][0] for b in CANDIDATE_BITS]
            sizes = [v["options"][option(b, g)][1] for b in CANDIDATE_BITS]
            assert costs == sorted(costs, reverse=True) and sizes == sorted(sizes)
        for b in CANDIDATE_BITS:
            assert v["options"][option(b, 32)][0] < v["options"][option(b, -1)][0]
            assert v["options"][option(b, 32)][1] > v["options"][option(b, -1)][1]
    # The cost is tr(E H Eᵀ), H = 2/n·XᵀX of the unquantized model's inputs: one against a direct computation.
    from elutq.calibration import calibration_ids
    from elutq.models import load_model

    model, tok = load_model(str(path))
    q = model.model.layers[1].self_attn.q_proj
    xs = []
    q.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    ids, _ = calibration_ids(tok, cfg.calib, model=path)
    with torch.no_grad():
        model(ids)
    x = torch.cat(xs)
    h = 2 * x.T @ x / x.shape[0]
    w = q.weight.detach().float()
    for b, g in ((2, 32), (3, -1)):
        e = w - quantize_weight(w, QuantConfig(b, g)).dequantize()
        want = ((e @ h) * e).sum().item()
        got = m["modules"]["model.layers.1.self_attn.q_proj"]["options"][option(b, g)][0]
        assert got == pytest.approx(want, rel=1e-3)
    assert m["n_params"] == sum(p.numel() for p in model.parameters())  # a tied table once
    assert measure(str(path), f, cfg, progress=False) == m  # read back, not measured again
    with pytest.raises(ElutqError, match="measures another model or other settings"):
        measure(str(path), f, MeasureConfig(group_sizes=(64,), calib=cfg.calib), progress=False)


def test_measure_resumed_after_the_gradient_pass_keeps_the_gradients(tiny_llama, tmp_path, monkeypatch):
    """Killed after the loss gradients were saved but before the first layer finished: the resumed run reads
    them instead of running the model's backward passes again, and measures the same."""
    _, path = tiny_llama
    cfg = MeasureConfig(group_sizes=(32,), calib=CalibConfig(n_samples=2, seqlen=16))
    want = measure(str(path), tmp_path / "ref.json", cfg, progress=False)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mixed, "run_layers", killed)
    with pytest.raises(KeyboardInterrupt):
        measure(str(path), tmp_path / "m.json", cfg, progress=False)
    assert (tmp_path / "m.json.partial" / mixed.GRADIENTS).is_file()
    monkeypatch.undo()
    monkeypatch.setattr(mixed, "loss_gradients", lambda *a, **k: pytest.fail("gradients computed again"))
    got = measure(str(path), tmp_path / "m.json", cfg, progress=False)
    for name, v in want["modules"].items():
        for k, (cost, bits) in v["options"].items():
            assert got["modules"][name]["options"][k] == [pytest.approx(cost, rel=1e-4), bits], (name, k)


def test_loss_weighted_cost_against_autograd(tiny_llama, tmp_path):
    """The default cost, Σ_o c_o·(E H_w Eᵀ)_oo, against its definition computed here with autograd on the whole
    model (one backward pass per sample; the measurement streams the layers, 4 samples at a time):
    g = ∂loss/∂(module output) per token, w_t = Σ_o g², c_o = Σ_t g² / Σ w, H_w = 2/n·Σ_t w_t x_t x_tᵀ."""
    _, path = tiny_llama
    cfg = MeasureConfig(group_sizes=(32,), calib=CalibConfig(n_samples=5, seqlen=16), batch_size=2)  # 2 chunks
    m = measure(str(path), tmp_path / "m.json", cfg, progress=False)
    from elutq.calibration import calibration_ids
    from elutq.models import load_model

    model, tok = load_model(str(path))
    ids, _ = calibration_ids(tok, cfg.calib, model=path)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    mods = {n: model.get_submodule(n) for n in names}
    xs: dict[str, list] = {n: [] for n in names}
    gs: dict[str, list] = {n: [] for n in names}

    def keep(n: str, a: tuple, out: torch.Tensor) -> None:
        xs[n].append(a[0].detach())
        out.retain_grad()
        gs[n].append(out)

    for n, mod in mods.items():
        mod.register_forward_hook(lambda _m, a, out, n=n: keep(n, a, out))
    for s in range(ids.shape[0]):
        logits = model(ids[s : s + 1]).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], ids[s, 1:]).backward()
    for n, mod in mods.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs[n]]).double()
        g2 = torch.cat([t.grad.reshape(-1, t.shape[-1]) for t in gs[n]]).double().pow(2)
        w_t, c = g2.sum(1), g2.sum(0) / g2.sum()
        h = 2 * (x * w_t[:, None]).T @ x / x.shape[0]
        w = mod.weight.detach().float()
        for b in (2, 3):
            e = (w - quantize_weight(w, QuantConfig(b, 32)).dequantize()).double()
            want = (((e @ h) * e).sum(1) @ c).item()
            assert m["modules"][n]["options"][option(b, 32)][0] == pytest.approx(want, rel=2e-3), (n, b)
    # The weighting ranks modules as the loss does: the plain output error says otherwise for some pair.
    plain = measure(str(path), tmp_path / "p.json", MeasureConfig(group_sizes=(32,), calib=cfg.calib, weighting="none"),
                    progress=False)  # fmt: skip
    ratio = [m["modules"][k]["options"]["2g32"][0] / plain["modules"][k]["options"]["2g32"][0] for k in m["modules"]]
    assert max(ratio) > 3 * min(ratio)
    with pytest.raises(ValueError, match="weighting"):
        MeasureConfig(weighting="fisher")


def test_gradient_pass_recomputing_inputs_equals_keeping_them(tiny_llama):
    """Keeping every 2nd layer's input and recomputing the rest in the backward pass (the default keeps every
    ⌈√layers⌉-th) gives the same gradients, bit for bit, as keeping every input."""
    from transformers import AutoConfig

    from elutq.mixed import loss_gradients
    from elutq.models import meta_model, position_embeddings
    from elutq.pipeline import open_source

    _, path = tiny_llama
    config = AutoConfig.from_pretrained(path)
    ids = torch.randint(0, config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    pos = position_embeddings(config, 16, "cpu", meta_model(config))
    keep_all, recompute = (loss_gradients(config, open_source(path, config, None), None, ids, pos, progress=False,
                                          chunk=2, keep_every=k) for k in (1, 2))  # fmt: skip
    assert keep_all.keys() == recompute.keys() and len(keep_all) == 2 * (7 * config.num_hidden_layers + 1)
    for k, v in keep_all.items():
        assert torch.equal(v, recompute[k]), k


@pytest.mark.parametrize("method", ["rtn", "gptq"])  # GPTQ: q/k/v read one input with three group sizes
def test_per_module_settings_through_pipeline_torch_and_runtime(tiny_llama, tmp_path, method):
    _, path = tiny_llama
    mods = (("model.layers.0.mlp.down_proj", 4, 32), ("model.layers.0.self_attn.q_proj", 1, 32),
            ("model.layers.1.self_attn.v_proj", 3, 64), ("model.layers.1.self_attn.k_proj", 2, -1))  # fmt: skip
    cfg = PipelineConfig(quant=QuantConfig(2, 32), method=method, lm_head=QuantConfig(3, 32), module_quant=mods,
                         calib=CalibConfig(n_samples=4, seqlen=16))  # fmt: skip
    quantize_streaming(str(path), tmp_path / "q", cfg, progress=False)
    qc = read_quantization_config(tmp_path / "q")
    for name, b, g in mods:
        assert qc["modules"][name] == {"bits": b, "group_size": g}
    assert qc["modules"]["model.layers.1.mlp.up_proj"]["bits"] == 2 and qc["modules"]["lm_head"]["bits"] == 3
    model, _, _ = load_quantized(tmp_path / "q", fp16_kv=True)
    assert model.model.layers[0].mlp.down_proj.bits == 4
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    got = elutq.load(tmp_path / "q", float_tables=True).logits(ids)
    assert ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item() < 5e-5


def test_cli_target_bpw(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ELUTQ_CACHE", str(tmp_path / "cache"))
    model, path = tiny_llama
    # unrotated throughout, so every target reads one measurement (up to 3 bits `--rotate auto` would rotate,
    # and a rotated network has a measurement of its own: test_rotation.py)
    base = ["quantize", str(path), "--method", "rtn", "--group-size", "128", "--calib-samples", "4",
            "--calib-seqlen", "16", "--rotate", "none"]  # fmt: skip
    assert main([*base, "-o", str(tmp_path / "a"), "--target-bpw", "3.5"]) == 0
    out = capsys.readouterr().out
    assert "target 3.5 bits per weight ->" in out
    achieved = float(out.split("target 3.5 bits per weight -> ")[1].split()[0])
    n_params = sum(p.numel() for p in model.parameters())  # tied: the table once
    file_bpw = 8 * sum(f.stat().st_size for f in (tmp_path / "a").glob("*.safetensors")) / n_params
    assert 3.3 < achieved <= 3.5 and achieved <= file_bpw < achieved + 0.12  # the file: + safetensors headers
    assert len(list((tmp_path / "cache" / "measurements").glob("*.json"))) == 1
    assert main([*base, "-o", str(tmp_path / "b"), "--target-bpw", "2.75"]) == 0  # reuses the measurement
    assert len(list((tmp_path / "cache" / "measurements").glob("*.json"))) == 1
    sizes = {k: sum(f.stat().st_size for f in (tmp_path / k).glob("*.safetensors")) for k in "ab"}
    assert sizes["b"] < sizes["a"]
    with pytest.raises(SystemExit) as e:
        main([*base, "-o", str(tmp_path / "c"), "--target-bpw", "17"])
    assert e.value.code == 2 and "--target-bpw" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "d"), "--target-bpw", "1.5"]) == 2
    assert "below what the smallest setting everywhere reaches" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert main(["info", str(tmp_path / "a")]) == 0
    assert "settings (mixed precision): " in capsys.readouterr().out
    assert main([*base, "-o", str(tmp_path / "e"), "--target-bpw", "3.0", "--plan-only"]) == 0  # print, write nothing
    plan = capsys.readouterr().out
    assert "target 3.0 bits per weight ->" in plan and "model.layers.0.mlp.down_proj: w" in plan
    assert not (tmp_path / "e").exists() and len(list((tmp_path / "cache" / "measurements").glob("*.json"))) == 1
    assert main([*base, "-o", str(tmp_path / "f"), "--plan-only"]) == 2
    assert "pass --target-bpw too" in capsys.readouterr().err
    mods = read_quantization_config(tmp_path / "a")["modules"]
    assert len({(v["bits"], v["group_size"]) for v in mods.values()}) > 1  # a mix, not one setting
    json.dumps(mods)
