"""A damaged sqlite store, a read-only, missing or full directory: one clear line, never a traceback (issue 26).

Each fault is made for real: a truncated or overwritten ``mlflow.db``, a read-only bind mount (``chmod`` when
not root: root writes through it), a 1 MiB tmpfs for a full disk. Tests that need a mount skip, saying why,
where mounting is not allowed. Two processes set up one fresh sqlite store at once.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from smp.cli import main

TINY = ["--sample-size", "0", "--n-estimators", "5", "--experiment", "faults"]


def store() -> Path:
    return Path(mlflow.get_tracking_uri().removeprefix("sqlite:///"))


def error_line(caplog) -> str:
    """The one error smp logged."""
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    return errors[0]


def _mount(*args: str) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` (made if missing) read-only while inside: a read-only bind mount as root, else ``chmod``."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if not _mount("--bind", str(path), str(path)):
        pytest.skip("running as root, where chmod does not stop writes, and bind mounts are not allowed")
    try:
        if not _mount("-o", "remount,bind,ro", str(path)):
            pytest.skip("running as root, where chmod does not stop writes, and read-only remounts are not allowed")
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # detached now, freed when unused


@contextlib.contextmanager
def tiny_disk(path: Path, size: str = "1m"):
    """A ``size`` tmpfs on ``path`` while inside (a disk that fills up)."""
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root and mount permission")
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # detached now, freed when unused


# --------------------------------------------------------------------------- the sqlite store
def test_a_file_that_is_not_sqlite_is_refused_before_any_data_loads(caplog):
    store().write_bytes(b"these are not the bytes of a database" * 100)
    assert main(["benchmark", "--data", "nowhere.csv", *TINY]) == 2  # no DataError: the data was never read
    assert error_line(caplog) == (f"tracking store {store()} is not an SQLite database (the file does not start "
                                  "with the SQLite header); restore it from a backup, or point MLFLOW_TRACKING_URI "
                                  "at another store")


def test_a_truncated_store_is_refused_naming_the_sizes(caplog):
    mlflow.MlflowClient().create_experiment("filled")  # a real store, then cut short
    whole = store().read_bytes()
    store().write_bytes(whole[:len(whole) // 3])
    assert main(["benchmark", "--data", "nowhere.csv", *TINY]) == 2
    assert error_line(caplog).startswith(f"tracking store {store()} is truncated (its header counts {len(whole)} "
                                         f"bytes, the file holds {len(whole) // 3})")


def test_a_store_in_a_missing_directory_is_refused_naming_it(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/gone/mlflow.db")
    assert main(["benchmark", "--data", "nowhere.csv", *TINY]) == 2
    assert error_line(caplog) == (f"tracking store sqlite:///{tmp_path}/gone/mlflow.db: its directory "
                                  f"{tmp_path}/gone does not exist; create it, or point MLFLOW_TRACKING_URI elsewhere")


def test_a_store_on_a_full_disk_is_named(smpd_dir, monkeypatch, tmp_path, caplog):
    """MLflow's tables (about 1 MB) do not fit: the setup stops with SQLite's "database or disk is full"."""
    with tiny_disk(tmp_path / "small", "256k"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/small/mlflow.db")
        assert main(["benchmark", "--data", str(smpd_dir), *TINY]) == 2
    assert error_line(caplog) == (f"tracking store {tmp_path}/small/mlflow.db is on a full disk (database or disk "
                                  "is full); free space on its disk, or point MLFLOW_TRACKING_URI at another store")


def _smp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smp.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=os.environ.copy())


@pytest.mark.slow
def test_a_store_damaged_inside_fails_the_job_with_one_line(smpd_dir, tmp_path):
    """Pages damaged past the header show only when read: the job fails there, naming the file, no traceback."""
    first = _smp("benchmark", "--data", str(smpd_dir), *TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    data = bytearray(store().read_bytes())
    start = len(data) // 4
    data[start:] = b"\xff" * (len(data) - start)  # three quarters of the pages overwritten, same size
    store().write_bytes(bytes(data))
    second = _smp("benchmark", "--data", str(smpd_dir), *TINY, cwd=tmp_path)
    assert second.returncode == 2, second.stderr[-3000:]
    assert (f"ERROR smp: tracking store {store()} is damaged (database disk image is malformed); restore it "
            "from a backup, or point MLFLOW_TRACKING_URI at another store") in second.stderr
    assert "Traceback" not in second.stderr


GO_SCRIPT = """
import os, sys, time
from pathlib import Path
from smp.tracking import configure_tracking, resolve_experiment
print("ready", flush=True)
while not Path(sys.argv[1]).exists():
    time.sleep(0.005)
