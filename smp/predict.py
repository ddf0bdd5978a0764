"""Stage 9: raw posts -> the registered model (``@champion`` by default) -> one prediction per post.

``run_predict`` reads posts the way training does (``smp.data.load_data``:
an SMPD directory or a posts table), loads the pyfunc model once and scores
the posts in batches.  Every input post gets a row in the output CSV
(``Pid, popularity, status``):

* ``ok``: scored from the values given;
* ``partial: <what>``: scored, but some input was unusable and treated as
  missing (a value ``load_data`` could not parse; for an image model, a post
  without an image or whose image could not be read);
* ``error: <reason>``: not scored (``popularity`` empty).  A batch the model
  refuses is split in halves until the rows it refuses are found, so one bad
  post never costs the others their prediction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from smp.data import DataError, load_data
from smp.serving import model_input, predict_frame
from smp.tracking import flat_params, job_run, log_params

log = logging.getLogger("smp.predict")

MAX_ROW_FAILURES = 1000  # past this many refused posts, stop hunting for them one by one
_BLANK = ("", "nan", "none", "null", "0000-00-00 00:00:00")


@dataclass(frozen=True)
class PredictJob:
    model: str = "models:/smp-popularity@champion"  # any MLflow model URI (models:/name@alias, runs:/<id>/<family>)
    input: str = ""        # posts table (.csv/.parquet/.json) or an SMPD directory ("" = the built-in demo set)
    images: str = ""       # images root for relative image paths (an SMPD dir's images by default)
    output: str = "predictions.csv"  # CSV written here: Pid, popularity, status (also logged to the run)
    batch_size: int = 10000  # posts per model call
    experiment: str = ""   # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)


def run_predict(cfg: PredictJob = PredictJob()) -> dict[str, float]:
    """Score every post of ``cfg.input`` with ``cfg.model``, write ``cfg.output``; return row counts and timing."""
    posts = load_data(cfg.input, images_root=cfg.images or None)
    notes = unparseable_notes(posts)
    with job_run("predict", cfg.experiment, flat_params(cfg), {"smp.model_uri": cfg.model}):
        t0 = time.perf_counter()
        try:
            model = mlflow.pyfunc.load_model(cfg.model)
        except mlflow.exceptions.MlflowException as exc:
            raise DataError(f"model {cfg.model!r} cannot be loaded ({exc.message}); register one with "
                            "`smp promote` or pass a runs:/<run_id>/<family> URI (e.g. runs:/<id>/benchmark)") from None
        load_seconds = time.perf_counter() - t0
        mlflow.set_tags(model_lineage(cfg.model, model))
        t0 = time.perf_counter()
        rows, image_issues = with_image_features(model, model_input(model, posts))
        notes = {**image_issues, **notes}
        pred, status = predict_rows(model, rows, cfg.batch_size)
        seconds = time.perf_counter() - t0
        status = [notes.get(pid, s) if s == "ok" else s for pid, s in zip(posts["Pid"], status)]
        out = pd.DataFrame({"Pid": posts["Pid"].to_numpy(), "popularity": pred,
                            "status": pd.Series(status, dtype=object)})  # object even with zero rows
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(cfg.output, index=False)
        mlflow.log_artifact(cfg.output)
        kinds = out["status"].astype(str).str.split(":").str[0]
        metrics = {"rows": len(out), "scored_rows": int(out["popularity"].notna().sum()),
                   "error_rows": int((kinds == "error").sum()), "partial_rows": int((kinds == "partial").sum()),
                   "load_seconds": load_seconds, "predict_seconds": seconds,
                   "rows_per_second": len(out) / seconds if seconds > 0 else float("nan")}
        log_params({f"data/{k}": metrics[k] for k in ("rows", "scored_rows", "error_rows", "partial_rows")})
        mlflow.log_metrics({f"time/{k}": v for k, v in {
            "load_s": load_seconds, "predict_s": seconds, "rows_per_s": metrics["rows_per_second"]}.items()
            if np.isfinite(v)})
    if metrics["error_rows"]:
        first = out.loc[kinds == "error", ["Pid", "status"]].head(3).to_dict("records")
        log.warning("%d of %d posts not scored, e.g. %s", int(metrics["error_rows"]), len(out), first)
    log.info("predicted %d posts with %s in %.2fs -> %s", len(out), cfg.model, seconds, cfg.output)
    return metrics


def predict_rows(model, rows: pd.DataFrame, batch_size: int = 10000) -> tuple[np.ndarray, list[str]]:
    """Predictions (NaN where not scored) and a status per row.

    A batch that fails is halved until the failing rows are isolated; each of
    those gets ``error: <reason>``.  After ``MAX_ROW_FAILURES`` such rows the
    rest of a failing batch is marked unscored with the first reason.
    """
    pred = np.full(len(rows), np.nan)
    status = ["ok"] * len(rows)
    failures: list[str] = []

    def score(lo: int, hi: int) -> None:
        try:
            p = np.asarray(predict_frame(model, rows.iloc[lo:hi].reset_index(drop=True)), dtype=float).reshape(-1)
            if len(p) != hi - lo:
                raise ValueError(f"the model returned {len(p)} predictions for {hi - lo} posts")
            pred[lo:hi] = p
        except Exception as exc:  # noqa: BLE001 - any refusal is reported per post, never raised
            if hi - lo == 1 or len(failures) >= MAX_ROW_FAILURES:
                reason = failure_reason(exc)
                failures.extend([reason] * (hi - lo))
                status[lo:hi] = [f"error: {reason}"] * (hi - lo)
                return
            mid = (lo + hi) // 2
            score(lo, mid)
            score(mid, hi)

    for lo in range(0, len(rows), max(1, batch_size)):
        score(lo, min(lo + max(1, batch_size), len(rows)))
    bad = ~np.isfinite(pred) & np.array([s == "ok" for s in status], dtype=bool)
    for i in np.flatnonzero(bad):
        status[i] = "error: the model returned no finite prediction"
    return pred, status


def failure_reason(exc: Exception, limit: int = 300) -> str:
    """A one-line reason from a prediction error (MLflow's schema messages trimmed to their last cause)."""
    msg = str(getattr(exc, "message", "") or exc or type(exc).__name__)
    if "Error: " in msg:
        msg = msg.rsplit("Error: ", 1)[1]
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def model_lineage(uri: str, model) -> dict[str, str]:
    """Tags saying which model version and training run made the predictions."""
    tags = {"smp.model_run": str(model.metadata.run_id or "")}
    if uri.startswith("models:/") and "@" in uri:
        name, alias = uri[len("models:/"):].split("@", 1)
        try:
            tags["smp.model_version"] = str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException:
            pass
    return tags


# --------------------------------------------------------------------------- per-post notes
def with_image_features(model, rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """For an image model: ``rows`` plus their image features, computed once, and a note per post without
    a usable image (it is scored without image features, as in training).  Other models: ``rows`` as given.

    The features are what the model's own ``ImageFeatureSource`` would compute
    (``smp.embed.features_for_rows`` with the training embedding settings);
    computing them here keeps the embedding's reasons for unusable images.
    """
    try:
        source = model.unwrap_python_model().model.images
    except AttributeError:  # not an smp image model
        return rows, {}
    if set(source.columns) <= set(rows.columns):
        return rows, {}  # features given with the posts
    given = pd.Series(False, index=rows.index)
    for col in ("image_b64", "image_path"):
        if col in rows.columns:
            given |= rows[col].map(lambda v: isinstance(v, str) and v != "")
    notes = {pid: "partial: no image given; scored without image features" for pid in rows.loc[~given, "Pid"]}
    if not given.any() or source.embed_cfg is None:
        return rows, notes
    from smp.embed import features_for_rows

    feats = features_for_rows(rows, source.embed_cfg)
    for pid, reason in feats.attrs["bad"][["Pid", "reason"]].itertuples(index=False):
        notes[str(pid)] = f"partial: image unusable ({reason}); scored without image features"
    extra = feats[source.columns].reset_index(drop=True)  # one row per input row, in order
    return pd.concat([rows.reset_index(drop=True).drop(columns=source.columns, errors="ignore"), extra], axis=1), notes


def unparseable_notes(posts: pd.DataFrame) -> dict[str, str]:
    """``partial`` notes naming the values ``load_data`` could not parse (it makes them NaN and only counts them)."""
    issues = posts.attrs.get("parse_issues") or {}
    cols = {k.split(":")[0] for k in issues if k.endswith(":unparseable")}
    if not cols:
        return {}
    parsed = posts.drop_duplicates("Pid").set_index("Pid")
    found: dict[str, list[str]] = {}
    for raw in raw_frames(str(posts.attrs.get("source", ""))):
        if "Pid" not in raw.columns:
            continue
        raw = raw.assign(Pid=raw["Pid"].astype(str)).drop_duplicates("Pid").set_index("Pid")
        for col in sorted(cols & set(raw.columns) & set(parsed.columns)):
            text = raw[col].astype("string").str.strip()
            given = text.notna() & ~text.str.lower().isin(_BLANK)
            lost = given & parsed[col].reindex(raw.index).isna()
            for pid in raw.index[lost.to_numpy(dtype=bool)]:
                found.setdefault(pid, []).append(f"{col}={raw.at[pid, col]!r}")
    return {pid: f"partial: unparseable {', '.join(v)} treated as missing" for pid, v in found.items()}


def raw_frames(source: str):
    """The unparsed tables behind a posts frame (one for a table, one per JSON file for an SMPD directory)."""
    from smp.data import SMPD_JSON_FILES, _records_frame

    path = Path(source)
    if path.is_dir():
        for name in SMPD_JSON_FILES:
            if (path / name).exists():
                yield _records_frame(path / name)
    elif path.suffix.lower() == ".csv":
        yield pd.read_csv(path, dtype=str, keep_default_na=False, low_memory=False)
    elif path.suffix.lower() in (".parquet", ".pq"):
        yield pd.read_parquet(path)
    elif path.suffix.lower() == ".json":
        yield _records_frame(path)
