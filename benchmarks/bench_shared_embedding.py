"""Is the GPTQ head a good embedding?  A tied model quantized with head and embeddings alike stores one
tensor, the head's (GPTQ's, with that method).  For such a checkpoint G and the RTN checkpoint R of the same
setting (whose shared tensor is the RTN one the GPTQ run embedded its calibration with), this builds

- rtn-shared: G with the shared tensor replaced by R's (the head loses GPTQ);
- separate: G's GPTQ head plus R's RTN embedding stored beside it (the layout before sharing, one copy more);

and scores all three with `elutq eval` on both shipped test texts.

    .venv/bin/python benchmarks/bench_shared_embedding.py G R WORK [--max-tokens 8192]

e.g. G, R = the frontier's elutq-gptq-hlq-w2g64 and elutq-rtn-hlq-w2g64 (benchmarks/bench_frontier.py --work).
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from elutq.checkpoint import INDEX_FILE, shard_records

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("gptq", type=Path)
ap.add_argument("rtn", type=Path)
ap.add_argument("work", type=Path)
ap.add_argument("--max-tokens", default="8192")
args = ap.parse_args()
G, R, OUT = args.gptq, args.rtn, args.work
OUT.mkdir(parents=True, exist_ok=True)
rt = {}
for f in R.glob("*.safetensors"):
    rt.update({k: v for k, v in load_file(f).items() if k.startswith("lm_head.")})
for variant in ("rtn-shared", "separate"):
    d = OUT / variant
    if not (d / "config.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(G, d, ignore=shutil.ignore_patterns("kernel-cache*", ".verified.json"))
        head = load_file(d / "model-head.safetensors")
        for k in ("qweight", "scales", "zeros"):
            if variant == "rtn-shared":
                head[f"lm_head.{k}"] = rt[f"lm_head.{k}"]
            else:
                head[f"model.embed_tokens.{k}"] = rt[f"lm_head.{k}"]
        save_file(head, d / "model-head.safetensors", metadata={"format": "pt"})
        cfg = json.loads((d / "config.json").read_text())
        qc = cfg["quantization_config"]
        if variant == "separate":
            qc["modules"]["model.embed_tokens"].pop("shared_with")
            idx = json.loads((d / INDEX_FILE).read_text())
            for k in ("qweight", "scales", "zeros"):
                idx["weight_map"][f"model.embed_tokens.{k}"] = "model-head.safetensors"
            (d / INDEX_FILE).write_text(json.dumps(idx))
        qc["shards"] = shard_records(d)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
for name, path in (("gptq-shared", G), ("rtn-shared", OUT / "rtn-shared"), ("separate", OUT / "separate")):
    for ds in ("wikitext2", "python-code"):
        cmd = [sys.executable, "-m", "elutq", "eval", str(path), "--dataset", ds, "--max-tokens", args.max_tokens,
               "--seqlen", "1024"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if "ppl" in ln]
        print(name, ds, lines[-1] if lines else r.stderr[-500:], flush=True)
