"""The block stage's learning rate, swept on single layers of a quantized checkpoint of the default model.

    .venv/bin/python benchmarks/block_lr.py CKPT [--layers 5,20] [--lrs 1e-2,3e-3,1e-3,3e-4,1e-4,1e-5]
        [--loss normed|mse]

For each layer, the unquantized model's stream entering it on the block stage's calibration (64 × 256 tokens
of the default mix of `valid` texts) is the input of both the fp layer (the target) and the checkpoint's
quantized layer, which ``train_layer`` trains with each learning rate (the stage's other defaults: 4
epochs, batch 4, 1/8 held out).  Prints the held-out block error before and after, and the step of the
best state (0: training never beat the start).  A diagnostic for choosing ``DEFAULT_LR``: the stage itself
feeds each layer the quantized model's stream.
"""

from __future__ import annotations

import argparse
import copy

import torch

from elutq.calibration import calibration_ids
from elutq.checkpoint import SafetensorsDir, read_quantization_config
from elutq.finetune import FinetuneConfig, materialize_quantized, next_norm, train_layer, trainable_views
from elutq.layerloop import layer_prefix, run_layer
from elutq.models import load_model, meta_model, position_embeddings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--layers", default="5,20")
    ap.add_argument("--lrs", default="1e-2,3e-3,1e-3,3e-4,1e-4,1e-5")
    ap.add_argument("--loss", choices=["normed", "mse"], default="normed")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg0 = FinetuneConfig(block_loss=args.loss)
    fp, tok = load_model("default")
    ck, qc = SafetensorsDir(args.checkpoint), read_quantization_config(args.checkpoint)
    ids, text = calibration_ids(tok, cfg0.calib)
    seqlen, n_layers = cfg0.calib.seqlen, fp.config.num_hidden_layers
    with torch.no_grad():
        hs = [fp(ids[i : i + 8], output_hidden_states=True).hidden_states for i in range(0, ids.shape[0], 8)]
    pos = position_embeddings(fp.config, seqlen, torch.device("cpu"), fp)
    skeleton = meta_model(fp.config)
    print(f"{args.checkpoint}: {ids.shape[0]} x {seqlen} tokens of {text}, loss {args.loss}")
    for i in [int(v) for v in args.layers.split(",")]:
        b = cfg0.batch_size
        xs = [h[i][j : j + b] for h in hs for j in range(0, h[i].shape[0], b)]
        with torch.no_grad():
            ys = [run_layer(fp.model.layers[i], x, pos) for x in xs]
        norm_w = ck.get(next_norm(i, n_layers)).float() if args.loss == "normed" else None
        for lr in [float(v) for v in args.lrs.split(",")]:
            q = materialize_quantized(copy.deepcopy(skeleton.model.layers[i]), ck, layer_prefix(i), qc["modules"])
            cfg = FinetuneConfig(lr=lr, block_loss=args.loss)
            r = train_layer(q, trainable_views(q), xs, ys, pos, cfg, i, progress=False, norm_w=norm_w)
            print(f"layer {i:2d}  lr {lr:<7g} {r.start_val:.4e} -> {r.best_val:.4e} "
                  f"({100 * (r.best_val / r.start_val - 1):+6.2f}%)  best step {r.best_step}/{r.steps}", flush=True)


if __name__ == "__main__":
    main()
