"""How far each quantized checkpoint's residual stream drifts from the source model's, layer by layer.

    .venv/bin/python benchmarks/layer_drift.py CKPT [CKPT ...] [--source default] [--tokens 1024]
        [--every 3] [--split valid]

For the same token windows of WikiText-2 (``--split``; ``valid`` by default: a diagnostic, not a score),
the source model in fp32 and each checkpoint through transformers (dequantized fp32, ``load_quantized``)
give the residual stream entering every layer; a rotated checkpoint's stream is rotated back (``h·Qᵀ``)
first.  Per layer it prints the error each token's stream has as a norm would see it,
``‖h_q − h‖² / ‖h‖²``, averaged over the tokens after each window's first, and on the first token alone
(the attention sink, whose stream is hundreds of times larger than the others').

With ``--energy`` it also prints, for the source model, the share of the stream's energy (sum of squares)
that the first positions and the four largest channels hold at each layer: why a plain MSE over the
stream (the block stage's former objective) fits the sink token and a few channels, and why a rotation,
which spreads those channels over every input of the next linears, can hurt a quantizer that does not see
activations (RTN).  ``--linear L [L ...]`` shows it on those layers' q_proj: its output error over the
tokens after the first, relative to the unquantized output, and the input norm's squared weight averaged
over the channels and over the normed stream's energy.  An error spread evenly over the inputs (what
rotation makes of a quantizer's error) is seen through the first, the unrotated linear's through the
second: where the energy sits on channels the norm shrinks (second below first), rotation costs their
ratio before it gains anything from the smaller weight error.
"""

from __future__ import annotations

import argparse

import torch

from elutq.checkpoint import load_quantized
from elutq.eval import load_text, tokenize
from elutq.models import load_model
from elutq.rotation import orthogonal, rotation_from_spec


def hidden_states(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def drift(h: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(mean normed error of the tokens after the first, of the first token) over the windows."""
    e = (h - ref).pow(2).sum(-1) / ref.pow(2).sum(-1)
    return e[:, 1:].mean().item(), e[:, 0].mean().item()


def q_proj_error(fp, model, x: torch.Tensor, layer: int, q: torch.Tensor | None) -> str:
    """Layer ``layer``'s q_proj in ``model`` against ``fp``'s on the unquantized stream ``x`` entering it
    (tokens after each window's first): relative output error; the norm weight's squared mean, plain and
    weighted by the normed stream's energy per channel."""
    x = x[:, 1:].reshape(-1, x.shape[-1])
    fl = fp.model.layers[layer]
    w, eps = fl.input_layernorm.weight.detach(), fp.config.rms_norm_eps
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # the norm without its weight
    ref_w = fl.self_attn.q_proj.weight.detach()
    y = (xn * w) @ ref_w.T
    got_w = model.model.layers[layer].self_attn.q_proj.weight().detach().float()
    # The checkpoint's basis: unrotated, the norm keeps its weight; rotated, it is folded in and the input is xn·Q.
    basis = (lambda t: t @ q) if q is not None else (lambda t: t * w)
    delta = got_w - (basis(ref_w * w) if q is not None else ref_w)
    e = xn.pow(2).mean(0)
    with torch.no_grad():
        total = (basis(xn) @ delta.T).pow(2).sum() / y.pow(2).sum()
    return (f"\n  layer {layer} q_proj: output error {total:.4f}; input norm weight² mean {w.pow(2).mean():.4f}, "
            f"energy-weighted {(e * w.pow(2)).sum() / e.sum():.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*")
    ap.add_argument("--source", default="default", help="the unquantized model the checkpoints came from")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens scored (windows of 512)")
    ap.add_argument("--offset", type=int, default=5000, help="first token of the text used")
    ap.add_argument("--every", type=int, default=3, help="print every N-th layer")
    ap.add_argument("--split", choices=["valid", "test"], default="valid")
    ap.add_argument("--energy", action="store_true", help="also the source stream's energy shares")
    ap.add_argument("--linear", type=int, nargs="*", default=[], help="also these layers' q_proj output error")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    fp, tok = load_model(args.source)
    text, _ = load_text(dataset="wikitext2", split=args.split)
    ids = tokenize(tok, text)[args.offset : args.offset + args.tokens]
    ids = ids[: len(ids) // 512 * 512].view(-1, 512)
    ref = hidden_states(fp, ids)
    layers = list(range(0, len(ref) - 1, args.every))
    print(f"{ids.numel()} tokens of WikiText-2 {args.split} in {ids.shape[0]} windows of 512; "
          "stream error per layer: tokens after the first / the first (sink)")
    if args.energy:
        print("\nsource stream energy: share on each window's first token | on the 4 largest channels")
        for i in layers:
            sq = ref[i].pow(2)
            chan = sq.sum((0, 1))
            print(f"  layer {i:2d}: {sq[:, 0].sum() / sq.sum():.3f} | {chan.topk(4).values.sum() / chan.sum():.3f}")
    for path in args.checkpoints:
        model, _, qc = load_quantized(path)
        rot = rotation_from_spec(qc.get("rotation"))
        q = orthogonal(fp.config.hidden_size, rot.matrix, rot.seed).float() if rot else None
        hs = hidden_states(model, ids)
        lin = "".join(q_proj_error(fp, model, ref[i], i, q) for i in args.linear)
        del model
        cells = []
        for i in layers:
            a, b = drift(hs[i] @ q.T if q is not None else hs[i], ref[i])
            cells.append(f"{i}: {a:.3f}/{b:.3f}")
        what = f"{qc['method']} {qc['format']} w{qc['bits']}g{qc['group_size']}"
        what += f" rotate {rot.kind}" if rot else ""
        print(f"\n{path} ({what})\n  " + "  ".join(cells) + lin)


if __name__ == "__main__":
    main()
