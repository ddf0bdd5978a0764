"""Booster prediction helpers."""

from __future__ import annotations

import json

import numpy as np
import xgboost as xgb

from smp.boosters import SMALL_PREDICT, predict_booster


def _nthread(booster: xgb.XGBRegressor) -> int:
    return int(json.loads(booster.get_booster().save_config())["learner"]["generic_param"]["nthread"])


def test_predict_booster_small_and_large_batches_equal_plain_predict_and_restore_threads():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 6)).astype(np.float32)
    y = X[:, 0] * 2 + rng.standard_normal(300)
    # fitted on one thread (two threads' OpenMP barriers cost seconds on a busy machine), predicting on two
    model = xgb.XGBRegressor(n_estimators=20, max_depth=4, n_jobs=1).fit(X, y).set_params(n_jobs=2)
    before = _nthread(model)
    small, large = X[:3], X[: SMALL_PREDICT + 50]
    np.testing.assert_allclose(predict_booster(model, small), model.predict(small), rtol=1e-6)
    np.testing.assert_allclose(predict_booster(model, large), model.predict(large), rtol=1e-6)
    assert predict_booster(model, small).dtype == np.float64
    assert _nthread(model) == before == 2  # the one-thread switch is undone


# ---------------------------------------------------------------- tree method, bins, device from the data

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from smp.boosters import (EXACT_MAX_ROWS, FULL_BINS_ROWS, XGBCfg, make_booster, resolve_device,  # noqa: E402
                          tree_settings)
from smp.features import TabularCfg  # noqa: E402
from smp.models import TWO_FOLDS_ROWS, BenchmarkModel, Part, TimeTrend, cross_fit, fold_count  # noqa: E402


def test_tree_settings_follow_the_data_size_and_keep_explicit_choices(monkeypatch):
    monkeypatch.setattr("smp.boosters.resolve_device", lambda device: "cpu" if device == "auto" else device)
    small, mid, large = EXACT_MAX_ROWS - 1, EXACT_MAX_ROWS, FULL_BINS_ROWS
    assert tree_settings(XGBCfg(), small) == {"tree_method": "exact", "max_bin": 64, "device": "cpu", "n_jobs": 1}
    assert tree_settings(XGBCfg(), mid) == {"tree_method": "hist", "max_bin": 64, "device": "cpu", "n_jobs": 1}
    assert tree_settings(XGBCfg(), large) == {"tree_method": "hist", "max_bin": 256, "device": "cpu", "n_jobs": 0}
    assert tree_settings(XGBCfg(n_jobs=2), small)["n_jobs"] == 2
    assert tree_settings(XGBCfg(tree_method="hist", max_bin=256), small)["tree_method"] == "hist"
    assert tree_settings(XGBCfg(max_bin=128), large)["max_bin"] == 128
    gpu = tree_settings(XGBCfg(device="cuda"), small)  # the GPU has no exact method
    assert gpu == {"tree_method": "hist", "max_bin": 256, "device": "cuda", "n_jobs": 0}
    booster = make_booster(XGBCfg(), 0, n_rows=small)
    assert booster.get_params()["tree_method"] == "exact" and booster.get_params()["n_jobs"] == 1
    assert make_booster(XGBCfg(), 0, n_rows=large).get_params()["n_jobs"] is None  # all cores


