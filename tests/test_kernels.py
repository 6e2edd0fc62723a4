"""Native LUT kernels against a float64 oracle that decodes the same quantized parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from elutq import _native
from elutq import kernels as K
from elutq.hlq import QuantConfig, QuantizedWeight, quantize_weight

X86_PATHS = ("scalar", "avx2", "avx512")
PATHS = [
    pytest.param(p, marks=pytest.mark.skipif(p not in K.available_paths(), reason=f"CPU lacks {p}")) for p in X86_PATHS
]


def random_qw(out: int, inf: int, bits: int, g: int, seed: int = 0, integer: bool = False) -> QuantizedWeight:
    """Random HLQ parameters (g = -1: one group per row).  ``integer``: small-integer s and z."""
    rng = np.random.default_rng(seed)
    gg = inf if g == -1 else g
    ng = math.ceil(inf / gg)
    codes = rng.integers(0, 1 << bits, size=(out, inf), dtype=np.uint8)
    if integer:
        s = rng.integers(1, 5, size=(out, ng, bits)).astype(np.float16)
        z = rng.integers(-8, 9, size=(out, ng)).astype(np.float16)
    else:
        s = (rng.uniform(0.5, 1.5, size=(out, ng, bits)) * 2.0 ** np.arange(bits) * 0.01).astype(np.float16)
        z = (-s.astype(np.float32).sum(-1) / 2 + rng.normal(0, 0.002, size=(out, ng))).astype(np.float16)
    return QuantizedWeight(torch.from_numpy(codes), torch.from_numpy(s), torch.from_numpy(z), gg)


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


SHAPES = [(37, 576, 128), (16, 128, 128), (50, 200, 64), (33, 96, 32), (5, 40, -1), (70, 576, -1)]


# ----------------------------------------------------------------------------- repack


def test_repack_layout_matches_definition() -> None:
    """Every chunk byte holds the documented nibbles (lut.h): p = 4m + j, runs k0 + j / k0 + 4 + j."""
    out, inf, bits, g = 20, 72, 3, 32
    qw = random_qw(out, inf, bits, g, seed=1)
    w, sz, gk = K.repack(qw.pack(), qw.scales, qw.zeros, inf, g)
    assert gk == 32
    nrb, ng, nl = 2, 3, 1
    w = w.reshape(nrb, ng, bits, nl, 64)
    sz = sz.view(np.float16).reshape(nrb, ng, bits + 1, 16)
    codes = qw.codes.numpy()

    def nib(i: int, r: int, k: int) -> int:
        if r >= out:
            return 0
        v = 0
        for t in range(4):
            c = 4 * k + t
            if c < inf:
                v |= ((int(codes[r, c]) >> i) & 1) << t
        return v

    for rb in range(nrb):
        for G in range(ng):
            for i in range(bits):
                for p in range(64):
                    m, j = divmod(p, 4)
                    k0 = G * g // 4
                    r = 16 * rb + m
                    assert w[rb, G, i, 0, p] == nib(i, r, k0 + j) | (nib(i, r, k0 + 4 + j) << 4)
            for m in range(16):
                r = 16 * rb + m
                want_s = qw.scales[r, G].numpy() if r < out else np.zeros(bits, np.float16)
                want_z = qw.zeros[r, G].numpy() if r < out else np.float16(0)
                np.testing.assert_array_equal(sz[rb, G, :bits, m], want_s)
                assert sz[rb, G, bits, m] == want_z


def test_repack_per_channel_replicates_parameters() -> None:
    qw = random_qw(9, 300, 2, -1, seed=2)
    w, sz, gk = K.repack(qw.pack(), qw.scales, qw.zeros, 300, 300)
    assert gk == 128
    sz = sz.view(np.float16).reshape(1, 3, 3, 16)
    for G in range(3):
        np.testing.assert_array_equal(sz[0, G, :2, :9].T, qw.scales[:, 0].numpy())
        np.testing.assert_array_equal(sz[0, G, 2, :9], qw.zeros[:, 0].numpy())


def test_repack_rejects_bad_input() -> None:
    qw = random_qw(8, 64, 2, 32)
    with pytest.raises(ValueError, match="bytes per row"):
        K.repack(qw.pack(), qw.scales, qw.zeros, 72, 32)
    with pytest.raises(TypeError, match="float16"):
        K.repack(qw.pack(), qw.scales.float(), qw.zeros, 64, 32)
    with pytest.raises(ValueError, match="do not match"):
        K.repack(qw.pack(), qw.scales[:, :1], qw.zeros, 64, 32)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_float_tables_match_reference(bits: int, shape: tuple[int, int, int]) -> None:
    out, inf, g = shape
    lin = K.LUTLinear(random_qw(out, inf, bits, g, seed=bits), path="scalar")
    x = np.random.default_rng(3).normal(size=(3, inf)).astype(np.float32)
    assert rel_err(lin(x, float_tables=True), lin.reference(x)) < 1e-5


def int8_error_bound(lin: K.LUTLinear, x: np.ndarray) -> float:
    """Expected mean squared output error of the int8-table path.

    The integer lookup sums are exact, so the only error is rounding each (signed) table entry to
    the integer grid of its run: the kernel computes (b·x) = Δ_G·Σ_k mult_k·q_k + Σx/2 with Δ_G the
    group's lut_scale (max|U|/(254·B), csrc/lut.h) and mult_k ∈ 1..B the run's multiplier, so
    each lookup is off by Δ_G·mult_k·δ, δ uniform in ±1/2, variance (Δ_G·mult_k)²/12.  Planes of the
    same run may hit the same (equally rounded) entry, so the per-run error is at most
    (Σ_i |s_i|)·Δ_G·mult_k·δ.  Hence, per output,
        E[err²] ≤ Σ_G Σ_k ((Δ_G·mult_k)²/12)·(Σ_i |s_i|)²
    (entries at the group's peak round to themselves; padded runs have no error).  Outputs sharing
    one x share its rounding errors, so the sample mean is noisy: tests use 16 input vectors and
    allow 1.5× the expectation; a real bug (wrong nibble, table, sign or scale) is off by orders of magnitude.
    """
    g = K.kernel_group_size(lin.in_features, lin.group_size)
    ng = math.ceil(lin.in_features / g)
    s = np.abs(lin._scales.numpy().astype(np.float64)).sum(-1)  # [out, ng_orig]
    gmap = (np.arange(ng) * g) // lin.group_size
    s = s[:, gmap]  # [out, ng]
    total = 0.0
    for xc in x:
        tq, tm = np.empty(ng * g * 4, np.int8), np.empty(ng * g // 4, np.uint8)
        ls, xs = np.empty(ng, np.float32), np.empty(ng, np.float32)
        _native.build_tables(xc, g, tq, tm, ls, xs, "scalar")
        real = (np.arange(ng * g // 4) * 4 < lin.in_features).reshape(ng, -1)  # runs with real columns
        m2 = ((tm.reshape(ng, -1).astype(np.float64) ** 2) * real).sum(1)  # Σ_k mult_k² per group
        total += float(((m2 * ls.astype(np.float64) ** 2 / 12) * s**2).sum(1).mean())
    return total / len(x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_tables_within_rounding_bound(path: str, bits: int, shape: tuple[int, int, int]) -> None:
    out, inf, g = shape
    lin = K.LUTLinear(random_qw(out, inf, bits, g, seed=10 + bits), path=path)
    x = np.random.default_rng(4).normal(size=(16, inf)).astype(np.float32)
    mse = float(((lin(x).astype(np.float64) - lin.reference(x)) ** 2).mean())
    assert mse <= 1.5 * int8_error_bound(lin, x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("shape", [(37, 576, 128), (50, 200, 64), (70, 576, -1)])
def test_residual_tables_within_their_rounding_bound(path: str, bits: int, shape: tuple[int, int, int]) -> None:
    """The residual pass rounds the int8 tables' error on a grid 254× finer, so what is left is the
    int8 bound / 254² (plus float rounding); GEMM columns equal the GEMV."""
    out, inf, g = shape
    lin = K.LUTLinear(random_qw(out, inf, bits, g, seed=20 + bits), path=path)
    x = np.random.default_rng(5).normal(size=(16, inf)).astype(np.float32)
    x[:, 3] *= 20  # an outlier channel: its runs get their own multipliers
    y = lin(x, residual_tables=True)
    mse = float(((y.astype(np.float64) - lin.reference(x)) ** 2).mean())
    assert mse <= 1.5 * int8_error_bound(lin, x) / 254**2 + 1e-10
    np.testing.assert_array_equal(lin(x[2], residual_tables=True), y[2])


@pytest.mark.parametrize("path", [p for p in PATHS if p.values[0] != "scalar"])
@pytest.mark.parametrize("bits", [2, 3])
def test_fused_residual_lookups_equal_the_two_pass_scalar_result(path: str, bits: int) -> None:
    """AVX2 and AVX-512 look both table sets up in one pass over the weights; scalar runs the residual
    as a second pass.  The tables and integer sums are the same on every path, so the results may
    differ only by float rounding — far below the residual bound.  Columns 1, 3 and 16 exercise the
    GEMV and GEMMs of several column counts."""
    qw = random_qw(83, 576, bits, 128, seed=30 + bits)
    x = np.random.default_rng(8).normal(size=(16, 576)).astype(np.float32)
    x[:, 7] *= 25
    lin, ref = K.LUTLinear(qw, path=path), K.LUTLinear(qw, path="scalar")
    scale = float(np.abs(ref.reference(x)).max())
    for cols in (x[0], x[:3], x):
        np.testing.assert_allclose(lin(cols, residual_tables=True), ref(cols, residual_tables=True), rtol=0,
                                   atol=2e-6 * scale)


@pytest.mark.parametrize("path", PATHS)
def test_tables_built_in_group_chunks_over_threads_match_one_thread(path: str) -> None:
    """A column's tables are built in chunks of groups spread over the threads (17 groups here, the last
    one short): the outputs must equal a one-thread build's bit for bit, for the int8, residual and
    float tables, one column and several."""
    lin = K.LUTLinear(random_qw(40, 2100, 2, 128, seed=11), path=path)
    x = np.random.default_rng(12).normal(size=(3, 2100)).astype(np.float32)
    x[:, 2099] *= 30
    modes = ({}, {"residual_tables": True}, {"float_tables": True})
    threads = K.get_num_threads()
    try:
        K.set_num_threads(1)
        one = [lin(cols, **kw) for cols in (x[0], x) for kw in modes]
        K.set_num_threads(2)
        two = [lin(cols, **kw) for cols in (x[0], x) for kw in modes]
    finally:
        K.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)
    y, ref = lin(x).astype(np.float64), lin.reference(x)
    assert float(((y - ref) ** 2).mean()) <= 1.5 * int8_error_bound(lin, x) + 1e-10


@pytest.mark.parametrize("path", PATHS)
def test_residual_tables_on_a_tall_matrix(path: str) -> None:
    """Many row chunks over both threads (scalar: each adding its own rows' residual pass from a view
    of just those row blocks), and a short last row block: every row must come out right."""
    lin = K.LUTLinear(random_qw(1040 * 16 + 5, 128, 1, 128, seed=7), path=path)
    x = np.random.default_rng(6).normal(size=(3, 128)).astype(np.float32)
    y, ref = lin(x, residual_tables=True).astype(np.float64), lin.reference(x)
    assert float(((y - ref) ** 2).mean()) <= 1.5 * int8_error_bound(lin, x) / 254**2 + 1e-10
    assert float(np.abs(y - ref)[:, -300:].max()) < 1e-3 * float(np.abs(ref).max())


def test_int8_on_fitted_weights() -> None:
    """A realistic fitted matrix (ALS HLQ, 2 bits, g128, in=576 with a short last group)."""
    w = torch.randn(96, 576)
    lin = K.LUTLinear(quantize_weight(w, QuantConfig(bits=2, group_size=128, iters=3)))
    x = torch.randn(4, 576)
    y, ref = lin(x), lin.reference(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (4, 96)
    assert float(((y.double() - ref) ** 2).mean()) <= 1.5 * int8_error_bound(lin, x.numpy())
    assert rel_err(lin(x, float_tables=True).numpy(), ref.numpy()) < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("g", [32, 64, 128, -1])
def test_exact_for_small_integer_activations(path: str, bits: int, g: int) -> None:
    """Integer x whose every run has Σ|x_run| = 127 makes every run's grid step 1 (all multipliers
    equal, lut.h: group_mults): the int8 tables are the exact tables, and with small-integer s and
    z every partial sum is a multiple of 1/2 below 2^23 — exact in fp32."""
    out, inf = 45, 576
    lin = K.LUTLinear(random_qw(out, inf, bits, g, seed=bits, integer=True), path=path)
    rng = np.random.default_rng(5)
    x = rng.integers(-31, 32, size=(2, inf // 4, 4)).astype(np.float32)
    x[..., 3] = rng.choice([-1, 1], size=x.shape[:2]) * (127 - np.abs(x[..., :3]).sum(-1))
    x = x.reshape(2, inf)
    ref = lin.reference(x)
    np.testing.assert_array_equal(lin(x), ref)
    np.testing.assert_array_equal(lin(x, float_tables=True), ref)


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("path", PATHS)
def test_tables_identical_across_paths(path: str) -> None:
    x = np.random.default_rng(6).normal(size=200).astype(np.float32)
    for g in (32, 64, 128):
        ng = math.ceil(200 / g)
        got, want = [], []
        for p, dst in ((path, got), ("scalar", want)):
            tq, tm = np.empty(ng * g * 4, np.int8), np.empty(ng * g // 4, np.uint8)
            ls, xs = np.empty(ng, np.float32), np.empty(ng, np.float32)
            _native.build_tables(x, g, tq, tm, ls, xs, p)
            dst += [tq, tm, ls, xs]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [2, 3])
def test_paths_agree_with_scalar(path: str, bits: int) -> None:
    """Integer parts are identical; only the fp32 epilogue's rounding may differ."""
    qw = random_qw(83, 576, bits, 128, seed=7)
    x = np.random.default_rng(8).normal(size=(5, 576)).astype(np.float32)
    y, ys = K.LUTLinear(qw, path=path)(x), K.LUTLinear(qw, path="scalar")(x)
    assert rel_err(y, ys) < 1e-6


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("bits", "g"), [(1, 32), (2, 128), (3, 64), (4, 128)])
def test_gemm_columns_equal_gemv(path: str, bits: int, g: int) -> None:
    lin = K.LUTLinear(random_qw(61, 320, bits, g, seed=9), path=path)
    x = np.random.default_rng(10).normal(size=(7, 320)).astype(np.float32)
    y = lin(x)
    np.testing.assert_array_equal(lin(x[:1]), lin(x[0])[None])
    for c in range(7):
        np.testing.assert_array_equal(y[c], lin(x[c]))


