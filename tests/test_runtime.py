"""The native runtime against a torch reference running the same (dequantized) weights.

Oracle: ``load_quantized`` builds a transformers model whose HLQ linears multiply with the decoded
weights in fp32; with float-table kernels the runtime must reproduce its logits to float rounding,
for every llama-family variant.  int8 tables are held to a stated tolerance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import elutq
from conftest import TINY_ARCHS, save_tiny_model
from elutq import _native, kernels
from elutq.checkpoint import attend_with_fp16_kv, load_quantized, save_quantized
from elutq.generation import IncrementalDecoder, Sampler, sample_batch
from elutq.hlq import QuantConfig, quantize_weight
from elutq.quantize import quantize
from elutq.runtime import KERNEL_CACHE_DIR, Session
from elutq.utils import ElutqError

IDS = [int(i) for i in np.random.default_rng(0).integers(0, 256, size=48)]


def _quantized(tmp_path, arch: str, bits: int = 3, head_bits: int | None = None, embed: QuantConfig | None = None):
    src = tmp_path / f"{arch}-src"
    model = save_tiny_model(src, arch)
    from transformers import AutoTokenizer

    head = QuantConfig(4, 32) if head_bits else None
    quantize(model, QuantConfig(bits, 32), lm_head=head, progress=False, embed=embed)
    out = save_quantized(model, AutoTokenizer.from_pretrained(src), tmp_path / f"{arch}-q", {"method": "rtn"})
    return src, out


def _torch_logits(path, ids=IDS) -> torch.Tensor:
    model, _, _ = load_quantized(path, fp16_kv=True)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_float_tables_match_torch_for_each_architecture(tmp_path, arch):
    _, out = _quantized(tmp_path, arch, head_bits=4 if arch == "llama3-rope" else None)
    ref = _torch_logits(out)
    got = elutq.load(out, float_tables=True).logits(IDS)
    assert got.shape == ref.shape
    # Float rounding, and the fp16 KV cache: the few K/V values whose f32 results in the two engines lie on
    # either side of an fp16 rounding boundary round one ulp apart (~1.4e-5 on every architecture here;
    # against an f32-KV reference the error is ~1.8e-4).
    assert _rel_err(got, ref) < 5e-5, arch
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize(
    ("arch", "head_bits", "embed"),
    [("llama", None, QuantConfig(4, 32)), ("qwen2", 4, QuantConfig(2, -1)), ("llama", 4, QuantConfig(4, 32))],
)
def test_quantized_embeddings_match_torch(tmp_path, arch, head_bits, embed):
    """HLQ embeddings, decoded row by row in the runtime, against torch's ``HLQEmbedding`` (a tied model
    untied with a 16-bit head; per-channel groups; one tensor shared with the quantized head)."""
    _, out = _quantized(tmp_path, arch, head_bits=head_bits, embed=embed)
    ref = _torch_logits(out)
    model = elutq.load(out, float_tables=True)
    assert _rel_err(model.logits(IDS), ref) < 5e-5
    _, out16 = _quantized(tmp_path / "fp16", arch, head_bits=head_bits)
    assert _rel_err(elutq.load(out16, float_tables=True).logits(IDS), ref) > 1e-3  # the embedding matters


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_int8_tables_within_tolerance(tmp_path, arch):
    # int8 tables carry ~1% relative error per matmul (one scale per group of 32-128 activations);
    # over 2 layers the logits stay within 5% relative RMS error.
    _, out = _quantized(tmp_path, arch)
    ref = _torch_logits(out)
    for path in elutq.kernels.available_paths():
        got = elutq.load(out, kernel=path).logits(IDS)
        assert _rel_err(got, ref) < 0.05, path


def test_residual_tables_close_to_float(tmp_path):
    """int8 + residual int8 tables (two lookup passes) leave ~1/254 of the int8 tables' error."""
    _, out = _quantized(tmp_path, "llama", head_bits=4)
    ref = _torch_logits(out)
    for path in elutq.kernels.available_paths():
        int8 = _rel_err(elutq.load(out, kernel=path).logits(IDS), ref)
        resid = _rel_err(elutq.load(out, kernel=path, residual_tables=True).logits(IDS), ref)
        assert resid < 1e-3 and resid < int8 / 30, (path, int8, resid)


