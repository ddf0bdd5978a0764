"""Stage 4: the models, chosen by name from ``MODELS``.

Every model follows scikit-learn conventions (``__init__`` stores parameters,
``fit`` returns ``self``, fitted attributes end in ``_``) and predicts from a
raw posts DataFrame (SMPD field names), so the logged MLflow model is the
whole chain: tabular transform -> booster (-> image features -> network).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import xgboost as xgb

from smp.features import TabularCfg, TabularFeaturizer


@dataclass(frozen=True)
class XGBCfg:
    n_estimators: int = 2000         # paper's grid search (benchmark)
    max_depth: int = 18              # paper's grid search (benchmark)
    learning_rate: float = 0.01      # paper's grid search (benchmark)
    early_stopping_rounds: int = 100  # rounds without val improvement before stopping
    min_child_weight: float = 1.0    # XGBoost default
    subsample: float = 1.0           # XGBoost default
    colsample_bytree: float = 1.0    # XGBoost default
    reg_lambda: float = 1.0          # XGBoost default (L2)
    reg_alpha: float = 0.0           # XGBoost default (L1)
    max_bin: int = 256               # histogram bins (tree_method=hist)
    n_jobs: int = 0                  # 0 = all cores


def make_booster(cfg: XGBCfg, seed: int, callbacks=None, early_stopping: bool = True) -> xgb.XGBRegressor:
    """An ``XGBRegressor`` (``tree_method=hist``) configured from ``cfg``."""
    params = asdict(cfg)
    rounds = params.pop("early_stopping_rounds")
    n_jobs = params.pop("n_jobs") or None
    return xgb.XGBRegressor(
        **params, tree_method="hist", objective="reg:squarederror", eval_metric="rmse",
        early_stopping_rounds=rounds if early_stopping and rounds > 0 else None,
        random_state=seed, n_jobs=n_jobs, callbacks=callbacks,
    )


def fit_booster(booster: xgb.XGBRegressor, X, y, X_val, y_val) -> xgb.XGBRegressor:
    """Fit with the validation set as the (last) eval set; callbacks are dropped afterwards."""
    booster.fit(X, y, eval_set=[(X_val, y_val)], verbose=False)
    booster.set_params(callbacks=None)  # pruning callbacks hold an Optuna trial: never pickle them
    return booster


def best_iteration(booster: xgb.XGBRegressor) -> int:
    """Number of trees used for prediction (best iteration + 1 under early stopping)."""
    try:
        return int(booster.best_iteration) + 1
    except AttributeError:
        return int(booster.get_booster().num_boosted_rounds())


class BenchmarkModel:
    """The paper's benchmark: XGBoost on the tabular features only."""

    family = "benchmark"
    needs_images = False

    def __init__(self, cfg: XGBCfg = XGBCfg(), tabular: TabularCfg = TabularCfg(), seed: int = 0):
        self.cfg = cfg
        self.tabular = tabular
        self.seed = seed

    def fit(self, train: pd.DataFrame, y, val: pd.DataFrame, y_val, callbacks=None) -> "BenchmarkModel":
        self.featurizer_ = TabularFeaturizer(self.tabular).fit(train)
        X, X_val = self.featurizer_.transform(train), self.featurizer_.transform(val)
        self.booster_ = fit_booster(make_booster(self.cfg, self.seed, callbacks), X, y, X_val, y_val)
        self.best_iteration_ = best_iteration(self.booster_)
        return self

    def predict(self, posts: pd.DataFrame) -> np.ndarray:
        """Predicted popularity for raw posts."""
        return self.booster_.predict(self.featurizer_.transform(posts)).astype(float)

    def importance(self) -> tuple[list[str], np.ndarray]:
        """Gain importance per tabular feature."""
        score = self.booster_.get_booster().get_score(importance_type="gain")
        names = self.featurizer_.feature_names_
        return names, np.array([score.get(f"f{i}", 0.0) for i in range(len(names))])

    @property
    def input_fields_(self) -> list[str]:
        return self.featurizer_.raw_fields_
