"""Wall time and peak memory of each model entry point on an 80k-post synthetic set with cached image features
(figures: docs/benchmarks.md, "Entry points at 80,000 posts").

The image features are *cached*, so that the model code is what is timed: a features table (Pid, has_image,
five handcrafted features, 1024 CLIP columns) is logged once as an `embed` run and every entry point is pointed at it with
``--embed-run``.  Its CLIP columns are random float32 vectors standing in for RN50 embeddings (embedding
80k images on this CPU takes hours; the model code's speed does not depend on the values).  The synthetic
posts themselves are the project's generator's (official SMPD layout, small JPEGs).

Each entry point runs as ``python -m smp.cli <entry point> ...`` in its own process; wall time is measured
around it and peak RSS is the process's own maximum resident set (``os.wait4``).  Order:

  benchmark                       XGBoost on tabular features (``--n-estimators`` trees, see below)
  ensemble_mlp (first)            + out-of-fold benchmark predictions (K fits, cached on the benchmark run)
  ensemble_mlp (upstream cached)  the MLP alone: 30 epochs over 64.8k train rows (target: 3 minutes)
  ensemble_conv1d                 upstream cached
  pca_boost                       PCA 300 + XGBoost

The paper's XGBoost settings (2000 rounds at lr 0.01, depth 18 / 12) take tens of minutes per fit on 2 cores
and the ensembles' out-of-fold stacking needs 5 more fits, so ``--n-estimators`` (default 200) caps the
boosted models here; the figures say so.  ``--full`` uses the paper's 2000.

Run:  .venv/bin/python benchmarks/entrypoints.py [--n 80000] [--n-estimators 200] [--only ensemble_mlp,...]

Before/after on one machine: the same script against another checkout of the project (e.g. a ``git worktree``
of an older commit), on the same generated posts, in its own experiment (``--label``), so that nothing is
reused across the two trees: ``SMP_TREE=<checkout> PYTHONPATH=<checkout> .venv/bin/python
benchmarks/entrypoints.py --label before``.  Metric names of older commits (``fit_seconds``...) are read too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = Path(os.environ.get("SMP_TREE", ROOT)).resolve()  # the checkout whose smp runs (default: this one)


def make_data(work: Path, n: int) -> Path:
    from smp.synth import SynthCfg, generate

    out = work / f"smpd-n{n}"
    if not (out / "train_label.txt").exists():
        t0 = time.perf_counter()
        generate(out, SynthCfg(n=n, seed=0))
        print(f"generated {n} synthetic posts in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return out


def log_cached_features(data: Path, experiment: str, dim: int = 1024) -> str:
    """Log a features table for every post as an `embed` run; its id."""
    import mlflow
    import numpy as np
    import pandas as pd

    from smp.data import data_hash, load_data
    from smp.image_features import HANDCRAFTED
    from smp.tracking import configure_tracking

    configure_tracking()
    posts = load_data(str(data))
    rng = np.random.default_rng(0)
    n = len(posts)
    feats = pd.concat([
        pd.DataFrame({"Pid": posts["Pid"].astype(str).to_numpy(), "has_image": np.ones(n, dtype=np.int64)}),
        pd.DataFrame(rng.random((n, len(HANDCRAFTED))), columns=list(HANDCRAFTED)),
        pd.DataFrame(rng.standard_normal((n, dim), dtype=np.float32), columns=[f"clip_{i}" for i in range(dim)]),
    ], axis=1)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="embed (cached stand-in features)") as run:
        mlflow.set_tags({"smp.job": "embed", "smp.data_hash": data_hash(posts), "smp.clip_random_weights": "true",
                         "smp.clip_effective_pretrained": "none", "smp.benchmark_stand_in": "true"})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "features.parquet"  # the name the model jobs read
            feats.to_parquet(path, index=False)
            mlflow.log_artifact(str(path))
    return run.info.run_id


def timed(args: list[str], env: dict, log: Path) -> dict:
    """Run ``python -m smp.cli *args``; wall seconds and the process's peak RSS (MB)."""
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "smp.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=TREE)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"smp {' '.join(args)} failed; see {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "peak_mb": usage.ru_maxrss / 1024}


def last_run_metrics(experiment: str) -> dict:
    """The newest top-level run's metrics, plus ``epochs_run`` (steps of ``val_rmse_epoch``) for the nets."""
    import mlflow

    runs = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time DESC"],
                              max_results=20, output_format="list")
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "smp.benchmark_stand_in" not in r.data.tags]
    if not runs:
        return {}
    metrics = dict(runs[0].data.metrics)
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "val_rmse_epoch")
    metrics["epochs_run"] = len(history) if len(history) > 1 else None
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=80000)
    ap.add_argument("--n-estimators", type=int, default=200)
    ap.add_argument("--full", action="store_true", help="the paper's 2000 rounds")
    ap.add_argument("--work", default=str(ROOT / ".smp_cache" / "bench-entrypoints"))
    ap.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    ap.add_argument("--label", default="", help="experiment suffix, e.g. before / after (nothing reused across labels)")
    args = ap.parse_args()
    trees = 2000 if args.full else args.n_estimators
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SMP_CACHE_DIR": str(work / "cache")}
    exp = f"bench-entrypoints-n{args.n}-t{trees}" + (f"-{args.label}" if args.label else "")
    data = make_data(work, args.n)
    common = ["--data", str(data), "--sample-size", str(args.n), "--experiment", exp, "--n-estimators", str(trees)]
    import mlflow

    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=[exp], filter_string="tags.`smp.benchmark_stand_in` = 'true'",
                               output_format="list")
    embed_run = found[0].info.run_id if found else log_cached_features(data, exp)
    up = ["--embed-run", embed_run]
    nets = [*up, "--patience", "1000"]  # no early stop: every epoch runs (30 MLP, 20 Conv1D)
    steps = [
        ("benchmark", ["benchmark", *common]),
        ("ensemble_mlp (first: computes out-of-fold stacking)", ["ensemble_mlp", *common, *nets]),
        ("ensemble_mlp (upstream cached)", ["ensemble_mlp", *common, *nets]),
        ("ensemble_conv1d (upstream cached)", ["ensemble_conv1d", *common, *nets]),
        ("pca_boost", ["pca_boost", *common, *up]),
    ]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    results = []
    for name, cmd in steps:
        if only and cmd[0] not in only:
            continue
        r = timed(cmd, env, work / f"{name.split()[0]}-{len(results)}.log")
        m = last_run_metrics(exp)
        def first(*keys):
            return next((m[k] for k in keys if m.get(k) is not None), None)

        r.update(step=name, fit_s=first("time/fit_s", "fit_seconds"), oof_s=first("time/oof_s", "oof_seconds"),
                 test_rmse=m.get("test_rmse"), epochs=m.get("epochs_run"),
                 best=first("fit/best_epoch", "fit/best_iteration", "best_epoch", "best_iteration"))
        results.append(r)
        fit = f", model fit {r['fit_s']:.0f} s" if r["fit_s"] is not None else ""
        fit += f" ({r['epochs']} epochs)" if r["epochs"] else ""
        print(f"{name:55s} wall {r['wall_s']:7.1f} s  peak RSS {r['peak_mb']:7.0f} MB{fit}  "
              f"test RMSE {r['test_rmse'] if r['test_rmse'] is None else round(r['test_rmse'], 3)}", flush=True)
    print(json.dumps({"n": args.n, "n_estimators": trees, "tree": str(TREE), "label": args.label, "results": results}))


if __name__ == "__main__":
    main()