def test_unquantized_model_runs_dense(tmp_path):
    """A 16-bit HF directory runs through the dense fp16 kernels; torch on the same fp16 weights agrees."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    save_tiny_model(src, "llama-untied")
    ref_model = attend_with_fp16_kv(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval())
    with torch.no_grad():
        ref = ref_model(torch.tensor([IDS])).logits[0]
    for path in elutq.kernels.available_paths():
        got = elutq.load(src, kernel=path).logits(IDS)
        assert _rel_err(got, ref) < 5e-5, path  # as in test_float_tables_match_torch_for_each_architecture


def test_decode_token_by_token_equals_prefill(tmp_path):
    _, out = _quantized(tmp_path, "qwen2")
    model = elutq.load(out)
    full = model.logits(IDS).numpy()
    s = Session(model)
    steps = [model.forward(s, IDS[:8], all_logits=True)]
    steps += [model.forward(s, [t]) for t in IDS[8:]]
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=0, atol=1e-4 * np.abs(full).max())


def test_token_logprobs_across_chunks_equal_log_softmax(tmp_path, monkeypatch):
    # Chunks of 5 tokens share one reused logits buffer; the in-place log-softmax must match torch's.
    import elutq.runtime as rt

    _, out = _quantized(tmp_path, "llama")
    model = elutq.load(out)
    ref = torch.log_softmax(model.logits(IDS).double(), -1)[:-1].gather(1, torch.tensor(IDS[1:])[:, None])[:, 0]
    for chunk in (5, 64):  # several chunks, and one chunk longer than the window
        monkeypatch.setattr(rt, "PREFILL_CHUNK", chunk)
        got = model.token_logprobs(IDS)
        assert got.shape == (len(IDS) - 1,)
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    s = Session(model)
    with pytest.raises(ElutqError, match="out must be"):
        model.forward(s, IDS[:4], all_logits=True, out=np.empty((3, model.arch.vocab), np.float32))


def test_ragged_batch_equals_separate_sequences(tmp_path):
    _, out = _quantized(tmp_path, "llama")
    model = elutq.load(out)
    rt = model.runtime
    a, b = IDS[:20], IDS[20:27]
    sep = [model.logits(a).numpy()[-1], model.logits(b).numpy()[-1]]
    caches = [_native.KVCache(2, 64, model.arch.n_kv_heads, model.arch.head_dim) for _ in range(2)]
    logits = np.empty((2, model.arch.vocab), dtype=np.float32)
    rt.forward(caches, [0, 0], [len(a), len(b)], [False, False], np.array(a + b, dtype=np.int32), logits)
    np.testing.assert_allclose(logits, np.stack(sep), atol=1e-4 * np.abs(logits).max())


def test_kv_cache_of_another_shape_is_rejected(tmp_path):
    """A cache whose layers, KV heads or head_dim differ from the model's is refused before anything runs,
    and caches of different shapes cannot share a prefix."""
    _, out = _quantized(tmp_path, "llama")
    model = elutq.load(out)
    a = model.arch
    logits = np.empty((1, a.vocab), dtype=np.float32)
    for dims in [(a.n_layers + 1, a.n_kv_heads, a.head_dim), (a.n_layers, a.n_kv_heads + 1, a.head_dim),
                 (a.n_layers, a.n_kv_heads, a.head_dim + 2)]:
        bad = _native.KVCache(dims[0], 16, dims[1], dims[2])
        with pytest.raises(ValueError, match="another model"):
            model.runtime.forward([bad], [0], [1], [False], np.array([1], dtype=np.int32), logits)
        with pytest.raises(ValueError, match="different models"):
            _native.KVCache(a.n_layers, 16, a.n_kv_heads, a.head_dim).copy_prefix(bad, 1)
    with pytest.raises(ValueError, match="positive"):
        _native.KVCache(a.n_layers, 16, 0, a.head_dim)


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_long_kv_cache_costs_only_the_positions_used(tmp_path):
    """One token in a 64k-position cache makes a few KiB per layer and head resident, not a 2 MiB huge page
    each (before: 224 MiB for Qwen2.5-1.5B's 32k context after one token, on machines with transparent huge
    pages)."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.is_file() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages here, so the test cannot tell")
    _, out = _quantized(tmp_path, "llama")
    model = elutq.load(out)
    a = model.arch
    cache = _native.KVCache(a.n_layers, 1 << 16, a.n_kv_heads, a.head_dim)  # 4 MiB per layer, head and K/V
    logits = np.empty((1, a.vocab), dtype=np.float32)
    model.runtime.forward([cache], [0], [1], [False], np.array([1], dtype=np.int32), logits)  # scratch, once
    cache = _native.KVCache(a.n_layers, 1 << 16, a.n_kv_heads, a.head_dim)
    before = _rss_anon_kib()
    model.runtime.forward([cache], [0], [1], [False], np.array([2], dtype=np.int32), logits)
    grown = _rss_anon_kib() - before
    huge = a.n_layers * a.n_kv_heads * 2 * 2048  # KiB, had each (layer, head) row faulted in a 2 MiB page
    assert grown < huge / 4, f"one token made {grown} KiB resident (huge pages would be {huge})"


