"""Study efficiency: a pruned Optuna study against the paper's kind of grid search.

Both search the tabular benchmark (XGBoost) on the real SMPD posts, same data, split and seed, same
budget of model fits (30), each fit early-stopped on the validation set (100 rounds) as the entry
point does, each logged to MLflow as a run:

  grid    the paper's kind of grid: max_depth {6, 12, 18} x learning_rate {0.005, 0.01, 0.03, 0.1, 0.3}
          x n_estimators {1000, 2000}, the other XGBoost settings at their defaults; every point is one
          ``run_benchmark`` call (the entry point's own code), one after the other.
  optuna  ``smp tune --model benchmark --n-trials 30`` in-process: seeded TPE over the documented space
          (smp.spaces.xgb_space), median pruner consulted every ``report_every`` boosting rounds.

Reported: each search's best validation RMSE and wall time, the best-so-far curve of both, and the time
Optuna took to reach the grid's best validation RMSE (target: at most a third of the grid's wall time).

The paper's data size (80k posts, depth-18 trees at lr 0.01) makes one fit take tens of minutes on
2 cores, so the default subsample is 10,000 posts (``--sample-size``).

Run:  .venv/bin/python benchmarks/study_efficiency.py [--posts ../shared/data/smpd2019/posts.csv]
                                                      [--sample-size 10000] [--trials 30] [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

GRID = {"max_depth": [6, 12, 18], "learning_rate": [0.005, 0.01, 0.03, 0.1, 0.3], "n_estimators": [1000, 2000]}


def run_grid(source, splitting, experiment: str, max_fits: int = 0) -> list[dict]:
    """Every grid point through the benchmark entry point's code; ``[{params, val_rmse, t_end}]``."""
    from smp.cli import apply
    from smp.train import BenchmarkJob, run_benchmark

    base = BenchmarkJob(source=source, splitting=splitting, experiment=experiment)
    out = []
    t0 = time.perf_counter()
    points = list(itertools.product(*GRID.values()))
    for values in points[:max_fits or None]:
        params = dict(zip(GRID, values))
        metrics = run_benchmark(apply(base, params))
        out.append({"params": params, "val_rmse": metrics["val_rmse"], "t_end": time.perf_counter() - t0})
        print(f"grid {len(out):2d}/{len(points)} {params}: val RMSE {metrics['val_rmse']:.4f} at {out[-1]['t_end']:.0f} s",
              flush=True)
    return out


def run_optuna(source, splitting, experiment: str, storage: str, trials: int) -> list[dict]:
    """The tune job, in-process; ``[{params, state, val_rmse, t_end}]`` in trial order (times from Optuna)."""
    import optuna

    from smp.tune import StudyCfg, TuneJob, run_tune

    t0 = time.time()
    run_tune(TuneJob(source=source, splitting=splitting, experiment=experiment,
                     study=StudyCfg(model="benchmark", n_trials=trials, study_name="efficiency", storage=storage)))
    study = optuna.load_study(study_name="efficiency", storage=storage)
    out = []
    for t in study.trials:
        end = t.datetime_complete.timestamp() - t0 if t.datetime_complete else None
        out.append({"params": t.params, "state": t.state.name, "val_rmse": t.value, "t_end": end})
        print(f"optuna {t.number:2d} {t.state.name:8s} val RMSE {t.value if t.value is None else round(t.value, 4)}"
              f" at {end:.0f} s", flush=True)
    return out


def best_so_far(trials: list[dict]) -> list[tuple[float, float]]:
    """``[(t_end, best val RMSE so far)]`` over finished (not pruned) fits."""
    curve, best = [], float("inf")
    for t in sorted((t for t in trials if t["val_rmse"] is not None and t.get("state", "COMPLETE") == "COMPLETE"),
                    key=lambda t: t["t_end"]):
        best = min(best, t["val_rmse"])
        curve.append((t["t_end"], best))
    return curve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", default="../shared/data/smpd2019/posts.csv")
    ap.add_argument("--sample-size", type=int, default=10000)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--out", default="")
    ap.add_argument("--max-fits", type=int, default=0, help="smoke test: only the first N grid points")
    args = ap.parse_args()

    from smp.data import DataCfg
    from smp.splits import SplitCfg

    source, splitting = DataCfg(data=str(Path(args.posts).resolve())), SplitCfg(sample_size=args.sample_size)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ["SMP_CACHE_DIR"] = f"{tmp}/cache"
        os.chdir(tmp)
        t0 = time.perf_counter()
        optuna_trials = run_optuna(source, splitting, "efficiency-optuna", f"sqlite:///{tmp}/optuna.db", args.trials)
        optuna_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        grid = run_grid(source, splitting, "efficiency-grid", args.max_fits)
        grid_wall = time.perf_counter() - t0

    grid_best = min(t["val_rmse"] for t in grid)
    opt_curve = best_so_far(optuna_trials)
    reached = next((t for t, b in opt_curve if b <= grid_best), None)
    pruned = sum(t["state"] == "PRUNED" for t in optuna_trials)
    print(f"\ngrid   ({len(grid)} fits): best val RMSE {grid_best:.4f}, wall {grid_wall:.0f} s "
          f"({min(grid, key=lambda t: t['val_rmse'])['params']})")
    print(f"optuna ({len(optuna_trials)} trials, {pruned} pruned): best val RMSE {opt_curve[-1][1]:.4f}, "
          f"wall {optuna_wall:.0f} s")
    if reached is None:
        print("optuna did not reach the grid's best validation RMSE")
    else:
        print(f"optuna reached the grid's best at {reached:.0f} s = {reached / grid_wall:.2f} of the grid's wall time "
              f"(target <= 0.33)")
    if args.out:
        Path(args.out).write_text(json.dumps({"grid": grid, "optuna": optuna_trials, "grid_wall": grid_wall,
                                              "optuna_wall": optuna_wall, "reached_s": reached}, indent=1))


if __name__ == "__main__":
    main()