def test_pca_boost_fits_and_applies_its_pca_on_one_blas_thread(monkeypatch):
    """PCA's products sum in one order whatever the core count (two BLAS threads moved early stopping by
    hundreds of rounds on the demo)."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_info, threadpool_limits

    from smp.models import ImageFeatureSource, PCABoostModel, PCACfg

    seen = []

    def spy(name):
        real = getattr(PCA, name)

        def wrapped(self, *args, **kwargs):
            blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
            seen.append((name, max(blas, default=1)))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(PCA, name, wrapped)

    spy("fit_transform")
    spy("transform")
    rows, y, img, cols = _posts_with_images(120)
    model = PCABoostModel(XGBCfg(n_estimators=5, max_depth=3), PCACfg(n_components=4), TabularCfg(),
                          ImageFeatureSource(cols))
    with threadpool_limits(limits=2, user_api="blas"):  # as on any machine with two or more cores
        model.fit(Part(rows[:100], y[:100], img[:100]), Part(rows[100:], y[100:], img[100:]))
        assert seen == [("fit_transform", 1), ("transform", 1)]  # train, then val
        with_two = model.predict(rows[100:], img[100:])
    assert seen[-1] == ("transform", 1)
    np.testing.assert_array_equal(with_two, model.predict(rows[100:], img[100:]))


def test_device_auto_is_cpu_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"


def _posts(n, seed=0, slope=0.0):
    rng = np.random.default_rng(seed)
    days = np.sort(rng.uniform(0, 400, n))
    posts = pd.DataFrame({"Pid": [f"p{seed}-{i}" for i in range(n)], "Postdate": 1.45e9 + days * 86400,
                          "Category": rng.choice(list("ABC"), n), "tag_count": rng.integers(0, 20, n).astype(float)})
    y = 6 + slope * days / 100 + (posts["Category"] == "A") * 1.5 + 0.1 * posts["tag_count"] + rng.normal(0, .3, n)
    return posts, y.to_numpy(float)


def _posts_with_images(n, seed=0):
    """``_posts`` plus an image block (handcrafted + 8 clip columns) whose first column carries signal."""
    from smp.image_features import HANDCRAFTED

    posts, y = _posts(n, seed)
    cols = [*HANDCRAFTED, *(f"clip_{i}" for i in range(8))]
    img = np.random.default_rng(seed + 1).standard_normal((n, len(cols))).astype(np.float32)
    img[:, 0] += (y - y.mean()).astype(np.float32)
    return posts, y, img, cols


def test_time_trend_extrapolates_where_trees_cannot():
    posts, y = _posts(600, slope=1.0)
    train, test = posts.iloc[:450].reset_index(drop=True), posts.iloc[450:].reset_index(drop=True)
    cfg = XGBCfg(n_estimators=200, max_depth=4, learning_rate=0.1, early_stopping_rounds=0)
    args = (Part(train, y[:450]), Part(train.tail(50), y[400:450]))
    flat = BenchmarkModel(cfg, TabularCfg(), 0).fit(*args)
    trend = BenchmarkModel(cfg, TabularCfg(absolute_date=False, time_trend=True), 0).fit(*args)
    assert "Postdate" not in trend.featurizer_.feature_names_ and "Postdate" in trend.input_fields_
    err = lambda m: float(np.mean(np.abs(m.predict(test) - y[450:])))  # noqa: E731
    assert err(trend) < 0.6 * err(flat)  # later posts sit above the training range of the label
    assert TimeTrend().fit(train, y[:450]).slope_ == pytest.approx(0.01, rel=0.1)  # 1.0 per 100 days
    no_date = test.drop(columns="Postdate")
    assert np.isfinite(trend.predict(no_date)).all()
    with pytest.raises(ValueError, match="time_trend"):
        TimeTrend().fit(train.assign(Postdate=1.45e9), y[:450])


def test_cross_fit_averages_its_fold_models_and_predicts_out_of_fold():
    posts, y = _posts(300, seed=2)
    val, y_val = posts.head(40), y[:40]
    cfg = XGBCfg(n_estimators=40, max_depth=3, learning_rate=0.2, early_stopping_rounds=0)
    fitted = cross_fit(posts, y, val, y_val, cfg, TabularCfg(), seed=0, folds=3)
    assert len(fitted.models) == 3 and np.isfinite(fitted.oof_).all()
    mean = np.mean([m.predict(val) for m in fitted.models], axis=0)
    np.testing.assert_allclose(fitted.predict(val), mean)
    # each row's out-of-fold value is the prediction of the one fold model that did not train on it
    held_out = [np.isclose(fitted.oof_, m.predict(posts)) for m in fitted.models]
    assert (np.sum(held_out, axis=0) >= 1).all()
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_fit(posts, y, val, y_val, cfg, TabularCfg(), seed=0, folds=1)


def test_fold_models_use_the_tree_settings_of_the_full_training_set(monkeypatch):
    import smp.boosters as boosters

    posts, y = _posts(300, seed=2)
    val, y_val = posts.head(40), y[:40]
    cfg = XGBCfg(n_estimators=10, max_depth=3, learning_rate=0.2, early_stopping_rounds=0)
    monkeypatch.setattr(boosters, "EXACT_MAX_ROWS", 250)  # 300 training rows: hist; a fold's 200 alone: exact
    assert tree_settings(cfg, 200)["tree_method"] == "exact" and tree_settings(cfg, 300)["tree_method"] == "hist"
    fitted = cross_fit(posts, y, val, y_val, cfg, TabularCfg(), seed=0, folds=3)
    assert [m.tree_settings_ for m in fitted.models] == [tree_settings(cfg, 300)] * 3


def test_fold_models_grow_the_given_rounds_or_early_stop():
    """rounds=N: every fold model has exactly N trees; rounds=None: each fold stops on val (labels are noise
    on a learnable signal, so a fast learner overfits and stops well before its cap)."""
    rng = np.random.default_rng(1)
    n = 300
    posts = pd.DataFrame({"Pid": [str(i) for i in range(n)], "photo_count": rng.random(n) * 10,
                          "Postdate": 1.4e9 + rng.random(n) * 1e7})
    y = posts["photo_count"].to_numpy() / 3 + rng.normal(0, 2, n)
    val, y_val = posts.head(60), y[:60]
    cfg = XGBCfg(n_estimators=300, max_depth=6, learning_rate=0.5, early_stopping_rounds=5)
    fixed = cross_fit(posts, y, val, y_val, cfg, TabularCfg(), seed=0, folds=3, rounds=17)
    assert [m.booster_.get_booster().num_boosted_rounds() for m in fixed.models] == [17, 17, 17]
    assert [m.best_iteration_ for m in fixed.models] == [17, 17, 17] and np.isfinite(fixed.oof_).all()
    stopped = cross_fit(posts, y, val, y_val, cfg, TabularCfg(), seed=0, folds=3)
    assert all(m.best_iteration_ < 100 for m in stopped.models)  # early stopping ended every fold
    with pytest.raises(ValueError, match="at least one tree"):
        cross_fit(posts, y, val, y_val, cfg, TabularCfg(), seed=0, folds=3, rounds=0)


def test_fold_count_from_the_training_rows_unless_given():
    assert fold_count(0, TWO_FOLDS_ROWS - 1) == 3 and fold_count(0, TWO_FOLDS_ROWS) == 2
    assert fold_count(5, 100) == 5 and fold_count(3, 10 * TWO_FOLDS_ROWS) == 3  # an explicit K is kept
