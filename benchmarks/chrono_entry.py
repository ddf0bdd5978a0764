"""`split=chrono` through the real launcher, scored on later real posts (figures: docs/benchmarks.md,
"The chronological protocol on the real posts").

The posts of ``posts.csv`` dated before the cut (the 90% quantile of ``Postdate``, 2016-02-12 07:12 UTC) are
written to ``pre_cut.csv`` with the file's own columns and dtypes; ``mlflow run <tree> -e benchmark
--env-manager local -P split=chrono -P data=pre_cut.csv -P seed=S`` trains on them (the entry point's
defaults: an 80k sample, the chronological split of it, ``chrono_tuned``); the run's logged model is then
loaded by URI and predicts every post after the cut, read with ``pd.read_csv`` as is. Printed per seed: test
RMSE, MAE, Spearman and bias on those posts, beside the mean predictor (the mean label of the posts before
the cut), and the run's own ``test_bias``.

Before/after on one machine: ``--tree`` another checkout (a ``git worktree`` of an older commit), run with
the same Python (its ``smp`` must be importable: ``PYTHONPATH=<tree>``).

Run:  .venv/bin/python benchmarks/chrono_entry.py [--seeds 0,1,2] [--tree .] [--label after]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "smpd2019" / "posts.csv"))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--tree", default=str(ROOT))
    ap.add_argument("--label", default="")
    ap.add_argument("--work", default="")
    args = ap.parse_args()

    import mlflow
    from scipy.stats import spearmanr

    work = Path(args.work or tempfile.mkdtemp(prefix="chrono_entry_"))
    work.mkdir(parents=True, exist_ok=True)
    posts = pd.read_csv(args.data)
    cut = float(np.quantile(posts["Postdate"].to_numpy(float), 0.9))
    pre, post = posts[posts["Postdate"] < cut], posts[posts["Postdate"] >= cut]
    pre.to_csv(work / "pre_cut.csv", index=False)
    y = post["label"].to_numpy(float)
    mean = float(pre["label"].mean())
    base = {"rmse": float(np.sqrt(np.mean((y - mean) ** 2))), "mae": float(np.mean(np.abs(y - mean)))}
    print(f"cut {pd.Timestamp(cut, unit='s')}: {len(pre)} posts before, {len(post)} after; mean predictor "
          f"{mean:.3f}: RMSE {base['rmse']:.3f} MAE {base['mae']:.3f}", flush=True)
    uri = f"sqlite:///{work}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": args.tree}
    env.pop("MLFLOW_RUN_ID", None)
    for seed in [int(s) for s in args.seeds.split(",")]:
        experiment = f"chrono-{args.label or 'run'}-s{seed}"
        cmd = [sys.executable, "-m", "mlflow", "run", args.tree, "-e", "benchmark", "--env-manager", "local",
               "--experiment-name", experiment, "-P", "split=chrono", "-P", f"data={work / 'pre_cut.csv'}",
               "-P", f"seed={seed}"]
        done = subprocess.run(cmd, cwd=work, env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            raise SystemExit(f"mlflow run failed for seed {seed}")
        mlflow.set_tracking_uri(uri)
        exp = mlflow.get_experiment_by_name(experiment)
        run = mlflow.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1,
                                 output_format="list")[0]
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/benchmark")
        frame = post.drop(columns=["label"]) if "label" in post.columns else post
        try:
            pred = model.predict(frame)
        except Exception:  # noqa: BLE001 - a model of an older commit refused the natural frame: cast for it
            frame = frame.astype({c: float for c in frame.select_dtypes("number").columns if c != "Pid"})
            pred = model.predict(frame.assign(Pid=frame["Pid"].astype(str)))
        p = np.asarray(pred["popularity"] if isinstance(pred, pd.DataFrame) else pred, dtype=float)
        out = {"label": args.label, "seed": seed, "run": run.info.run_id,
               "rmse": round(float(np.sqrt(np.mean((y - p) ** 2))), 4), "mae": round(float(np.mean(np.abs(y - p))), 4),
               "spearman": round(float(spearmanr(y, p).statistic), 4), "bias": round(float(np.mean(p - y)), 4),
               "mean_rmse": round(base["rmse"], 4), "mean_mae": round(base["mae"], 4),
               "run_test_bias": round(run.data.metrics.get("test_bias", float("nan")), 4),
               "effective": {k: v for k, v in run.data.params.items() if k.startswith("effective/")}}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
