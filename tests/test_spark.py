"""The Spark engine (issue 29): ``smp.spark.predict_spark`` and ``embed_spark`` in local mode (``local[2]``).

Parity: a table of bad rows (text in a number column, a missing and a blank ``Pid``, NaN, an unparseable date,
out-of-range and infinite numbers, pandas' ``NA`` text, a garbled ``image_b64``, quoted newlines) scored by
``smp predict``'s pandas path and by Spark agrees on every prediction to 1e-9 and on every status, in the
input order. Embed: the features Spark writes into the cache are the local embed's, and a rerun computes
nothing. Without pyspark or Java 17+ the Spark tests are skipped with the reason ``check_spark`` gives
(``pytest -rs`` prints it); the setup checks themselves run everywhere.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from smp import spark as smp_spark
from smp.data import DataError
from smp.spark import SparkUnavailable, check_output, check_spark, input_kind, java_major, last_line

try:
    check_spark()
    NO_SPARK = ""
except SparkUnavailable as exc:
    NO_SPARK = str(exc)
needs_spark = pytest.mark.skipif(bool(NO_SPARK), reason=f"the Spark engine cannot run here: {NO_SPARK}")

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


# --------------------------------------------------------------------------- setup checks (no Spark needed)
def _fake_java(tmp_path: Path, banner: str) -> Path:
    """A JAVA_HOME whose bin/java prints ``banner`` to stderr, as ``java -version`` does."""
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho '{banner}' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return java.parent.parent


@pytest.mark.parametrize("banner, major", [
    ('openjdk version "17.0.15" 2025-04-15', 17),
    ('openjdk version "21" 2023-09-19', 21),
    ('java version "1.8.0_392"', 8),
    ('openjdk version "11.0.22" 2024-01-16', 11),
])
def test_java_major_reads_the_version_banner(tmp_path, banner, major):
    home = _fake_java(tmp_path, banner)
    assert java_major(str(home / "bin" / "java")) == major


def test_no_java_or_an_old_one_is_refused_naming_the_package(tmp_path, monkeypatch):
    pytest.importorskip("pyspark", reason="without pyspark check_spark names the spark extra first (next test)")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(SparkUnavailable) as missing:
        check_spark()
    assert "Java 17 or newer" in str(missing.value) and "openjdk-17-jre-headless" in str(missing.value)
    assert "nowhere has no bin/java" in str(missing.value)
    monkeypatch.setenv("JAVA_HOME", str(_fake_java(tmp_path, 'openjdk version "11.0.22" 2024-01-16')))
    with pytest.raises(SparkUnavailable) as old:
        check_spark()
    assert "is Java 11" in str(old.value) and "openjdk-17-jre-headless" in str(old.value)


def test_no_pyspark_is_refused_naming_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyspark(name, *args, **kwargs):
        if name == "pyspark" or name.startswith("pyspark."):
            raise ImportError("No module named 'pyspark'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyspark)
    with pytest.raises(SparkUnavailable, match=r"needs pyspark.*\.\[spark\]"):
        check_spark()


def test_inputs_and_outputs_are_checked_naming_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.csv: no such file or directory"):
        input_kind(str(tmp_path / "nope.csv"))
    (tmp_path / "posts.txt").write_text("Pid\n1\n")
    with pytest.raises(DataError, match=r"unknown extension '\.txt'"):
        input_kind(str(tmp_path / "posts.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither Parquet files nor an SMPD"):
        input_kind(str(tmp_path / "empty"))
    assert input_kind("") == "driver" and input_kind("s3a://bucket/posts.csv") == "csv"
    with pytest.raises(DataError, match="writes Parquet .* not CSV"):
        check_output(str(tmp_path / "predictions.csv"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        check_output(str(tmp_path / "a_file"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"holding other files \(\['notes.txt'\]\)"):
        check_output(str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="is the input"):
        check_output(str(tmp_path / "posts.parquet"), str(tmp_path / "posts.parquet"))


def test_last_line_keeps_the_cause():
    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
             "smp.serving.RequestRejected: column 'Pid': empty in 2 row(s)\n\n"
             "JVM stacktrace:\norg.apache.spark.SparkException: Job aborted")
    assert last_line(trace) == "org.apache.spark.SparkException: Job aborted"
    assert last_line("[PATH_NOT_FOUND] Path does not exist: file:/x.parquet. SQLSTATE: 42K03") \
        .startswith("[PATH_NOT_FOUND]")


# --------------------------------------------------------------------------- Spark, local[2]
@pytest.fixture(scope="module")
def spark():
    if NO_SPARK:
        pytest.skip(f"the Spark engine cannot run here: {NO_SPARK}")
    session, created = smp_spark.spark_session("local[2]")
    yield session
    if created:
        session.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A small benchmark model (60 trees, depth 4) trained on 400 synthetic posts, as a local model directory."""
    from smp.data import DataCfg
    from smp.models import XGBCfg
    from smp.splits import SplitCfg
    from smp.synth import SynthCfg, draw_posts
    from smp.tracking import logged_model_uri
    from smp.train import BenchmarkJob, run_benchmark

    root = tmp_path_factory.mktemp("spark_model")
    uri, old_uri = f"sqlite:///{root}/mlflow.db", os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        _posts_table(draw_posts(SynthCfg(n=400, seed=11))).to_csv(root / "train.csv", index=False)
        result = run_benchmark(BenchmarkJob(source=DataCfg(data=str(root / "train.csv")),
                                            splitting=SplitCfg(sample_size=0),
                                            xgb=XGBCfg(n_estimators=60, max_depth=4), experiment="spark"))
        return mlflow.artifacts.download_artifacts(artifact_uri=logged_model_uri(result.run_id),
                                                   dst_path=str(root / "model"))
    finally:
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


