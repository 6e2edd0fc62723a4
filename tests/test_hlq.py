"""The HLQ format: fitting, the uniform special case, packing, short groups, storage cost."""

from __future__ import annotations

import pytest
import torch

from elutq import hlq as H
from elutq.hlq import (
    QuantConfig,
    bits_per_weight,
    decode,
    fit_hlq_adam,
    fit_hlq_als,
    fit_uniform_minmax,
    pack_bitplanes,
    quantize_weight,
    uniform_codes,
    unpack_bitplanes,
    weighted_sq_error,
)

MATRICES = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.3.intermediate.dense.weight",
    "encoder.layer.5.output.dense.weight",
]


def mse(w: torch.Tensor, cfg: QuantConfig, **kw) -> float:
    return (quantize_weight(w, cfg, **kw).dequantize() - w).pow(2).mean().item()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_als_error_never_increases(minilm_weights, bits):
    w = minilm_weights[MATRICES[1]].reshape(-1, 64)
    h = torch.rand(1, 64) + 0.1  # a weighted objective must be monotone too
    history: list[float] = []
    fit_hlq_als(w, bits, h, iters=15, history=history)
    assert len(history) == 16
    assert all(b <= a for a, b in zip(history, history[1:], strict=False)), history
    assert history[-1] < history[0]  # and it actually improves on the uniform start


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_native_fit_assign_dequantize_match_torch_on_real_weights(minilm_weights, bits, group_size):
    """csrc/fit.cpp against the torch reference, on real weights: the same fitted parameters up to summation
    order (every group's error within 1e-5 of the reference's, the total within 1e-6), the same codes and the
    same dequantized floats bit for bit; weighted (per-group and shared) and padded groups included."""
    torch.manual_seed(0)
    w = minilm_weights[MATRICES[2]][:, :1000]  # [384, 1000]: a short last group at every group size
    g = 1000 if group_size == -1 else group_size
    rows = H._group_rows(w, g)
    for h in (torch.rand(1, g) + 0.1, torch.rand(rows.shape[0], g)):
        s, z = fit_hlq_als(rows, bits, h, iters=20)
        rs, rz = H.fit_hlq_als_reference(rows, bits, h, iters=20)
        err = weighted_sq_error(rows, decode(H.assign_nearest_reference(rows, s, z), s, z), h)
        ref = weighted_sq_error(rows, decode(H.assign_nearest_reference(rows, rs, rz), rs, rz), h)
        assert torch.all(err <= ref * (1 + 1e-5) + 1e-12), (err - ref).max()
        assert abs(err.sum() / ref.sum() - 1) < 1e-6
        s16, z16 = s.half().float(), z.half().float()
        assert torch.equal(H.assign_nearest(rows, s16, z16), H.assign_nearest_reference(rows, s16, z16))
    qw = quantize_weight(w, QuantConfig(bits, group_size))
    lv = [H.levels(qw.scales[:, i].float(), qw.zeros[:, i].float()) for i in range(qw.scales.shape[1])]
    ref_w = torch.cat([lv[i].gather(1, qw.codes[:, c : c + g].long()) for i, c in enumerate(range(0, 1000, g))], 1)
    assert torch.equal(qw.dequantize(), ref_w)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_hlq_error_not_above_uniform_on_real_weights(minilm_weights, bits, group_size):
    for name in MATRICES:
        w = minilm_weights[name]
        hlq = mse(w, QuantConfig(bits, group_size, "hlq"))
        uni = mse(w, QuantConfig(bits, group_size, "uniform"))
        assert hlq <= uni, (name, hlq, uni)
        if bits <= 3:
            assert hlq < 0.9 * uni  # non-uniform levels pay off most at low bits


