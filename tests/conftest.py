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
