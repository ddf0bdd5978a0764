"""Optuna studies: nested runs, resume, pruning, two processes on one storage."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import optuna
import pytest

from smp.config import sig
from smp.data import DataCfg
from smp.spaces import xgb_space
from smp.splits import SplitCfg
from smp.tune import StudyCfg, TuneJob, open_study, run_tune, study_figure, study_note

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
    note = pruned_run.data.tags["mlflow.note.content"]  # MLflow draws KILLED as a failure: the description says why
    assert note.startswith("benchmark: ") and "Stopped early by the study's pruner (pruned at step " in note
    assert "not a failure" in note
    done = [r for r in children if r.info.status == "FINISHED"]
    assert min(r.data.metrics["val_rmse"] for r in done) == pytest.approx(study.best_value)
    # what `smp tune` returns (and prints) is what the parent logged, under the same keys
    p = mlflow.get_run(parent)
    assert result["val_rmse"] == pytest.approx(study.best_value) and result["study/best_trial"] == study.best_trial.number
    assert set(result) == {"val_rmse", "study/best_trial"} | {f"study/trials_{s.name.lower()}"
                                                              for s in optuna.trial.TrialState}
    assert all(p.data.metrics[k] == pytest.approx(v) for k, v in result.items())
    # the study names its objective and carries a note (optuna-dashboard shows both)
    assert study.metric_names == ["val_rmse"]
    best = f"best trial {study.best_trial.number}, val_rmse {sig(study.best_value)}"
    assert study.user_attrs["summary"].startswith(f"benchmark on smpd, split random: {best}; changed from the ")
    dashboard = pytest.importorskip("optuna_dashboard")
    note = dashboard.get_note(study)
    assert best.capitalize() in note and parent in note
    assert f"Data `{smpd_dir}`" in note and "split `random`" in note
    # the parent run's page (MLflow) says the same: its description is the study's note
    description = mlflow.get_run(parent).data.tags["mlflow.note.content"]
    assert description.startswith("Optuna study `t`. **benchmark**") and best.capitalize() in description
    # a trial logs params, metrics, inputs and its model, but no figures unless asked (trial_figures)
    client = mlflow.MlflowClient()
    best = done[0].info.run_id
    assert "feature_importance.json" in {a.path for a in client.list_artifacts(best)}
    assert len(mlflow.get_run(best).outputs.model_outputs) == 1  # the logged model
    assert client.list_artifacts(best, "plots") == []
    assert {i.dataset.name.rsplit("-", 1)[1] for i in mlflow.get_run(best).inputs.dataset_inputs} == {
        "train", "val", "test"}
    # the parent holds the summary: best value/params, figures, the best trial's model
    assert p.data.metrics["val_rmse"] == pytest.approx(study.best_value)  # the best trial's, charted beside them
    assert p.data.metrics["study/trials_complete"] + p.data.metrics["study/trials_pruned"] == 3
    assert p.info.run_name.startswith("tune · benchmark · ")
    best_params = study.best_trial.params  # exact in best_params.json, 4 significant digits in the tags
    assert mlflow.artifacts.load_dict(f"runs:/{parent}/best_params.json") == best_params
    assert p.data.tags["best.learning_rate"] == sig(best_params["learning_rate"])
    assert p.data.tags["best.max_depth"] == str(best_params["max_depth"])
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

    from smp.boosters import step_callbacks
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


def _fixed_study(values: dict[int, float]) -> optuna.Study:
    """An in-memory benchmark study whose trial ``i`` (GOOD first, then TPE's) scores ``values[i]``."""
    import warnings

    study = optuna.create_study(direction="minimize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_rmse"])
    study.enqueue_trial(GOOD)

    def objective(trial):
        xgb_space(trial)
        return values[trial.number]

    study.optimize(objective, n_trials=len(values))
    return study


def test_study_note_names_family_data_split_and_what_the_best_trial_changed():
    study = _fixed_study({0: 1.234567, 1: 2.5, 2: 3.0})
    cfg = TuneJob(source=DataCfg(data="posts.csv"), splitting=SplitCfg(sample_size=0, split="user", seed=3))
    note = study_note(study, cfg, "parent123")
    assert note.startswith("**benchmark**: the paper's tabular XGBoost benchmark.")
    assert "Data `posts.csv` (sample_size 0, 0 = all posts); split `user` (seed 3, val 0.09, test 0.1)." in note
    assert "**Best trial 0, val_rmse 1.235**" in note and "of 3 trials (3 complete)" in note
    # GOOD against XGBCfg's defaults (the paper's): what changed, in a table; what did not, in one line
    for row in ("| max_depth | 18 | 3 |", "| learning_rate | 0.01 | 0.3 |", "| n_estimators | 2000 | 200 |",
                "| reg_alpha | 0 | 0.001 |"):
        assert row in note
    assert "| subsample |" not in note
    assert "left at the default: min_child_weight 1, subsample 1, colsample_bytree 1, reg_lambda 1." in note
    assert "`parent123`" in note
    from smp.tune import study_summary

    assert study_summary(study, cfg) == ("benchmark on posts, split user: best trial 0, val_rmse 1.235; changed "
                                         "from the defaults: max_depth, learning_rate, n_estimators, reg_alpha")


def test_study_note_compares_with_the_chrono_protocol_defaults():
    study = _fixed_study({0: 1.0})
    cfg = TuneJob(splitting=SplitCfg(split="chrono"))
    from smp.train import BenchmarkJob, for_protocol

    chrono = for_protocol(BenchmarkJob(splitting=SplitCfg(split="chrono"))).xgb  # what `smp benchmark` uses there
    assert f"| max_depth | {chrono.max_depth} | 3 |" in study_note(study, cfg, "p")


def test_study_figures_keep_every_label_inside_and_number_trials_in_whole_numbers():
    import warnings

    from optuna.visualization import matplotlib as ovm

    study = _fixed_study({0: 1.2, 1: 1.1, 2: 1.3, 3: 1.05})
    warnings.simplefilter("ignore")
    for plot in (ovm.plot_optimization_history, ovm.plot_param_importances, ovm.plot_parallel_coordinate):
        fig = study_figure(plot, study)
        fig.canvas.draw()
        drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # in inches, every visible artist
        width, height = fig.get_size_inches()
        assert drawn.x0 >= 0 and drawn.y0 >= 0 and drawn.x1 <= width and drawn.y1 <= height, plot.__name__
        if plot is ovm.plot_optimization_history:
            ax = fig.axes[0]
            assert ax.get_ylabel() == "val_rmse"
            shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert shown and all(float(t).is_integer() for t in shown)
        import matplotlib.pyplot as plt

        plt.close(fig)
