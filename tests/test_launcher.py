"""Every MLproject entry point through the real launcher: `mlflow run . -e NAME --env-manager local -P ...`.

A test calling the Python job does not prove the MLproject path: the launcher logs the declared parameters
itself (as it substitutes them into the command), passes undeclared ones through as ``--name value``, and
names its run at random unless the job renames it. The entry points run in dependency order in one store
(embed before the image models, a model before promote, a champion before predict).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "launch"
SMALL_XGB = ["n_estimators=30", "max_depth=3", "early_stopping_rounds=5"]
ORDER = ["synth", "embed", "benchmark", "pca_boost", "ensemble_mlp", "ensemble_conv1d", "fusion", "compare",
         "ablation", "tune", "promote", "predict"]
MODELS = ("benchmark", "pca_boost", "ensemble_mlp", "ensemble_conv1d", "fusion")


@pytest.fixture(scope="module")
def store(tmp_path_factory, smpd_dir):
    work = tmp_path_factory.mktemp("launch")
    return {"uri": f"sqlite:///{work}/mlflow.db", "work": work, "data": str(smpd_dir)}


def _params(entry: str, store: dict) -> list[str]:
    data = ["data=" + store["data"], "sample_size=0"]
    image = ["clip_pretrained=none"]
    return {
        "synth": [f"out={store['work']}/synth", "n=40"],
        "embed": ["data=" + store["data"], *image, "progress=false"],
        "benchmark": [*data, *SMALL_XGB],
        "pca_boost": [*data, *SMALL_XGB, *image, "n_components=8"],
        "ensemble_mlp": [*data, *SMALL_XGB, *image, "epochs=3"],
        "ensemble_conv1d": [*data, *SMALL_XGB, *image, "epochs=3"],
        "fusion": [*data, *SMALL_XGB, *image, "epochs=3", "text_dim=4"],
        "compare": [],
        "ablation": [*data, "groups=tabular,user"],
        "tune": [*data, "model=benchmark", "n_trials=2", f"storage=sqlite:///{store['work']}/optuna.db",
                 "trial_figures=false"],
        "promote": [],
        "predict": [f"input={store['data']}", f"output={store['work']}/predictions.csv"],  # undeclared: passed through
    }[entry]


def test_the_order_covers_every_entry_point():
    declared = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert sorted(declared) == sorted(ORDER)


@pytest.mark.parametrize("entry", ORDER)
def test_entry_point_through_mlflow_run(entry, store, monkeypatch):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
           "--experiment-name", EXPERIMENT]
    for p in _params(entry, store):
        cmd += ["-P", p]
    out = subprocess.run(cmd, cwd=store["work"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]

    mlflow.set_tracking_uri(store["uri"])
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.project.entryPoint` = '{entry}'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    assert runs, f"no run of entry point {entry}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith(("tune · " if entry == "tune" else f"{entry} · ")), run.info.run_name
    assert all(v != "''" for v in run.data.params.values()), run.data.params  # no shell-quoted empties
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    if entry in MODELS:
        assert run.data.metrics["test_rmse"] > 0 and "test_rmse_baseline" in run.data.metrics
        assert run.data.params["data/posts"] == "160" and run.data.params["sample_size"] == "0"
    if entry in MODELS[1:]:
        # random weights as asked: no fallback, so no effective/ value beside the requested one
        assert run.data.params["clip_pretrained"] == "none" and "effective/clip_pretrained" not in run.data.params
        embed = mlflow.get_run(run.data.tags["smp.embed_run"])
        assert embed.data.tags["smp.clip_effective_pretrained"] == "none"
    if entry == "ablation":  # a model run per group set (all, each left out, each alone), nested, its table
        children = mlflow.search_runs([exp.experiment_id], output_format="list",
                                      filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert sorted(c.data.params["features"] for c in children) == ["tabular", "tabular,user", "user"]
        assert "| all " in out.stdout and "| user only " in out.stdout  # the table, printed
    if entry == "tune":
        trials = mlflow.search_runs([exp.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'", output_format="list")
        assert sorted(t.info.run_name for t in trials) == ["trial 0", "trial 1"]
    if entry == "promote":  # the store's first promotion: its candidate becomes the champion
        assert run.data.metrics == {} and run.data.tags["smp.decision"] == "champion"
        version = mlflow.MlflowClient().get_model_version_by_alias("smp-popularity", "champion")
        assert (version.run_id, str(version.version)) == (run.data.tags["smp.candidate_run"],
                                                           run.data.tags["smp.registered_version"])
    if entry == "predict":
        pred = pd.read_csv(store["work"] / "predictions.csv")
        assert len(pred) == 160 and pred["popularity"].notna().all()
    check_every_run(exp.experiment_id)


RANDOM_NAME = re.compile(r"^[a-z]+-[a-z]+-\d+$")  # MLflow's own run names (e.g. "bemused-fox-123")


def check_every_run(experiment_id: str) -> None:
    """Every run the chains made so far (upstream and nested ones too): named after what it is (``trial N`` only
    under a study), described, and every ``effective/`` value is what the fitted model really used."""
    runs = mlflow.search_runs([experiment_id], output_format="list")
    by_id = {r.info.run_id: r for r in runs}
    for run in runs:
        name, tags = run.info.run_name, run.data.tags
        parent = by_id.get(tags.get("mlflow.parentRunId", ""))
        in_study = parent is not None and parent.data.tags.get("smp.job") == "tune"
        assert name and not RANDOM_NAME.match(name), name
        assert name.startswith("trial ") == in_study, (name, tags.get("smp.job"))
        if in_study:
            assert re.fullmatch(r"trial \d+", name), name
        assert len(tags.get("mlflow.note.content", "")) > 40, (name, tags.get("mlflow.note.content"))
        effective = {k.split("/", 1)[1]: v for k, v in run.data.params.items() if k.startswith("effective/")}
        if effective and tags.get("smp.model") in MODELS:
            model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/{tags['smp.model']}")
            check_effective(model.unwrap_python_model().model, effective, run)
        if "clip_pretrained" in effective:  # a fallback of the embedding: what the embed run used
            embed = by_id.get(tags.get("smp.embed_run", ""), run)
            assert effective["clip_pretrained"] == embed.data.tags.get("smp.clip_effective_pretrained"), name


def check_effective(model, effective: dict, run) -> None:
    """Each ``effective/`` param of a model run equals the fitted model's own setting."""
    booster_model = getattr(model, "benchmark", None) or model  # an ensemble: the benchmark it stacks on
    booster_model = getattr(booster_model, "models", [booster_model])[0]  # cross-fitted: a fold model
    params = booster_model.booster_.get_params()
    tabular = booster_model.tabular
    for key, value in effective.items():
        if key in ("tree_method", "max_bin", "max_depth", "n_estimators", "learning_rate", "device", "n_jobs"):
            if run.data.tags.get("smp.model") not in ("benchmark", "pca_boost") and key in (
                    "tree_method", "max_bin", "device", "n_jobs"):
                continue  # logged by the benchmark's own run, not the ensemble's
            real = params[key]
            if key == "n_jobs" and real is None:
                real = os.cpu_count()
            if key == "device":
                real = booster_model.tree_settings_["device"]  # the fit's (the booster moves to cpu to predict)
            assert str(real) == value or float(real) == float(value), (key, real, value)
        elif key == "early_stopping_rounds":
            assert str(booster_model.cfg.early_stopping_rounds) == value
        elif key in ("absolute_date", "month", "time_trend"):
            assert str(getattr(tabular, key)).lower() == value, (key, value)
        elif key == "stacking_folds":  # the fold models cached on the benchmark run are K of them
            cached = [a.path for a in mlflow.MlflowClient().list_artifacts(run.data.tags["smp.benchmark_run"],
                                                                            "stacking")]
            assert any(p.startswith(f"stacking/folds_k{value}_") for p in cached), (value, cached)
        elif key != "clip_pretrained":
            raise AssertionError(f"effective/{key}: no check for this setting; add one")


