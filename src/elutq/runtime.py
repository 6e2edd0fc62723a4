"""The inference runtime: an HLQ checkpoint in the native decode loop, tokens out.

    model = elutq.load("out/smollm2-w2")                  # or any model `elutq quantize` accepts (16-bit)
    print(model.generate("Hello", max_new_tokens=32).text)
    for piece in model.generate(messages=[{"role": "user", "content": "Hi"}], stream=True):
        print(piece, end="", flush=True)

Loading reads the safetensors files (memory-mapped), repacks every quantized linear into the LUT
kernels' layout (cached beside the checkpoint in ``kernel-cache/``, so later loads skip it) and
hands everything to ``_native.Runtime`` (``csrc/runtime.h``), which runs all layers of a step in
one call.  Python keeps tokenization, chat templates and the KV-cache bookkeeping: a ``Session``
remembers which tokens its cache holds, so a new prompt that extends the previous conversation only
prefills the new part.  Sampling, detokenization and stop strings live in ``generation.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, _native, kernels
from .checkpoint import (
    EMBED,
    SafetensorsDir,
    check_finite,
    embedding_prefix,
    is_quantized_checkpoint,
    load_config,
    load_tokenizer,
    module_group_size,
    read_quantization_config,
    validate_checkpoint,
    verified_digests,
)
from .generation import (
    Completion,
    DraftPolicy,
    Generation,
    Sampler,
    TextStream,
    eos_ids,
    generation_defaults,
    read_generation_config,
    speculative_pick,
)
from .models import check_architecture, resolve_source_dir, rope_frequencies
from .rotation import NORM_ROTATION, fast_factors, rotation_from_spec
from .utils import ElutqError, release_free_memory

# Linear slots of a decoder layer, in the order csrc/runtime.h numbers them.
LAYER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
KERNEL_CACHE_DIR = "kernel-cache"
PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activation memory on long prompts


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[t, targets[t]]`` for each row, overwriting ``logits`` (no [T, vocab] temporary)."""
    picked = logits.gather(1, targets[:, None])[:, 0]
    peak = logits.amax(dim=1)
    lse = logits.sub_(peak[:, None]).exp_().sum(dim=1).log_()
    return picked - peak - lse


# ----------------------------------------------------------------------------- loading


def _fp16_bits(t: torch.Tensor, name: str) -> np.ndarray:
    h = check_finite(name, t.detach()).to(torch.float16)
    if not torch.isfinite(h).all():
        raise ElutqError(f"{name} has values outside the fp16 range; the runtime keeps 16-bit tensors in fp16")
    return np.ascontiguousarray(h.numpy().view(np.uint16))


def _f32(t: torch.Tensor, name: str = "tensor") -> np.ndarray:
    return np.ascontiguousarray(check_finite(name, t.detach().to(torch.float32)).numpy())


