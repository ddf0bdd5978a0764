"""The Spark engine: batch scoring and embedding past one machine (``engine=spark``).

``predict_spark(model_uri, input_path, output_path, master)`` scores a posts table on Spark executors and
writes Parquet with ``Pid``, ``popularity`` and ``status``, the values and statuses ``smp predict``'s pandas
path writes (``smp.predict``: per-post ``ok`` / ``partial: ...`` / ``error: ...``; a malformed row gets its
status and never fails the job; a duplicate ``Pid`` or a missing ``Pid`` column refuses the whole input,
as there).  ``embed_spark(posts, cfg, master)`` computes the image features of every post on the
executors into the feature cache the local ``embed`` uses (``smp.feature_cache``: same layout, same
content keys), so a later local ``embed`` or model run finds them; a rerun skips what the cache holds.
``master`` is any Spark master URL (``local[*]`` by default; ``spark://``, ``yarn``, ``k8s://``).

How a row is scored (why not ``mlflow.pyfunc.spark_udf`` alone)
------------------------------------------------------------------
The logged models type every input column as MLflow's ``AnyType`` (``smp.packaging.input_schema``).  That
is not what stops ``spark_udf``: in MLflow 3.17 the input schema never becomes a Spark type (only the
output schema does: ``_convert_spec_type_to_spark_type`` maps ``AnyType`` to ``VariantType`` on pyspark
4, and our output is ``popularity`` double / ``status`` string), and ``spark_udf(spark, uri)`` called on
``struct(<the schema's columns>)`` of a CSV read as text scores clean rows (checked with pyspark 4.3).
What it cannot do is the pandas path's per-post contract:

* one refused row fails the whole job: the model refuses a request (``RequestRejected``: an empty ``Pid``,
  a list in a text field, ``image_b64`` that is not base64) and ``spark_udf`` raises it in the task, which
  fails (a cluster retries it, 4 times by default) and so does the job (seen: ``column 'Pid': empty in 2
  row(s)`` stopped a 40-row job); ``smp predict`` halves a refused batch until the refused rows are found
  (``smp.scoring.predict_rows``) and gives each ``error: <reason>``;
* load-time parsing: ``smp predict`` reads a table with ``smp.data.prepare_posts``, which treats an
  unparseable number as missing and notes it in the post's status (``partial: unparseable
  photo_count='abc'; treated as missing``); the served model refuses the whole request for it.

So the executors run the pandas path's own per-post code on each Arrow batch (``score_posts``:
``prepare_posts`` -> ``model_input`` -> image features -> ``predict_rows`` -> ``with_notes``) through
``DataFrame.mapInArrow``, with the model loaded once per Python worker by ``mlflow.pyfunc.load_model``
from a copy the driver downloads once (``local[...]``: read in place; other masters: shipped with
``SparkContext.addFile``, as ``spark_udf`` ships it).  Same code, same statuses: the parity test
(``tests/test_spark.py``) checks every prediction to 1e-9 and every status on a table of bad rows.

What differs from the pandas path
---------------------------------
* The output is Parquet (a directory of part files), in input order; unscored rows have a null
  ``popularity``; no spreadsheet quoting (``smp.predict.spreadsheet_safe`` is for the CSV).
* CSV is read by Spark as text (quoted newlines and ``""`` escapes as pandas reads them; pandas' default
  missing-value strings -- ``NA``, ``null``, ``nan``, ... -- are made missing as ``pd.read_csv`` does).
  Numbers are then parsed by the same code, so they agree; a *text* field (``Title``, ``Category``, ...)
  whose every value in the file looks like a number is text here, while ``pd.read_csv`` makes it a
  number column (``7`` -> ``7.0`` once a value is missing) -- a difference only the model's text
  features (``title_len``, the category one-hots) can see.
* ``MAX_ROW_FAILURES`` (stop isolating refused rows one by one) counts per Arrow batch of
  ``batch_size`` rows, not per input.
* An SMPD directory, a ``.json`` table or the demo set (``input=""``) is not a table Spark reads: it is
  read by ``smp.data.load_data`` on the driver (its row notes carried along) and then distributed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from smp.data import DataError

log = logging.getLogger("smp.spark")

DEFAULT_MASTER = "local[*]"
MIN_JAVA = 17  # Spark 4 runs on Java 17 or 21
JAVA_PACKAGE = "openjdk-17-jre-headless"  # Debian / Ubuntu
SPARK_EXTRA = "pip install -e '.[spark]'"
MIN_PYSPARK = (4, 0)

ROW = "_smp_row"  # the input order, carried through the job and dropped before writing
NOTES = "_smp_load_notes"  # a driver-read input's load notes per row (JSON list), see read_posts
OUTPUT_COLUMNS = ("Pid", "popularity", "status")

# pd.read_csv's default missing-value strings (pandas' STR_NA_VALUES, documented under ``na_values``)
CSV_NA_VALUES = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                           "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


class SparkUnavailable(DataError):
    """Spark cannot run here (no pyspark, no or too old Java, the JVM did not start); the message says what to
    install."""


class SparkJobFailed(DataError):
    """A Spark job failed for a reason that is not a per-post problem; the message is the cause's last line."""