POST_COLUMNS = ["Uid", "Pid", "Category", "Subcategory", "Concept", "Postdate", "Latitude", "Longitude", "Geoaccuracy",
                "tag_count", "photo_count", "ispro", "canbuypro", "photo_firstdate", "photo_firstdatetaken",
                "timezone_offset", "label", "Title", "Alltags"]


def _posts_table(posts: pd.DataFrame) -> pd.DataFrame:
    return posts[POST_COLUMNS].copy()


def bad_table(n: int = 120) -> pd.DataFrame:
    """``n`` synthetic posts with bad rows among them (each a case the pandas path gives a status for)."""
    from smp.synth import SynthCfg, draw_posts

    df = _posts_table(draw_posts(SynthCfg(n=n, seed=12))).drop(columns=["label"]).astype(object)
    df["extra_column"] = "ignored"
    df["image_b64"] = None
    cases = {
        1: ("photo_count", "abc"),            # text in a number column: partial, unparseable
        3: ("Pid", None),                     # a missing Pid: error
        5: ("Postdate", np.nan),              # NaN: missing, no note
        7: ("Postdate", "not a date"),        # an unparseable date the model reads: partial
        9: ("photo_firstdatetaken", "2010-13-45 99:00:00"),  # unparseable, in a field the model does not read
        11: ("tag_count", -3),                # out of range: partial
        13: ("Latitude", "inf"),              # infinite: partial
        15: ("timezone_offset", "+08:00"),    # a time zone as text: parsed
        17: ("ispro", "true"),                # a flag as text: parsed
        19: ("photo_count", "NA"),            # pandas' missing-value text: missing, no note
        21: ("Pid", "=1+1"),                  # a formula-like Pid (quoted in the pandas path's CSV only)
        23: ("Title", 'He said "hi"\nand left, twice'),  # quotes, a comma and a newline inside a cell
        25: ("Pid", " "),                     # a blank Pid: error
        27: ("image_b64", "not base64!!"),    # a garbled image: the model refuses the row: error
        29: ("Title", "émoji 📷 ünïcode"),
        31: ("Latitude", "1e999"),            # overflows to inf: partial
        33: ("photo_count", ""),              # empty cell: missing
    }
    for row, (col, value) in cases.items():
        if row < n:
            df.at[row, col] = value
    return df


def pandas_path(model: str, table: Path, tmp_path: Path, batch_size: int) -> tuple[pd.DataFrame, dict]:
    """``smp predict`` as it runs today (``run_predict``), its CSV read back with the spreadsheet quotes undone."""
    from smp.predict import PredictJob, run_predict

    out = tmp_path / "pandas.csv"
    metrics = run_predict(PredictJob(model=model, input=str(table), output=str(out), batch_size=batch_size,
                                     experiment="parity"))
    got = pd.read_csv(out, dtype={"Pid": str, "status": str}, keep_default_na=False, na_values={"popularity": [""]})

    def unquote(v):
        return v[1:] if isinstance(v, str) and v.startswith("'") and v[1:].startswith(FORMULA_STARTS) else v

    return got.assign(Pid=got["Pid"].map(unquote), status=got["status"].map(unquote)), dict(metrics)


