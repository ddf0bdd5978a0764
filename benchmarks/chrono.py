"""Why the benchmark generalises poorly to later posts, measured on the real posts.

A chronological holdout of its own: every real post (``posts.csv``) dated after the cut (the 90% quantile of
``Postdate``: the latest 10% of posts) is test; the posts before the cut are the training pool. Each variant
trains on the pool (or an 80k subsample of it, as the entry points' default ``sample_size``) and predicts
the same test posts; RMSE, MAE and Spearman are printed next to the mean predictor's (the training mean).

Factors varied one at a time from the paper pipeline (the paper's booster, ``Postdate`` as a feature): early
stopping on a validation window (the latest 10% of the training posts, right before the test window),
``Postdate`` itself as a feature, the 80k subsample, the tree depth, and a linear time trend of the label
fitted on the training posts (the model then learns the residual; the trend is extrapolated to test).

Every variant uses the project's own code (``TabularFeaturizer``, ``BenchmarkModel``), so a variant named
like a configuration is exactly that configuration.

Run:  .venv/bin/python benchmarks/chrono.py --data ../shared/data/smpd2019/posts.csv --out chrono.jsonl
      [--only plain,plain_nodate,...]   (results are appended one JSON line per variant)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

PAPER = dict(n_estimators=2000, max_depth=18, learning_rate=0.01, early_stopping_rounds=100)
PLAIN = dict(n_estimators=400, max_depth=8, learning_rate=0.05, early_stopping_rounds=0)

# name: (training rows: "all" pool or "80k", booster settings, early stopping on the val window,
#        Postdate as a feature, linear time trend)
VARIANTS = {
    "paper": ("80k", PAPER, True, True, False),
    "plain": ("all", PLAIN, False, True, False),
    "plain_es": ("all", {**PLAIN, "n_estimators": 2000, "early_stopping_rounds": 100}, True, True, False),
    "plain_nodate": ("all", PLAIN, False, False, False),
    "plain_trend": ("all", PLAIN, False, True, True),
    "plain_nodate_trend": ("all", PLAIN, False, False, True),
    "plain_nodate_trend_80k": ("80k", PLAIN, False, False, True),
    "plain_nodate_trend_es": ("all", {**PLAIN, "n_estimators": 2000, "early_stopping_rounds": 100}, True, False,
                              True),
    "deep_nodate_trend": ("all", {**PLAIN, "max_depth": 18}, False, False, True),
    "paper_nodate_trend_80k": ("80k", PAPER, True, False, True),
    "chrono_default": ("80k", None, None, None, None),  # the entry point's split=chrono default: its own split
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/smpd2019/posts.csv")
    ap.add_argument("--out", default="chrono.jsonl")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all, cheapest first)")
    ap.add_argument("--test-frac", type=float, default=0.10)
    args = ap.parse_args()

    from smp.boosters import XGBCfg
    from smp.data import labelled, load_data
    from smp.evaluate import baseline_metrics, regression_metrics
    from smp.features import TabularCfg
    from smp.models import BenchmarkModel, Part
    from smp.splits import SplitCfg, split_indices, subsample
    from smp.train import protocol_defaults

    posts, _ = labelled(load_data(args.data))
    dates = posts["Postdate"].to_numpy(dtype=float)
    cut = float(np.quantile(dates, 1 - args.test_frac))
    pool = posts[dates < cut].reset_index(drop=True)
    test = posts[dates >= cut].reset_index(drop=True)
    y_test = test["label"].to_numpy(float)
    print(f"{len(posts)} posts; cut {np.datetime64(int(cut), 's')}: pool {len(pool)}, test {len(test)}", flush=True)

    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(VARIANTS)
    for name in names:
        rows, xgb, es, date, trend = VARIANTS[name]
        if xgb is None:  # the defaults split=chrono resolves to
            xgb_cfg, tab_cfg = protocol_defaults(SplitCfg(split="chrono"), XGBCfg(), TabularCfg())
            rows, es = "80k", xgb_cfg.early_stopping_rounds > 0
        else:
            xgb_cfg = replace(XGBCfg(), **xgb)
            tab_cfg = replace(TabularCfg(), absolute_date=date, time_trend=trend)
        train = subsample(pool, 80000, 0) if rows == "80k" else pool
        order = np.argsort(train["Postdate"].to_numpy(float), kind="stable")
        n_val = int(round(0.1 * len(train)))  # 9% of the pipeline's 90% train+val: the latest posts before the cut
        fit_rows, val_rows = train.iloc[np.sort(order[:-n_val])], train.iloc[np.sort(order[-n_val:])]
        if xgb is None:  # exactly what the entry point fits: the job's own chronological split of the sample
            parts = split_indices(train, SplitCfg(split="chrono"))
            fit_rows, val_rows = train.iloc[parts["train"]], train.iloc[parts["val"]]
        elif not es:  # nothing is chosen on the window: train on all of the pool
            fit_rows = train
        fit_rows, val_rows = fit_rows.reset_index(drop=True), val_rows.reset_index(drop=True)
        t0 = time.perf_counter()
        model = BenchmarkModel(xgb_cfg, tab_cfg, seed=0).fit(Part(fit_rows, fit_rows["label"].to_numpy(float)),
                                                              Part(val_rows, val_rows["label"].to_numpy(float)))
        fit_s = time.perf_counter() - t0
        pred = model.predict(test)
        m = regression_metrics(y_test, pred, "test")
        b = baseline_metrics(fit_rows["label"].to_numpy(float), y_test, "test")
        out = {"variant": name, "train_rows": len(fit_rows), "es": bool(es), "absolute_date": tab_cfg.absolute_date,
               "time_trend": tab_cfg.time_trend, "max_depth": xgb_cfg.max_depth, "n_estimators": xgb_cfg.n_estimators,
               "learning_rate": xgb_cfg.learning_rate, "best_iteration": model.best_iteration_,
               "fit_s": round(fit_s, 1), "test_rmse": m["test_rmse"], "test_mae": m["test_mae"],
               "test_spearman": m["test_spearman"], "test_bias": m["test_bias"],
               "test_rmse_baseline": b["test_rmse_baseline"], "test_mae_baseline": b["test_mae_baseline"],
               "cut": int(cut), "test_rows": len(test)}
        print(json.dumps(out), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