# --------------------------------------------------------------------------- setup checks
def java_executable() -> str | None:
    """The ``java`` Spark will start: ``$JAVA_HOME/bin/java`` when JAVA_HOME is set, else ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME", "")
    if home:
        candidate = Path(home) / "bin" / "java"
        return str(candidate) if candidate.exists() else None
    return shutil.which("java")


def java_major(java: str) -> int | None:
    """The major version ``java -version`` reports (``17``; ``8`` for ``1.8.0_392``), or None if it does not run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def check_spark() -> str:
    """Raise ``SparkUnavailable`` naming what to install unless pyspark (4.0+) and Java 17+ are here; return
    pyspark's version."""
    try:
        import pyspark
    except ImportError:
        raise SparkUnavailable(f"engine=spark needs pyspark, which is not installed: {SPARK_EXTRA} "
                               "(or pip install 'pyspark>=4.0'); engine=pandas needs none") from None
    version = tuple(int(p) for p in re.findall(r"\d+", pyspark.__version__)[:2])
    if version < MIN_PYSPARK:
        raise SparkUnavailable(f"engine=spark needs pyspark 4.0 or newer, found {pyspark.__version__}: {SPARK_EXTRA}")
    java = java_executable()
    if java is None:
        where = f"JAVA_HOME={os.environ['JAVA_HOME']} has no bin/java" if os.environ.get("JAVA_HOME") \
            else "no JAVA_HOME and no java on PATH"
        raise SparkUnavailable(f"engine=spark needs Java {MIN_JAVA} or newer, and none was found ({where}): on "
                               f"Debian/Ubuntu `apt-get install {JAVA_PACKAGE}`")
    major = java_major(java)
    if major is None:
        raise SparkUnavailable(f"{java} -version does not run or does not say its version; engine=spark needs "
                               f"Java {MIN_JAVA} or newer (Debian/Ubuntu: `apt-get install {JAVA_PACKAGE}`)")
    if major < MIN_JAVA:
        raise SparkUnavailable(f"{java} is Java {major}; Spark {pyspark.__version__} needs Java {MIN_JAVA} or newer: "
                               f"`apt-get install {JAVA_PACKAGE}` and set JAVA_HOME to it "
                               "(e.g. /usr/lib/jvm/java-17-openjdk-amd64)")
    return pyspark.__version__


def is_local(master: str) -> bool:
    """True for ``local``, ``local[N]``, ``local[*]``, ``local[N,F]``: executors share the driver's machine and files."""
    return master == "local" or master.startswith("local[")


def spark_session(master: str = DEFAULT_MASTER, conf: dict | None = None):
    """``(session, created)``: the running session of this process if there is one (its master wins; a
    different ``master`` is warned about), else a new one on ``master``.

    Executors in local mode run this interpreter (``PYSPARK_PYTHON``, unless set), so they import this
    ``smp`` and its dependencies; other masters need them installed on the executors.
    """
    check_spark()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        running = active.sparkContext.master
        if master and running != master:
            log.warning("a Spark session on %s is already running in this process; it is used (not %s)", running,
                        master)
        return active, False
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # pyspark reads it, not spark.pyspark.python
    settings = {"spark.ui.showConsoleProgress": "false", "spark.sql.session.timeZone": "UTC",
                "spark.sql.execution.arrow.pyspark.enabled": "true"}
    if is_local(master):  # a one-machine job: no web UI, and the JVM's log only for FATAL (start-up notes, task traces)
        settings["spark.ui.enabled"] = "false"
        if "SPARK_CONF_DIR" not in os.environ:
            settings["spark.driver.extraJavaOptions"] = f"-Dlog4j2.configurationFile=file:{_quiet_log4j()}"
    settings.update(conf or {})
    builder = SparkSession.builder.master(master).appName("smp")
    for key, value in settings.items():
        builder = builder.config(key, value)
    # pyspark 4.x warns about pandas 3 at every Arrow call; what we use of it the parity test covers
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - the JVM's own failure, in one line
        raise SparkUnavailable(f"Spark could not start on master {master!r}: {last_line(str(exc))}") from None
    if is_local(master):  # a failed task is reported once, in one line, by spark_errors (its trace at DEBUG)
        spark.sparkContext.setLogLevel("FATAL")
    return spark, True


_LOG4J = """\
rootLogger.level = fatal
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
"""


def _quiet_log4j() -> str:
    """A log4j2 configuration file (in the temp directory) that logs only FATAL from Spark's JVM."""
    path = Path(tempfile.gettempdir()) / "smp-spark-log4j2.properties"
    if not path.exists() or path.read_text() != _LOG4J:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(_LOG4J)
        os.replace(tmp, path)
    return str(path)


@contextlib.contextmanager
def session(master: str = DEFAULT_MASTER, spark=None, conf: dict | None = None):
    """Yield ``(spark, startup_seconds)``: ``spark`` if given, else ``spark_session(master)``; a session
    started here is stopped at the end."""
    if spark is not None:
        yield spark, 0.0
        return
    t0 = time.perf_counter()
    spark, created = spark_session(master, conf)
    startup = time.perf_counter() - t0 if created else 0.0
    try:
        yield spark, startup
    finally:
        if created:
            spark.stop()


# --------------------------------------------------------------------------- errors
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Rejected|Failed|Unavailable|Chunk)): (.*)$")


