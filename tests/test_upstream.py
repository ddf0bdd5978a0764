"""The resolve phase's fold-model cache: reused only when it is the same training set, refitted otherwise."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from smp import upstream
from smp.boosters import XGBCfg
from smp.data import DataCfg
from smp.splits import SplitCfg, prepare
from smp.train import EnsembleMLPJob

TINY = XGBCfg(n_estimators=20, max_depth=3, learning_rate=0.3, early_stopping_rounds=0)


@pytest.fixture()
def setting(smpd_dir):
    cfg = EnsembleMLPJob(source=DataCfg(data=str(smpd_dir)), xgb=TINY)
    prep = prepare(cfg.source, cfg.splitting)
    with mlflow.start_run() as run:  # stands for the benchmark run the fold models are cached on
        pass
    return cfg, prep, run.info.run_id


def train_pids(prep):
    return prep.rows("train")["Pid"].astype(str).to_numpy()


def test_fold_models_are_fitted_once_then_read_back(setting):
    cfg, prep, run_id = setting
    name = upstream.fold_artifact(3, 20)
    assert name == "stacking/folds_k3_t20.pkl"
    fitted, why = upstream.cached_fold_models(run_id, name, train_pids(prep))
    assert fitted is None and why.startswith("none cached")

    first, seconds = upstream.fold_models(prep, cfg, run_id, 3, 20)
    assert seconds > 0 and len(first.models) == 3 and np.isfinite(first.oof_).all()
    again, seconds_again = upstream.fold_models(prep, cfg, run_id, 3, 20)
    assert seconds_again == 0.0
    np.testing.assert_array_equal(again.oof_, first.oof_)
    np.testing.assert_array_equal(again.predict(prep.rows("test")), first.predict(prep.rows("test")))


def test_fold_models_of_another_training_set_are_not_reused(setting):
    cfg, prep, run_id = setting
    upstream.fold_models(prep, cfg, run_id, 3, 20)
    name = upstream.fold_artifact(3, 20)
    other = train_pids(prep)[::-1]
    fitted, why = upstream.cached_fold_models(run_id, name, other)
    assert fitted is None and why == "the cached fold models were fitted on another training set"


def test_an_unreadable_cache_file_is_refitted_not_an_error(setting, tmp_path):
    cfg, prep, run_id = setting
    bad = tmp_path / "folds_k3_t20.pkl"
    bad.write_bytes(b"not a pickle")
    mlflow.MlflowClient().log_artifact(run_id, str(bad), upstream.FOLDS_DIR)
    fitted, why = upstream.cached_fold_models(run_id, upstream.fold_artifact(3, 20), train_pids(prep))
    assert fitted is None and why.startswith("the cached file is unreadable (UnpicklingError")
    refit, seconds = upstream.fold_models(prep, cfg, run_id, 3, 20)
    assert seconds > 0 and len(refit.models) == 3
    # the refit replaced the damaged file: the next job reads it
    assert upstream.cached_fold_models(run_id, upstream.fold_artifact(3, 20), train_pids(prep))[1] == ""