def test_embeddings_looked_up_in_the_head_follow_the_head(tmp_path):
    """A tied table is looked up in the head's kernel matrix; replacing the head drops that, and the runtime
    refuses to run without an embedding rather than read a matrix it no longer has."""
    _, out = _quantized(tmp_path, "llama", head_bits=4, embed=QuantConfig(4, 32))  # one shared tensor
    model = elutq.load(out)
    a = model.arch
    logits = np.empty((1, a.vocab), dtype=np.float32)
    toks = np.array([1], dtype=np.int32)
    model.runtime.forward([_native.KVCache(a.n_layers, 8, a.n_kv_heads, a.head_dim)], [0], [1], [False], toks, logits)
    q = quantize_weight(torch.randn(a.vocab, a.hidden), QuantConfig(4, 32))
    w, sz, gk = kernels.repack(q.pack(), q.scales, q.zeros, a.hidden, 32)
    model.runtime.set_lut(-1, 0, _native.PackedWeight(w, sz, a.vocab, a.hidden, 4, gk), np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="missing the embedding"):
        model.runtime.forward([_native.KVCache(a.n_layers, 8, a.n_kv_heads, a.head_dim)], [0], [1], [False], toks,
                              logits)


def test_native_quantized_embedding_shapes_are_checked():
    """``set_embedding_hlq`` refuses tensors whose shapes do not fit the model, naming the layout it wants."""
    vocab, hidden, g = 10, 40, 16  # 3 groups, 5 bytes per bit-plane row
    rt = _native.Runtime(1, hidden, 64, 4, 2, 10, vocab, 1e-5, np.ones(5, dtype=np.float32), 1.0)

    def call(bits=2, v=vocab, rb=5, ng=3, sbits=None, zng=None, group=g):
        qw = np.zeros((bits, v, rb), dtype=np.uint8)
        sc = np.zeros((vocab, ng, bits if sbits is None else sbits), dtype=np.uint16)
        zr = np.zeros((vocab, 3 if zng is None else zng), dtype=np.uint16)
        rt.set_embedding_hlq(qw, sc, zr, group)

    call()  # the right shapes
    for kw, msg in [({"bits": 5}, "bits must be 1..4"), ({"group": 0}, "group size must be positive"),
                    ({"v": vocab + 1}, r"qweight must be uint8 \[bits, vocab"), ({"rb": 4}, "qweight must be"),
                    ({"ng": 2}, r"scales must be fp16 bits \[vocab, groups, bits\]"), ({"sbits": 3}, "scales must be"),
                    ({"zng": 4}, r"zeros must be fp16 bits \[vocab, groups\]")]:
        with pytest.raises(ValueError, match=msg):
            call(**kw)


