"""Which inputs carry the signal? The benchmark with each feature group added (smp.groups), demo data x seeds.

For each ``--seed`` (it seeds the split and the booster; the demo data set stays the same: 2,000 synthetic posts,
``smp synth`` seed 0) and each ``--features`` set, the script runs ``smp benchmark --features F --seed S`` in
process (every other setting at its default: the paper's 2,000 trees, depth 18, lr 0.01, early stopping), into
a throw-away tracking store, and appends one JSON line per run: test RMSE / MAE / Spearman, the mean predictor's
RMSE, the fit time, the number of features and the user table's size. ``--summary`` prints the Markdown table
(mean over seeds, and each seed's RMSE) from the lines.

Not a timed test: figures for docs/benchmarks.md.

Run:  .venv/bin/python benchmarks/feature_groups.py --seeds 0,1,2 --out feature_groups.jsonl
      .venv/bin/python benchmarks/feature_groups.py --summary --out feature_groups.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SETS = ("tabular", "tabular,user", "tabular,text", "tabular,time", "tabular,time,user,text")


def run_one(features: str, seed: int, data: str, experiment: str) -> dict:
    import mlflow

    from smp.config import apply
    from smp.train import BenchmarkJob, run_benchmark

    t0 = time.perf_counter()
    cfg = apply(BenchmarkJob(), {"data": data, "seed": seed, "features": features, "experiment": experiment})
    result = run_benchmark(cfg)
    run = mlflow.get_run(result.run_id).data
    m = run.metrics
    return {"features": features, "seed": seed, "test_rmse": m["test_rmse"], "test_mae": m["test_mae"],
            "test_spearman": m["test_spearman"], "test_rmse_baseline": m["test_rmse_baseline"],
            "fit_s": m.get("time/fit_s"), "n_features": m.get("fit/n_features"),
            "user_table_users": run.params.get("features/user_table_users"), "wall_s": time.perf_counter() - t0}


def summary(lines: list[dict]) -> str:
    import pandas as pd

    df = pd.DataFrame(lines)
    seeds = sorted(df["seed"].unique())
    rows = ["| features | test RMSE | MAE | Spearman | RMSE per seed (" + "/".join(map(str, seeds))
            + ") | vs tabular (RMSE) |", "|---|---|---|---|---|---|"]
    base = df[df["features"] == "tabular"]["test_rmse"].mean()
    for features in [s for s in SETS if s in set(df["features"])]:
        part = df[df["features"] == features].sort_values("seed")
        rmse = part["test_rmse"].mean()
        rows.append(f"| {features} | {rmse:.3f} | {part['test_mae'].mean():.3f} | {part['test_spearman'].mean():.3f}"
                    f" | {'/'.join(f'{v:.3f}' for v in part['test_rmse'])} | {rmse - base:+.3f} |")
    rows.append(f"\nmean predictor: test RMSE {df['test_rmse_baseline'].mean():.3f} (mean over seeds)")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--features", default=";".join(SETS), help="feature sets, separated by ';'")
    parser.add_argument("--data", default="demo")
    parser.add_argument("--out", default="feature_groups.jsonl")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if args.summary:
        print(summary([json.loads(line) for line in out.read_text().splitlines() if line.strip()]))
        return
    store = tempfile.mkdtemp(prefix="smp-feature-groups-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for features in args.features.split(";"):
            line = run_one(features, seed, args.data, "feature_groups")
            with out.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