@pytest.mark.parametrize("path", PATHS)
def test_one_and_two_threads_identical(path: str) -> None:
    lin = K.LUTLinear(random_qw(300, 1024, 4, 128, seed=11), path=path)
    x = np.random.default_rng(12).normal(size=(6, 1024)).astype(np.float32)
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        y1, v1 = lin(x), lin(x[0])
        K.set_num_threads(2)
        assert K.get_num_threads() == 2
        y2, v2 = lin(x), lin(x[0])
    finally:
        K.set_num_threads(before)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(v1, v2)


@pytest.mark.parametrize("path", PATHS)
def test_gemv_rows_do_not_depend_on_what_streams_beside_them(path: str) -> None:
    """The AVX-512 GEMV walks the two halves of each thread's share of the row blocks side by side, across
    matrix boundaries and bit widths (lut.cpp: parallel_halves).  Every matrix of a multi_linear call, at
    1 and 2 threads, must equal its 16-row slices computed one at a time, bit for bit."""
    specs = ((16 * 37 + 5, 2), (16 * 20, 2), (16 * 11, 3), (16 * 25, 4), (16 * 6 + 1, 2))
    qws = [random_qw(out, 1024, bits, 128, seed=out) for out, bits in specs]
    x = np.random.default_rng(13).normal(size=1024).astype(np.float32)

    def rows(q: QuantizedWeight, r0: int, r1: int) -> QuantizedWeight:
        return QuantizedWeight(q.codes[r0:r1], q.scales[r0:r1], q.zeros[r0:r1], q.group_size)

    alone = [
        np.concatenate([K.LUTLinear(rows(q, r, r + 16), path=path)(x) for r in range(0, q.shape[0], 16)]) for q in qws
    ]
    lins = [K.LUTLinear(q, path=path) for q in qws]
    before = K.get_num_threads()
    try:
        for threads in (1, 2):
            K.set_num_threads(threads)
            K.multi_linear(lins, 2 * x)  # (so output buffers reused from a freed call hold other values)
            for y, ref in zip(K.multi_linear(lins, x), alone, strict=True):
                np.testing.assert_array_equal(y, ref)
            np.testing.assert_array_equal(lins[0](x), alone[0])
    finally:
        K.set_num_threads(before)