def last_line(text: str, limit: int = 400) -> str:
    """The cause of a Spark / Python error message in one line: the last ``SomeError: message`` line of a Python
    traceback, else the first non-empty line (Spark's ``[ERROR_CLASS] ...``)."""
    lines = [ln.rstrip() for ln in str(text).splitlines() if ln.strip()]
    causes = [ln for ln in lines if _ERROR_LINE.match(ln)]
    line = causes[-1] if causes else (lines[0] if lines else "unknown error")
    line = " ".join(line.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


@contextlib.contextmanager
def spark_errors(what: str):
    """Turn a failed Spark job into one line: an ``smp`` ``DataError`` raised on an executor (an image path
    escaping the images root) is raised again as is; anything else as ``SparkJobFailed`` naming ``what``
    (the full Spark / Python trace at DEBUG)."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - py4j / pyspark errors carry JVM and worker traces
        text = str(exc)
        log.debug("%s failed in Spark", what, exc_info=exc)
        own = re.findall(r"smp\.\w+\.(?:DataError|SparkUnavailable|SparkJobFailed): ([^\n]*)", text)
        if own:
            raise DataError(own[-1].strip()) from None
        raise SparkJobFailed(f"{what} failed in Spark: {last_line(text)}") from None


# --------------------------------------------------------------------------- reading posts
def input_kind(path: str) -> str:
    """How ``path`` is read: ``csv`` and ``parquet`` by Spark, ``driver`` (an SMPD directory, a ``.json`` table,
    the demo set) by ``smp.data.load_data`` on the driver; raises ``DataError`` for what neither reads."""
    if str(path) in ("", "demo"):
        return "driver"
    text = str(path)
    if "://" in text and not text.startswith("file:"):  # hdfs://, s3a://, gs://, abfss://: by its name
        return "csv" if text.rstrip("/").lower().endswith(".csv") else "parquet"
    p = Path(text.removeprefix("file://").removeprefix("file:"))
    if not p.exists():
        raise DataError(f"{path}: no such file or directory (expected a posts table: .csv, .parquet or a directory "
                        "of Parquet files; or an SMPD directory)")
    suffix = p.suffix.lower()
    if p.is_dir():
        if (p / "train_category.json").exists():
            return "driver"
        if suffix in (".parquet", ".pq") or any(p.rglob("*.parquet")):
            return "parquet"
        raise DataError(f"{path}: a directory with neither Parquet files nor an SMPD train_category.json")
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".json":
        return "driver"
    raise DataError(f"{path}: unknown extension {suffix!r}; expected .csv, .parquet, .pq, .json, a directory of "
                    "Parquet files or an SMPD directory")


def read_posts(spark, path: str, images_root: str | None = None):
    """``(frame, kind)``: the posts of ``path`` as a Spark DataFrame with ``ROW`` (input order) added.

    ``csv``: every column as text, quoting as pandas writes it (``""`` inside quotes, newlines in quoted
    cells); the executors turn pandas' missing-value strings into missing values (``score_batches``).
    ``parquet``: the file's own types.  ``driver``: read by ``load_data`` on the driver (parsed, image paths
    resolved), with each row's load notes in ``NOTES``.
    """
    from pyspark.sql import functions as F

    kind = input_kind(path)
    if kind == "driver":
        from smp.data import load_data

        posts = load_data(path, images_root=images_root)
        notes = posts.attrs.get("row_notes") or {}
        log.info("%s is not a table Spark reads (an SMPD directory, .json or the demo set): read on the driver "
                 "(%d posts), then distributed", posts.attrs.get("source", path), len(posts))
        frame = posts.copy()
        frame.attrs = {}
        frame[NOTES] = [json.dumps(list(notes.get(pid, ()))) for pid in posts["Pid"]]
        frame[ROW] = np.arange(len(frame), dtype=np.int64)
        for col in frame.columns:  # Arrow needs one type per column: a text column is text, None where missing
            if frame[col].dtype == object or pd.api.types.is_string_dtype(frame[col]):
                frame[col] = [None if v is None or (isinstance(v, float) and np.isnan(v)) else
                              v if isinstance(v, str) else str(v) for v in frame[col].astype(object)]
        with spark_errors(f"distributing {path}"):
            return spark.createDataFrame(frame), kind
    with spark_errors(f"reading {path}"):
        if kind == "csv":
            reader = spark.read.options(header=True, escape='"', multiLine=True, mode="PERMISSIVE",
                                        encoding="UTF-8")
            sdf = reader.csv(path)
            sdf = sdf.toDF(*[c.lstrip("\ufeff") for c in sdf.columns])  # a UTF-8 BOM, which pandas drops
        else:
            sdf = spark.read.parquet(path)
    if "Pid" not in sdf.columns:
        raise DataError(f"{path}: missing required field(s) ['Pid']")
    return sdf.withColumn(ROW, F.monotonically_increasing_id()), kind


def check_unique_pids(sdf, source: str, kind: str) -> int:
    """Refuse the input (``DataError``, ``load_data``'s wording) when a ``Pid`` occurs twice, as the pandas path
    does; return the number of rows. One aggregation over the ``Pid`` column; nothing but the counts (and
    three example ids) reaches the driver."""
    from pyspark.sql import functions as F

    pid = F.col("Pid").cast("string")
    if kind == "csv":  # what pd.read_csv reads as missing is missing (two such Pids are duplicates there too)
        pid = F.when(pid.isin(*CSV_NA_VALUES), F.lit(None)).otherwise(pid)
    with spark_errors(f"counting the posts of {source}"):
        groups = sdf.groupBy(pid.alias("Pid")).count()
        total = groups.agg(F.sum("count").alias("rows"),
                           F.sum(F.when(F.col("count") > 1, F.col("count") - 1).otherwise(0)).alias("dups")).first()
        rows, dups = int(total["rows"] or 0), int(total["dups"] or 0)
        if dups:
            examples = [r["Pid"] if r["Pid"] is not None else float("nan")
                        for r in groups.where(F.col("count") > 1).limit(3).collect()]
            raise DataError(f"{source}: {dups} duplicate Pid value(s), e.g. {examples}")
    return rows


# --------------------------------------------------------------------------- the model on the executors
@dataclass(frozen=True)
class ModelRef:
    """Where an executor finds the model: ``path`` (a directory on a filesystem it shares with the driver) or
    ``archive`` (a zip added with ``SparkContext.addFile``)."""

    path: str
    archive: str = ""


_LOADED: dict[str, object] = {}  # per Python worker process: ModelRef key -> loaded pyfunc


def executor_model(ref: ModelRef):
    """``(model, load_seconds)``: the pyfunc for ``ref``, loaded once per Python worker (0 s when it was)."""
    key = ref.archive or ref.path
    if key in _LOADED:
        return _LOADED[key], 0.0
    import mlflow

    t0 = time.perf_counter()
    path = ref.path
    if ref.archive:
        from pyspark import SparkFiles

        path = tempfile.mkdtemp(prefix="smp-model-")
        shutil.unpack_archive(SparkFiles.get(ref.archive), path, format="zip")
    try:
        model = mlflow.pyfunc.load_model(path)
    except Exception as exc:  # noqa: BLE001 - said in one line on the driver (spark_errors)
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise DataError(f"the model cannot be loaded on a Spark executor ({cause}); the executors need smp's "
                        f"dependencies (pip install smp[spark]) and the model's files intact") from None
    _LOADED[key] = model
    return model, time.perf_counter() - t0


def ship_model(spark, local_path: str) -> ModelRef:
    """A ``ModelRef`` the executors can use: the path itself on a local master, else a zip of it added to the
    job's files (``SparkContext.addFile``), with smp's own code (``addPyFile``) for executors that lack it."""
    if is_local(spark.sparkContext.master):
        return ModelRef(path=local_path)
    archive = shutil.make_archive(str(Path(tempfile.mkdtemp(prefix="smp-ship-")) / f"model-{_digest(local_path)}"),
                                  "zip", local_path)
    spark.sparkContext.addFile(archive)
    ship_code(spark)
    return ModelRef(path="", archive=Path(archive).name)


def ship_code(spark) -> None:
    """Add smp's sources (one zip) to the executors' Python path, once per session."""
    context = spark.sparkContext
    if getattr(context, "_smp_code_shipped", False):
        return
    from smp.packaging import bundle_code

    archive = next(p for p in bundle_code(Path(tempfile.mkdtemp(prefix="smp-code-"))) if p.suffix == ".zip")
    context.addPyFile(str(archive))
    context._smp_code_shipped = True


def _digest(path: str) -> str:
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- scoring
def score_posts(model, raw: pd.DataFrame, batch_size: int = 10_000, images_root: str | None = None,
                source: str = "<frame>", row_notes: list | None = None) -> pd.DataFrame:
    """``Pid``, ``popularity``, ``status`` for each row of ``raw`` (a posts frame as read, before parsing), by
    the pandas path's steps: ``prepare_posts`` (numbers parsed, notes for what was treated as missing),
    ``model_input``, image features, ``predict_rows`` (refused rows isolated), ``with_notes``.

    ``row_notes``: each row's load notes when ``raw`` was parsed already (a driver-read input), instead of
    the ones ``prepare_posts`` finds.  A whole-input problem (an image path escaping ``images_root``) raises
    ``DataError`` as ``load_data`` does.
    """
    from smp.data import prepare_posts
    from smp.scoring import note_field, predict_rows, with_image_features, with_notes
    from smp.serving import model_input

    posts = prepare_posts(raw, source=source, images_root=images_root)
    load_notes = posts.attrs.get("row_notes") or {}
    rows = model_input(model, posts)
    read = set(rows.columns)  # a field the model does not read is not noted (as in run_predict)
    rows, image_notes = with_image_features(model, rows)
    pred, status = predict_rows(model, rows, batch_size)
    pids = posts["Pid"].tolist()
    given = row_notes if row_notes is not None else [load_notes.get(pid, ()) for pid in pids]
    status = [with_notes(s, [*(n for n in notes if note_field(n) in read), *image_notes.get(pid, ())])
              for pid, s, notes in zip(pids, status, given)]
    return pd.DataFrame({"Pid": posts["Pid"].to_numpy(), "popularity": pred,
                         "status": pd.Series(status, dtype=object)})


def arrow_to_pandas(batch) -> pd.DataFrame:
    """An Arrow record batch as ``pd.read_parquet`` would give it (pandas' own conversion where it has one)."""
    import pyarrow as pa

    table = pa.Table.from_batches([batch])
    try:
        from pandas.io._util import arrow_table_to_pandas
    except ImportError:  # another pandas: pyarrow's conversion
        return table.to_pandas()
    return arrow_table_to_pandas(table)


def csv_missing(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells ``pd.read_csv`` reads as missing (``CSV_NA_VALUES``) made missing, column by column."""
    frame = frame.copy()
    for col in frame.columns:
        values = frame[col]
        if values.dtype == object or pd.api.types.is_string_dtype(values):
            frame[col] = values.mask(values.isin(CSV_NA_VALUES))
    return frame


def read_columns(mlmodel, columns: list[str]) -> list[str]:
    """The columns of a posts table that scoring needs: what ``smp.serving.model_input`` keeps for this model
    (its input columns, ``Pid``, precomputed image features), plus this module's own. The rest would be parsed
    and dropped on every executor."""
    from smp.serving import model_input

    kept = list(model_input(SimpleNamespace(metadata=mlmodel), pd.DataFrame(columns=list(columns))).columns)
    return kept + [c for c in (NOTES, ROW) if c in columns and c not in kept]


def _output_schema():
    import pyarrow as pa

    return pa.schema([("Pid", pa.string()), ("popularity", pa.float64()), ("status", pa.string()),
                      (ROW, pa.int64())])


def score_batches(batches, ref: ModelRef, kind: str, batch_size: int, images_root: str | None, source: str,
                  env: dict, loads, load_seconds):
    """The executor side of ``predict_spark`` (``mapInArrow``): each Arrow batch of posts -> ``score_posts`` ->
    an Arrow batch of ``Pid, popularity, status`` and the rows' ``ROW``."""
    import pyarrow as pa

    os.environ.update(env)  # SMP_* settings of the driver (the feature cache of an image model)
    logging.getLogger("smp.data").setLevel(logging.ERROR)  # per-batch parse counts: the driver reports totals
    model, seconds = executor_model(ref)
    if seconds:
        loads.add(1)
        load_seconds.add(seconds)
    schema = _output_schema()
    for batch in batches:
        if batch.num_rows == 0:
            continue
        frame = arrow_to_pandas(batch)
        order = frame.pop(ROW).to_numpy(dtype=np.int64)
        notes = [json.loads(n) for n in frame.pop(NOTES)] if NOTES in frame.columns else None
        if kind == "csv":
            frame = csv_missing(frame)
        out = score_posts(model, frame, batch_size, images_root=None if kind == "driver" else images_root,
                          source=source, row_notes=notes)
        pid = out["Pid"].astype(object).where(out["Pid"].notna(), None)
        popularity = out["popularity"].to_numpy(dtype=float)
        yield pa.RecordBatch.from_arrays(
            [pa.array(pid.tolist(), type=pa.string()),
             pa.array(popularity, type=pa.float64(), mask=~np.isfinite(popularity)),
             pa.array(out["status"].astype(str).tolist(), type=pa.string()),
             pa.array(order, type=pa.int64())], schema=schema)


def _spark_output_file(name: str) -> bool:
    """A file Spark's Parquet writer leaves in an output directory (part files, markers, checksums)."""
    return name.startswith(("part-", "_SUCCESS", "_committed", "_started", ".part-", "._SUCCESS"))


def check_output(output: str, input_path: str = "") -> None:
    """Refuse an output path Spark would clobber or that is not a Parquet directory, naming the problem."""
    if not output:
        raise DataError("output: give a path for the predictions (engine=spark writes a directory of Parquet files)")
    if output.lower().rstrip("/").endswith(".csv"):
        raise DataError(f"output {output!r}: engine=spark writes Parquet (a directory of part files), not CSV: "
                        "pass e.g. output=predictions.parquet")
    if "://" in output and not output.startswith("file:"):
        return
    path = Path(output.removeprefix("file://").removeprefix("file:"))
    if input_path and "://" not in input_path and path.resolve() == Path(input_path).resolve():
        raise DataError(f"output {output!r} is the input; pick another path")
    if path.is_file():
        raise DataError(f"output {output!r} is a file; engine=spark writes a directory of Parquet part files: "
                        "remove it or pick another path")
    if path.is_dir():
        other = [c.name for c in path.iterdir() if not _spark_output_file(c.name)]
        if other:
            raise DataError(f"output {output!r} is a directory holding other files ({other[:3]}); engine=spark "
                            "replaces an earlier predictions directory only: pick another path")


def output_counts(spark, output: str) -> tuple[dict[str, int], list[dict]]:
    """``rows``, ``scored_rows``, ``error_rows``, ``partial_rows`` and the feature-group note counts
    (``smp.scoring.note_counts``' keys) of a written predictions directory (one aggregation) and its first
    three errors."""
    from pyspark.sql import functions as F

    from smp.scoring import GROUP_NOTES

    out = spark.read.parquet(output)
    kind = F.split(F.col("status"), ":").getItem(0)
    notes = F.split(F.regexp_replace(F.col("status"), "^partial: ", ""), "; ")  # note_counts' reading
    row = out.agg(F.count(F.lit(1)).alias("rows"), F.count("popularity").alias("scored_rows"),
                  F.sum(F.when(kind == "error", 1).otherwise(0)).alias("error_rows"),
                  F.sum(F.when(kind == "partial", 1).otherwise(0)).alias("partial_rows"),
                  *[F.sum(F.when((kind == "partial") & F.array_contains(notes, note), 1).otherwise(0)).alias(key)
                    for key, note in GROUP_NOTES.items()]).first()
    counts = {k: int(row[k] or 0) for k in ("rows", "scored_rows", "error_rows", "partial_rows", *GROUP_NOTES)}
    first = []
    if counts["error_rows"]:
        first = [r.asDict() for r in out.where(kind == "error").select("Pid", "status").limit(3).collect()]
    return counts, first


def fetch_model(model_uri: str, dest: str):
    """``(local_path, mlmodel)``: the model's files downloaded once into ``dest`` and its MLmodel read (the
    pandas path's error when it cannot be). The driver does not load the model itself: the Python workers do
    (a paper-sized benchmark -- 900 trees of depth 18 -- takes 600 MB in a process)."""
    import mlflow
    from mlflow.models import Model

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dest)
        mlmodel = Model.load(local)
    except mlflow.exceptions.MlflowException as exc:
        raise DataError(f"model {model_uri!r} cannot be loaded ({exc.message}); register one with `smp promote` or "
                        "pass a runs:/<run_id>/<family> URI (e.g. runs:/<id>/benchmark)") from None
    except OSError as exc:
        raise DataError(f"model {model_uri!r} cannot be loaded ({type(exc).__name__}: {exc})") from None
    if "python_function" not in mlmodel.flavors:
        raise DataError(f"model {model_uri!r} is not a Python function (pyfunc) model; its flavors are "
                        f"{sorted(mlmodel.flavors)}")
    return local, mlmodel


def predict_spark(model_uri: str, input_path: str, output_path: str, master: str = DEFAULT_MASTER,
                  images: str = "", batch_size: int = 10_000, partitions: int = 0, spark=None,
                  keep_order: bool = True) -> dict[str, float]:
    """Score every post of ``input_path`` with ``model_uri`` on Spark; write ``output_path`` (Parquet:
    ``Pid``, ``popularity``, ``status``, in input order); return the pandas path's counts and timings under
    its keys (``data/rows``, ``data/scored_rows``, ``data/error_rows``, ``data/partial_rows``,
    ``time/load_s`` (here: fetching the model for the executors), ``time/predict_s``, ``time/rows_per_s``) plus
    ``spark/*`` (startup, partitions, model loads on the executors and their mean seconds).

    ``partitions``: how many tasks score (0 = the session's default parallelism; an input with fewer
    partitions is repartitioned by range of its row order, so the output keeps the input order).
    ``spark``: a running session to use (not stopped here); else one is started on ``master`` and stopped.
    The driver reads counts only: the posts go from the input to the executors to the output.
    """
    return _predict_spark(model_uri, input_path, output_path, master, images, batch_size, partitions, spark,
                          keep_order)[0]


def _predict_spark(model_uri, input_path, output_path, master, images, batch_size, partitions, spark,
                   keep_order):
    """``predict_spark`` returning ``(metrics, the model's MLmodel)`` (the run's lineage tags need it)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, not {batch_size}")
    if partitions < 0:
        raise DataError(f"partitions must be 0 (the session's default) or more, not {partitions}")
    input_path = str(input_path or "")
    kind = input_kind(input_path)  # a missing input is named before Spark starts
    check_output(output_path, input_path)
    check_spark()
    images_root = str(Path(images).resolve()) if images and "://" not in images else (images or None)
    env = {k: v for k, v in os.environ.items() if k.startswith("SMP_")}
    if env.get("SMP_CACHE_DIR"):
        env["SMP_CACHE_DIR"] = str(Path(env["SMP_CACHE_DIR"]).resolve())
    with tempfile.TemporaryDirectory(prefix="smp-predict-") as tmp, session(master, spark) as (spark, startup):
        t0 = time.perf_counter()
        local, mlmodel = fetch_model(model_uri, tmp)
        ref = ship_model(spark, local)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
        sdf, kind = read_posts(spark, input_path, images_root)
        sdf = sdf.select(*read_columns(mlmodel, sdf.columns))  # what the model reads travels, nothing else
        source = input_path or "demo"
        t_check = time.perf_counter()
        n_rows = check_unique_pids(sdf, source, kind)
        check_s = time.perf_counter() - t_check
        target = partitions or spark.sparkContext.defaultParallelism
        n_in = sdf.rdd.getNumPartitions()
        if n_in < target and n_rows > n_in:
            sdf = sdf.repartitionByRange(min(target, n_rows), ROW) if keep_order else sdf.repartition(target)
        context = spark.sparkContext
        loads, load_seconds = context.accumulator(0), context.accumulator(0.0)

        def score(batches, ref=ref, kind=kind, batch_size=batch_size, images_root=images_root, source=source,
                  env=env, loads=loads, load_seconds=load_seconds):
            return score_batches(batches, ref, kind, batch_size, images_root, source, env, loads, load_seconds)

        scored = sdf.mapInArrow(score, f"Pid string, popularity double, status string, {ROW} long")
        if keep_order:
            scored = scored.sortWithinPartitions(ROW)  # a partition's batches are in order; kept so on write
        with spark_errors(f"scoring {source} with {model_uri}"):
            t_score = time.perf_counter()
            scored.drop(ROW).write.mode("overwrite").parquet(output_path)
            score_s = time.perf_counter() - t_score
            counts, first_errors = output_counts(spark, output_path)
        seconds = time.perf_counter() - t0
        n_parts = scored.rdd.getNumPartitions()
    timings = {"load_s": load_s, "predict_s": seconds,
               "rows_per_s": counts["rows"] / seconds if seconds > 0 else float("nan")}
    metrics = {**{f"data/{k}": v for k, v in counts.items()}, **{f"time/{k}": v for k, v in timings.items()},
               "spark/startup_s": startup, "spark/check_s": check_s, "spark/score_write_s": score_s,
               "spark/partitions": n_parts, "spark/model_loads": int(loads.value),
               "spark/model_load_s": load_seconds.value / loads.value if loads.value else 0.0}
    if counts["error_rows"]:
        log.warning("%d of %d posts not scored, e.g. %s", counts["error_rows"], counts["rows"], first_errors)
    if counts["partial_rows"]:
        log.info("%d posts scored with some input treated as missing (status partial: ...)", counts["partial_rows"])
    log.info("predicted %d posts with %s on Spark %s in %.2fs (%d tasks) -> %s", counts["rows"], model_uri, master,
             seconds, n_parts, output_path)
    return metrics, mlmodel


def spark_output_path(output: str) -> str:
    """``output`` for engine=spark: the pandas path's default ``predictions.csv`` becomes ``predictions.parquet``
    (said in the log); any other ``.csv`` is refused by ``check_output``."""
    if output == "predictions.csv":
        log.info("engine=spark writes Parquet: predictions.parquet (the default output predictions.csv is CSV)")
        return "predictions.parquet"
    return output


def run_predict_spark(cfg, master: str = ""):
    """``run_predict`` on Spark (``cfg.engine == "spark"``): the same MLflow run -- params, the ``data/*`` counts,
    ``time/*`` metrics, lineage tags, a description -- with the Parquet predictions logged as an artifact
    directory; on ``master``, else ``cfg.spark_master``, else ``local[*]``."""
    import mlflow

    from smp.config import flatten
    from smp.scoring import model_lineage
    from smp.tracking import JobResult, describe_run, job_run, log_params

    master = master or getattr(cfg, "spark_master", "") or DEFAULT_MASTER
    output = spark_output_path(cfg.output)
    input_kind(str(cfg.input or ""))  # a missing input or a bad output is named before a run opens
    check_output(output, str(cfg.input or ""))
    check_spark()
    tags = {"smp.model_uri": cfg.model, "smp.engine": "spark", "smp.spark_master": master}
    with job_run("predict", cfg.experiment, flatten(cfg), tags,
                 what="predict popularity for raw posts with a model URI, on Spark") as run:
        metrics, mlmodel = _predict_spark(cfg.model, cfg.input, output, master, cfg.images, cfg.batch_size, 0, None,
                                          True)
        mlflow.set_tags(model_lineage(cfg.model, SimpleNamespace(metadata=mlmodel)))
        log_params({k: v for k, v in metrics.items() if k.startswith("data/")}
                   | {"spark/partitions": metrics["spark/partitions"], "effective/output": output})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                            if (k.startswith("time/") or k in ("spark/startup_s", "spark/model_load_s"))
                            and np.isfinite(v)})
        mlflow.log_artifacts(output, artifact_path=Path(output).name)
        describe_run(f"predict on Spark ({master}): {metrics['data/rows']} posts of "
                     f"{Path(str(cfg.input or 'demo')).name} scored with {cfg.model} ({metrics['data/scored_rows']} "
                     f"scored, {metrics['data/partial_rows']} partly, {metrics['data/error_rows']} not); "
                     f"predictions in {Path(output).name} (Parquet: Pid, popularity, status).")
    return JobResult(run.info.run_id, metrics, None)  # the model was loaded by the executors only


# --------------------------------------------------------------------------- embedding
_CLIP: dict[str, tuple] = {}  # per Python worker: feature spec -> load_clip(cfg)
_KEYS: dict[str, tuple[set, set]] = {}  # per Python worker: cache directory -> (image keys, chunk files read)


def executor_clip(cfg):
    """``(load_clip(cfg), load_seconds)``, loaded once per Python worker (0 s when it was)."""
    from smp.clip import load_clip
    from smp.feature_cache import feature_spec

    key = json.dumps(feature_spec(cfg), sort_keys=True, default=str)
    if key in _CLIP:
        return _CLIP[key], 0.0
    t0 = time.perf_counter()
    _CLIP[key] = load_clip(cfg)
    return _CLIP[key], time.perf_counter() - t0


def cached_keys(directory: Path, widths: dict[str, int]) -> set[str]:
    """The image keys the cache directory holds, from its usable chunks; each chunk file is read once per
    Python worker (a chunk's name is the digest of its keys), new ones on each call."""
    keys, read = _KEYS.setdefault(str(directory), (set(), set()))
    if not directory.is_dir():
        return keys
    from smp.feature_cache import DamagedChunk, read_chunk

    for path in sorted(directory.glob("chunk-*.npz")):
        if path.name in read:
            continue
        try:
            keys.update(str(k) for k in read_chunk(path, widths)["keys"])
        except DamagedChunk:
            continue  # embed_images sets it aside and computes its images again
        read.add(path.name)
    return keys


def image_key(path) -> str | None:
    """sha256 of the file's bytes (the cache key), or None when it cannot be read (embed_images says why)."""
    if not isinstance(path, str) or not path or "\x00" in path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


EMBED_DDL = ("Pid string, reason string, images long, cache_hits long, computed long, bad_images long, "
             "model_loads long, model_load_s double, embed_s double")


def _embed_schema():
    import pyarrow as pa

    return pa.schema([("Pid", pa.string()), ("reason", pa.string()), ("images", pa.int64()),
                      ("cache_hits", pa.int64()), ("computed", pa.int64()), ("bad_images", pa.int64()),
                      ("model_loads", pa.int64()), ("model_load_s", pa.float64()), ("embed_s", pa.float64())])


def embed_batches(batches, cfg, env: dict):
    """The executor side of ``embed_spark`` (``mapInArrow``): a partition's posts (Pid, image_path) ->
    ``embed_images`` on those whose image the cache does not hold, written to the cache; yields one
    summary row (counts, the model's load time if it was loaded here) and one row per unusable image
    (Pid, reason)."""
    import pyarrow as pa

    from smp.embed import embed_images
    from smp.feature_cache import feature_spec, spec_directory
    from smp.image_features import HANDCRAFTED

    os.environ.update(env)
    frames = [arrow_to_pandas(b) for b in batches]
    frames = [f for f in frames if len(f)]
    if not frames:
        return
    t0 = time.perf_counter()
    frame = pd.concat(frames, ignore_index=True)
    pids = frame["Pid"].astype(str).tolist()
    paths = [p if isinstance(p, str) else None for p in frame["image_path"].astype(object)]
    spec = feature_spec(cfg)
    known = cached_keys(spec_directory(cfg.cache_dir, spec), {"hc": len(HANDCRAFTED), "clip": spec["embedding_dim"]})
    keys = [image_key(p) for p in paths]
    todo = [i for i, key in enumerate(keys) if key is None or key not in known]
    hits, computed, loads, load_s, bad = len(pids) - len(todo), 0, 0, 0.0, []
    if todo:
        # CLIP only where an image may need it: a file that cannot be read is refused without the model
        loaded, load_s = executor_clip(cfg) if any(keys[i] is not None for i in todo) else (None, 0.0)
        loads = int(load_s > 0)
        result = embed_images([pids[i] for i in todo], [paths[i] for i in todo], cfg, loaded=loaded)
        hits += int(result.stats["cache_hits"])
        computed = int(result.stats["computed"])
        bad = list(result.bad[["Pid", "reason"]].itertuples(index=False, name=None))
    schema = _embed_schema()
    summary = {"Pid": [None], "reason": [None], "images": [len(pids)], "cache_hits": [hits], "computed": [computed],
               "bad_images": [len(bad)], "model_loads": [loads], "model_load_s": [load_s],
               "embed_s": [time.perf_counter() - t0]}
    yield pa.RecordBatch.from_pydict(summary, schema=schema)
    if bad:
        yield pa.RecordBatch.from_pydict(
            {"Pid": [str(p) for p, _ in bad], "reason": [str(r) for _, r in bad], "images": [0] * len(bad),
             "cache_hits": [0] * len(bad), "computed": [0] * len(bad), "bad_images": [0] * len(bad),
             "model_loads": [0] * len(bad), "model_load_s": [0.0] * len(bad), "embed_s": [0.0] * len(bad)},
            schema=schema)


def embed_spark(posts, cfg=None, master: str = DEFAULT_MASTER, images: str = "", images_per_partition: int = 1024,
                spark=None) -> dict[str, float]:
    """Image features of every post, computed on Spark executors into the feature cache; return counts.

    ``posts``: a DataFrame with ``Pid`` and ``image_path`` (absolute paths the executors can read), or data
    as ``smp.data.load_data`` takes it (read on the driver: the post ids and image paths only go to Spark;
    the executors read the images).  ``cfg``: an ``smp.embed.EmbedCfg`` (its ``cache_dir`` resolved here, so
    every executor writes the one cache; ``num_workers`` 0 and no progress bar on the executors: each task
    is one core).  Each Python worker loads CLIP once (``device="auto"``: its GPU when it has one) and runs
    ``smp.embed.embed_images`` -- the local job's code, so the same features, reasons and cache chunks --
    on the posts of its partition whose image the cache does not hold yet; a rerun computes nothing.
    Partitions of ``images_per_partition`` posts (at least the session's default parallelism).

    Returns ``images``, ``bad_images``, ``cache_hits``, ``computed``, ``seconds``, ``images_per_s``
    (computed / seconds), ``bad_examples`` (up to 5 ``(Pid, reason)``), ``spark/startup_s``,
    ``spark/partitions``, ``spark/model_loads`` and ``spark/model_load_s`` (mean, per worker that loaded it).
    """
    from smp.embed import EmbedCfg
    from smp.feature_cache import features_root

    cfg = cfg if cfg is not None else EmbedCfg()
    if images_per_partition < 1:
        raise DataError(f"images_per_partition must be at least 1, not {images_per_partition}")
    if isinstance(posts, pd.DataFrame):
        frame = posts
        source = posts.attrs.get("source", "<frame>")
    else:
        from smp.data import load_data

        frame = load_data(posts, images_root=images or None)
        source = frame.attrs.get("source", str(posts))
    if "image_path" not in frame.columns or "Pid" not in frame.columns:
        raise DataError(f"{source}: has no images (no image_path column / train_img_filepath.txt); image features "
                        "cannot be computed")
    check_spark()
    root = features_root(cfg.cache_dir).parent.resolve()
    cfg = replace(cfg, cache_dir=str(root), num_workers=0, progress=False)
    env = {k: v for k, v in os.environ.items() if k.startswith("SMP_")}
    env["SMP_CACHE_DIR"] = str(root)
    table = pd.DataFrame({"Pid": frame["Pid"].astype(str).astype(object),
                          "image_path": [str(Path(p).resolve()) if isinstance(p, str) and p and "\x00" not in p
                                         else (p if isinstance(p, str) and p else None)
                                         for p in frame["image_path"].astype(object)]})
    with session(master, spark) as (spark, startup):
        t0 = time.perf_counter()
        n_parts = max(spark.sparkContext.defaultParallelism, math.ceil(len(table) / images_per_partition))
        n_parts = max(1, min(n_parts, len(table)))
        with spark_errors(f"distributing the posts of {source}"):
            sdf = spark.createDataFrame(table, schema="Pid string, image_path string").repartition(n_parts)

        def embed(batches, cfg=cfg, env=env):
            return embed_batches(batches, cfg, env)

        result = sdf.mapInArrow(embed, EMBED_DDL)
        with spark_errors(f"embedding the images of {source}"):
            result = result.persist()
            from pyspark.sql import functions as F

            sums = result.agg(*[F.sum(c).alias(c) for c in ("images", "cache_hits", "computed", "bad_images",
                                                            "model_loads", "model_load_s")]).first()
            examples = [(r["Pid"], r["reason"]) for r in result.where(F.col("Pid").isNotNull()).limit(5).collect()]
            result.unpersist()
        seconds = time.perf_counter() - t0
    counts = {k: int(sums[k] or 0) for k in ("images", "cache_hits", "computed", "bad_images", "model_loads")}
    loads = counts.pop("model_loads")
    out = {**counts, "seconds": seconds, "images_per_s": counts["computed"] / seconds if seconds > 0 else 0.0,
           "bad_examples": examples, "spark/startup_s": startup, "spark/partitions": n_parts,
           "spark/model_loads": loads,
           "spark/model_load_s": float(sums["model_load_s"] or 0.0) / loads if loads else 0.0}
    log.info("embed on Spark %s: %d images (%d computed, %d from the cache, %d unusable) in %.1fs -> %s", master,
             out["images"], out["computed"], out["cache_hits"], out["bad_images"], seconds, root / "features")
    return out