def assert_same(spark_out: pd.DataFrame, pandas_out: pd.DataFrame) -> None:
    assert list(spark_out.columns) == ["Pid", "popularity", "status"]
    assert len(spark_out) == len(pandas_out)
    spark_pids = spark_out["Pid"].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else v)
    assert spark_pids.tolist() == pandas_out["Pid"].tolist()  # every row, in the input's order
    assert spark_out["status"].tolist() == pandas_out["status"].tolist()
    a, b = spark_out["popularity"].to_numpy(dtype=float), pandas_out["popularity"].to_numpy(dtype=float)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert np.nanmax(np.abs(a - b)) <= 1e-9


@needs_spark
@pytest.mark.slow  # a model trained (~5 s), Spark jobs (~20 s on 2 cores)
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_spark_and_pandas_paths_agree_on_every_row(spark, model_dir, tmp_path, fmt):
    table = bad_table()
    path = tmp_path / f"posts.{fmt}"
    if fmt == "csv":
        table.to_csv(path, index=False)
    else:  # typed columns as a user writes them: numbers where they are numbers, text where any cell is text
        table.assign(Pid=table["Pid"].astype(object)).astype(
            {c: str for c in table.columns if table[c].map(lambda v: isinstance(v, str)).any()}
        ).replace({"None": None, "nan": None}).to_parquet(path, index=False)
    # small batches and three tasks: refused rows are isolated across batch and partition boundaries
    metrics = smp_spark.predict_spark(model_dir, str(path), str(tmp_path / "spark.parquet"), spark=spark,
                                      batch_size=16, partitions=3)
    spark_out = pd.read_parquet(tmp_path / "spark.parquet")
    pandas_out, pandas_metrics = pandas_path(model_dir, path, tmp_path, batch_size=16)
    assert_same(spark_out, pandas_out)
    for key in ("data/rows", "data/scored_rows", "data/error_rows", "data/partial_rows", "data/unseen_user_rows",
                "data/text_truncated_rows"):
        assert metrics[key] == pandas_metrics[key], key
    assert metrics["data/rows"] == 120 and metrics["data/error_rows"] == 3 and metrics["spark/partitions"] == 3
    statuses = dict(zip(spark_out.index, spark_out["status"]))
    assert statuses[1] == "partial: unparseable photo_count='abc'; treated as missing"
    assert statuses[3].startswith("error: column 'Pid': empty") and statuses[25].startswith("error: column 'Pid'")
    assert statuses[27] == f"error: column 'image_b64': not valid base64 (Pid '{table.at[27, 'Pid']}')"
    assert statuses[11] == "partial: tag_count=-3 out of range [0, 10000]; treated as missing"
    assert statuses[13] == statuses[31] == "partial: Latitude=inf out of range [-90, 90]; treated as missing"
    assert {statuses[i] for i in (5, 9, 15, 17, 21, 23, 29, 33)} == {"ok"}
    # "NA" is missing in a CSV (pd.read_csv's rule, followed on Spark), text in a Parquet string column
    assert statuses[19] == ("ok" if fmt == "csv" else "partial: unparseable photo_count='NA'; treated as missing")
    assert spark_out.at[21, "Pid"] == "=1+1"  # Parquet holds the value itself; only the CSV is quoted
    assert 0 < metrics["spark/model_loads"] <= 3 and metrics["spark/model_load_s"] > 0


@needs_spark
@pytest.mark.slow  # a Spark session (~10 s to start)
def test_the_feature_group_note_counts_are_the_pandas_paths(spark, tmp_path):
    """``data/unseen_user_rows`` and ``data/text_truncated_rows``: a note counts only in a ``partial:`` status,
    as one whole note among several, never as a substring of a load note's text."""
    from smp.scoring import note_counts
    from smp.serving import TEXT_TRUNCATED, UNSEEN_USER

    status = ["ok", f"partial: {UNSEEN_USER}", f"partial: {TEXT_TRUNCATED}",
              f"partial: unparseable photo_count='abc'; treated as missing; {UNSEEN_USER}; {TEXT_TRUNCATED}",
              f"partial: unparseable Title='{UNSEEN_USER}'; treated as missing",  # the words inside a value
              f"error: column 'Uid': {UNSEEN_USER}", f"partial: {UNSEEN_USER}"]
    pd.DataFrame({"Pid": [str(i) for i in range(len(status))], "popularity": [1.0] * 5 + [None, 1.0],
                  "status": status}).to_parquet(tmp_path / "out.parquet", index=False)
    counts, first_errors = smp_spark.output_counts(spark, str(tmp_path / "out.parquet"))
    assert {k: counts[k] for k in ("unseen_user_rows", "text_truncated_rows")} == note_counts(status) \
        == {"unseen_user_rows": 3, "text_truncated_rows": 2}
    assert (counts["rows"], counts["partial_rows"], counts["error_rows"], len(first_errors)) == (7, 5, 1, 1)


