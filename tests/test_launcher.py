"""Every MLproject entry point through the real launcher: `mlflow run . -e NAME --env-manager local -P ...`.

A test calling the Python job does not prove the MLproject path: the launcher logs the declared parameters
itself (as it substitutes them into the command), passes undeclared ones through as ``--name value``, and
names its run at random unless the job renames it. The entry points run in dependency order in one store
(embed before the image models, a model before promote, a champion before predict).
"""

from __future__ import annotations

import os
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
ORDER = ["synth", "embed", "benchmark", "pca_boost", "ensemble_mlp", "ensemble_conv1d", "compare", "tune",
         "promote", "predict"]


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
        "compare": [],
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
    if entry in ("benchmark", "pca_boost", "ensemble_mlp", "ensemble_conv1d"):
        assert run.data.metrics["test_rmse"] > 0 and "test_rmse_baseline" in run.data.metrics
        assert run.data.params["data/posts"] == "160" and run.data.params["sample_size"] == "0"
    if entry in ("pca_boost", "ensemble_mlp", "ensemble_conv1d"):
        assert run.data.params["clip/effective_pretrained"] == "none"
    if entry == "tune":
        trials = mlflow.search_runs([exp.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'", output_format="list")
        assert sorted(t.info.run_name for t in trials) == ["trial 0", "trial 1"]
    if entry == "promote":
        assert run.data.metrics == {} and run.data.tags["smp.decision"] in ("champion", "challenger")
        version = mlflow.MlflowClient().get_model_version_by_alias("smp-popularity", "champion")
        assert version.run_id
    if entry == "predict":
        pred = pd.read_csv(store["work"] / "predictions.csv")
        assert len(pred) == 160 and pred["popularity"].notna().all()
