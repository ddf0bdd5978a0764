"""Shared fixtures: tracking in tmp_path, tiny generated SMPD data, small configs (a tiny CLIP)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test tracks into its own sqlite store and caches into tmp_path; no network."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("SMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    import mlflow
    import mlflow.tracking.fluent as fluent

    monkeypatch.setattr(fluent, "_active_experiment_id", None)  # set_experiment() of an earlier test's store
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # an earlier test's set_tracking_uri() sticks
    yield
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="session")
def smpd_dir(tmp_path_factory):
    """A tiny synthetic SMPD directory (official layout, JPEGs), shared read-only by tests."""
    from smp.synth import SynthCfg, generate

    out = tmp_path_factory.mktemp("smpd") / "smpd"
    return generate(out, SynthCfg(n=160, seed=3))


@pytest.fixture(scope="session")
def tiny_clip() -> dict:
    """``EmbedCfg`` / ``UpstreamCfg`` fields for smp's tiny CLIP (``smp.clip.TINY_CLIP``, random weights):
    the RN50 code path (ModifiedResNet, BatchNorm, a text tower) at 64 px and 32-d vectors, for tests that
    are not about RN50 itself."""
    from smp.clip import TINY_CLIP

    return {"clip_model": TINY_CLIP, "clip_pretrained": "none"}


@pytest.fixture(scope="session")
def tiny(tiny_clip):
    """Small settings for the tests' model jobs, kept in one place: ``tiny.xgb`` (60 rounds of depth 4 at lr 0.1,
    stopping after 10 without improvement), ``tiny.pca`` (10 components), ``tiny.mlp`` (4 epochs, batches of 16),
    ``tiny.conv1d`` (PCA to 8, 3 epochs, batches of 16), ``tiny.upstream`` and ``tiny.images`` (the tiny CLIP,
    random weights) and
    ``tiny.splitting`` (all posts: ``sample_size=0``).

    ``tiny.job(family, data, **overrides)``: the job config of model family ``family`` (its
    ``smp.families.FAMILIES[family].config``) on ``data`` in experiment ``"t"``, each of its settings that has a
    small version above set to it. ``overrides`` replace a field of the job by name (``xgb=XGBCfg(...)``,
    ``experiment="img"``), or any setting inside it by its name (``epochs=3``, ``head="paper"``,
    ``split="chrono"``: ``smp.config.apply``, the CLI's walk).
    """
    from dataclasses import fields, replace
    from types import SimpleNamespace

    from smp.boosters import XGBCfg
    from smp.config import apply
    from smp.data import DataCfg
    from smp.families import FAMILIES
    from smp.models import PCACfg
    from smp.nets import Conv1DCfg, MLPCfg
    from smp.splits import SplitCfg
    from smp.train import ImageInputCfg, UpstreamCfg

    small = SimpleNamespace(
        xgb=XGBCfg(n_estimators=60, max_depth=4, learning_rate=0.1, early_stopping_rounds=10),
        pca=PCACfg(n_components=10), mlp=MLPCfg(epochs=4, batch_size=16),
        conv1d=Conv1DCfg(n_pca=8, epochs=3, batch_size=16), upstream=UpstreamCfg(**tiny_clip),
        images=ImageInputCfg(**tiny_clip), splitting=SplitCfg(sample_size=0))
    by_type = {type(v): v for v in vars(small).values()}

    def job(family: str, data, **overrides):
        config = FAMILIES[family].config
        default = config()
        names = {f.name for f in fields(config)}
        cfg = replace(default, source=DataCfg(data=str(data)), experiment="t",
                      **{n: by_type[type(getattr(default, n))] for n in names if type(getattr(default, n)) in by_type})
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if k in names})
        leaves = {k: v for k, v in overrides.items() if k not in names}
        return apply(cfg, leaves) if leaves else cfg

    small.job = job
    return small


@pytest.fixture(scope="session", autouse=True)
def _stores_from_a_template(tmp_path_factory):
    """Every test's fresh sqlite tracking store starts as a copy of one built once per session.

    Building MLflow's tables runs its ~100 migrations, about a second a store (more on a busy disk), paid by every
    test that touches its store. The first store of the session is built by MLflow's own code; later ones in this
    process get its pages through SQLite's backup API (the same schema, a fraction of the time). A copy that
    cannot be made (a full disk) falls back to MLflow's own setup, so its error is the one a user sees. Stores
    built by other processes (``smp`` subprocesses, ``mlflow server``) are not touched.
    """
    import sqlite3
    from contextlib import closing

    import mlflow.store.db.utils as db_utils
    import mlflow.store.model_registry.sqlalchemy_store as registry_store

    build = db_utils._initialize_tables
    template = tmp_path_factory.mktemp("store_template") / "mlflow.db"

    def initialize(engine):
        db = engine.url.database
        if engine.dialect.name != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
            return build(engine)
        if not template.exists():
            build(engine)
            with engine.connect() as conn, closing(sqlite3.connect(template)) as out:
                conn.connection.driver_connection.backup(out)
            return None
        try:
            with closing(sqlite3.connect(template)) as src, engine.connect() as conn:
                src.backup(conn.connection.driver_connection)
        except sqlite3.Error:
            return build(engine)
        return None

    mp = pytest.MonkeyPatch()
    mp.setattr(db_utils, "_initialize_tables", initialize)
    mp.setattr(registry_store, "_initialize_tables", initialize)
    yield
    mp.undo()


# --------------------------------------------------------------------------- a scoring server
import contextlib  # noqa: E402 - with the helpers that use it, below the fixtures above


class ScoringServer:
    """A running ``mlflow models serve``: its process, port and log; ``post`` sends one request body."""

    def __init__(self, proc, port: int, log):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def post(self, payload, content_type: str = "application/json", timeout: float = 300):
        """POST ``payload`` (a str as it is, anything else as JSON) to /invocations; the ``requests`` response."""
        import json

        import requests

        data = payload if isinstance(payload, str) else json.dumps(payload)
        return requests.post(f"{self.url}/invocations", data=data, headers={"Content-Type": content_type},
                             timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc) -> None:
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: it runs in a session of its own
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@contextlib.contextmanager
def scoring_server(model_uri: str, log, env: dict | None = None, workers: int | None = None,
                   read_only=None, timeout: float = 180):
    """``mlflow models serve`` of ``model_uri`` (``--env-manager local``) on a free loopback port, yielded as a
    ``ScoringServer`` once it answers ``/ping``, and stopped on exit.

    ``env``: variables set for the server (None as a value: removed), over this process's environment with
    the test Python's directory first on PATH; ``workers``: ``--workers``; ``read_only``: a directory the
    server sees mounted read-only (``unshare -rm``, as a container's read-only filesystem).
    """
    import subprocess
    import sys
    import time
    from pathlib import Path

    import requests

    port = free_port()
    server_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key, value in (env or {}).items():
        if value is None:
            server_env.pop(key, None)
        else:
            server_env[key] = str(value)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_uri), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), *(["--workers", str(workers)] if workers else [])]
    if read_only is not None:
        cmd = ["unshare", "-rm", "sh", "-c", 'd="$1"; shift; mount --bind "$d" "$d" && '
               'mount -o remount,ro,bind "$d" "$d" && exec "$@"', "sh", str(read_only), *cmd]
    log = Path(log)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=server_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()[-3000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"no /ping answer in {timeout:.0f} s: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield ScoringServer(proc, port, log)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def serve_model():
    """``scoring_server``, for tests that serve a model with ``mlflow models serve``."""
    return scoring_server


@pytest.fixture(scope="session")
def model_in_own_store():
    """``make(root, run, cfg, family) -> Path``: run the model job ``run(cfg)`` tracking into a store of its own
    under ``root`` (feature cache ``root/cache``, working directory ``root``) and return its logged model as a
    local directory ``root/model``; the caller's environment and tracking URI are restored. For module fixtures
    whose model outlives one test's store."""
    from pathlib import Path

    import mlflow

    def make(root, run, cfg, family: str) -> Path:
        mp = pytest.MonkeyPatch()
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("SMP_CACHE_DIR", str(root / "cache"))
        mp.chdir(root)
        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        try:
            run_id = run(cfg).run_id
            return Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{family}", dst_path=str(root / "model")))
        finally:
            mp.undo()
            mlflow.set_tracking_uri(before)

    return make
