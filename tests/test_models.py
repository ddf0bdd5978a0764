"""Booster prediction helpers."""

from __future__ import annotations

import json

import numpy as np
import xgboost as xgb

from smp.models import SMALL_PREDICT, predict_booster


def _nthread(booster: xgb.XGBRegressor) -> int:
    return int(json.loads(booster.get_booster().save_config())["learner"]["generic_param"]["nthread"])


def test_predict_booster_small_and_large_batches_equal_plain_predict_and_restore_threads():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 6)).astype(np.float32)
    y = X[:, 0] * 2 + rng.standard_normal(300)
    model = xgb.XGBRegressor(n_estimators=20, max_depth=4, n_jobs=2).fit(X, y)
    before = _nthread(model)
    small, large = X[:3], X[: SMALL_PREDICT + 50]
    np.testing.assert_allclose(predict_booster(model, small), model.predict(small), rtol=1e-6)
    np.testing.assert_allclose(predict_booster(model, large), model.predict(large), rtol=1e-6)
    assert predict_booster(model, small).dtype == np.float64
    assert _nthread(model) == before == 2  # the one-thread switch is undone
