"""Fusion against the stacked nets and their benchmark, with the same feature groups, over sizes and seeds.

For each ``--n`` (synthetic demo data of that many posts, data seed 0) and each ``--seeds`` value (the split and
model seed), the script runs, in one throw-away tracking store per (size, seed): ``ensemble_mlp``,
``ensemble_conv1d`` and ``fusion``, each with ``features=--groups`` and every other setting at its default,
CLIP RN50 with random weights (this machine is offline). The three stack on the same benchmark run (the groups
but ``image``; found by its reuse key, fitted once), whose test figures are the ``benchmark`` rows. It prints
one Markdown table of test RMSE / MAE / Spearman (mean over seeds, each seed's RMSE) and each net's fit time;
``--out`` keeps one JSON line per run. Not a timed test: figures for docs/benchmarks.md.

``--fusion-modes concat gated`` adds a ``fusion (gated)`` row; ``--families`` runs a subset (the first one's
benchmark is the cell's ``benchmark`` row).

Run:  .venv/bin/python benchmarks/fusion_compare.py --sizes 800 2000 --seeds 0 1 2 --out fusion.jsonl
      .venv/bin/python benchmarks/fusion_compare.py --sizes 2000 8000 --families fusion --fusion-modes concat gated
      .venv/bin/python benchmarks/fusion_compare.py --summary fusion.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

GROUPS = "tabular,time,user,text,image"
FAMILIES = ("ensemble_mlp", "ensemble_conv1d", "fusion")


def variants(families: tuple[str, ...], fusion_modes: tuple[str, ...]) -> list[tuple[str, str, dict]]:
    """``(row label, family, extra params)`` per run of a cell: the stacked nets, then fusion once per mode
    (``concat`` is the plain ``fusion`` row)."""
    out = [(name, name, {}) for name in families if name != "fusion"]
    if "fusion" in families:
        out += [("fusion" if mode == "concat" else f"fusion ({mode})", "fusion", {"fusion": mode})
                for mode in fusion_modes]
    return out


def run_cell(n: int, seed: int, groups: str, families: tuple[str, ...] = FAMILIES,
             fusion_modes: tuple[str, ...] = ("concat",), split: str = "random") -> list[dict]:
    import mlflow

    from smp.config import apply
    from smp.families import FAMILIES as TABLE
    from smp.synth import demo_data_dir

    store = tempfile.mkdtemp(prefix="smp-fusion-")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    data = demo_data_dir(n, 0)
    rows = []
    for label, name, extra in variants(families, fusion_modes):
        fam = TABLE[name]
        cfg = apply(fam.config(), {"data": str(data), "seed": seed, "features": groups, "clip_pretrained": "none",
                                   "sample_size": 0, "experiment": "fusion", "split": split, **extra})
        t0 = time.perf_counter()
        result = fam.run(cfg)
        run = mlflow.get_run(result.run_id)
        m = run.data.metrics
        rows.append({"n": n, "seed": seed, "model": label, "test_rmse": m["test_rmse"], "test_mae": m["test_mae"],
                     "test_spearman": m["test_spearman"], "fit_s": m.get("time/fit_s"),
                     "wall_s": time.perf_counter() - t0})
        if len(rows) == 1:  # the benchmark every net of the cell stacks on (found by its reuse key)
            bench = mlflow.get_run(run.data.tags["smp.benchmark_run"]).data.metrics
            rows.append({"n": n, "seed": seed, "model": "benchmark (groups but image)",
                         "test_rmse": bench["test_rmse"], "test_mae": bench["test_mae"],
                         "test_spearman": bench["test_spearman"], "fit_s": bench.get("time/fit_s"), "wall_s": None})
    return rows


def summary(rows: list[dict]) -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    head = "| posts | model | test RMSE | MAE | Spearman | RMSE per seed | fit s (mean) | vs benchmark |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for n, part in df.groupby("n", sort=True):
        order = list(dict.fromkeys(part["model"]))
        mean = part.groupby("model")[["test_rmse", "test_mae", "test_spearman", "fit_s"]].mean()
        base = mean.loc["benchmark (groups but image)", "test_rmse"]
        for model in order:
            m, cells = mean.loc[model], part[part["model"] == model].sort_values("seed")
            lines.append(f"| {n} | {model} | {m.test_rmse:.3f} | {m.test_mae:.3f} | {m.test_spearman:.3f} | "
                         f"{'/'.join(f'{v:.3f}' for v in cells['test_rmse'])} | {m.fit_s:.1f} | "
                         f"{m.test_rmse - base:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[800, 2000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--groups", default=GROUPS)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--fusion-modes", nargs="+", default=["concat"], choices=["concat", "gated"],
                        help="fusion's fusion layer(s): one fusion row per mode")
    parser.add_argument("--split", default="random", choices=["random", "chrono", "user"])
    parser.add_argument("--out", default="")
    parser.add_argument("--summary", default="", help="only print the table of the rows in this --out file")
    args = parser.parse_args()
    if args.summary:
        print(summary([json.loads(x) for x in Path(args.summary).read_text().splitlines() if x.strip()]))
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    t0, rows = time.perf_counter(), []
    for n in args.sizes:
        for seed in args.seeds:
            found = run_cell(n, seed, args.groups, tuple(args.families), tuple(args.fusion_modes), args.split)
            rows += found
            if args.out:
                with Path(args.out).open("a") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in found)
            print(f"{n} posts, seed {seed}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    print(summary(rows))
    print(f"\nwall time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
