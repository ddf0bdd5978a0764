"""optuna-dashboard reads a study made by `smp tune` from its storage (the study as optuna-dashboard serves it)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

from smp.data import DataCfg
from smp.splits import SplitCfg
from smp.tune import StudyCfg, TuneJob, open_study, run_tune

pytestmark = pytest.mark.slow

pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install -e '.[test]')")

GOOD = {"max_depth": 3, "learning_rate": 0.3, "n_estimators": 200, "min_child_weight": 1.0, "subsample": 1.0,
        "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001}
SLOW = {**GOOD, "learning_rate": 0.005}  # barely moves in the first rounds: the median pruner stops it
DEEPER = {**GOOD, "max_depth": 4, "learning_rate": 0.2}

STARTUP_S = 60  # how long the dashboard may take to answer
# loopback requests must not go through a proxy from the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0):
    with _OPENER.open(url, timeout=timeout) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def _get_json(url: str):
    status, _, body = _get(url)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


def _dashboard_cmd(storage: str, port: int) -> list[str]:
    """The `optuna-dashboard` console script beside this interpreter (the package has no ``__main__``)."""
    script = Path(sys.executable).with_name("optuna-dashboard")
    if not script.exists():
        found = shutil.which("optuna-dashboard")
        script = Path(found) if found else None
    head = [str(script)] if script else [sys.executable, "-c", "from optuna_dashboard._cli import main; main()"]
    # wsgiref: one process, so terminate() stops all of it
    return head + [storage, "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"]


@pytest.fixture()
def tuned_study(smpd_dir, tmp_path):
    """A 3-trial benchmark study (one pruned) in a sqlite storage of its own, made by run_tune."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cfg = TuneJob(source=DataCfg(data=str(smpd_dir)), splitting=SplitCfg(sample_size=0),
                  study=StudyCfg(model="benchmark", n_trials=3, study_name="dash", startup_trials=1,
                                 storage=storage), experiment="tune")
    study = open_study(cfg)
    for params in (GOOD, SLOW, DEEPER):
        study.enqueue_trial(params)
    run_tune(cfg)
    return storage, optuna.load_study(study_name="dash", storage=storage)


@pytest.fixture()
def dashboard(tuned_study, tmp_path):
    """optuna-dashboard on a free loopback port against the study's storage; yields its base URL."""
    storage, _ = tuned_study
    port = int(os.environ.get("SMP_TEST_DASHBOARD_PORT", 0)) or _free_port()
    log_path = tmp_path / "optuna-dashboard.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(_dashboard_cmd(storage, port), stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"optuna-dashboard exited with {proc.returncode} before answering:\n"
                            f"{log_path.read_text()}")
            try:
                if _get(f"{base}/api/meta", timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"optuna-dashboard did not answer on {base}/api/meta within {STARTUP_S}s:\n"
                            f"{log_path.read_text()}")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_dashboard_serves_the_tuned_study(tuned_study, dashboard):
    _, study = tuned_study
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.COMPLETE in states and optuna.trial.TrialState.PRUNED in states

    # the study list: our study, by name, minimising, with the MLflow parent run as a user attribute
    summaries = _get_json(f"{dashboard}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in summaries] == [study.study_name]
    (summary,) = summaries
    assert summary["directions"] == ["minimize"]
    attrs = {a["key"]: a["value"] for a in summary["user_attrs"]}
    assert attrs["mlflow_parent_run_id"] == study.user_attrs["mlflow_parent_run_id"]

    # the study page's data: every trial with its state, params and value; the best trial
    detail = _get_json(f"{dashboard}/api/studies/{summary['study_id']}")
    assert detail["name"] == study.study_name
    trials = sorted(detail["trials"], key=lambda t: t["number"])
    assert len(trials) == len(study.trials) == 3
    assert [t["state"].upper() for t in trials] == [t.state.name for t in study.trials]
    for served, trial in zip(trials, study.trials):
        assert served["number"] == trial.number
        assert {p["name"]: p["param_external_value"] for p in served["params"]} == {
            k: str(v) for k, v in trial.params.items()}
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert served["values"] == [pytest.approx(trial.value)]
        served_attrs = {a["key"]: a["value"] for a in served["user_attrs"]}
        if "mlflow_run_id" in trial.user_attrs:
            assert served_attrs["mlflow_run_id"] == trial.user_attrs["mlflow_run_id"]
    (best,) = detail["best_trials"]
    assert best["number"] == study.best_trial.number
    assert best["values"][0] == pytest.approx(study.best_value)
    # the pruned trial's learning curve (XGBoost's validation RMSE every report_every rounds) is there too
    pruned = next(t for t in trials if t["state"] == "Pruned")
    curve = study.trials[pruned["number"]].intermediate_values
    assert len(curve) >= 1 and detail["has_intermediate_values"]
    assert {v["step"]: v["value"] for v in pruned["intermediate_values"]} == pytest.approx(curve)

    # the single-page app itself is served
    status, ctype, body = _get(f"{dashboard}/dashboard/studies/{summary['study_id']}")
    assert status == 200 and ctype.startswith("text/html") and b"<html" in body.lower()
