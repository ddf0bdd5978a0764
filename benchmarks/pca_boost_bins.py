"""pca_boost's booster under several tree methods / bin counts, fitted as the job fits it (figures: docs/benchmarks.md,
"pca_boost on the demo" and "Tree method, bins and threads from the data").

Builds the job's matrix (300 PCA components over [CLIP, handcrafted, tabular]) for one data set and split
seed, then fits the paper's booster (depth 12, lr 0.01, up to 2000 rounds, early stopping 100 on val) once
per setting and prints one JSON line each: wall and CPU seconds, best iteration, ms per round, test RMSE.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/pca_boost_bins.py DATA_DIR FEATURES.parquet SEED \
        '{"tree_method": "exact"}' '{"tree_method": "hist", "max_bin": 16}' ...

With ``SMP_DUMP=PATH.npz`` set, the split's matrices and labels are also written there, so that
``benchmarks/xgb_fit.py`` can fit the same booster under another XGBoost release (another venv).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pandas as pd


def main() -> None:
    from smp.boosters import XGBCfg, make_booster
    from smp.data import labelled, load_data
    from smp.features import TabularCfg
    from smp.models import ImageFeatureSource, Part, PCABoostModel, PCACfg, image_columns
    from smp.splits import SplitCfg, split_indices

    data, features, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = [json.loads(s) for s in sys.argv[4:]]
    posts, _ = labelled(load_data(data))
    parts = split_indices(posts, SplitCfg(sample_size=0, seed=seed))
    feats = pd.read_parquet(features)
    feats["Pid"] = feats["Pid"].astype(str)
    cols = image_columns(feats)
    img = feats.set_index("Pid").reindex(posts["Pid"].astype(str))[cols].to_numpy(np.float32)
    y = posts["label"].to_numpy(float)
    rows = lambda idx: posts.iloc[idx].reset_index(drop=True)  # noqa: E731
    tr, va, te = parts["train"], parts["val"], parts["test"]
    pca = PCABoostModel(XGBCfg(n_estimators=1, max_depth=1), PCACfg(), TabularCfg(), ImageFeatureSource(cols))
    pca.fit(Part(rows(tr), y[tr], img[tr]), Part(rows(va), y[va], img[va]))
    matrix = lambda idx: pca.pca_.transform(pca._matrix(rows(idx), img[idx]))  # noqa: E731
    X_tr, X_va, X_te = matrix(tr), matrix(va), matrix(te)
    if os.environ.get("SMP_DUMP"):
        np.savez(os.environ["SMP_DUMP"], X_tr=X_tr, y_tr=y[tr], X_va=X_va, y_va=y[va], X_te=X_te, y_te=y[te])
    for setting in settings:
        booster = make_booster(XGBCfg(max_depth=12, **setting), seed, n_rows=len(X_tr))
        w0, c0 = time.perf_counter(), time.process_time()
        booster.fit(X_tr, y[tr], eval_set=[(X_va, y[va])], verbose=False)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        rmse = float(np.sqrt(np.mean((booster.predict(X_te) - y[te]) ** 2)))
        rounds = booster.get_booster().num_boosted_rounds()
        print(json.dumps({"seed": seed, **setting, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                          "best": int(getattr(booster, "best_iteration", rounds - 1)), "rounds": rounds,
                          "ms_per_round": round(1000 * wall / rounds, 1),
                          "test_rmse": round(rmse, 4)}), flush=True)


if __name__ == "__main__":
    main()