def test_predict_on_spark_through_mlflow_run_agrees_with_the_pandas_predict(store):
    """Issue 29's command, `mlflow run . -e predict -P engine=spark -P model=... -P input=... -P output=...`,
    after the parametrized entry points (the store has a champion and the pandas predictions): the Parquet it
    writes holds the pandas path's predictions (to 1e-9) and statuses, row for row."""
    from tests.test_spark import NO_SPARK

    if NO_SPARK:
        pytest.skip(f"the Spark engine cannot run here: {NO_SPARK}")
    pandas_csv = store["work"] / "predictions.csv"
    if not pandas_csv.exists():
        pytest.skip("the pandas predict entry point did not run first")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_RUN_ID", None)
    out_path = store["work"] / "spark_predictions.parquet"
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "predict", "--env-manager", "local",
           "--experiment-name", EXPERIMENT, "-P", "engine=spark", "-P", "spark_master=local[2]",
           "-P", "model=models:/smp-popularity@champion", "-P", f"input={store['data']}", "-P", f"output={out_path}"]
    out = subprocess.run(cmd, cwd=store["work"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    spark_out = pd.read_parquet(out_path)
    pandas_out = pd.read_csv(pandas_csv, dtype={"Pid": str, "status": str}, keep_default_na=False,
                             na_values={"popularity": [""]})
    assert list(spark_out.columns) == ["Pid", "popularity", "status"] and len(spark_out) == len(pandas_out) == 160
    assert spark_out["Pid"].tolist() == pandas_out["Pid"].tolist()
    assert spark_out["status"].tolist() == pandas_out["status"].tolist()
    assert abs(spark_out["popularity"].to_numpy() - pandas_out["popularity"].to_numpy()).max() <= 1e-9

    mlflow.set_tracking_uri(store["uri"])
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    run = mlflow.search_runs([exp.experiment_id], output_format="list", order_by=["attributes.start_time DESC"],
                             filter_string="tags.`mlflow.project.entryPoint` = 'predict'")[0]
    assert run.info.status == "FINISHED" and run.data.params["engine"] == "spark"
    assert run.data.tags.get("smp.engine") == "spark" and run.data.params["data/rows"] == "160"
