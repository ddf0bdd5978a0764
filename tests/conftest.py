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
