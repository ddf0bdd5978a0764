"""XGBoost per-round cost under the data-chosen tree settings vs the fixed ones.

Builds the exact matrices the jobs fit on (the tabular benchmark's features, and pca_boost's 300 PCA
components over [CLIP, handcrafted, tabular]) for one data set and split, then times ``--rounds`` boosting
rounds (no early stopping) under each setting, interleaved, ``--reps`` times: wall seconds and this
process's CPU seconds per round (CPU time is the fairer figure on a loaded shared machine; a spinning
OpenMP thread counts in it too).

  fixed:  tree_method=hist, max_bin=256, all cores (XGBoost's own defaults)
  auto:   ``boosters.tree_settings`` (exact / 64 bins / one thread on small data)

Run:  .venv/bin/python benchmarks/tree_settings.py --data DIR --features features.parquet [--rounds 20 --reps 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--features", required=True, help="an embed run's features.parquet for the same data")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import pandas as pd

    from smp.boosters import XGBCfg, make_booster, tree_settings
    from smp.data import labelled, load_data
    from smp.features import TabularCfg, TabularFeaturizer
    from smp.models import ImageFeatureSource, Part, PCABoostModel, PCACfg, image_columns
    from smp.splits import SplitCfg, split_indices

    posts, _ = labelled(load_data(args.data))
    parts = split_indices(posts, SplitCfg(sample_size=0))
    feats = pd.read_parquet(args.features).set_index("Pid")
    cols = image_columns(feats.reset_index())
    img = feats.reindex(posts["Pid"].astype(str))[cols].to_numpy(np.float32)
    tr, va = parts["train"], parts["val"]
    rows = lambda idx: posts.iloc[idx].reset_index(drop=True)  # noqa: E731
    y = posts["label"].to_numpy(float)
    tab = TabularFeaturizer(TabularCfg()).fit(rows(tr))
    pca = PCABoostModel(XGBCfg(n_estimators=1, max_depth=1), PCACfg(), TabularCfg(), ImageFeatureSource(cols))
    pca.fit(Part(rows(tr), y[tr], img[tr]), Part(rows(va), y[va], img[va]))
    mats = {"benchmark (depth 18)": (tab.transform(rows(tr)), 18),
            "pca_boost (depth 12)": (pca.pca_.transform(pca._matrix(rows(tr), img[tr])), 12)}
    out = []
    for name, (X, depth) in mats.items():
        for rep in range(args.reps):
            for label, cfg in (("fixed", XGBCfg(max_depth=depth, n_estimators=args.rounds, tree_method="hist",
                                                max_bin=256, early_stopping_rounds=0)),
                               ("auto", XGBCfg(max_depth=depth, n_estimators=args.rounds, early_stopping_rounds=0))):
                booster = make_booster(cfg, 0, early_stopping=False, n_rows=len(X))
                w0, c0 = time.perf_counter(), time.process_time()
                booster.fit(X, y[tr], verbose=False)
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                r = {"matrix": name, "rows": X.shape[0], "cols": X.shape[1], "setting": label, "rep": rep,
                     **({} if label == "fixed" else tree_settings(cfg, len(X))),
                     "wall_s_per_round": wall / args.rounds, "cpu_s_per_round": cpu / args.rounds}
                print(json.dumps(r), flush=True)
                out.append(r)
    for name in mats:
        for label in ("fixed", "auto"):
            sub = [r for r in out if r["matrix"] == name and r["setting"] == label]
            print(f"{name:22s} {label:5s} median wall {np.median([r['wall_s_per_round'] for r in sub]):.3f} s/round, "
                  f"CPU {np.median([r['cpu_s_per_round'] for r in sub]):.3f} s/round")


if __name__ == "__main__":
    main()