@needs_spark
@pytest.mark.slow
def test_an_smpd_directory_is_read_on_the_driver_and_agrees(spark, model_dir, smpd_dir, tmp_path):
    """An SMPD directory (JSON files) is not a table Spark reads: load_data reads it on the driver, its notes
    travel with the rows, and the result is the pandas path's."""
    import json
    import shutil

    smpd = tmp_path / "smpd"
    shutil.copytree(smpd_dir, smpd)
    spatial = smpd / "train_temporalspatial_information.json"
    records = json.loads(spatial.read_text())
    records[3]["Postdate"], records[7]["Latitude"] = "yesterday", "95"  # unparseable, out of range
    spatial.write_text(json.dumps(records))
    metrics = smp_spark.predict_spark(model_dir, str(smpd), str(tmp_path / "spark.parquet"), spark=spark,
                                      partitions=2)
    pandas_out, pandas_metrics = pandas_path(model_dir, smpd, tmp_path, batch_size=10_000)
    spark_out = pd.read_parquet(tmp_path / "spark.parquet")
    assert_same(spark_out, pandas_out)
    assert metrics["data/rows"] == pandas_metrics["data/rows"] == 160 and metrics["data/partial_rows"] == 2
    assert spark_out.at[3, "status"] == "partial: unparseable Postdate='yesterday'; treated as missing"
    assert spark_out.at[7, "status"] == "partial: Latitude=95 out of range [-90, 90]; treated as missing"


@needs_spark
@pytest.mark.slow
def test_whole_input_problems_refuse_as_the_pandas_path_does(spark, model_dir, tmp_path):
    from smp.data import load_data

    table = bad_table(30)
    table.at[4, "Pid"] = table.at[2, "Pid"]
    table.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError) as pandas_error:
        load_data(str(tmp_path / "dup.csv"))
    with pytest.raises(DataError) as spark_error:
        smp_spark.predict_spark(model_dir, str(tmp_path / "dup.csv"), str(tmp_path / "out"), spark=spark)
    assert str(spark_error.value) == str(pandas_error.value)  # "<file>: 1 duplicate Pid value(s), e.g. ['..']"
    assert not (tmp_path / "out").exists()
    pd.read_csv(tmp_path / "dup.csv").drop(columns=["Pid"]).to_parquet(tmp_path / "nopid.parquet")
    with pytest.raises(DataError, match=r"nopid.parquet: missing required field\(s\) \['Pid'\]"):
        smp_spark.predict_spark(model_dir, str(tmp_path / "nopid.parquet"), str(tmp_path / "out"), spark=spark)
    with pytest.raises(DataError, match="cannot be loaded"):
        smp_spark.predict_spark(str(tmp_path / "no_model"), str(tmp_path / "dup.csv"), str(tmp_path / "out"),
                                spark=spark)
    # a model whose files are damaged fails where it is loaded, on the executors: one line, no trace
    import shutil

    shutil.copytree(model_dir, tmp_path / "broken")
    (tmp_path / "broken" / "python_model.pkl").write_bytes(b"not a pickle")
    table.drop_duplicates("Pid").to_csv(tmp_path / "ok.csv", index=False)
    with pytest.raises(DataError) as broken:
        smp_spark.predict_spark(str(tmp_path / "broken"), str(tmp_path / "ok.csv"), str(tmp_path / "out"),
                                spark=spark)
    message = str(broken.value)
    assert message.startswith("the model cannot be loaded on a Spark executor (")
    assert "\n" not in message and "Traceback" not in message and len(message) < 700


