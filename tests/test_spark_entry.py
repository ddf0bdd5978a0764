"""The Spark engine through the entry points: `smp embed --engine spark` and `smp predict --engine spark` make one
MLflow run each, with the values the local engine gives (the engines' own parity: tests/test_spark.py)."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from smp.config import ConfigError
from smp.embed import EmbedJob, run_embed
from tests.test_spark import needs_spark  # skipped with check_spark's reason where Spark cannot run


def test_the_local_embed_job_refuses_engine_spark_instead_of_running_locally():
    with pytest.raises(ConfigError, match="engine=spark: the images are embedded on Spark by smp.engines.run_embed"):
        run_embed(EmbedJob(engine="spark"))


def test_an_unknown_engine_is_refused():
    from smp.predict import PredictJob

    with pytest.raises(ConfigError, match="engine='dask'"):
        EmbedJob(engine="dask")
    with pytest.raises(ConfigError, match="engine='dask'"):
        PredictJob(engine="dask")


@needs_spark
@pytest.mark.slow
def test_embed_on_spark_through_the_cli_logs_the_local_jobs_features(smpd_dir, tiny_clip, tmp_path, monkeypatch):
    from smp.cli import main

    args = ["--data", str(smpd_dir), "--clip_model", tiny_clip["clip_model"], "--clip_pretrained", "none",
            "--experiment", "e", "--progress", "false"]
    assert main(["embed", *args, "--engine", "spark", "--spark_master", "local[2]"]) == 0
    runs = mlflow.search_runs(experiment_names=["e"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    params = run.data.params
    assert run.data.tags["smp.engine"] == "spark" and params["engine"] == "spark"
    # the executors computed every usable image; the job's own pass then found all of them in the cache
    assert int(params["spark/computed"]) + int(params["spark/bad_images"]) == int(params["data/images"]) == 160
    assert params["cache/computed"] == "0"
    spark_features = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                         artifact_path="features.parquet"))
    monkeypatch.setenv("SMP_CACHE_DIR", str(tmp_path / "fresh-cache"))  # the local engine from scratch
    assert main(["embed", *args, "--experiment", "local"]) == 0
    local = mlflow.search_runs(experiment_names=["local"], output_format="list")[0]
    local_features = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=local.info.run_id,
                                                                         artifact_path="features.parquet"))
    assert int(local.data.params["cache/computed"]) == int(params["spark/computed"])
    pd.testing.assert_frame_equal(spark_features, local_features, rtol=1e-5, atol=1e-6)