@pytest.mark.parametrize("path", PATHS)
def test_multi_linear_shares_tables(path: str) -> None:
    lins = [K.LUTLinear(random_qw(out, 256, 2, 128, seed=out), path=path) for out in (64, 17, 40)]
    x = torch.randn(3, 256)
    ys = K.multi_linear(lins, x)
    for lin, y in zip(lins, ys, strict=True):
        torch.testing.assert_close(y, lin(x), rtol=0, atol=0)


def test_avx2_byte_order_gives_identical_results() -> None:
    """A matrix copied in the AVX2 order (lut.h) gives, on the scalar path (int8 and float tables),
    exactly what the standard order gives; paths that read only the standard order refuse it."""
    qw = random_qw(70, 320, 3, 64, seed=15)
    w, sz, gk = K.repack(qw.pack(), qw.scales, qw.zeros, 320, 64)
    std = _native.PackedWeight(w, sz, 70, 320, 3, gk)
    avx2 = _native.PackedWeight(w, sz, 70, 320, 3, gk, avx2_order=True)
    assert avx2.avx2_order and not std.avx2_order
    x = np.random.default_rng(16).normal(size=(3, 320)).astype(np.float32)
    out = {}
    for float_tables in (False, True):
        a, b = np.empty((3, 70), np.float32), np.empty((3, 70), np.float32)
        _native.matmul([std], x, [a], "scalar", float_tables)
        _native.matmul([avx2], x, [b], "scalar", float_tables)
        np.testing.assert_array_equal(a, b)
        out[float_tables] = a
    if "avx2" in K.available_paths():
        _native.matmul([avx2], x, [b], "avx2", False)
        np.testing.assert_array_equal(b, K.LUTLinear(qw, path="avx2")(x))
        assert rel_err(b, out[False]) < 1e-6
    if "avx512" in K.available_paths():
        with pytest.raises(ValueError, match="avx2 path"):
            _native.matmul([avx2], x, [b], "avx512", False)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("avx2_order", [False, True])
