"""Stage 11: the per-post scoring both predict engines run (``smp.predict`` in one process, ``smp.spark`` on each
executor's batches): a loaded pyfunc model over raw post rows in batches, a refused batch halved until the
refused posts are found (each gets ``error: <reason>``), load and image notes joined into each post's status,
and the tags naming the model version that scored.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from smp import image_requests
from smp.serving import TEXT_TRUNCATED, UNSEEN_USER, predict_table, status_text

MAX_ROW_FAILURES = 1000  # past this many refused posts, stop hunting for them one by one


def predict_rows(model, rows: pd.DataFrame, batch_size: int = 10000) -> tuple[np.ndarray, list[str]]:
    """Predictions (NaN where not scored) and a status per row (the model's own, ``smp.serving``).

    A batch that fails is halved until the failing rows are isolated; each of
    those gets ``error: <reason>``.  After ``MAX_ROW_FAILURES`` such rows the
    rest of a failing batch is marked unscored with the first reason.
    """
    pred = np.full(len(rows), np.nan)
    status = ["ok"] * len(rows)
    failures: list[str] = []

    def score(lo: int, hi: int) -> None:
        try:
            table = predict_table(model, rows.iloc[lo:hi].reset_index(drop=True))
            if len(table) != hi - lo:
                raise ValueError(f"the model returned {len(table)} predictions for {hi - lo} posts")
            pred[lo:hi] = table["popularity"].to_numpy(dtype=float)
            status[lo:hi] = [str(s) for s in table["status"]]
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
    bad = ~np.isfinite(pred) & np.array([not s.startswith("error") for s in status], dtype=bool)
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
def with_notes(status: str, notes) -> str:
    """``status`` from the model with ``notes`` (load and image notes) put first; an error stays an error."""
    if status.startswith("error"):
        return status
    own = status[len("partial: "):] if status.startswith("partial: ") else ""
    return status_text([*notes, own])


def note_field(note: str) -> str:
    """The field a ``load_data`` row note is about (``tag_count=-3 out of range ...``, ``unparseable x='a'; ...``)."""
    return note.removeprefix("unparseable ").split("=", 1)[0]


GROUP_NOTES = {"unseen_user_rows": UNSEEN_USER, "text_truncated_rows": TEXT_TRUNCATED}  # smp.serving.group_notes


def note_counts(status) -> dict[str, int]:
    """How many posts carry each feature-group note (``unseen_user_rows``: scored with the user prior,
    ``text_truncated_rows``: text cut to the encoder's bounds), for a predictions summary beside
    ``partial_rows``, which counts them among the rest."""
    counts = dict.fromkeys(GROUP_NOTES, 0)
    for s in status:
        s = str(s)
        if s.startswith("partial: "):
            notes = set(s[len("partial: "):].split("; "))
            for key, note in GROUP_NOTES.items():
                counts[key] += note in notes
    return counts


def with_image_features(model, rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """``smp.image_requests.with_image_features`` for a loaded pyfunc: for an smp image model, ``rows`` plus
    their image features, computed once for all batches, and the notes of each post without a usable image;
    any other model: ``rows`` as given."""
    try:
        inner = model.unwrap_python_model().model
    except (AttributeError, mlflow.exceptions.MlflowException):  # not an smp model
        return rows, {}
    return image_requests.with_image_features(inner, rows)
