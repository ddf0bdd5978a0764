"""Do the stacked nets hold up against their own benchmark? Synthetic sizes x seeds.

For each synthetic data set (one per size, generated once: ``smp synth --n N --seed S``; the image features are
embedded once per set with RN50 on random weights, as everywhere on this offline machine) and each ``--seed``
(which seeds the split, the boosters and the nets; the data set stays the same), the script runs, in process and
with every other setting at its default:

  benchmark                              the paper's tabular XGBoost (the reference)
  ensemble_mlp / ensemble_conv1d         default head (residual), default stacking (oof, cross-fitted, K=3)
  ensemble_mlp / ensemble_conv1d         ``--head paper`` (the paper's head), same stacking inputs

and appends one JSON line per cell with the test RMSEs, the stacked benchmark input's test RMSE, the kept epoch
and whether the net beat its input on validation. ``--summary`` prints the Markdown table from the lines.

``--param KEY=VALUE`` sets a job setting for every run, in its own experiment (e.g. ``fold_rounds=early_stop``: each
fold model early-stops on val; ``stacking_folds=2``). The lines also record the
benchmark's fit time and trees and the fold fits' time (``oof_s``).

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


def cell(data: Path, n: int, seed: int, experiment: str, extra: dict | None = None) -> dict:
    import mlflow

    from smp.cli import jobs
    from smp.config import apply, leaves

    table = jobs()
    common = {"data": str(data), "sample_size": 0, "seed": seed, "experiment": experiment,
              "clip_pretrained": "none", **(extra or {})}
    out = {"n": n, "seed": seed, **(extra or {})}

    def run(name: str, values: dict):
        run_fn, default, _ = table[name]
        known = {path[-1] for path, _ in leaves(default)}  # e.g. the benchmark has no clip_pretrained
        result = run_fn(apply(default, {k: v for k, v in values.items() if k in known}))
        return result, mlflow.get_run(result.run_id)

    t0 = time.perf_counter()
    m, bench = run("benchmark", common)
    out["benchmark"] = m["test_rmse"]
    out["benchmark/fit_s"] = bench.data.metrics.get("time/fit_s")
    out["benchmark/trees"] = bench.data.metrics.get("fit/best_iteration")
    for family in ("ensemble_mlp", "ensemble_conv1d"):
        for head in ("residual", "paper"):
            m, run_ = run(family, {**common, "head": head})
            key = f"{family}/{head}"
            out[key] = m["test_rmse"]
            out[f"{key}/input"] = m["stacked_input/test_rmse"]
            out[f"{key}/best_epoch"] = run_.data.metrics.get("fit/best_epoch")
            out[f"{key}/beats_input_val"] = run_.data.tags.get("smp.beats_stacked_benchmark")
            if "time/oof_s" in run_.data.metrics:  # the first ensemble fits the fold models; the rest reuse them
                out["oof_s"] = run_.data.metrics["time/oof_s"]
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
    timed = [r for r in rows if r.get("oof_s") and r.get("benchmark/fit_s")]
    if timed:
        body += ("\n| size | seed | fold_rounds, K | benchmark trees | benchmark fit s | fold fits s | folds / fit |\n"
                 "|---|---|---|---|---|---|---|\n")
        for r in sorted(timed, key=lambda r: (r["n"], r["seed"])):
            body += (f"| {r['n']} | {r['seed']} | {r.get('fold_rounds', 'default')}, K={r.get('stacking_folds', 'default')} | {r['benchmark/trees']:.0f} | "
                     f"{r['benchmark/fit_s']:.1f} | {r['oof_s']:.1f} | {r['oof_s'] / r['benchmark/fit_s']:.2f} |\n")
    return head + body


def _number(text: str):
    """``--param`` values as the job configs hold them: ``2`` -> 2, ``0.5`` -> 0.5, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="800:4,2000:0,8000:0", help="size:generator-seed, comma-separated")
    ap.add_argument("--seeds", default="0,1,2", help="split/training seeds")
    ap.add_argument("--work", default=str(ROOT / ".smp_cache" / "stack"))
    ap.add_argument("--out", default="stacking.jsonl")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a job setting for every run, e.g. fold_rounds=early_stop or stacking_folds=2 (repeatable)")
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
            extra = {k: _number(v) for k, v in (p.split("=", 1) for p in args.param)}
            label = "".join(f"-{k}-{v}" for k, v in extra.items())
            r = cell(data, n, seed, f"stack-n{n}{label}", extra)
            r["data"] = f"smp synth --n {n} --seed {gen_seed}"
            print(json.dumps(r), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