class _KernelCache:
    """Repacked (kernel-layout) matrices kept beside the checkpoint: ``kernel-cache/<key>/`` (the key
    derives from the shards' sha256 digests, so any change to the weights misses it) holds ``NAME.w.npy``
    and ``NAME.sz.npy`` per quantized linear, memory-mapped on later loads, and ``index.json`` (written
    last, so a killed first load leaves no cache that looks complete) with each file's sha256.  A file
    is used only if its digest matches (computed once per file state: ``checkpoint.verified_digests``);
    anything else (damaged, truncated, swapped, NaNs written in) is repacked from the checkpoint."""

    def __init__(self, ckpt: Path, key: str):
        self.dir = ckpt / KERNEL_CACHE_DIR / key
        self.index: dict[str, dict] = {}  # name → {"group": kernel group size, "w": sha256, "sz": sha256}
        self.writable = True
        try:
            index = json.loads((self.dir / "index.json").read_text())
            self.index = {k: v for k, v in index.items() if isinstance(v, dict) and {"group", "w", "sz"} <= set(v)}
        except (OSError, ValueError, AttributeError):  # none yet, or damaged: only a lost speed-up, rebuilt
            self.index = {}
        self.complete = bool(self.index)
        self.changed = False
        self._root = ckpt / KERNEL_CACHE_DIR
        self._made = self.dir.is_dir()

    def _prepare(self) -> bool:
        """Create the cache folder on first use (removing caches of older files)."""
        if not self._made and self.writable:
            try:
                shutil.rmtree(self._root, ignore_errors=True)
                self.dir.mkdir(parents=True)
                self._made = True
            except OSError:
                self.writable = False  # a read-only checkpoint just goes uncached
        return self.writable

    def _cached(self, name: str) -> tuple[Any, Any] | None:
        entry = self.index.get(name)
        if entry is None:
            return None
        files = [self.dir / f"{name}.w.npy", self.dir / f"{name}.sz.npy"]
        try:
            digests = verified_digests(self.dir, files)
            if [digests[f.name] for f in files] != [entry["w"], entry["sz"]]:
                return None
            return tuple(np.load(f, mmap_mode="r", allow_pickle=False) for f in files)
        except (OSError, ValueError, EOFError):
            return None

    def packed(self, t: SafetensorsDir, name: str, spec: dict, in_f: int, avx2_order: bool) -> Any:
        """``_native.PackedWeight`` of quantized linear ``name``, from the cache or repacked now (the
        cache holds the standard order; ``avx2_order`` is applied when the matrix is copied in)."""
        bits, out = (int(d) for d in t.shape(f"{name}.qweight")[:2])  # the header: a hit reads no weights
        hit = self._cached(name)
        if hit is not None:
            w, sz = hit
            if w.dtype == np.uint8 and sz.dtype == np.uint16 and w.ndim == sz.ndim == 1:  # (shapes: PackedWeight)
                try:
                    return _native.PackedWeight(w, sz, out, in_f, bits, self.index[name]["group"], avx2_order)
                except (ValueError, TypeError, RuntimeError):
                    pass
        q = t.get(f"{name}.qweight")
        scales = check_finite(f"{name}.scales", t.get(f"{name}.scales"))
        zeros = check_finite(f"{name}.zeros", t.get(f"{name}.zeros"))
        try:
            w, sz, gk = kernels.repack(q, scales, zeros, in_f, spec["group_size"])
        except ValueError as e:
            raise ElutqError(f"{name}: {e}; the checkpoint is corrupt or from another tool") from e
        if self._prepare():
            files = [self.dir / f"{name}.w.npy", self.dir / f"{name}.sz.npy"]
            try:
                for f, a in zip(files, (w, sz), strict=True):
                    np.save(f, a, allow_pickle=False)
                d = verified_digests(self.dir, files)
                self.index[name] = {"group": gk, "w": d[files[0].name], "sz": d[files[1].name]}
                self.changed = True
            except OSError:
                self.writable = False
        return _native.PackedWeight(w, sz, out, in_f, bits, gk, avx2_order)

    def finish(self) -> None:
        if self.writable and self.changed and self.index:
            try:
                tmp = self.dir / "index.json.tmp"
                tmp.write_text(json.dumps(self.index))
                os.replace(tmp, self.dir / "index.json")
            except OSError:
                pass


@dataclass
class Arch:
    n_layers: int
    hidden: int
    inter: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    max_ctx: int
    tied: bool