configure_tracking()
print("experiment", resolve_experiment("first"), flush=True)
"""


@pytest.mark.slow
def test_two_jobs_set_up_a_fresh_store_at_once(tmp_path):
    """Both start on a store that does not exist yet (before: ``table _alembic_tmp_... already exists`` or
    ``duplicate column name`` for one of them, 3 tries in 3)."""
    for attempt in range(3):
        uri, go = f"sqlite:///{tmp_path}/fresh{attempt}.db", tmp_path / f"go{attempt}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        procs = [subprocess.Popen([sys.executable, "-c", GO_SCRIPT, str(go)], env=env, cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
        go.touch()  # both imported smp and MLflow: they open the store within milliseconds of each other
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        assert outs[0][0] == outs[1][0] == "experiment 1\n"  # one experiment, made once


# --------------------------------------------------------------------------- directories: read-only, missing, full
@pytest.mark.slow
def test_a_read_only_artifact_directory_fails_the_job_naming_it(smpd_dir, tmp_path, caplog):
    with read_only(tmp_path / "mlruns"):
        assert main(["benchmark", "--data", str(smpd_dir), *TINY]) == 2
    line = error_line(caplog)
    assert line.startswith(f"{tmp_path}/mlruns/1 (the run's artifacts): ")
    assert line.endswith(("the file system is read-only (Read-only file system)",
                          "permission denied (Permission denied)"))
    run = mlflow.search_runs(experiment_names=["faults"], output_format="list")[0]
    assert run.info.status == "FAILED" and run.data.tags["smp.end_reason"] == f"StorageError: {line}"


@pytest.mark.slow
def test_a_read_only_feature_cache_fails_the_job_naming_it(smpd_dir, tmp_path, monkeypatch, tiny_clip, caplog):
    monkeypatch.setenv("SMP_CACHE_DIR", str(tmp_path / "cache"))
    with read_only(tmp_path / "cache"):
        assert main(["embed", "--data", str(smpd_dir), "--clip-model", tiny_clip["clip_model"],
                     "--clip-pretrained", "none", "--experiment", "faults"]) == 2
    line = error_line(caplog)
    assert line.startswith(f"{tmp_path}/cache/features (the feature cache): ")
    assert line.endswith(("read-only (Read-only file system)", "permission denied (Permission denied)"))


@pytest.mark.slow
def test_a_missing_cache_is_made_and_missing_artifacts_are_named(smpd_dir, tmp_path, monkeypatch, tiny_clip,
                                                                 caplog):
    """A cache directory that does not exist yet is made; a run's artifact directory deleted after it finished
    fails the job that reuses it, in one line."""
    import shutil

    monkeypatch.setenv("SMP_CACHE_DIR", str(tmp_path / "not" / "yet" / "there"))
    clip = ["--clip-model", tiny_clip["clip_model"], "--clip-pretrained", "none"]
    assert main(["embed", "--data", str(smpd_dir), *clip, "--experiment", "faults"]) == 0
    assert (tmp_path / "not" / "yet" / "there" / "features").is_dir()
    shutil.rmtree(tmp_path / "mlruns")  # the embed run's features.parquet with it
    assert main(["ensemble_mlp", "--data", str(smpd_dir), "--sample-size", "0", "--epochs", "1", *clip,
                 "--n-estimators", "5", "--experiment", "faults"]) == 2
    assert error_line(caplog).startswith("artifact 'features.parquet' of a run this job reads is missing: its run's "
                                         "artifact directory was moved or deleted")


@pytest.mark.slow
def test_a_full_disk_fails_the_job_and_leaves_no_model_marked_whole(smpd_dir, tmp_path, caplog):
    """The model's upload fills the disk: the job ends in one line naming the full directory, its run FAILED
    with the reason, and its logged model FAILED (not READY), so nothing takes it for a whole model."""
    with tiny_disk(tmp_path / "mlruns"):
        t0 = time.monotonic()
        # about 2 MB of trees: the plots fit in 1 MiB, the model does not
        code = main(["benchmark", "--data", str(smpd_dir), "--sample-size", "0", "--n-estimators", "400",
                     "--learning-rate", "0.001", "--early-stopping-rounds", "0", "--experiment", "faults"])
        took = time.monotonic() - t0
    assert code == 2
    line = error_line(caplog)
    assert line.startswith(f"{tmp_path}/mlruns/") and "(the run's artifacts): no space left on the disk" in line
    run = mlflow.search_runs(experiment_names=["faults"], output_format="list")[0]
    assert run.info.status == "FAILED" and run.data.tags["smp.end_reason"] == f"StorageError: {line}"
    models = mlflow.MlflowClient().search_logged_models([run.info.experiment_id])
    assert [str(m.status) for m in models] in (["FAILED"], ["LoggedModelStatus.FAILED"]), models
    print(f"full disk: exit 2 after {took:.1f} s, run FAILED, logged model FAILED")
