"""Do the stacked nets hold up against their own benchmark? Synthetic sizes x seeds (issue: models that hold up).

For each synthetic data set (one per size, generated once: ``smp synth --n N --seed S``; the image features are
embedded once per set with RN50 on random weights, as everywhere on this offline machine) and each ``--seed``
(which seeds the split, the boosters and the nets; the data set stays the same), the script runs, in process and
with every other setting at its default:

  benchmark                              the paper's tabular XGBoost (the reference)
  ensemble_mlp / ensemble_conv1d         default head (residual), default stacking (oof, cross-fitted, K=3)
  ensemble_mlp / ensemble_conv1d         ``--head paper`` (the paper's head), same stacking inputs

and appends one JSON line per cell with the test RMSEs, the stacked benchmark input's test RMSE, the kept epoch
and whether the net beat its input on validation. ``--summary`` prints the Markdown table from the lines.

Run:  .venv/bin/python benchmarks/stacking.py --sets 800:4,2000:0,8000:0 --seeds 0,1,2 --out stacking.jsonl
      .venv/bin/python benchmarks/stacking.py --summary --out stacking.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dataset(work: Path, n: int, seed: int) -> Path:
    from smp.synth import SynthCfg, generate

    out = work / f"smpd-n{n}-s{seed}"
    if not (out / "train_label.txt").exists():
        generate(out, SynthCfg(n=n, seed=seed))
    return out


def cell(data: Path, n: int, seed: int, experiment: str) -> dict:
    import mlflow

    from smp.cli import apply, jobs

    table = jobs()
    common = {"data": str(data), "sample_size": 0, "seed": seed, "experiment": experiment,
              "clip_pretrained": "none", "progress": False}
    out = {"n": n, "seed": seed}
    t0 = time.perf_counter()
    run_fn, default, _ = table["benchmark"]
    out["benchmark"] = run_fn(apply(default, common))["test_rmse"]
    for family in ("ensemble_mlp", "ensemble_conv1d"):
        for head in ("residual", "paper"):
            run_fn, default, _ = table[family]
            m = run_fn(apply(default, {**common, "head": head}))
            run = mlflow.last_active_run()
            key = f"{family}/{head}"
            out[key] = m["test_rmse"]
            out[f"{key}/input"] = m["stacked_input/test_rmse"]
            out[f"{key}/best_epoch"] = run.data.metrics.get("fit/best_epoch")
            out[f"{key}/beats_input_val"] = run.data.tags.get("smp.beats_stacked_benchmark")
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def summary(path: Path) -> str:
    import numpy as np

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fams = [f"{f}/{h}" for f in ("ensemble_mlp", "ensemble_conv1d") for h in ("residual", "paper")]
    head = ("| size | seed | benchmark | stacked input (refit = benchmark) | " + " | ".join(fams) + " |\n|"
            + "---|" * (4 + len(fams)) + "\n")
    body = ""
    for r in sorted(rows, key=lambda r: (r["n"], r["seed"])):
        cells = [f"{r[f]:.3f}" + (" **>+0.01**" if r[f] > r["benchmark"] + 0.01 else "") for f in fams]
        body += f"| {r['n']} | {r['seed']} | {r['benchmark']:.3f} | {r['ensemble_mlp/residual/input']:.3f} | " \
                + " | ".join(cells) + " |\n"
    for n in sorted({r["n"] for r in rows}):
        sub = [r for r in rows if r["n"] == n]
        diffs = [f"{np.mean([r[f] - r['benchmark'] for r in sub]):+.3f}" for f in fams]
        inp = np.mean([r["ensemble_mlp/residual/input"] - r["benchmark"] for r in sub])
        body += f"| {n} | mean - benchmark | | {inp:+.3f} | " + " | ".join(diffs) + " |\n"
    return head + body


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="800:4,2000:0,8000:0", help="size:generator-seed, comma-separated")
    ap.add_argument("--seeds", default="0,1,2", help="split/training seeds")
    ap.add_argument("--work", default=str(ROOT / ".smp_cache" / "stack"))
    ap.add_argument("--out", default="stacking.jsonl")
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args()
    if args.summary:
        print(summary(Path(args.out)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    os.environ.setdefault("SMP_CACHE_DIR", str(work / "cache"))
    import logging

    logging.basicConfig(level=logging.WARNING)
    for spec in args.sets.split(","):
        n, gen_seed = (int(v) for v in spec.split(":"))
        data = dataset(work, n, gen_seed)
        for seed in (int(s) for s in args.seeds.split(",")):
            r = cell(data, n, seed, f"stack-n{n}")
            r["data"] = f"smp synth --n {n} --seed {gen_seed}"
            print(json.dumps(r), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
