"""Stage 5: predictions -> metrics named ``{split}_{metric}``.

``bias`` is the mean of prediction minus truth, ``error_var`` the (population)
variance of that error, so ``rmse**2 == bias**2 + error_var``.  Spearman is the
SMP challenge's ranking metric.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

METRICS = ("rmse", "mae", "bias", "error_var", "spearman", "r2")


def regression_metrics(y_true, y_pred, split: str) -> dict[str, float]:
    """Return ``{f"{split}_{m}": value}`` for every metric in ``METRICS``."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"y_true {y.shape} and y_pred {p.shape} must be 1-D and the same length")
    if len(y) == 0:
        raise ValueError(f"{split}: no rows to evaluate")
    err = p - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if len(y) > 1 and np.ptp(p) > 0 and np.ptp(y) > 0:
        spearman = float(spearmanr(y, p).statistic)
    else:
        spearman = float("nan")  # undefined for a constant prediction
    values = {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "bias": float(np.mean(err)),
        "error_var": float(np.var(err)),
        "spearman": spearman,
        "r2": float(1.0 - np.sum(err**2) / ss_tot) if ss_tot > 0 else float("nan"),
    }
    return {f"{split}_{k}": v for k, v in values.items()}


def baseline_metrics(y_train, y_eval, split: str) -> dict[str, float]:
    """Metrics of the mean predictor (train mean) on ``y_eval``, suffixed ``_baseline``."""
    pred = np.full(len(y_eval), float(np.mean(y_train)))
    out = regression_metrics(y_eval, pred, split)
    return {f"{k}_baseline": v for k, v in out.items() if not k.endswith("spearman")}
