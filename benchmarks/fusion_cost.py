"""Fit time and peak memory of fusion against ensemble_mlp, same posts, same groups, same benchmark.

Synthetic demo data of ``--n`` posts (data seed 0), every family setting at its default, ``features=--groups``,
CLIP RN50 with random weights (this machine is offline), one throw-away tracking store. First each family runs
once to fill the store (embed, the benchmark on the groups but ``image``, its fold models): both nets then stack
on those same runs. Then ``--repeats`` rounds run each family again, each run in a fresh Python process, so its
peak resident memory (``ru_maxrss`` of that process, from ``os.wait4``) is the run's own: loading the posts and
the image features, the net's fit, evaluation and logging the model (and the imports: a process that only
imports them is printed as the floor). The net's fit time is the run's
``time/fit_s``; wall is the process's. The script prints the medians per family, and their ratio.

Not a timed test: figures for docs/benchmarks.md.

Run:  .venv/bin/python benchmarks/fusion_cost.py --n 8000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUPS = "tabular,time,user,text,image"
FAMILIES = ("ensemble_mlp", "fusion")

CHILD = """
import json, sys, mlflow
from smp.config import apply
from smp.families import FAMILIES
name, data, seed, groups, uri = sys.argv[1:6]
mlflow.set_tracking_uri(uri)
fam = FAMILIES[name]
cfg = apply(fam.config(), {"data": data, "seed": int(seed), "features": groups, "clip_pretrained": "none",
                           "sample_size": 0, "experiment": "cost"})
result = fam.run(cfg)
run = mlflow.get_run(result.run_id)
print("RESULT " + json.dumps({"run_id": result.run_id, "benchmark_run": run.data.tags.get("smp.benchmark_run"),
                              "fit_s": run.data.metrics.get("time/fit_s"),
                              "test_rmse": run.data.metrics["test_rmse"]}))
"""


def cache_dir() -> str:
    """The feature cache the caller's runs use (``$SMP_CACHE_DIR``, else ``./.smp_cache`` here), so the children,
    started in the store's folder, find the images already embedded."""
    return str(Path(os.environ.get("SMP_CACHE_DIR") or ".smp_cache").absolute())


def run_one(name: str, data: Path, seed: int, groups: str, uri: str) -> dict:
    """One family run in a fresh process: its result line, wall seconds and peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, name, str(data), str(seed), groups, uri],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=uri.removeprefix("sqlite:///").rsplit("/", 1)[0],  # ./mlruns in the store
                            env={**os.environ, "SMP_CACHE_DIR": cache_dir()})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{name} failed (wait status {status})")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return {"model": name, **json.loads(line[len("RESULT "):]), "wall_s": wall,
            "peak_rss_mib": usage.ru_maxrss / 1024}  # Linux: KiB


def import_floor() -> float:
    """Peak RSS (MiB) of a process that only imports what a run imports: the part of each figure no fit adds."""
    proc = subprocess.Popen([sys.executable, "-c", "import mlflow, torch, xgboost, smp.families"])
    _, status, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8000, help="posts in the demo data set")
    parser.add_argument("--seed", type=int, default=0, help="split and model seed")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per family, after the warm-up")
    parser.add_argument("--groups", default=GROUPS)
    parser.add_argument("--out", default="", help="also append one JSON line per run here")
    args = parser.parse_args()

    from smp.synth import demo_data_dir

    data = Path(demo_data_dir(args.n, 0)).resolve()
    store = tempfile.mkdtemp(prefix="smp-fusion-cost-")
    uri = f"sqlite:///{store}/mlflow.db"
    rows = []
    for name in FAMILIES:  # warm-up: fills the store with the upstream runs both nets read
        row = {**run_one(name, data, args.seed, args.groups, uri), "phase": "warm-up"}
        rows.append(row)
        print(f"warm-up {name}: wall {row['wall_s']:.1f} s, peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    for r in range(args.repeats):
        for name in FAMILIES:
            row = {**run_one(name, data, args.seed, args.groups, uri), "phase": f"repeat {r}"}
            rows.append(row)
            print(f"repeat {r} {name}: fit {row['fit_s']:.2f} s, wall {row['wall_s']:.1f} s, "
                  f"peak {row['peak_rss_mib']:.0f} MiB, test RMSE {row['test_rmse']:.4f}", flush=True)
    benches = {row["benchmark_run"] for row in rows}
    if len(benches) != 1:
        raise SystemExit(f"the runs stacked on {len(benches)} benchmark runs, not one: {benches}")
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps({**row, "n": args.n}) + "\n" for row in rows)
    measured = [row for row in rows if row["phase"] != "warm-up"]
    med = {name: {k: statistics.median(row[k] for row in measured if row["model"] == name)
                  for k in ("fit_s", "wall_s", "peak_rss_mib")} for name in FAMILIES}
    print(f"\n{args.n} posts, seed {args.seed}, features={args.groups}, medians of {args.repeats} runs, one benchmark")
    print("| model | net fit s | wall s (process) | peak RSS MiB |")
    print("|---|---|---|---|")
    for name in FAMILIES:
        m = med[name]
        print(f"| {name} | {m['fit_s']:.2f} | {m['wall_s']:.1f} | {m['peak_rss_mib']:.0f} |")
    print(f"| (imports only) | - | - | {import_floor():.0f} |")
    a, b = med["fusion"], med["ensemble_mlp"]
    print(f"| fusion / ensemble_mlp | {a['fit_s'] / b['fit_s']:.2f} | {a['wall_s'] / b['wall_s']:.2f} | "
          f"{a['peak_rss_mib'] / b['peak_rss_mib']:.2f} |")


if __name__ == "__main__":
    main()