def straightforward_int_q(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Textbook asymmetric min-max INT-q per group, with fp16 scale and offset."""
    groups = w.reshape(-1, g)
    lo, hi = groups.min(1, keepdim=True).values, groups.max(1, keepdim=True).values
    delta = ((hi - lo) / (2**bits - 1)).half().float()
    zero = lo.half().float()
    q = torch.clamp(torch.round((groups - zero) / torch.where(delta == 0, 1.0, delta)), 0, 2**bits - 1)
    return (zero + q * delta).reshape(w.shape)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_uniform_special_case_equals_int_q(minilm_weights, bits):
    w = minilm_weights[MATRICES[0]]
    qw = quantize_weight(w, QuantConfig(bits, 64, "uniform"))
    torch.testing.assert_close(qw.dequantize(), straightforward_int_q(w, bits, 64), rtol=0, atol=0)
    # and its per-plane scales really are 2^i·Δ
    s = qw.scales.float()
    torch.testing.assert_close(s, s[..., :1] * 2.0 ** torch.arange(bits), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("width", [8, 13, 576, 1000])
def test_pack_unpack_round_trip(bits, width):
    codes = torch.randint(0, 2**bits, (7, width), dtype=torch.uint8)
    packed = pack_bitplanes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (bits, 7, (width + 7) // 8)
    assert torch.equal(unpack_bitplanes(packed, width), codes)


def test_pack_layout_is_lsb_first():
    codes = torch.zeros(1, 16, dtype=torch.uint8)
    codes[0, 0] = 0b01  # plane 0, column 0 → byte 0 bit 0
    codes[0, 9] = 0b10  # plane 1, column 9 → byte 1 bit 1
    packed = pack_bitplanes(codes, 2)
    assert packed[0, 0].tolist() == [1, 0] and packed[1, 0].tolist() == [0, 2]


@pytest.mark.parametrize("fmt", ["hlq", "uniform"])
def test_short_last_group_costs_no_accuracy(minilm_weights, fmt):
    """576 = 4·128 + 64: the padded last group fits exactly as a standalone 64-column group would."""
    w = minilm_weights[MATRICES[2]][:, :576].contiguous()  # [384, 1536] → [384, 576]
    qw = quantize_weight(w, QuantConfig(2, 128, fmt))
    assert qw.scales.shape == (w.shape[0], 5, 2) and qw.codes.shape == w.shape
    tail = quantize_weight(w[:, 512:].contiguous(), QuantConfig(2, -1, fmt))
    torch.testing.assert_close(qw.scales[:, 4], tail.scales[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(qw.zeros[:, 4], tail.zeros[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(qw.dequantize()[:, 512:], tail.dequantize(), rtol=0, atol=0)


def test_importance_weighting_lowers_weighted_error(minilm_weights):
    w = minilm_weights[MATRICES[2]]
    importance = torch.rand(w.shape[1]) ** 4 * 100  # a few columns matter a lot
    plain = quantize_weight(w, QuantConfig(2, 128))
    weighted = quantize_weight(w, QuantConfig(2, 128), importance=importance)

    def werr(q):
        return ((q.dequantize() - w) ** 2 * importance).sum().item()

    assert werr(weighted) < 0.95 * werr(plain)


def test_adam_variant_improves_on_uniform_start(minilm_weights):
    w = minilm_weights[MATRICES[0]][:64].reshape(-1, 128)
    h = torch.ones(1, 128)
    s0, z0 = fit_uniform_minmax(w, 2)
    start = weighted_sq_error(w, decode(uniform_codes(w, s0, z0), s0, z0), h).sum()
    s, z = fit_hlq_adam(w, 2, h, steps=100, lr=3e-3)
    from elutq.hlq import assign_nearest

    adam = weighted_sq_error(w, decode(assign_nearest(w, s, z), s, z), h).sum()
    assert adam < 0.8 * start


def test_stored_parameters_are_fp16_and_define_the_values(minilm_weights):
    w = minilm_weights[MATRICES[0]]
    qw = quantize_weight(w, QuantConfig(3, 128))
    assert qw.scales.dtype == torch.float16 and qw.zeros.dtype == torch.float16
    levels = (
        qw.zeros.float().unsqueeze(-1)
        + qw.scales.float() @ torch.tensor([[(k >> i) & 1 for i in range(3)] for k in range(8)], dtype=torch.float32).T
    )
    manual = levels.repeat_interleave(128, dim=1).gather(2, qw.codes.long().unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(qw.dequantize(), manual)


def test_bits_per_weight():
    assert bits_per_weight(2, 128) == 2.375
    assert bits_per_weight(2, 64) == 2.75
    assert bits_per_weight(3, 128) == 3.5


@pytest.mark.parametrize("kwargs", [{"bits": 0}, {"bits": 5}, {"group_size": 48}, {"group_size": 0}, {"format": "nf4"}])
def test_bad_config_is_rejected_with_a_fix(kwargs):
    with pytest.raises(ValueError, match="must be"):
        QuantConfig(**kwargs)


def test_non_finite_weights_are_rejected():
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(w, QuantConfig())