def _arch(config) -> Arch:
    check_architecture(config)
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ElutqError(f"hidden_act {act!r} is not supported by the runtime (llama-family SwiGLU uses 'silu')")
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    max_ctx = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        max_ctx = min(max_ctx, int(window))  # within the window, sliding-window attention is plain causal
    return Arch(
        n_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        inter=config.intermediate_size,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        rms_eps=float(config.rms_norm_eps),
        max_ctx=max_ctx,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def _rope(config) -> tuple[np.ndarray, float]:
    """``inv_freq`` and attention scaling exactly as the model's own rotary embedding computes them."""
    inv_freq, scaling = rope_frequencies(config)
    return _f32(inv_freq), scaling


# ----------------------------------------------------------------------------- the model


class Session:
    """One conversation's KV cache and the tokens it holds."""

    def __init__(self, model: Model, max_ctx: int | None = None):
        self.model = model
        self.max_ctx = min(max_ctx or model.max_ctx, model.max_ctx)
        self.cache = _native.KVCache(model.arch.n_layers, self.max_ctx, model.arch.n_kv_heads, model.arch.head_dim)
        self.tokens: list[int] = []

    def reset(self) -> None:
        self.tokens = []

    def share_prefix(self, src: Session, n: int) -> None:
        """Start from ``src``'s first ``n`` tokens, their KV copied: a prompt prefix that several
        requests share (a system prompt, an earlier turn) then runs through the model once."""
        n = min(n, len(src.tokens))
        self.cache.copy_prefix(src.cache, n)
        self.tokens = src.tokens[:n]


class Model:
    """A loaded model: use :func:`load`."""

    def __init__(self, rt: Any, config, tokenizer, arch: Arch, path: Path | None, qconfig: dict | None, max_ctx: int):
        self.runtime, self.config, self.tokenizer, self.arch = rt, config, tokenizer, arch
        self.path, self.qconfig, self.max_ctx = path, qconfig, max_ctx
        gen = read_generation_config(path)
        self.eos_ids = eos_ids(config, tokenizer, gen) if tokenizer is not None else set()
        self.generation_defaults = generation_defaults(gen)
        self.session = Session(self)
        self.step_costs: dict[int, float] = {}  # seconds of a decode forward over n tokens (DraftPolicy)
        self.step_samples: dict[int, int] = {}  # how many timings each of them averages
        self._lock = threading.Lock()  # one forward at a time (the runtime owns its scratch buffers)

    # -- low level

    def forward(
        self, session: Session, tokens: Sequence[int], all_logits: bool = False, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Append ``tokens`` to ``session``; logits ``[len(tokens) or 1, vocab]`` (float32), written into the
        first rows of ``out`` when given (a C-contiguous float32 ``[>= rows, vocab]`` buffer reused across calls:
        a fresh 100 MB array per prefill chunk costs more in page faults than the lm_head itself)."""
        toks = np.asarray(tokens, dtype=np.int32)
        if toks.size == 0:
            raise ElutqError("nothing to run: the token list is empty")
        if toks.min() < 0 or toks.max() >= self.arch.vocab:
            raise ElutqError(f"token ids must be in 0..{self.arch.vocab - 1} (the vocabulary), got {toks.max()}")
        pos = len(session.tokens)
        if pos + toks.size > session.max_ctx:
            raise ElutqError(
                f"context overflow: {pos + toks.size} tokens do not fit the {session.max_ctx}-token context; "
                "shorten the prompt, lower max_new_tokens, or reset the session"
            )
        rows = toks.size if all_logits else 1
        if out is None:
            logits = np.empty((rows, self.arch.vocab), dtype=np.float32)
        else:
            if out.dtype != np.float32 or out.ndim != 2 or out.shape[0] < rows or out.shape[1] != self.arch.vocab \
                    or not out.flags.c_contiguous:
                raise ElutqError(f"out must be a C-contiguous float32 array of at least [{rows}, {self.arch.vocab}]")
            logits = out[:rows]
        with self._lock:
            self.runtime.forward([session.cache], [pos], [int(toks.size)], [all_logits], toks, logits)
        session.tokens.extend(int(t) for t in toks)
        return logits

    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits ``[T, vocab]`` of a token sequence from an empty context (for perplexity)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        s = Session(self, max_ctx=len(ids))
        chunks = [ids[i : i + PREFILL_CHUNK] for i in range(0, len(ids), PREFILL_CHUNK)]
        parts = [self.forward(s, c, all_logits=True) for c in chunks]
        return torch.from_numpy(np.concatenate(parts))

    def token_logprobs(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``log p(ids[t+1] | ids[:t+1])`` for ``t < T-1`` (float32 ``[T-1]``), from an empty context.
        One prefill chunk's logits are alive at a time, so memory does not grow with ``T`` (a 2048-token
        window's full logits over a 150k vocabulary would be 1.2 GB)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        s = Session(self, max_ctx=len(ids))
        buf = np.empty((min(PREFILL_CHUNK, len(ids)), self.arch.vocab), dtype=np.float32)
        out = []
        for i in range(0, len(ids) - 1, PREFILL_CHUNK):
            chunk = ids[i : i + PREFILL_CHUNK]
            targets = torch.tensor(ids[i + 1 : i + 1 + len(chunk)], dtype=torch.long)
            logits = torch.from_numpy(self.forward(s, chunk, all_logits=True, out=buf))[: targets.numel()]
            out.append(_target_logprobs(logits, targets))
        return torch.cat(out) if out else torch.zeros(0)

    # -- text

    def encode(self, prompt: str | None = None, messages: Sequence[dict] | None = None) -> list[int]:
        """Token ids of a raw prompt, or of chat ``messages`` through the model's chat template."""
        if (prompt is None) == (messages is None):
            raise ElutqError("pass either a prompt or messages")
        if messages is not None:
            if not messages:
                raise ElutqError("messages is empty; pass at least one {'role': 'user', 'content': ...}")
            if not getattr(self.tokenizer, "chat_template", None):
                raise ElutqError(f"{self.path} has no chat template in its tokenizer config; pass a plain prompt")
            ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise ElutqError("the prompt is empty (no tokens); pass some text")
        return [int(i) for i in ids]

    def forward_batch(self, sessions: Sequence[Session], tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Append ``tokens[i]`` to ``sessions[i]`` for all i in one step; the last row of logits of
        each, ``[len(sessions), vocab]``.  Prefill chunks and decode steps can be mixed."""
        lens = [len(t) for t in tokens]
        flat = np.asarray([x for t in tokens for x in t], dtype=np.int32)
        for s, n in zip(sessions, lens, strict=True):
            if n < 1 or len(s.tokens) + n > s.max_ctx:
                raise ElutqError(f"cannot append {n} tokens to a session at {len(s.tokens)}/{s.max_ctx}")
        if flat.size and (flat.min() < 0 or flat.max() >= self.arch.vocab):
            raise ElutqError(f"token ids must be in 0..{self.arch.vocab - 1} (the vocabulary)")
        logits = np.empty((len(sessions), self.arch.vocab), dtype=np.float32)
        with self._lock:
            self.runtime.forward(
                [s.cache for s in sessions], [len(s.tokens) for s in sessions], lens, [False] * len(lens), flat, logits
            )
        for s, t in zip(sessions, tokens, strict=True):
            s.tokens.extend(int(x) for x in t)
        return logits

    def start(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict] | None = None,
        ids: Sequence[int] | None = None,
        max_new_tokens: int = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        session: Session | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        """A reply in the making, for a driver that feeds ``pending`` tokens and calls ``advance``
        (``generate`` does it for one request; the server does it for many in one batch).  Sampling
        settings left ``None`` come from :attr:`generation_defaults`; ``ignore_eos`` goes on past an
        end-of-text token to ``max_new_tokens`` (a stop string or the context still ends it)."""
        given = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        settings = {**self.generation_defaults, **{k: v for k, v in given.items() if v is not None}}
        sampler = Sampler(**settings, seed=seed)
        if ids is None:
            ids = self.encode(prompt, messages)
        stops = [stop] if isinstance(stop, str) else [x for x in (stop or []) if x]
        return Generation(self, session or self.session, list(ids), max_new_tokens, sampler, stops, ignore_eos)

    def generate(
        self, prompt: str | None = None, *, stream: bool = False, speculative: bool = True, max_draft: int = 8,
        **kw: Any,
    ) -> Completion | TextStream:
        """Continue ``prompt`` (or answer chat ``messages=``), sampling as the model's
        ``generation_config.json`` says unless told otherwise (greedy when it does not ask to sample).

        Keywords as :meth:`start`: ``messages, max_new_tokens, temperature, top_p, top_k,
        repetition_penalty, stop, seed, session, ignore_eos``.  The session's KV cache is reused for the
        longest common prefix with its previous tokens.  ``stream=True`` returns a :class:`TextStream`.
        ``speculative``: check prompt-lookup drafts several tokens per forward (``prompt_match``;
        :class:`DraftPolicy` decides how many, none where it does not pay): greedy replies are the same tokens
        as without, sampled ones the same distribution; fewer passes over the weights; at most ``max_draft``
        (1–64) draft tokens per forward."""
        policy = self.draft_policy(max_draft)  # checked even when unused: a bad value is an error either way
        it = self._drive(self.start(prompt, **kw), policy if speculative else None)
        if stream:
            return TextStream(it)
        *_, done = it
        assert isinstance(done, Completion)
        return done

    def draft_policy(self, max_draft: int = 8) -> DraftPolicy:
        """A draft-length policy sharing this model's measured step costs (:class:`DraftPolicy`), checking at
        most ``max_draft`` draft tokens per forward."""
        return DraftPolicy(k_max=max_draft, cost=self.step_costs, samples=self.step_samples)

    def step(self, g: Generation, policy: DraftPolicy | None = None) -> str:
        """Advance ``g`` by one pass over the weights (after its prompt's earlier chunks): what is pending,
        plus — with ``policy`` and where it pays — prompt-lookup drafts checked in the same forward
        (:meth:`_verify`).  Returns the new text (possibly empty)."""
        feed = g.pending
        while len(feed) > PREFILL_CHUNK:  # long prompts in chunks: bounded activation memory
            self.forward(g.session, feed[:PREFILL_CHUNK])
            feed = feed[PREFILL_CHUNK:]
        draft: list[int] = []
        if policy is not None and g.out:
            # the drafts fit the context and the reply (advance's own checks stop exactly where they would)
            room = min(g.session.max_ctx - len(g.session.tokens) - len(feed) - 1, g.max_new - len(g.out) - 1)
            draft = policy.offer(g.ids + g.out, room)
        decoding = bool(g.out)
        g.timing.decode_steps += decoding
        t = time.perf_counter()
        delta = self._verify(g, feed, draft) if draft else g.advance(self.forward(g.session, feed)[-1])
        if policy is not None and decoding and len(feed) == 1:
            policy.timed(1 + len(draft), time.perf_counter() - t)
        return delta

    def _drive(self, g: Generation, policy: DraftPolicy | None) -> Iterator[str | Completion]:
        while not g.done:
            delta = self.step(g, policy)
            if delta:
                yield delta
        yield g.completion()

    def _verify(self, g: Generation, feed: list[int], draft: list[int]) -> str:
        """One forward over ``feed + draft``; the reply takes tokens row by row — greedy: as plain decoding
        would (the same logits); sampled: by ``speculative_pick``, distributed as plain sampling's — for as
        long as they equal the draft, plus the first that does not.  The KV of drafted tokens not taken is
        dropped (the session forgets them; later writes reuse their slots).  Returns the new text."""
        base = len(g.session.tokens)
        logits = self.forward(g.session, feed + draft, all_logits=True)
        g.timing.drafted_tokens += len(draft)
        text, taken = "", 0
        for j in range(len(draft) + 1):
            row = logits[len(feed) - 1 + j]
            if j < len(draft) and g.sampler.temperature > 0:  # speculative sampling: distributed as row's
                tok = speculative_pick(g.sampler.distribution(row, g.history()), draft[j], g.sampler.rng)
                text += g.advance(None, token=tok)
            else:  # greedy: the token plain decoding takes; or the last row, sampled as plain decoding does
                text += g.advance(row)
            if g.done or j == len(draft) or g.out[-1] != draft[j]:
                break
            taken += 1
        g.timing.accepted_tokens += taken
        del g.session.tokens[base + len(feed) + taken :]
        return text


def load(
    path: str | Path,
    *,
    max_ctx: int | None = None,
    threads: int | None = None,
    kernel: str | None = None,
    float_tables: bool = False,
    residual_tables: bool = False,
) -> Model:
    """Load a quantized checkpoint (or, 16-bit, any model `elutq quantize` accepts) into the runtime.

    ``max_ctx`` caps the context (default: the model's); ``threads`` sizes the kernel thread pool;
    ``kernel`` forces a path (scalar/avx2/avx512/neon); ``float_tables`` uses the exact float-table
    kernels (slow; for accuracy checks); ``residual_tables`` also looks up int8 tables of the tables'
    rounding error (logits ~250x closer to float, twice the lookups: free where decode is memory-bound,
    half-speed prefill; docs/KERNELS.md; no effect with ``float_tables``)."""
    spec = str(path)
    if Path(spec).is_dir() and is_quantized_checkpoint(spec):
        ckpt = Path(spec)
        qc: dict | None = read_quantization_config(ckpt)
    else:
        ckpt, qc = resolve_source_dir(spec), None
    config = load_config(ckpt)
    check_architecture(config)
    # a checkpoint is checked before use: headers, sizes, sha256 against the recorded ones, tensors vs config
    digests = validate_checkpoint(ckpt, qc, config) if qc is not None else None
    arch = _arch(config)
    if max_ctx is not None:
        if max_ctx < 2:
            raise ElutqError(f"max_ctx must be at least 2, got {max_ctx}")
        arch.max_ctx = min(arch.max_ctx, int(max_ctx))
    if threads is not None:
        kernels.set_num_threads(threads)
    inv_freq, rope_scale = _rope(config)
    t = SafetensorsDir(ckpt)
    modules = (qc or {}).get("modules", {})
    has_head = "lm_head" in modules or "lm_head.weight" in t
    if not has_head and arch.tied and EMBED in modules:
        raise ElutqError(f"{ckpt}: config.json ties lm_head to quantized embeddings, which elutq never writes; "
                         "re-run `elutq quantize`")
    if not has_head and not arch.tied:
        raise ElutqError(f"{ckpt} has no lm_head and its config does not tie embeddings; re-run `elutq quantize`")
    # Before the weights: parsing a 151k-token tokenizer.json takes ~170 MB for a moment, which on top of
    # the weights would set the process's peak.
    tokenizer = load_tokenizer(ckpt)
    release_free_memory()
    rt = _native.Runtime(
        arch.n_layers, arch.hidden, arch.inter, arch.n_heads, arch.n_kv_heads, arch.head_dim, arch.vocab,
        arch.rms_eps, inv_freq, rope_scale,
    )
    if kernel:
        if kernel not in kernels.available_paths():
            raise ElutqError(f"kernel path {kernel!r} is not available here (available: {kernels.available_paths()})")
        rt.set_path(kernel)
    rt.float_tables = float_tables
    rt.residual_tables = residual_tables
    key = hashlib.sha256(json.dumps([t.fingerprint() if digests is None else sorted(digests.items()),
                                     __version__]).encode()).hexdigest()[:16]
    cache = _KernelCache(ckpt, key)
    no_bias = np.zeros(0, dtype=np.float32)

    q_dim = arch.n_heads * arch.head_dim
    in_features = (arch.hidden, arch.hidden, arch.hidden, q_dim, arch.hidden, arch.hidden, arch.inter)

    def put_linear(layer: int, slot: int, name: str) -> None:
        bias = _f32(t.get(f"{name}.bias"), f"{name}.bias") if f"{name}.bias" in t else no_bias
        if name in modules:
            in_f = arch.hidden if layer < 0 else in_features[slot]
            rt.set_lut(layer, slot, cache.packed(t, name, modules[name], in_f, rt.path == "avx2"), bias)
        else:
            rt.set_dense(layer, slot, _fp16_bits(t.get(f"{name}.weight"), name), bias)

    emb = embedding_prefix(qc or {})
    # One tensor for a tied head and embeddings: rows are looked up in the head's kernel matrix (below),
    # not held a second time.
    in_head = EMBED in modules and emb == "lm_head" and "lm_head" in modules
    if EMBED in modules and not in_head:
        rt.set_embedding_hlq(
            np.ascontiguousarray(t.get(f"{emb}.qweight").numpy()),
            _fp16_bits(t.get(f"{emb}.scales"), f"{emb}.scales"),
            _fp16_bits(t.get(f"{emb}.zeros"), f"{emb}.zeros"),
            module_group_size(modules[EMBED], arch.hidden),
        )
    elif EMBED not in modules:
        rt.set_embedding(_fp16_bits(t.get(f"{EMBED}.weight"), f"{EMBED}.weight"))
    for i in range(arch.n_layers):
        p = f"model.layers.{i}."
        for slot, lin in enumerate(LAYER_LINEARS):
            put_linear(i, slot, p + lin)
        for kind, tensor in (("attn", "input_layernorm"), ("mlp", "post_attention_layernorm"),
                             ("q", "self_attn.q_norm"), ("k", "self_attn.k_norm")):
            if kind in ("attn", "mlp") or f"{p}{tensor}.weight" in t:
                rt.set_norm(i, kind, _f32(t.get(f"{p}{tensor}.weight"), f"{p}{tensor}.weight"))
    rt.set_norm(-1, "final", _f32(t.get("model.norm.weight"), "model.norm.weight"))
    rotation = rotation_from_spec((qc or {}).get("rotation"))
    if rotation is not None and rotation.kind == "full":  # down_proj's input rotated online (csrc/hadamard.h)
        signs, a = fast_factors(arch.inter, rotation.seed + 2)
        rt.set_down_rotation(signs.astype(np.float32), np.ascontiguousarray(a, dtype=np.float32))
    if NORM_ROTATION in t:  # a rotated tied model (rotation.py): h ← h·M after the final norm, M symmetric
        rt.set_dense(-1, 1, _fp16_bits(t.get(NORM_ROTATION).T.contiguous(), NORM_ROTATION), no_bias)
    if has_head:
        put_linear(-1, 0, "lm_head")
        if in_head:
            rt.embed_from_lm_head()
    else:
        rt.tie_lm_head()  # a tied 16-bit table (checked above)
    cache.finish()
    return Model(rt, config, tokenizer, arch, ckpt, qc, arch.max_ctx)


__all__ = ["Model", "Session", "load"]