def test_kernel_cache_is_reused_and_survives_damage(tmp_path, monkeypatch):
    _, out = _quantized(tmp_path, "llama")
    first = elutq.load(out).logits(IDS)
    (index,) = (out / KERNEL_CACHE_DIR).glob("*/index.json")
    assert json.loads(index.read_text())  # written, with every quantized matrix
    with monkeypatch.context() as m:  # from the cache: nothing repacked (a miss would call repack)
        m.setattr(elutq.kernels, "repack", lambda *a, **k: pytest.fail("the kernel cache was not used"))
        assert torch.equal(elutq.load(out).logits(IDS), first)
    for f in index.parent.glob("*.w.npy"):
        f.write_bytes(b"garbage")
    assert torch.equal(elutq.load(out).logits(IDS), first)  # damaged entries are repacked


def test_generate_stream_stop_and_session_reuse(tmp_path):
    _, out = _quantized(tmp_path, "llama")
    model = elutq.load(out)
    prompt = "The quick brown fox"
    full = model.generate(prompt, max_new_tokens=12)
    assert len(full.token_ids) == 12 and full.finish_reason == "length"
    stream = model.generate(prompt, max_new_tokens=12, stream=True)
    assert "".join(stream) == full.text and stream.completion.token_ids == full.token_ids
    # the second call reused the KV cache of the shared prompt
    assert stream.completion.timing.cached_tokens == len(model.encode(prompt)) - 1
    # a fresh session gives the same tokens
    assert model.generate(prompt, max_new_tokens=12, session=Session(model)).token_ids == full.token_ids
    if len(full.text.strip()) > 2:
        stop = full.text.strip()[1:3]
        cut = model.generate(prompt, max_new_tokens=12, stop=[stop])
        assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
        pieces = list(model.generate(prompt, max_new_tokens=12, stop=stop, stream=True))
        assert "".join(pieces) == cut.text


def test_generation_config_sets_the_sampling_defaults(tmp_path):
    """As transformers: greedy unless generation_config.json says do_sample; then its settings (its missing
    ones transformers' defaults); explicit arguments win.  The file travels from the source into the checkpoint."""
    from transformers import GenerationConfig

    src = tmp_path / "src"
    model = save_tiny_model(src, "llama")
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.8, repetition_penalty=1.1).save_pretrained(src)
    from transformers import AutoTokenizer

    quantize(model, QuantConfig(3, 32), progress=False)
    model.generation_config = GenerationConfig.from_pretrained(src)
    out = save_quantized(model, AutoTokenizer.from_pretrained(src), tmp_path / "q", {"method": "rtn"})
    rt = elutq.load(out)
    assert rt.generation_defaults == {"temperature": 0.6, "top_p": 0.8, "top_k": 50, "repetition_penalty": 1.1}
    g = rt.start("Hello", temperature=0.0, seed=1)
    assert (g.sampler.temperature, g.sampler.top_p, g.sampler.top_k) == (0.0, 0.8, 50)
    greedy = rt.generate("Hello", max_new_tokens=8, temperature=0.0, repetition_penalty=1.0).token_ids
    sampled = {tuple(rt.generate("Hello", max_new_tokens=8, seed=s).token_ids) for s in range(4)}
    assert len(sampled) > 1 or greedy not in [list(x) for x in sampled]  # the defaults sample
    (out / "generation_config.json").write_text('{"do_sample": false, "repetition_penalty": 1.3}')
    assert elutq.load(out).generation_defaults == {
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.3
    }
    (out / "generation_config.json").unlink()
    assert elutq.load(out).generation_defaults["temperature"] == 0.0  # no file: greedy
    (out / "generation_config.json").write_text("{oops")
    with pytest.raises(ElutqError, match="generation_config.json is not valid JSON"):
        elutq.load(out)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    logits = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    a = [Sampler(temperature=1.0, top_p=0.9, seed=5)(logits, []) for _ in range(3)]
    b = [Sampler(temperature=1.0, top_p=0.9, seed=5)(logits, []) for _ in range(3)]
    assert a == b
    assert Sampler(temperature=2.0, top_k=1, seed=0)(logits, []) == int(np.argmax(logits))
    draws = {Sampler(temperature=1.0, top_p=0.05, seed=s)(logits, []) for s in range(20)}
    top = np.argsort(-logits)[:5].tolist()
    assert draws <= set(top)  # top-p keeps only the head of the distribution
    pen = Sampler(repetition_penalty=1e6)(logits, [int(np.argmax(logits))])
    assert pen != int(np.argmax(logits))  # a repeated token is penalised away
    with pytest.raises(ElutqError, match="top_p"):
        Sampler(top_p=0.0)


