"""Stage 12: raw posts -> the registered model (``@champion`` by default) -> one prediction per post.

``run_predict`` reads posts the way training does (``smp.data.load_data``:
an SMPD directory or a posts table), loads the pyfunc model once and scores
the posts in batches.  Every input post gets a row in the output CSV
(``Pid, popularity, status``), with the statuses the served model returns
(``smp.serving``):

* ``ok``: scored from the values given;
* ``partial: <what>``: scored, but some input was unusable and treated as
  missing, each note joined by ``"; "``: a value ``load_data`` could not parse
  (``unparseable photo_count='abc'; treated as missing``) or that is out of
  its range in ``smp.data.FIELD_RANGES`` or infinite (``tag_count=-3 out of
  range [0, 10000]; treated as missing``); for an image model, a post without
  an image or whose image could not be used (``image unusable (truncated
  JPEG); scored without image features``);
* ``error: <reason>``: not scored (``popularity`` empty): what the served model
  refuses a whole request for, e.g. an ``image_b64`` that is not base64.  A
  batch the model refuses is split in halves until the rows it refuses are
  found, so one bad post never costs the others their prediction.

A duplicate ``Pid`` refuses the whole input (``load_data``), as the server
refuses a request with one.

The CSV is safe to open in a spreadsheet (OWASP's CSV injection advice): a
text cell (``Pid``, ``status``) that starts with ``=``, ``+``, ``-``, ``@``, a
tab or a carriage return, which a spreadsheet would run as a formula, is
written with a single quote in front (``'=HYPERLINK(...)``, ``'-5``); the
``popularity`` column holds numbers only and is written as they are
(``-1.5``).  ``run_predict`` returns and logs the same counts either way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from smp.config import at_least, check, flatten, one_of
from smp.data import DataError, load_data
from smp.jobs import Job
from smp.scoring import model_lineage, note_counts, note_field, predict_rows, with_image_features, with_notes
from smp.serving import model_input
from smp.tracking import JobResult, describe_run, job_run, log_params

log = logging.getLogger("smp.predict")

@dataclass(frozen=True)
class PredictJob:
    model: str = "models:/smp-popularity@champion"  # any MLflow model URI (models:/name@alias, runs:/<id>/<family>)
    input: str = ""        # posts table (.csv/.parquet/.json) or an SMPD directory ("" = the built-in demo set)
    images: str = ""       # images root for relative image paths (an SMPD dir's images by default)
    output: str = "predictions.csv"  # CSV written here: Pid, popularity, status (also logged to the run)
    batch_size: int = 10000  # posts per model call
    engine: str = "pandas"  # pandas = this process; spark = Spark executors (pip install -e .[spark], Java 17)
    spark_master: str = "local[*]"  # engine=spark: any Spark master URL (local[N], spark://, yarn, k8s://)
    experiment: str = ""   # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)

    def __post_init__(self) -> None:
        check(self, engine=one_of("pandas", "spark"), batch_size=at_least(1))


def run_predict(cfg: PredictJob = PredictJob()) -> JobResult:
    """Score every post of ``cfg.input`` with ``cfg.model``, write ``cfg.output``; return the run, its row
    counts and timing (under the keys the run logged them) and the loaded model. ``engine=spark``: the same on
    Spark executors (``smp.spark.run_predict_spark``; Parquet output)."""
    if cfg.engine == "spark":
        from smp.spark import run_predict_spark

        return run_predict_spark(cfg)
    posts = load_data(cfg.input, images_root=cfg.images or None)
    load_notes = posts.attrs.get("row_notes") or {}  # values load_data treated as missing, per Pid
    with job_run("predict", cfg.experiment, flatten(cfg), {"smp.model_uri": cfg.model}, what=PREDICT.help) as run:
        t0 = time.perf_counter()
        try:
            model = mlflow.pyfunc.load_model(cfg.model)
        except mlflow.exceptions.MlflowException as exc:
            raise DataError(f"model {cfg.model!r} cannot be loaded ({exc.message}); register one with "
                            "`smp promote` or pass a runs:/<run_id>/<family> URI (e.g. runs:/<id>/benchmark)") from None
        load_seconds = time.perf_counter() - t0
        mlflow.set_tags(model_lineage(cfg.model, model))
        t0 = time.perf_counter()
        rows = model_input(model, posts)
        read = set(rows.columns)  # a field the model does not read is not noted (the server drops it unseen)
        rows, image_notes = with_image_features(model, rows)
        pred, status = predict_rows(model, rows, cfg.batch_size)
        seconds = time.perf_counter() - t0
        status = [with_notes(s, [*(n for n in load_notes.get(pid, ()) if note_field(n) in read),
                                 *image_notes.get(pid, ())])
                  for pid, s in zip(posts["Pid"], status)]
        out = pd.DataFrame({"Pid": posts["Pid"].to_numpy(), "popularity": pred,
                            "status": pd.Series(status, dtype=object)})  # object even with zero rows
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        out.assign(Pid=spreadsheet_safe(out["Pid"]), status=spreadsheet_safe(out["status"])).to_csv(
            cfg.output, index=False)
        mlflow.log_artifact(cfg.output)
        kinds = out["status"].astype(str).str.split(":").str[0]
        counts = {"rows": len(out), "scored_rows": int(out["popularity"].notna().sum()),
                  "error_rows": int((kinds == "error").sum()), "partial_rows": int((kinds == "partial").sum()),
                  **note_counts(out["status"])}  # of the partial rows: unseen users, text cut
        timings = {"load_s": load_seconds, "predict_s": seconds,
                   "rows_per_s": len(out) / seconds if seconds > 0 else float("nan")}
        log_params({f"data/{k}": v for k, v in counts.items()})
        mlflow.log_metrics({f"time/{k}": v for k, v in timings.items() if np.isfinite(v)})
        describe_run(f"predict: {counts['rows']} posts of {Path(str(cfg.input)).name} scored with {cfg.model} "
                     f"({counts['scored_rows']} scored, {counts['partial_rows']} partly, {counts['error_rows']} "
                     f"not); predictions in {Path(cfg.output).name} (Pid, popularity, status).")
    metrics = {**{f"data/{k}": v for k, v in counts.items()}, **{f"time/{k}": v for k, v in timings.items()}}
    if counts["error_rows"]:
        first = out.loc[kinds == "error", ["Pid", "status"]].head(3).to_dict("records")
        log.warning("%d of %d posts not scored, e.g. %s", counts["error_rows"], len(out), first)
    log.info("predicted %d posts with %s in %.2fs -> %s", len(out), cfg.model, seconds, cfg.output)
    return JobResult(run.info.run_id, metrics, model)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula (OWASP: CSV injection)


def spreadsheet_safe(values: pd.Series) -> pd.Series:
    """Text cells with a single quote put before each one that starts like a formula (``FORMULA_STARTS``),
    so a spreadsheet shows it as text; other values unchanged. For text columns only: ``-1.5`` in a
    number column is a number."""
    return values.map(lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v).astype(object)


PREDICT = Job("predict", "predict popularity for raw posts with a model URI", run_predict, PredictJob)