@needs_spark
@pytest.mark.slow
def test_run_predict_spark_logs_the_pandas_paths_run(spark, model_dir, tmp_path):
    """The hook ``run_predict`` calls for engine=spark: one MLflow run with the counts, timings and the Parquet."""
    from smp.predict import PredictJob

    bad_table(40).to_csv(tmp_path / "posts.csv", index=False)
    job = PredictJob(model=model_dir, input=str(tmp_path / "posts.csv"), output=str(tmp_path / "preds.parquet"),
                     experiment="spark-run")
    result = smp_spark.run_predict_spark(job)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["smp.engine"] == "spark"
    assert run.data.params["data/rows"] == "40" and run.data.params["data/error_rows"] == "3"
    assert run.data.metrics["time/rows_per_s"] > 0
    logged = [f.path for f in mlflow.MlflowClient().list_artifacts(result.run_id, "preds.parquet")]
    assert any(Path(p).name.startswith("part-") for p in logged)
    assert len(pd.read_parquet(tmp_path / "preds.parquet")) == 40


@needs_spark
@pytest.mark.slow  # tiny CLIP, 40 images, three embed passes (~30 s)
def test_embed_on_spark_fills_the_local_cache_and_resumes(spark, tmp_path, tiny_clip):
    from smp.data import load_data
    from smp.embed import EmbedCfg, embed_images
    from smp.image_features import HANDCRAFTED
    from smp.synth import SynthCfg, generate

    posts = load_data(str(generate(tmp_path / "smpd", SynthCfg(n=40, seed=5, bad_images=4))))
    pids, paths = posts["Pid"].tolist(), posts["image_path"].tolist()
    cfg = EmbedCfg(**tiny_clip, batch_size=8, num_workers=0, chunk_size=8, progress=False, compile="none",
                   cache_dir=str(tmp_path / "local_cache"))
    local = embed_images(pids, paths, cfg)

    spark_cfg = replace(cfg, cache_dir=str(tmp_path / "spark_cache"))
    first = smp_spark.embed_spark(posts, spark_cfg, spark=spark, images_per_partition=10)
    assert first["images"] == 40 and first["bad_images"] == 4 and first["computed"] == 36
    assert first["cache_hits"] == 0 and first["spark/partitions"] == 4 and first["spark/model_loads"] >= 1
    assert sorted(first["bad_examples"]) == sorted(local.bad[["Pid", "reason"]].itertuples(index=False, name=None))

    # the local embed finds every image in the cache Spark wrote, with the same features
    again = embed_images(pids, paths, spark_cfg)
    assert again.stats["computed"] == 0 and again.stats["cache_hits"] == 36
    cols = [*HANDCRAFTED, *[c for c in local.features.columns if c.startswith("clip_")]]
    assert again.features["has_image"].tolist() == local.features["has_image"].tolist()
    np.testing.assert_allclose(again.features[cols].to_numpy(dtype=float), local.features[cols].to_numpy(dtype=float),
                               rtol=1e-5, atol=1e-6)
    assert again.bad.equals(local.bad)

    # a rerun skips what the cache holds: nothing computed
    rerun = smp_spark.embed_spark(posts, spark_cfg, spark=spark, images_per_partition=10)
    assert rerun["computed"] == 0 and rerun["cache_hits"] == 36 and rerun["bad_images"] == 4


@needs_spark
@pytest.mark.slow  # a standalone cluster on this machine: one executor JVM of its own (~60 s)
def test_a_cluster_master_gets_the_model_and_code_shipped(model_dir, tmp_path):
    """Any master but ``local[...]`` ships the model (``SparkContext.addFile``) and smp's code (``addPyFile``) to
    executors in JVMs of their own (``local-cluster[1,1,1024]``: Spark's one-machine cluster); same answers."""
    import json
    import subprocess
    import sys

    bad_table(40).to_csv(tmp_path / "posts.csv", index=False)
    out = tmp_path / "cluster.parquet"
    code = ("import json; from smp.spark import predict_spark; "
            f"m = predict_spark({model_dir!r}, {str(tmp_path / 'posts.csv')!r}, {str(out)!r}, "
            "master='local-cluster[1,1,1024]'); print('METRICS ' + json.dumps(m))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("METRICS "))[8:])
    assert metrics["spark/model_loads"] == 1 and metrics["data/rows"] == 40 and metrics["data/error_rows"] == 3
    pandas_out, _ = pandas_path(model_dir, tmp_path / "posts.csv", tmp_path, batch_size=10_000)
    assert_same(pd.read_parquet(out), pandas_out)
