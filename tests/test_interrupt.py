"""A job stopped with SIGTERM ends its MLflow run KILLED, with the reason, instead of leaving it RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from smp import tracking
from smp.tracking import Terminated, job_run, raise_on_sigterm, sigterm_seen

@pytest.mark.slow
def test_sigterm_ends_the_run_killed_with_the_reason(smpd_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/stop.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SMP_CACHE_DIR": str(tmp_path / "cache")}
    # a fit that would run for a long time: many slow rounds, no early stopping
    cmd = [sys.executable, "-m", "smp.cli", "benchmark", "--data", str(smpd_dir), "--sample-size", "0",
           "--n-estimators", "1000000", "--learning-rate", "0.0001", "--early-stopping-rounds", "0",
           "--experiment", "stop"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        mlflow.set_tracking_uri(uri)
        deadline, run = time.monotonic() + 180, None
        while time.monotonic() < deadline and run is None:
            time.sleep(1.0)
            exp = mlflow.get_experiment_by_name("stop")
            if exp is not None:
                found = mlflow.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                           output_format="list")
                # the settings are logged as the run opens, right before the fit (the data/ counts only after it)
                run = found[0] if found and found[0].data.params.get("n_estimators") == "1000000" else None
            assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert run is not None, "the job never reached its fit"
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    ended = mlflow.get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["smp.end_reason"] == "SIGTERM"
    assert "stopped (SIGTERM)" in out


class _DroppedOnCollect:
    """An object whose finaliser is where the signal lands: Python prints and drops what a ``__del__`` raises."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, inside __del__: the handler's exception is lost


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception, expected
def test_a_sigterm_whose_exception_was_swallowed_still_ends_the_run_killed():
    """A SIGTERM landing in a cleanup callback (SQLAlchemy's, in CI) lost its exception and the job finished
    as if never stopped: the run still ends KILLED at its normal end, and the job gets Terminated."""
    previous = signal.getsignal(signal.SIGTERM)
    raise_on_sigterm()
    try:
        with pytest.raises(Terminated):
            with job_run("benchmark", "swallowed", {"seed": 0}) as run:
                _DroppedOnCollect()  # collected at once: its __del__ sends the signal, the exception is dropped
                assert sigterm_seen()  # the body went on: this line ran after the signal
        ended = mlflow.get_run(run.info.run_id)
        assert ended.info.status == "KILLED" and ended.data.tags["smp.end_reason"] == "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, previous)
        tracking._SIGTERM.clear()