def test_incremental_decoding_equals_decoding_everything():
    from conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)
    texts = ["Grüße, 東京 🦊 and the quick brown fox", "a  b\n\nc", "🦊🦊🦊"]
    seqs = [tok(t)["input_ids"] for t in texts]
    seqs += [rng.integers(0, len(tok), 30).tolist() for _ in range(20)]  # lone UTF-8 bytes included
    for k, ids in enumerate(seqs):
        dec = IncrementalDecoder(tok)
        pieces = [dec.push(int(i)) for i in ids]
        if k < len(texts):  # valid text: a character split over tokens is never emitted half
            assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + dec.flush() == tok.decode(ids, skip_special_tokens=True)


def _draws(logits: np.ndarray, us: np.ndarray, t: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The native sampler's picks for one row of logits and each uniform in ``us``."""
    n = len(us)
    out = np.empty(n, np.int32)
    rows = np.ascontiguousarray(np.broadcast_to(logits.astype(np.float32), (n, logits.size)))
    _native.sample_rows(rows, np.full(n, 1 / t, np.float32), np.full(n, top_k, np.int32),
                        np.full(n, top_p, np.float32), us.astype(np.float64), out)
    return out


def test_draw_follows_the_weights_across_blocks():
    # weights in blocks 0, 3 and 5 of 512 (empty blocks between them), one at the very end (logits
    # of exactly the weights: log p, −inf for 0)
    p = np.zeros(3000, np.float32)
    idx = [3, 511, 1600, 1700, 2999]
    p[idx] = [1.0, 0.5, 4.0, 2.0, 3.0]
    with np.errstate(divide="ignore"):
        logits = np.log(p)
    us = np.random.default_rng(0).random(20000)
    counts = np.bincount(_draws(logits, us), minlength=p.size)
    assert counts.sum() == counts[idx].sum()  # never a zero-weight index
    np.testing.assert_allclose(counts[idx] / 20000, p[idx] / p.sum(), atol=0.012)
    # inverse CDF in vocabulary order: u = 0 is the first weight, u → 1 the last
    assert _draws(logits, np.array([0.0, np.nextafter(1.0, 0.0)])).tolist() == [3, 2999]
    # u just below / above the first weight's share, and the first two weights' share
    for share, pair in ((1.0, [3, 511]), (1.5, [511, 1600])):
        edge = share / p.sum()
        assert _draws(logits, np.array([edge * 0.999, edge * 1.001])).tolist() == pair
    # the same with top-p on (the kept set is drawn in vocabulary order too), u → 1
    assert _draws(logits, np.array([np.nextafter(1.0, 0.0)]), top_p=0.99)[0] == 2999


def test_sampling_edge_cases():
    x = np.full(100, -np.inf, np.float32)
    assert _draws(x, np.array([0.5]))[0] == 0  # nothing to draw from: the (first) largest logit
    x = np.random.default_rng(4).standard_normal(100).astype(np.float32)
    x[[10, 20]] = np.nan  # NaN logits are never drawn, with or without top-k
    assert not set(_draws(x, np.random.default_rng(5).random(2000)).tolist()) & {10, 20}
    assert not set(_draws(x, np.random.default_rng(5).random(2000), top_k=5).tolist()) & {10, 20}
    y = np.random.default_rng(7).standard_normal(100).astype(np.float32)
    # top_k >= vocab and huge values mean "all"; a huge temperature stays sampling, never greedy
    wide = [Sampler(temperature=1.0, top_k=10**12, seed=1), Sampler(temperature=1e60, seed=1)]
    got = {tuple(sample_batch(np.stack([y, y]), wide, [[], []])) for _ in range(30)}
    assert len(got) > 1
    # ties at the k-th largest: all tied values are kept
    z = np.zeros(50, np.float32)
    z[[5, 6, 7]] = 2.0
    z[[8, 9]] = 1.0
    assert set(_draws(z, np.random.default_rng(8).random(3000), top_k=3).tolist()) == {5, 6, 7}


def test_top_p_and_top_k_keep_what_a_full_sort_keeps():
    rng = np.random.default_rng(2)
    for n, top_p in [(50, 0.5), (3000, 0.9), (5000, 0.999)]:
        logits = rng.standard_normal(n).astype(np.float32) * 2
        p = np.exp(logits.astype(np.float64) - logits.max())
        order = np.argsort(-p, kind="stable")
        mass = np.cumsum(p[order])
        keep = np.sort(order[mass - p[order] < top_p * p.sum()])
        # the inverse CDF over the kept weights, in vocabulary order, at the midpoints of their shares
        cum = np.cumsum(p[keep]) / p[keep].sum()
        mids = (np.concatenate([[0.0], cum[:-1]]) + cum) / 2
        np.testing.assert_array_equal(_draws(logits, mids, top_p=top_p), keep)
        k = 7
        top = np.sort(np.argsort(-logits)[:k])
        got = set(_draws(logits, rng.random(4000), top_k=k).tolist())
        assert got == set(top.tolist())  # every one of the k largest, nothing else
        # temperature: greedy at 0, sharper below 1
        assert _draws(logits, np.array([0.5]), t=1e-4)[0] == int(np.argmax(logits))


def test_sample_batch_rows_are_independent():
    logits = np.random.default_rng(3).standard_normal((6, 500)).astype(np.float32)

    def samplers() -> list[Sampler]:
        out = [Sampler(temperature=0.8, top_p=0.9, top_k=k, seed=s) for s, k in enumerate([0, 5, 0, 40, 0, 3])]
        out[2] = Sampler(seed=2)  # greedy
        out[4] = Sampler(temperature=0.8, repetition_penalty=1e6, seed=4)
        return out

    hist = [[], [], [], [], [int(np.argmax(logits[4]))], []]
    batch_s = samplers()
    state = batch_s[2].rng.bit_generator.state
    batch = sample_batch(logits, batch_s, hist)
    assert batch_s[2].rng.bit_generator.state == state  # a greedy row consumes no random number
    assert batch_s[0].rng.bit_generator.state != Sampler(seed=0).rng.bit_generator.state  # a sampled row one
    # the same rows one at a time, each with its own sampler and history
    assert batch == [s(row, h) for s, row, h in zip(samplers(), logits, hist, strict=True)]
    assert batch[2] == int(np.argmax(logits[2]))
    assert batch[4] != int(np.argmax(logits[4]))  # penalised away in its row only
    assert sample_batch(logits[4:5], [Sampler(seed=4)], [hist[4]]) == [int(np.argmax(logits[4]))]
    with pytest.raises(ElutqError, match="one sampler"):
        sample_batch(logits, samplers()[:3], [[]] * 3)
    with pytest.raises(ValueError, match="top_p"):
        _native.sample_rows(logits, np.ones(6, np.float32), np.zeros(6, np.int32), np.zeros(6, np.float32),
                            np.zeros(6), np.empty(6, np.int32))


def test_bad_input_context_overflow_empty_prompt_non_ascii(tmp_path):
    _, out = _quantized(tmp_path, "llama")
    model = elutq.load(out, max_ctx=32)
    with pytest.raises(ElutqError, match="context holds 32"):
        model.generate("fox " * 40, max_new_tokens=4)
    with pytest.raises(ElutqError, match="empty"):
        model.generate("", max_new_tokens=4)
    with pytest.raises(ElutqError, match="max_new_tokens"):
        model.generate("fox", max_new_tokens=0)
    with pytest.raises(ElutqError, match="no chat template"):
        model.generate(messages=[{"role": "user", "content": "hi"}])
    # generation stops at the end of the context instead of overflowing
    done = model.generate("The quick brown fox", max_new_tokens=100)
    assert done.finish_reason == "length" and len(model.session.tokens) == 32
    # non-ASCII text goes through the byte-level tokenizer and comes back as valid text
    text = "Grüße, 東京 🦊"
    assert model.tokenizer.decode(model.encode(text)) == text
    out_text = "".join(model.generate(text, max_new_tokens=8, stream=True))
    out_text.encode("utf-8")  # streamed pieces never split a character into invalid UTF-8
    with pytest.raises(ElutqError, match="vocabulary"):
        model.forward(Session(model), [999])


def test_cli_generate_chat_bench(tmp_path):
    _, out = _quantized(tmp_path, "llama")
    tok_cfg = out / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok_cfg.write_text(json.dumps(cfg))

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "elutq", *args], input=stdin, capture_output=True, text=True, timeout=300
        )

    g = run("generate", str(out), "-p", "The quick", "--max-new-tokens", "8")
    assert g.returncode == 0, g.stderr
    assert "decode" in g.stderr and "tok/s" in g.stderr
    c = run("chat", str(out), "--max-new-tokens", "4", "--seed", "1", stdin="hello\n/reset\nfox\n/exit\n")
    assert c.returncode == 0, c.stderr
    assert "conversation cleared" in c.stderr
    b = run("bench", str(out), "--prompt-tokens", "16", "--gen-tokens", "4", "--repeats", "1", "--threads", "1")
    assert b.returncode == 0, b.stderr
    assert "decode tok/s" in b.stdout and "peak RSS" in b.stdout
    bad = run("generate", str(tmp_path / "nope"), "-p", "x")
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    bad = run("bench", "synthetic:7")
    assert bad.returncode == 2 and "BITS in 1..4" in bad.stderr


