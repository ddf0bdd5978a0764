"""Optuna studies: nested runs, resume, pruning, two processes on one storage."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import optuna
import pytest

from smp.data import DataCfg
from smp.splits import SplitCfg
from smp.tune import StudyCfg, TuneJob, open_study, run_tune

pytestmark = pytest.mark.slow

GOOD = {"max_depth": 3, "learning_rate": 0.3, "n_estimators": 200, "min_child_weight": 1.0, "subsample": 1.0,
        "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001}
SLOW = {**GOOD, "learning_rate": 0.005}  # barely moves in the first rounds: the median pruner stops it


def _job(smpd_dir, tmp_path, **study) -> TuneJob:
    study = {"model": "benchmark", "n_trials": 3, "study_name": "t", "startup_trials": 1,
             "storage": f"sqlite:///{tmp_path}/optuna.db", **study}
    return TuneJob(source=DataCfg(data=str(smpd_dir)), splitting=SplitCfg(sample_size=0),
                   study=StudyCfg(**study), experiment="tune")


def _children(parent_id):
    exp = mlflow.get_experiment_by_name("tune").experiment_id
    return mlflow.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list")


def test_study_parent_nested_runs_resume_and_pruning(smpd_dir, tmp_path):
    cfg = _job(smpd_dir, tmp_path)
    study = open_study(cfg)
    study.enqueue_trial(GOOD)
    study.enqueue_trial(SLOW)
    result = run_tune(cfg)
    study = optuna.load_study(study_name="t", storage=cfg.study.storage)
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = _children(parent)
    assert len(study.trials) == 3 and len(children) == 3
    states = {t.number: t.state for t in study.trials}
    assert states[0] == optuna.trial.TrialState.COMPLETE
    assert states[1] == optuna.trial.TrialState.PRUNED
    pruned_run = next(r for r in children if r.data.tags.get("optuna.trial_number") == "1")
    assert pruned_run.info.status == "KILLED" and pruned_run.data.tags["smp.trial_state"] == "PRUNED"
    done = [r for r in children if r.info.status == "FINISHED"]
    assert min(r.data.metrics["val_rmse"] for r in done) == pytest.approx(study.best_value)
    assert result["best_val_rmse"] == pytest.approx(study.best_value)
    # a trial logs params, metrics, inputs and its model, but no figures unless asked (trial_figures)
    client = mlflow.MlflowClient()
    best = done[0].info.run_id
    assert "feature_importance.json" in {a.path for a in client.list_artifacts(best)}
    assert len(mlflow.get_run(best).outputs.model_outputs) == 1  # the logged model
    assert client.list_artifacts(best, "plots") == []
    assert {i.dataset.name.rsplit("-", 1)[1] for i in mlflow.get_run(best).inputs.dataset_inputs} == {
        "train", "val", "test"}
    # the parent holds the summary: best value/params, figures, the best trial's model
    p = mlflow.get_run(parent)
    assert p.data.metrics["val_rmse"] == pytest.approx(study.best_value)  # the best trial's, charted beside them
    assert p.data.metrics["study/trials_complete"] + p.data.metrics["study/trials_pruned"] == 3
    assert p.info.run_name.startswith("tune · benchmark · ")
    assert {r.info.run_name for r in children} == {"trial 0", "trial 1", "trial 2"}
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent, "plots")}
    assert "plots/optimization_history.png" in arts
    # the parent's best_model is the best trial's model: same predictions on the same posts
    from smp.data import load_data
    from smp.serving import predict_frame

    posts = load_data(str(smpd_dir)).drop(columns=["label"]).head(8)
    best_trial_run = next(r for r in children if r.data.tags.get("optuna.trial_number") == str(study.best_trial.number))
    copied = mlflow.pyfunc.load_model(f"runs:/{parent}/best_model")
    original = mlflow.pyfunc.load_model(f"runs:/{best_trial_run.info.run_id}/benchmark")
    assert predict_frame(copied, posts) == pytest.approx(predict_frame(original, posts))
    # the same name continues the study under the same parent run
    run_tune(_job(smpd_dir, tmp_path, n_trials=1))
    study = optuna.load_study(study_name="t", storage=cfg.study.storage)
    assert len(study.trials) == 4 and study.user_attrs["mlflow_parent_run_id"] == parent
    assert len(_children(parent)) == 4


def test_trial_figures_on_request(smpd_dir, tmp_path):
    cfg = _job(smpd_dir, tmp_path, n_trials=1, trial_figures=True, study_name="figs")
    open_study(cfg).enqueue_trial(GOOD)
    run_tune(cfg)
    parent = optuna.load_study(study_name="figs", storage=cfg.study.storage).user_attrs["mlflow_parent_run_id"]
    (trial,) = _children(parent)
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(trial.info.run_id, "plots")}
    assert plots == {"plots/pred_vs_actual.png", "plots/error_hist.png", "plots/feature_importance.png"}


def test_two_processes_share_one_study(smpd_dir, tmp_path):
    storage = f"journal:{tmp_path}/study.log"
    args = [sys.executable, "-m", "smp.cli", "tune", "--data", str(smpd_dir), "--sample-size", "0",
            "--model", "benchmark", "--study-name", "shared", "--storage", storage, "--experiment", "tune"]
    init = subprocess.run(args + ["--n-trials", "0"], capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    parent = init.stdout.split("parent run ")[1].split()[0]
    args += ["--n-trials", "2", "--parent-run", parent]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    from smp.tune import make_storage

    study = optuna.load_study(study_name="shared", storage=make_storage(storage))
    assert len(study.trials) == 4
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)
    assert study.user_attrs["mlflow_parent_run_id"] == parent
    children = _children(parent)
    assert len(children) == 4
    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["0", "1", "2", "3"]


def test_xgboost_pruning_reports_every_n_rounds():
    """Each report is a storage round trip: a booster's on_step hook consults Optuna every `report_every` rounds."""
    import numpy as np
    import xgboost as xgb

    from smp.models import step_callbacks
    from smp.tune import step_reporter

    study = optuna.create_study(direction="minimize")  # in memory
    trial = study.ask()
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((200, 3)), rng.standard_normal(200)
    xgb.XGBRegressor(n_estimators=25, max_depth=2, callbacks=step_callbacks(step_reporter(trial, 10))).fit(
        X, y, eval_set=[(X, y)], verbose=False)
    reported = study.trials[0].intermediate_values
    assert sorted(reported) == [0, 10, 20]
    assert all(np.isfinite(v) for v in reported.values())
