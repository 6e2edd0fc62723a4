"""HLQ-FT: the trainable view; block reconstruction and end-to-end tuning: error reduction,
never-worse, loading, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_llama
from elutq import finetune
from elutq.calibration import CalibConfig
from elutq.checkpoint import load_quantized, read_quantization_config, read_tensors
from elutq.finetune import (
    FinetuneConfig,
    TrainableHLQ,
    TrainableTiedRows,
    block_error,
    finetune_block,
    finetune_e2e,
    trainable_views,
)
from elutq.hlq import QuantConfig, dequantize, levels, quantize_weight
from elutq.modules import HLQLinear
from elutq.pipeline import PipelineConfig, quantize_streaming
from elutq.utils import ElutqError
from test_pipeline import assert_same_checkpoint, run_cli


def test_trainable_view_reproduces_hlqlinear_exactly(minilm_weights):
    w = minilm_weights["encoder.layer.0.intermediate.dense.weight"][:, :352]  # 352 = 2·128 + 96: short last group
    m = HLQLinear.from_quantized(quantize_weight(w, QuantConfig(3, 128)), torch.randn(w.shape[0]))
    v = TrainableHLQ(m)
    x = torch.randn(5, 7, 352)
    assert torch.equal(v(x), m(x))
    assert v.s.requires_grad and v.z.requires_grad and not v.codes.is_floating_point()
    # Linear in s, z: the gradient w.r.t. z of sum(W) is the number of columns of each group.
    v.weight().sum().backward()
    assert v.z.grad[0].tolist() == [128.0, 128.0, 96.0]
    # After training steps, writing back (fp16) gives an HLQLinear equal to the rounded view.
    with torch.no_grad():
        v.s.mul_(1.01).add_(1e-4)
        v.z.sub_(3e-4)
    v.round_()
    v.write_back(m)
    assert torch.equal(v(x), m(x))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "g"), [(352, 128), (349, 32), (349, 64), (349, -1)])
def test_native_decode_equals_the_torch_decode(minilm_weights, bits, n, g):
    """The native decode and its gradient (what training on the CPU runs) against ``hlq.dequantize`` and
    autograd through it: every width 1–4, rows that end mid-byte, one group a row."""
    w = minilm_weights["encoder.layer.0.intermediate.dense.weight"][:37, :n]
    v = TrainableHLQ(HLQLinear.from_quantized(quantize_weight(w, QuantConfig(bits, g)), None))
    g = v.group_size  # -1: one group a row
    assert torch.equal(v.weight(), dequantize(v.codes, v.s, v.z, g))
    upstream = torch.randn(37, n)
    (v.weight() * upstream).sum().backward()
    s, z = v.s.detach().clone().requires_grad_(), v.z.detach().clone().requires_grad_()
    (dequantize(v.codes, s, z, g) * upstream).sum().backward()
    torch.testing.assert_close(v.s.grad, s.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.z.grad, z.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_trainable_view_gradient_equals_autograd_through_the_decode(minilm_weights, native, monkeypatch):
    """The view's own backward (codes re-read, nothing per weight saved) against autograd through
    ``hlq.dequantize``'s gather, on real weights with a short last group, for the head's path (``weight``)
    and the tied embedding's (rows looked up); the native decode and the torch one (what CUDA runs)."""
    monkeypatch.setattr(finetune, "NATIVE_DECODE", native)
    w = minilm_weights["encoder.layer.0.intermediate.dense.weight"][:40, :352]
    v = TrainableHLQ(HLQLinear.from_quantized(quantize_weight(w, QuantConfig(3, 128)), None))
    upstream = torch.randn(40, 352)
    (v.weight() * upstream).sum().backward()
    s, z = v.s.detach().clone().requires_grad_(), v.z.detach().clone().requires_grad_()
    (dequantize(v.codes, s, z, 128) * upstream).sum().backward()
    torch.testing.assert_close(v.s.grad, s.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(v.z.grad, z.grad, rtol=1e-5, atol=1e-4)
    rows = TrainableTiedRows(v, torch.float32)
    ids = torch.tensor([[3, 3, 17], [0, 39, 3]])
    v.s.grad = v.z.grad = s.grad = z.grad = None
    (rows(ids) ** 2).sum().backward()
    (dequantize(v.codes[ids.flatten()], s[ids.flatten()], z[ids.flatten()], 128) ** 2).sum().backward()
    torch.testing.assert_close(v.s.grad, s.grad, rtol=1e-5, atol=1e-4)
    assert v.s.grad[3].abs().sum() > 0 and v.s.grad[1].abs().sum() == 0  # looked-up rows only


@pytest.fixture()
def tiny_ckpt(tmp_path: Path) -> tuple[Path, Path, CalibConfig]:
    """A 3-layer llama (widths 96/160: no group divides evenly at g=64), its RTN w2g32 checkpoint, calibration."""
    src = tmp_path / "src"
    save_tiny_llama(src, seed=1, hidden_size=96, intermediate_size=160, num_hidden_layers=3, max_position_embeddings=64)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. A lazy dog sleeps. " * 60)
    cfg = PipelineConfig(quant=QuantConfig(2, 32), method="rtn", lm_head=QuantConfig(4, 32))
    quantize_streaming(str(src), tmp_path / "q", cfg, progress=False)
    return src, tmp_path / "q", CalibConfig(n_samples=16, seqlen=32, dataset=None, text=str(text))


def ft_cfg(calib: CalibConfig, **kw) -> FinetuneConfig:
    return FinetuneConfig(**{"calib": calib, "batch_size": 2, "epochs": 4, "lr": 1e-3, **kw})


def test_block_reconstruction_reduces_error_and_loads(tiny_ckpt, tmp_path):
    import elutq

    src, q, calib = tiny_ckpt
    report = finetune_block(q, str(src), tmp_path / "ft", ft_cfg(calib), progress=False)
    starts = [r["start_val"] for r in report.layers]
    bests = [r["best_val"] for r in report.layers]
    assert len(report.layers) == 3 and all(b <= s for s, b in zip(starts, bests, strict=True)), report.layers
    assert sum(bests) < 0.8 * sum(starts), report.layers  # a real reduction, not a tie
    for r in report.layers:  # the held-out curve: the start, every evaluation, and the best state among them
        assert r["curve"][0] == [0, r["start_val"]] and r["curve"][-1][0] == r["steps"] and len(r["curve"]) == 5
        assert min(v for _, v in r["curve"]) == r["best_val"] and [r["best_step"], r["best_val"]] in r["curve"]
    hist = read_quantization_config(tmp_path / "ft")["finetune"][-1]
    assert hist["held_out_curves"] == [r["curve"] for r in report.layers]

    before, after = read_tensors(q), read_tensors(tmp_path / "ft")
    assert before.keys() == after.keys()
    for k in before:
        if k.startswith("model.layers.") and k.endswith((".scales", ".zeros")):
            assert after[k].dtype == torch.float16 and not torch.equal(before[k], after[k]), k
        else:  # codes, norms, embeddings and the lm_head are untouched
            assert torch.equal(before[k], after[k]), k

    model, tok, qc = load_quantized(tmp_path / "ft")
    assert qc["finetune"][0]["stage"] == "block" and qc["method"] == "rtn"
    ids = torch.tensor([tok("The lazy dog jumps over the quick brown fox.")["input_ids"]])
    with torch.no_grad():
        ref = model(ids).logits[0].float()
    runtime = elutq.load(str(tmp_path / "ft"), threads=1)
    got = torch.as_tensor(runtime.logits(ids[0].tolist()))
    torch.testing.assert_close(got.reshape(ref.shape), ref, atol=0.05 * ref.abs().max().item(), rtol=0)

    # Closer to the full-precision model than the checkpoint it started from, end to end.
    from elutq.models import load_model

    fp, _ = load_model(str(src))
    qm, _, _ = load_quantized(q)
    with torch.no_grad():
        target = fp(ids).logits[0]
        err_q = (qm(ids).logits[0] - target).pow(2).mean()
    assert (ref - target).pow(2).mean() < err_q


def test_block_error_sees_the_stream_as_the_next_norm_does():
    """Each token counts by its own scale (a sink token 1000x larger weighs as much as any other), a channel
    the next norm zeroes counts for nothing, and the error is the normed outputs' to first order."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 6, 16, generator=g)
    y[:, 0] *= 1000.0  # attention sinks
    d = 1e-3 * torch.randn(2, 6, 16, generator=g)
    w = torch.rand(16, generator=g) + 0.5
    w[3] = 0.0
    e = block_error(y + d, y, w)
    scaled = block_error(7.0 * (y + d), 7.0 * y, w)
    torch.testing.assert_close(e, scaled)
    d2 = d.clone()
    d2[..., 3] += 5.0  # only on the channel the norm drops
    torch.testing.assert_close(block_error(y + d2, y, w), e)
    mse = block_error(y + 1000.0 * d * (y.abs() > 100), y, None)  # plain MSE: the sinks' error swamps the rest
    assert mse[:, 0].sum() > 1e3 * mse[:, 1:].sum()

    def normed(t: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True)) * w

    # For an error orthogonal to the token's own stream, the norm's scale is unchanged to first order.
    y, d, w = y.double(), d.double(), w.double()
    d_perp = d - (d * y).sum(-1, keepdim=True) / y.pow(2).sum(-1, keepdim=True) * y
    first_order = (normed(y + d_perp) - normed(y)).pow(2).sum(-1) / normed(y).pow(2).sum(-1)
    torch.testing.assert_close(block_error(y + d_perp, y, w), first_order, rtol=1e-2, atol=0)


def test_never_returns_a_worse_state(tiny_ckpt, tmp_path):
    """A learning rate that wrecks training must leave the input parameters exactly as they were."""
    src, q, calib = tiny_ckpt
    report = finetune_block(q, str(src), tmp_path / "ft", ft_cfg(calib, lr=5.0), progress=False)
    assert all(r["best_val"] == r["start_val"] and r["best_step"] == 0 for r in report.layers), report.layers
    before, after = read_tensors(q), read_tensors(tmp_path / "ft")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reassign_codes_between_epochs(tiny_ckpt, tmp_path):
    """With ``reassign_codes`` codes may change between epochs; what is written is still the best
    held-out state, loads, and equals what the trainable view computed."""
    src, q, calib = tiny_ckpt
    report = finetune_block(q, str(src), tmp_path / "ft", ft_cfg(calib, reassign_codes=True), progress=False)
    assert all(r["best_val"] <= r["start_val"] for r in report.layers), report.layers
    before, after = read_tensors(q), read_tensors(tmp_path / "ft")
    changed = [k for k in before if k.endswith(".qweight") and not torch.equal(before[k], after[k])]
    assert changed, "no code was re-assigned"
    assert all(k.startswith("model.layers.") for k in changed)  # never the lm_head
    model, tok, _ = load_quantized(tmp_path / "ft")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    # The option is part of the stage's settings (a resume with the other value is refused).
    assert "reassign_codes" in ft_cfg(calib, reassign_codes=True).settings()
    assert "reassign_codes" not in ft_cfg(calib).settings()


def test_reassign_picks_the_nearest_level(minilm_weights):
    w = minilm_weights["encoder.layer.0.attention.self.query.weight"][:64]
    m = HLQLinear.from_quantized(quantize_weight(w, QuantConfig(2, 64)))
    v = TrainableHLQ(m)
    with torch.no_grad():
        v.s.mul_(1.3)  # levels move: some weights now sit nearer another level
    assert v.reassign_(w) > 0
    err = (v.weight() - w).abs()
    lv = levels(v.s.reshape(-1, 2), v.z.reshape(-1)).reshape(64, -1, 4)  # [out, ng, 4]
    grp = torch.arange(w.shape[1]) // 64
    best = (lv[:, grp, :] - w.unsqueeze(-1)).abs().amin(-1)
    torch.testing.assert_close(err, best, atol=1e-6, rtol=0)


def ft_args(src: Path, q: Path, out: Path, calib_text: Path, *extra: str) -> list[str]:
    return [
        "finetune", str(q), "--source", str(src), "-o", str(out), "--calib-text", str(calib_text),
        "--calib-samples", "16", "--calib-seqlen", "32", "--batch-size", "2", "--epochs", "2", "--lr", "1e-3",
        "--device", "cpu", *extra,
    ]  # fmt: skip


def test_crash_then_resume_gives_the_same_checkpoint(tiny_ckpt, tmp_path):
    src, q, calib = tiny_ckpt
    text = Path(calib.text)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    done = run_cli(ft_args(src, q, full, text))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out block error" in done.stdout
    crashed = run_cli(ft_args(src, q, resumed, text), env={"ELUTQ_TEST_CRASH_AFTER_LAYER": "1"})
    assert crashed.returncode == 17 and not resumed.exists()
    assert json.loads((tmp_path / "resumed.partial" / "progress.json").read_text())["layers_done"] == 2
    again = run_cli(ft_args(src, q, resumed, text))
    assert again.returncode == 2 and "--resume" in again.stderr
    other = run_cli(ft_args(src, q, resumed, text, "--resume", "--lr", "2e-3"))
    assert other.returncode == 2 and "settings" in other.stderr
    done = run_cli(ft_args(src, q, resumed, text, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed after layer 1" in done.stdout and not (tmp_path / "resumed.partial").exists()
    assert_same_checkpoint(full, resumed)


def test_source_that_does_not_match(tiny_ckpt, tmp_path):
    _, q, calib = tiny_ckpt
    wider = tmp_path / "wider"
    save_tiny_llama(wider, seed=1, hidden_size=128, intermediate_size=160, num_hidden_layers=3)
    with pytest.raises(ElutqError, match="hidden_size is 128, not 96"):
        finetune_block(q, str(wider), tmp_path / "ft", ft_cfg(calib), progress=False)
    other = tmp_path / "other"  # same shapes, other weights
    save_tiny_llama(
        other, seed=2, hidden_size=96, intermediate_size=160, num_hidden_layers=3, max_position_embeddings=64
    )
    with pytest.raises(ElutqError, match="embeddings differ"):
        finetune_block(q, str(other), tmp_path / "ft", ft_cfg(calib), progress=False)
    with pytest.raises(ElutqError, match="not a checkpoint directory"):
        finetune_block(tmp_path / "nothing", str(other), tmp_path / "ft", ft_cfg(calib), progress=False)
    assert not (tmp_path / "ft").exists()


def test_trainable_views_replace_every_hlq_linear(tiny_ckpt):
    _, q, _ = tiny_ckpt
    model, _, _ = load_quantized(q)
    layer = model.model.layers[0]
    views = trainable_views(layer)
    assert len(views) == 7 and not any(isinstance(m, HLQLinear) for m in layer.modules())


# ----------------------------------------------------------------------------- end to end


def e2e_cfg(calib: CalibConfig, **kw) -> FinetuneConfig:
    return FinetuneConfig(**{"stage": "e2e", "calib": calib, "batch_size": 2, "epochs": 3, "lr": 1e-4, **kw})


def _kl_to_source(src: Path, ckpt: Path, ids: torch.Tensor) -> float:
    from elutq.models import load_model

    fp, _ = load_model(str(src))
    qm, _, _ = load_quantized(ckpt)
    with torch.no_grad():
        p = fp(ids).logits.float().log_softmax(-1)
        q = qm(ids).logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_e2e_reduces_the_loss_and_writes_a_normal_checkpoint(tiny_ckpt, tmp_path, loss):
    import elutq

    src, q, calib = tiny_ckpt
    report = finetune_e2e(q, str(src), tmp_path / "ft", e2e_cfg(calib, loss=loss), progress=False)
    r = report.e2e
    assert r["loss"] == loss and r["steps"] == 3 * 7 and r["best_step"] > 0
    assert r["best_val"] < (0.9 if loss == "kl" else 0.99) * r["start_val"], r
    assert r["curve"][0] == [0, r["start_val"]] and r["curve"][-1][0] == r["steps"]
    assert min(v for _, v in r["curve"]) == r["best_val"] and [r["best_step"], r["best_val"]] in r["curve"]

    before, after = read_tensors(q), read_tensors(tmp_path / "ft")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith((".scales", ".zeros")) for k in changed), changed  # codes never move
    assert any(k.startswith("lm_head.") for k in changed)  # the 4-bit lm_head is tuned too

    _, tok, qc = load_quantized(tmp_path / "ft")
    assert qc["finetune"][-1]["stage"] == "e2e" and qc["finetune"][-1]["settings"]["loss"] == loss
    ids = torch.tensor([tok("The lazy dog jumps over the quick brown fox. A dog.")["input_ids"]])
    if loss == "kl":  # on text it was not trained on, closer to the full-precision model
        assert _kl_to_source(src, tmp_path / "ft", ids) < _kl_to_source(src, q, ids)
    assert elutq.load(str(tmp_path / "ft"), threads=1).generate("The lazy", max_new_tokens=4).token_ids
    assert not (tmp_path / "ft.partial").exists()


def test_e2e_in_bf16_trains_as_fp32_does(tiny_ckpt, tmp_path):
    # bf16 matmuls in the training steps only: the held-out checks are fp32, so the two runs' curves compare
    src, q, calib = tiny_ckpt
    runs = {p: finetune_e2e(q, str(src), tmp_path / p, e2e_cfg(calib, precision=p), progress=False).e2e
            for p in ("fp32", "bf16")}  # fmt: skip
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16["start_val"] == fp32["start_val"]  # the same fp32 check of the same starting point
    assert bf16["best_val"] < 0.9 * bf16["start_val"], bf16
    gain = {p: r["start_val"] - r["best_val"] for p, r in runs.items()}
    assert abs(gain["bf16"] / gain["fp32"] - 1) < 0.1, gain
    assert read_tensors(tmp_path / "bf16").keys() == read_tensors(tmp_path / "fp32").keys()
    _, _, qc = load_quantized(tmp_path / "bf16")
    assert qc["finetune"][-1]["settings"]["precision"] == "bf16"
    _, _, qc = load_quantized(tmp_path / "fp32")
    assert "precision" not in qc["finetune"][-1]["settings"]  # as recorded before the option


def test_chunked_loss_equals_the_whole_vocabulary_loss(tiny_ckpt, monkeypatch):
    # The loss in slices of 5 positions (recomputed in the backward pass) against one [B, T, vocab] formula:
    # the same value and the same gradients, for the KL (whole teacher) and the causal-LM loss.
    from elutq import finetune as ft
    from elutq.models import load_model

    src, q, _ = tiny_ckpt
    ids = torch.randint(0, 200, (2, 13), generator=torch.Generator().manual_seed(0))
    fp, _ = load_model(str(src))
    with torch.no_grad():
        logp = fp(ids).logits.float().log_softmax(-1).half().float()  # as the teacher files store it
    for loss in ("kl", "ce"):
        grads = []
        for rows in (5, None):
            model, _, _ = load_quantized(q)
            views = trainable_views(model)
            if rows is None:  # the reference: whole logits, one formula
                logits = model(input_ids=ids).logits.float()
                if loss == "kl":
                    value = (logp.exp() * (logp - logits.log_softmax(-1))).sum(-1).mean()
                else:
                    value = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            else:
                monkeypatch.setattr(ft, "LOSS_ROWS", rows)
                value = ft.e2e_loss(model, ids, {"logp": logp} if loss == "kl" else None)
            value.backward()
            grads.append((value.item(), [views[n].s.grad.clone() for n in sorted(views)]))
        (a, ga), (b, gb) = grads
        assert a == pytest.approx(b, rel=1e-5), loss
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, rtol=2e-3, atol=1e-6)


def test_topk_teacher_kl_is_a_bound_that_is_exact_at_full_width():
    from elutq.finetune import _kl_rows, _teacher_record

    g = torch.Generator().manual_seed(0)
    logp = (3 * torch.randn(6, 50, generator=g)).log_softmax(-1)
    student = torch.randn(6, 50, generator=g)
    full = _kl_rows(student, _teacher_record(logp, 0))
    assert "logp" in _teacher_record(logp, 50)  # k >= vocab: the whole distribution
    exact = _kl_rows(student, _teacher_record(logp, 49))  # one token left in the rest: the same partition
    assert exact.item() == pytest.approx(full.item(), rel=1e-3)  # (the whole teacher is stored in fp16)
    for k in (1, 4, 16):
        rec = _teacher_record(logp, k)
        assert rec["top_index"].shape == (6, k) and rec["rest_logp"].shape == (6,)
        assert torch.allclose((rec["top_logp"].exp().sum(-1) + rec["rest_logp"].exp()), torch.ones(6), atol=1e-5)
        assert 0 <= _kl_rows(student, rec).item() <= full.item() * (1 + 1e-3)  # coarser bins: never more


def test_e2e_with_a_topk_teacher(tiny_ckpt, tmp_path, monkeypatch):
    from elutq import finetune as ft

    src, q, calib = tiny_ckpt
    kept = []
    real = ft._teacher_record
    monkeypatch.setattr(ft, "_teacher_record", lambda logp, k: kept.append(real(logp, k)) or kept[-1])
    report = finetune_e2e(q, str(src), tmp_path / "ft", e2e_cfg(calib, teacher_topk=8), progress=False)
    assert kept and all(set(r) == {"top_logp", "top_index", "rest_logp"} and r["top_index"].shape[-1] == 8
                        for r in kept)  # fmt: skip
    r = report.e2e
    assert r["best_step"] > 0 and r["best_val"] < 0.9 * r["start_val"], r
    _, _, qc = load_quantized(tmp_path / "ft")
    assert qc["finetune"][-1]["settings"]["teacher_topk"] == 8
    with pytest.raises(ValueError, match="teacher_topk"):
        FinetuneConfig(stage="e2e", teacher_topk=-1)


def test_e2e_never_returns_a_worse_state(tiny_ckpt, tmp_path):
    src, q, calib = tiny_ckpt
    report = finetune_e2e(q, str(src), tmp_path / "ft", e2e_cfg(calib, lr=5.0, epochs=1), progress=False)
    assert report.e2e["best_step"] == 0 and report.e2e["best_val"] == report.e2e["start_val"]
    before, after = read_tensors(q), read_tensors(tmp_path / "ft")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_e2e_crash_then_resume_and_block_then_e2e(tiny_ckpt, tmp_path):
    src, q, calib = tiny_ckpt
    text = Path(calib.text)
    e2e = ["--stage", "e2e", "--eval-every", "4", "--lr", "1e-4"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    done = run_cli(ft_args(src, q, full, text, *e2e))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out KL to the source model per token" in done.stdout
    crashed = run_cli(ft_args(src, q, resumed, text, *e2e), env={"ELUTQ_TEST_CRASH_AFTER_STEP": "8"})
    assert crashed.returncode == 17 and not resumed.exists()
    assert json.loads((tmp_path / "resumed.partial" / "progress.json").read_text())["step"] == 8
    done = run_cli(ft_args(src, q, resumed, text, *e2e, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed after step 8" in done.stdout and not (tmp_path / "resumed.partial").exists()
    assert_same_checkpoint(full, resumed)
    curves = [read_quantization_config(d)["finetune"][-1]["held_out_curve"] for d in (full, resumed)]
    assert curves[0] == curves[1] and [k for k, _ in curves[0]][:3] == [0, 4, 8]  # the resumed run kept its start
    assert "held-out curve (step: loss): 0: " in done.stdout

    both = tmp_path / "both"
    done = run_cli(ft_args(src, q, both, text, "--stage", "block,e2e"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "block reconstruction" in done.stdout and "end-to-end tuning (kl)" in done.stdout
    _, _, qc = load_quantized(both)
    assert [h["stage"] for h in qc["finetune"]] == ["block", "e2e"]
    assert not (tmp_path / "both.block").exists()


def test_e2e_bad_settings_are_refused_and_write_nothing(tiny_ckpt, tmp_path):
    src, q, calib = tiny_ckpt
    with pytest.raises(ValueError, match="stage must be"):
        FinetuneConfig(stage="layers")
    with pytest.raises(ValueError, match="loss must be"):
        FinetuneConfig(stage="e2e", loss="mse")
    with pytest.raises(ValueError, match="block_loss must be"):
        FinetuneConfig(block_loss="l1")
    with pytest.raises(ValueError, match="precision must be"):
        FinetuneConfig(stage="e2e", precision="fp16")
    with pytest.raises(ValueError, match="stage='e2e'"):
        finetune_e2e(q, str(src), tmp_path / "ft", FinetuneConfig(calib=calib), progress=False)
    few = CalibConfig(n_samples=2, seqlen=32, dataset=None, text=calib.text)  # one chunk: none left to train on
    with pytest.raises(ElutqError, match="none for training"):
        finetune_e2e(q, str(src), tmp_path / "ft", e2e_cfg(few), progress=False)
    assert not (tmp_path / "ft").exists()


def test_quantize_finetune_equals_quantize_then_finetune(tiny_ckpt, tmp_path):
    """`quantize --finetune e2e` = `quantize` then `finetune --stage e2e` (same defaults), bit for bit."""
    src, q, calib = tiny_ckpt
    text = Path(calib.text)
    quant = ["--method", "rtn", "--bits", "2", "--group-size", "32", "--lm-head-group-size", "32"]
    one = tmp_path / "one"
    done = run_cli([
        "quantize", str(src), "-o", str(one), *quant, "--finetune", "e2e", "--calib-text", str(text),
        "--ft-calib-samples", "16", "--ft-calib-seqlen", "32", "--ft-batch-size", "2", "--ft-epochs", "2",
        "--ft-lr", "1e-3", "--ft-device", "cpu",
    ])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "end-to-end tuning (kl)" in done.stdout and not (tmp_path / "one.quantized").exists()
    two_q = tmp_path / "two_q"
    assert run_cli(["quantize", str(src), "-o", str(two_q), *quant]).returncode == 0
    two = tmp_path / "two"
    done = run_cli(ft_args(src, two_q, two, text, "--stage", "e2e"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_checkpoint(one, two)
    # An existing output is refused before any quantization work.
    again = run_cli(["quantize", str(src), "-o", str(one), *quant, "--finetune", "e2e"])
    assert again.returncode == 2 and "--overwrite" in again.stderr and not (tmp_path / "one.quantized").exists()


def test_block_and_e2e_on_quantized_embeddings(tiny_ckpt, tmp_path):
    """A checkpoint with HLQ embeddings: block reconstruction feeds its layers the quantized rows, e2e tunes
    every linear and leaves the embedding (a lookup) as it is; both write checkpoints that load."""
    import elutq

    src, _, calib = tiny_ckpt
    cfg = PipelineConfig(quant=QuantConfig(2, 32), method="rtn", lm_head=QuantConfig(4, 32), embed=QuantConfig(3, 32))
    q = tmp_path / "qe"
    quantize_streaming(str(src), q, cfg, progress=False)
    block = finetune_block(q, str(src), tmp_path / "ft-block", ft_cfg(calib, epochs=1), progress=False)
    assert all(r["best_val"] <= r["start_val"] for r in block.layers)
    finetune_e2e(tmp_path / "ft-block", str(src), tmp_path / "ft", e2e_cfg(calib), progress=False)
    before, after = read_tensors(q), read_tensors(tmp_path / "ft")
    assert before.keys() == after.keys() and "model.embed_tokens.weight" not in after
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith("model.embed_tokens.") for k in changed)
    assert any(k.startswith("lm_head.") for k in changed)
    assert elutq.load(str(tmp_path / "ft"), threads=1).generate("The lazy", max_new_tokens=4).token_ids


def test_e2e_trains_a_shared_head_and_embedding_as_one_tensor(tiny_ckpt, tmp_path):
    """Head and embeddings stored as one tensor: e2e's embedding reads the head's trainable scales (the
    loss reaches them through the lookup too), and the result still stores one tensor, which changed."""
    import elutq

    _, _, calib = tiny_ckpt
    src = tmp_path / "tied"
    save_tiny_llama(src, seed=1, hidden_size=96, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=64,
                    tie_word_embeddings=True)  # fmt: skip
    cfg = PipelineConfig(quant=QuantConfig(2, 32), method="rtn", lm_head=QuantConfig(4, 32), embed=QuantConfig(4, 32))
    q = tmp_path / "shared"
    quantize_streaming(str(src), q, cfg, progress=False)
    model, _, _ = load_quantized(q)
    ids = torch.tensor([[5, 1, 200, 5]])
    with torch.no_grad():
        before = model.model.embed_tokens(ids)
    views = trainable_views(model)
    rows = model.model.embed_tokens(ids)
    assert torch.equal(rows, before)  # the same rows before training
    rows.sum().backward()
    assert views["lm_head"].s.grad is not None and views["lm_head"].s.grad[5].abs().sum() > 0

    finetune_e2e(q, str(src), tmp_path / "ft", e2e_cfg(calib), progress=False)
    before_t, after_t = read_tensors(q), read_tensors(tmp_path / "ft")
    assert before_t.keys() == after_t.keys() and not any(k.startswith("model.embed_tokens.") for k in after_t)
    assert not torch.equal(before_t["lm_head.scales"], after_t["lm_head.scales"])
    assert read_quantization_config(tmp_path / "ft")["modules"]["model.embed_tokens"]["shared_with"] == "lm_head"
    assert elutq.load(str(tmp_path / "ft"), threads=1).generate("The lazy", max_new_tokens=4).token_ids


def test_native_decode_refuses_mismatched_shapes():
    """The binding checks every shape against the bit-planes before touching memory."""
    from elutq.kernels import decode_planes, decode_planes_grad

    q = torch.zeros(2, 4, 2, dtype=torch.uint8)  # 2 bits, 4 rows, 16 columns
    with pytest.raises(ValueError, match="scales must be"):
        decode_planes(q, torch.zeros(4, 2, 3), torch.zeros(4, 2), 16, 8)  # 3 scales a group for 2 planes
    with pytest.raises(ValueError, match="qweight must be"):
        decode_planes(q, torch.zeros(4, 1, 2), torch.zeros(4, 1), 32, 32)  # 32 columns need 4 bytes a row
    with pytest.raises(ValueError, match="grad must be"):
        decode_planes_grad(q, torch.zeros(5, 16), 8)