def test_bench_counts_the_kv_cache_a_decode_step_reads():
    """Step p reads positions 0..p of K and V (fp16, every layer and KV head): over prompt P and G steps,
    on average P + (G + 1) / 2 positions, reported beside the weights-only roofline."""
    from elutq.bench import measure, synthetic_model

    m = synthetic_model(n_layers=2, hidden=128, inter=256, n_heads=4, n_kv_heads=2, vocab=64, max_ctx=32)
    sp = measure(m, 1, 8, 4, 1)
    assert sp.kv_bytes == 2 * 2 * 2 * 32 * 2 * (8 + 2.5)  # layers · (K, V) · kv heads · head_dim · fp16 · positions
    assert sp.weight_bytes == m.runtime.weight_bytes and sp.decode_tokens_per_s > 0
    sp.read_gb_per_s = 1.0
    assert sp.read_fraction == pytest.approx(sp.roofline_fraction * (1 + sp.kv_bytes / sp.weight_bytes))


def test_probe_reads_past_the_last_level_cache(monkeypatch):
    """The probe's buffer is twice the largest cache (a decode's weights never fit in it), within
    [256 MiB, 4 GiB]; the cache size comes from sysfs as Linux writes it ("491520K")."""
    from elutq import roofline

    for llc, want in ((0, 1 << 28), (32 << 20, 1 << 28), (480 << 20, 960 << 20), (8 << 30, 1 << 32)):
        monkeypatch.setattr(roofline, "last_level_cache_bytes", lambda llc=llc: llc)
        assert roofline.probe_bytes() == want
    monkeypatch.undo()
    assert roofline.last_level_cache_bytes() >= 0


def test_paired_rounds_compare_each_round_with_the_probes_around_it(monkeypatch):
    from elutq import roofline

    probes = iter([10.0, 20.0, 30.0, 50.0])
    monkeypatch.setattr(roofline, "sustained_read_bandwidth", lambda threads: next(probes))
    calls = []

    def one_round(t: int) -> tuple[float, float]:
        calls.append(t)
        return (100.0, 5.0) if len(calls) == 1 else (90.0, 7.0)

    r = roofline.paired_rounds(one_round, 2, 2)
    assert calls == [2, 2]
    assert r["prefill"] == 100.0 and r["decode"] == 7.0
    assert [x["bw"] for x in r["rounds"]] == [15.0, 40.0]


def test_probe_buffer_left_out_of_peak_rss(monkeypatch):
    """A probe allocates and frees a buffer far larger than the engine: peak RSS must not count it (without
    the high-water mark's reset it would rise by the whole 512 MiB)."""
    from elutq import roofline

    monkeypatch.setattr(roofline, "probe_bytes", lambda: 512 << 20)
    before = roofline.peak_rss_mb()
    assert roofline.sustained_read_bandwidth(1) > 0
    assert roofline.peak_rss_mb() < before + 100