def test_row_decoded_from_the_kernel_layout_is_the_dequantized_row(bits: int, avx2_order: bool) -> None:
    """``PackedWeight.row`` (an embedding looked up in a tied head's matrix) returns exactly the rows the
    format dequantizes to, in either chunk order, for partial groups and one group per row too."""
    for out, inf, g in SHAPES:
        qw = random_qw(out, inf, bits, g, seed=bits)
        w, sz, gk = K.repack(qw.pack(), qw.scales, qw.zeros, inf, g)
        pw = _native.PackedWeight(w, sz, out, inf, bits, gk, avx2_order=avx2_order)
        ref = qw.dequantize().float().numpy()
        for r in {0, out // 2, out - 1}:
            np.testing.assert_array_equal(pw.row(r), ref[r])
        with pytest.raises(ValueError, match="out of range"):
            pw.row(out)


def test_a_runtime_takes_the_packed_weight_it_is_given() -> None:
    """``Runtime.set_lut`` moves the matrix's memory into the runtime (no second copy at load): the
    PackedWeight is empty afterwards, and using it again is refused, not a read of freed memory."""
    qw = random_qw(32, 32, 2, 32, seed=3)
    pw = _native.PackedWeight(*K.repack(qw.pack(), qw.scales, qw.zeros, 32, 32)[:2], 32, 32, 2, 32)
    rt = _native.Runtime(1, 32, 64, 2, 2, 16, 100, 1e-5, np.ones(8, np.float32), 1.0)
    no_bias = np.zeros(0, np.float32)
    rt.set_lut(0, 0, pw, no_bias)
    assert pw.out_features == 0
    with pytest.raises(ValueError, match="already handed"):
        rt.set_lut(0, 3, pw, no_bias)
    with pytest.raises(ValueError, match="expects 0"):
        _native.matmul([pw], np.ones((1, 32), np.float32), [np.empty((1, 32), np.float32)])


def test_from_packed_equals_constructor() -> None:
    qw = random_qw(40, 160, 2, 32, seed=13)
    a = K.LUTLinear(qw)
    b = K.LUTLinear.from_packed(qw.pack(), qw.scales, qw.zeros, 160, 32)
    x = np.random.default_rng(14).normal(size=160).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x))
    np.testing.assert_allclose(a.dequantize(), qw.dequantize().double().numpy(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- API


def test_input_kinds_and_errors() -> None:
    lin = K.LUTLinear(random_qw(10, 64, 2, 32))
    xt = torch.randn(64)
    yt = lin(xt)
    assert isinstance(yt, torch.Tensor) and yt.shape == (10,)
    yn = lin(xt.numpy().astype(np.float64))
    assert isinstance(yn, np.ndarray) and yn.dtype == np.float32 and yn.shape == (10,)
    np.testing.assert_array_equal(yt.numpy(), yn)
    assert lin(xt.half()).shape == (10,)
    with pytest.raises(TypeError, match="floating"):
        lin(np.ones(64, dtype=np.int32))
    with pytest.raises(ValueError, match=r"\[64\] or \[N, 64\]"):
        lin(np.ones(65, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[64\] or \[N, 64\]"):
        lin(np.ones((2, 3, 64), dtype=np.float32))
    with pytest.raises(TypeError):
        lin([0.0] * 64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not available|not supported|unknown"):
        K.LUTLinear(random_qw(10, 64, 2, 32), path="sse9")
    with pytest.raises(ValueError, match="equal in_features"):
        K.multi_linear([lin, K.LUTLinear(random_qw(10, 96, 2, 32))], xt)
    with pytest.raises(ValueError):
        K.set_num_threads(0)
    assert K.active_path() in K.available_paths()
    for path in K.available_paths():
        assert f"path={path!r}" in repr(K.LUTLinear(random_qw(4, 32, 1, 32), path=path))


def test_env_var_forces_path() -> None:
    import os
    import subprocess
    import sys

    code = "from elutq import _native; print(_native.default_path())"  # what kernels.active_path() returns
    for want in ("scalar", *(p for p in ("avx2", "avx512") if p in K.available_paths())):
        env = {**os.environ, "ELUTQ_KERNEL": want}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split()[0] == want
    env = {**os.environ, "ELUTQ_KERNEL": "bogus"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "unknown kernel path" in out.stderr


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    s = (q.astype(np.float64) @ k.astype(np.float64).T) * scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v.astype(np.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_dim", [32, 64, 128, 40, 256])
def test_attention_matches_float64_reference(path: str, head_dim: int) -> None:
    """Every path's attention kernel (each picks its own for the head size) against softmax(q·Kᵀ)·V in
    float64 (on the same fp16 K and V the cache holds): lengths around the 16-key blocks, 1 to 7 query
    heads per KV head, and K, V rows strided as in the KV cache (the head at column offset ``off`` of 3
    heads)."""
    rng = np.random.default_rng(head_dim)
    for length in (1, 5, 15, 16, 17, 33, 100, 300):
        for grp in (1, 2, 3, 4, 5, 7):
            q = rng.normal(size=(grp, head_dim)).astype(np.float32)
            k = rng.normal(size=(length, 3 * head_dim)).astype(np.float16)
            v = rng.normal(size=(length, 3 * head_dim)).astype(np.float16)
            off = head_dim
            for scale in (head_dim**-0.5, 3.0):  # typical, and peaked (scores up to ~±100: softmax must shift)
                out = np.empty_like(q)
                _native.attention(q, k.view(np.uint16), v.view(np.uint16), off, scale, out, path=path)
                ref = attention_reference(q, k[:, off : off + head_dim], v[:, off : off + head_dim], scale)
                assert np.abs(out - ref).max() < 2e-5 * max(1.0, np.abs(ref).max()), (length, grp, scale)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_attention_of_consecutive_columns_is_causal(path: str, head_dim: int) -> None:
    """``ncol`` columns of a prompt at once (the runtime's prefill blocks): column i of the block sees the
    first len − ncol + 1 + i positions only, each against the float64 reference over its own prefix."""
    rng = np.random.default_rng(head_dim + 1)
    for length in (2, 4, 16, 17, 40, 130):
        for ncol in (2, 3, 4):
            if ncol > length:
                continue
            for grp in (1, 2, 7):
                q = rng.normal(size=(ncol * grp, head_dim)).astype(np.float32)
                k = rng.normal(size=(length, 2 * head_dim)).astype(np.float16)
                v = rng.normal(size=(length, 2 * head_dim)).astype(np.float16)
                out = np.empty_like(q)
                _native.attention(q, k.view(np.uint16), v.view(np.uint16), head_dim, 3.0, out, path=path, ncol=ncol)
                for i in range(ncol):
                    n = length - ncol + 1 + i
                    rows = slice(i * grp, (i + 1) * grp)
                    ref = attention_reference(q[rows], k[:n, head_dim:], v[:n, head_dim:], 3.0)
                    assert np.abs(out[rows] - ref).max() < 2e-5 * max(1.0, np.abs(ref).max()), (length, ncol, grp, i)
                    # and bit for bit what the column alone gives: no row reads a later position
                    one = np.empty_like(q[rows])
                    _native.attention(q[rows], k[:n].view(np.uint16), v[:n].view(np.uint16), head_dim, 3.0, one,
                                      path=path)
                    assert np.array_equal(out[rows], one), (length, ncol, grp, i)
    # a NaN at the last position reaches only the last column
    q = rng.normal(size=(3, head_dim)).astype(np.float32)
    k = rng.normal(size=(20, head_dim)).astype(np.float16)
    v = rng.normal(size=(20, head_dim)).astype(np.float16)
    k[-1, 0] = v[-1, 0] = np.nan
    out = np.empty_like(q)
    _native.attention(q, k.view(np.uint16), v.view(np.uint16), 0, 1.0, out, path=path, ncol=3)
    assert np.isfinite(out[:2]).all() and np.isnan(out[2]).all()
    q = np.zeros((4, head_dim), dtype=np.float32)
    kv = np.zeros((3, head_dim), dtype=np.uint16)
    for ncol in (0, 3, 4):  # 3 does not divide 4 rows; 4 columns need at least 4 positions
        with pytest.raises(ValueError, match="ncol"):
            _native.attention(q, kv, kv, 0, 1.0, np.empty_like(q), path=path, ncol=ncol)


def _before_guard_page(shape: tuple[int, int]) -> tuple[np.ndarray, object]:
    """A float16 array whose last element ends right before a PROT_NONE page (a read past it faults)."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    nbytes = shape[0] * shape[1] * 2
    size = (nbytes + page - 1) // page * page + page
    buf = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(base + size - page), ctypes.c_size_t(page), 0) == 0
    arr = np.frombuffer(buf, dtype=np.float16, count=nbytes // 2, offset=size - page - nbytes).reshape(shape)
    return arr, buf


@pytest.mark.parametrize("path", PATHS)
def test_attention_reads_nothing_past_the_last_position(path: str) -> None:
    """K and V end right before an inaccessible page, the head being the last of the row: tails of the
    16/8-key blocks must not touch positions past ``len`` (a fault would kill the test process)."""
    rng = np.random.default_rng(1)
    for length in (1, 5, 17, 33):
        for head_dim in (32, 64, 128):
            k, kbuf = _before_guard_page((length, 2 * head_dim))
            v, vbuf = _before_guard_page((length, 2 * head_dim))
            k[:] = rng.normal(size=k.shape)
            v[:] = rng.normal(size=v.shape)
            q = rng.normal(size=(3, head_dim)).astype(np.float32)
            out = np.empty_like(q)
            _native.attention(q, k.view(np.uint16), v.view(np.uint16), head_dim, head_dim**-0.5, out, path=path)
            ref = attention_reference(q, k[:, head_dim:], v[:, head_dim:], head_dim**-0.5)
            assert np.abs(out - ref).max() < 2e-5 * max(1.0, np.abs(ref).max())
            del k, v
            kbuf.close()
            vbuf.close()


@pytest.mark.parametrize("path", PATHS)
def test_attention_propagates_nan(path: str) -> None:
    """A NaN key makes every output NaN on every path (the vector exp must not clamp NaN to a number)."""
    rng = np.random.default_rng(2)
    q = rng.normal(size=(3, 64)).astype(np.float32)
    k = rng.normal(size=(40, 64)).astype(np.float16)
    v = rng.normal(size=(40, 64)).astype(np.float16)
    k[7, 3] = np.nan
    out = np.empty_like(q)
    _native.attention(q, k.view(np.uint16), v.view(np.uint16), 0, 0.125, out, path=path)
    assert np.isnan(out).all()


def test_attention_rejects_bad_shapes() -> None:
    q = np.zeros((2, 64), np.float32)
    kv = np.zeros((10, 128), np.uint16)
    out = np.zeros_like(q)
    with pytest.raises(ValueError, match="exceeds"):
        _native.attention(q, kv, kv, 100, 1.0, out)
    with pytest.raises(ValueError, match="one shape"):
        _native.attention(q, kv, kv[:5], 0, 1.0, out)


def test_read_bandwidth_windows() -> None:
    """The roofline probe: one pass per window by default; with min_seconds every window (a plain and a
    prefetching one per rep) reads until that much time has passed, and the rate counts all its passes
    (one pass over 8 MiB counted in a 0.05 s window would read as 0.17 GB/s)."""
    import time

    t0 = time.perf_counter()
    bw = _native.read_bandwidth(1 << 23, 2, 1, 0.05)
    assert time.perf_counter() - t0 >= 4 * 0.05
    assert math.isfinite(bw) and 2.0 < bw < 10_000
    t0 = time.perf_counter()
    assert 2.0 < _native.read_bandwidth(1 << 23, 1, 1) < 10_000
    assert time.perf_counter() - t0 < 0.1  # two passes over 8 MiB, not windows


def test_read_bandwidth_uses_the_threads_asked_for() -> None:
    """A probe for more threads than the pool has (a 1-thread benchmark leaves a 1-thread pool) resizes the
    pool for its readers and restores it afterwards; bad arguments are refused."""
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        assert _native.read_bandwidth(1 << 23, 1, 2) > 0
        assert K.get_num_threads() == 1
    finally:
        K.set_num_threads(before)
    for args in [(1 << 23, 0, 1), (1 << 23, 1, 0), (1 << 23, 1, 1, -1.0), (1 << 23, 1, 1, float("inf"))]:
        with pytest.raises(ValueError, match="read_bandwidth"):
            _native.read_bandwidth(*args)
