"""Fit pca_boost's booster on a dumped matrix under whichever XGBoost this interpreter has (figures:
docs/benchmarks.md, "Tree method, bins and threads from the data").

The matrix comes from ``SMP_DUMP=m.npz benchmarks/pca_boost_bins.py ...``. Needs numpy, xgboost and
scikit-learn (XGBRegressor), so it runs in a throwaway venv with an old release
(e.g. ``pip install xgboost==1.7.6 'numpy<2' scipy scikit-learn``) as well as in the project's.
One JSON line per setting: release, wall/CPU seconds, best iteration, rounds grown, ms per round,
test RMSE. The booster's settings repeat pca_boost's (``XGBCfg`` at depth 12, as in
``benchmarks/pca_boost_bins.py``) by hand, since smp itself may not import under an old release.

Run:  python benchmarks/xgb_fit.py m.npz SEED '{"tree_method": "exact", "n_jobs": 1}' ...
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import xgboost as xgb


def main() -> None:
    m = np.load(sys.argv[1])
    seed = int(sys.argv[2])
    for text in sys.argv[3:]:
        setting = json.loads(text)
        params = dict(n_estimators=2000, max_depth=12, learning_rate=0.01, objective="reg:squarederror",
                      eval_metric="rmse", early_stopping_rounds=100, random_state=seed, **setting)
        booster = xgb.XGBRegressor(**params)
        w0, c0 = time.perf_counter(), time.process_time()
        booster.fit(m["X_tr"], m["y_tr"], eval_set=[(m["X_va"], m["y_va"])], verbose=False)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        rounds = booster.get_booster().num_boosted_rounds()
        pred = booster.predict(m["X_te"], iteration_range=(0, booster.best_iteration + 1))
        rmse = float(np.sqrt(np.mean((pred - m["y_te"]) ** 2)))
        print(json.dumps({"xgboost": xgb.__version__, "seed": seed, **setting, "wall_s": round(wall, 1),
                          "cpu_s": round(cpu, 1), "best": int(booster.best_iteration), "rounds": rounds,
                          "ms_per_round": round(1000 * wall / rounds, 1),
                          "test_rmse": round(rmse, 4)}), flush=True)


if __name__ == "__main__":
    main()
