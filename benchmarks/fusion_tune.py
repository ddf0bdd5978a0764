"""Does tuning fusion's own settings pay within a 20-trial budget? Two search spaces, several sampler seeds.

``wide`` is ``fusion_space`` as shipped (widths, dropout, lr, weight decay, batch, epochs, plus fusion's own
``modality_dropout``, ``user_embedding_dim`` and the ``fusion`` layer); ``narrow`` is the same without fusion's
own three (they stay at their defaults). For each space and each ``--sampler-seeds`` value the script runs
``smp tune --model fusion --n-trials N`` on the demo data (split and model seed 0, every other setting at its
default: CLIP RN50, random weights here, offline) into one throw-away store, and prints per study the best
trial's validation and test RMSE; then the mean per space. All studies read the same benchmark run and fold
models (found by their reuse key), so they differ only in the trials.

Not a timed test: figures for docs/benchmarks.md.

Run:  .venv/bin/python benchmarks/fusion_tune.py --sampler-seeds 0 1 2 --n-trials 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace

OWN = ("modality_dropout", "user_embedding_dim", "fusion")  # fusion's own settings in its space


def narrow_space(trial) -> dict:
    """The shipped space's shared settings only, sampled without touching fusion's own names."""
    from smp.fusion_net import fusion_space

    class Shared:  # a trial that answers fusion's own names with their defaults instead of sampling them
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            method = getattr(self.inner, name)
            if not name.startswith("suggest_"):
                return method

            def suggest(param, *args, **kw):
                if param in OWN:
                    return None
                return method(param, *args, **kw)
            return suggest

    values = fusion_space(Shared(trial))
    return {k: v for k, v in values.items() if k not in OWN}


def study(space_name: str, sampler_seed: int, n_trials: int) -> dict:
    import mlflow

    import smp.families
    from smp.config import apply
    from smp.tune import TuneJob, run_tune

    fusion = smp.families.FAMILIES["fusion"]
    if space_name == "narrow":
        smp.families.FAMILIES["fusion"] = replace(fusion, space=narrow_space)
    try:
        cfg = apply(TuneJob(), {"model": "fusion", "n_trials": n_trials, "data": "demo", "sampler_seed": sampler_seed,
                                "study_name": f"fusion-{space_name}-{sampler_seed}",
                                "experiment": "fusion-tune"})
        t0 = time.perf_counter()
        result = run_tune(cfg)
        wall = time.perf_counter() - t0
    finally:
        smp.families.FAMILIES["fusion"] = fusion
    parent = mlflow.get_run(result.run_id)
    best = mlflow.get_run(parent.data.tags["smp.best_run_id"])
    trials = mlflow.search_runs(experiment_names=["fusion-tune"], output_format="list",
                                filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    return {"space": space_name, "sampler_seed": sampler_seed, "val_rmse": best.data.metrics["val_rmse"],
            "test_rmse": best.data.metrics["test_rmse"], "fusion": best.data.params.get("fusion"),
            "trials": len(trials), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampler-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--spaces", nargs="+", default=["narrow", "wide"], choices=["narrow", "wide"])
    args = parser.parse_args()

    import mlflow

    store = tempfile.mkdtemp(prefix="smp-fusion-tune-")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    rows = []
    for seed in args.sampler_seeds:
        for space in args.spaces:
            row = study(space, seed, args.n_trials)
            rows.append(row)
            print(f"{space} sampler seed {seed}: best val {row['val_rmse']:.4f} test {row['test_rmse']:.4f} "
                  f"(fusion={row['fusion']}, {row['trials']} trials, {row['wall_s']:.0f} s)", flush=True)
    print("\n| space | best val RMSE (mean) | its test RMSE (mean) | per sampler seed (val / test) |")
    print("|---|---|---|---|")
    for space in args.spaces:
        part = [r for r in rows if r["space"] == space]
        print(f"| {space} | {statistics.mean(r['val_rmse'] for r in part):.3f} | "
              f"{statistics.mean(r['test_rmse'] for r in part):.3f} | "
              + ", ".join(f"{r['val_rmse']:.3f} / {r['test_rmse']:.3f}" for r in part) + " |")


if __name__ == "__main__":
    main()
