"""MLflow plumbing shared by every job: runs, params, data inputs, figures, upstream reuse.

The tracking store is MLflow's default (``sqlite:///mlflow.db`` with artifacts
under ``./mlruns``) unless ``MLFLOW_TRACKING_URI`` is set; nothing here touches
MLflow at import time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import os
import subprocess
import time
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
import numpy as np
import pandas as pd

log = logging.getLogger("smp.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Set by `tune` around each trial: the parent run id (and its experiment id), extra tags for the job's run,
# and whether the job logs its figures ("figures", default True).
RUN_CONTEXT: contextvars.ContextVar[dict] = contextvars.ContextVar("smp_run_context", default={})
# The run id of the last job run started in this context (nested runs included).
LAST_JOB_RUN: contextvars.ContextVar[str] = contextvars.ContextVar("smp_last_job_run", default="")


def configure_tracking() -> str:
    """Use ``MLFLOW_TRACKING_URI`` when set, else the sqlite default in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    return uri


def flat_params(*cfgs) -> dict[str, object]:
    """Flatten (possibly nested) config dataclasses into one ``{name: value}`` dict."""
    out: dict[str, object] = {}
    for cfg in cfgs:
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            if is_dataclass(value):
                out.update(flat_params(value))
            else:
                out[f.name] = value
    return out


def params_hash(params: dict) -> str:
    """Stable short hash of a params dict (for finding reusable upstream runs)."""
    text = json.dumps({k: str(v) for k, v in sorted(params.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def job_run(job: str, experiment: str, params: dict, tags: dict | None = None, nested: bool = False):
    """Start (or join, under ``mlflow run``) a run for ``job``, log params and tags, yield it.

    Under ``mlflow run`` the launcher has already created the run (in the
    experiment given by ``--experiment-name``) and exported ``MLFLOW_RUN_ID``;
    ``mlflow.start_run()`` joins it.  Otherwise a new run is made in
    ``experiment`` ("" = MLflow's default resolution).  Inside an active run
    the new run is nested.  A failure marks the run FAILED (KILLED on Ctrl-C).
    """
    configure_tracking()
    context = RUN_CONTEXT.get()
    launched = bool(os.environ.get("MLFLOW_RUN_ID"))  # made by `mlflow run`; start_run joins it
    parent = context.get("parent_run_id") if mlflow.active_run() is None else None
    nested = nested or mlflow.active_run() is not None or bool(parent)
    if not nested and not launched and experiment:
        mlflow.set_experiment(experiment)  # "" = MLflow's own choice (MLFLOW_EXPERIMENT_NAME or Default)
    experiment_id = None
    if parent:  # the trial's run goes in its parent's experiment (`tune` looks it up once per worker)
        experiment_id = context.get("experiment_id") or mlflow.get_run(parent).info.experiment_id
    run = mlflow.start_run(run_name=job if (nested or not launched) else None, nested=nested and not parent,
                           parent_run_id=parent or None, experiment_id=experiment_id)
    LAST_JOB_RUN.set(run.info.run_id)
    if parent:
        context["run_id"] = run.info.run_id  # tells `tune` which run this trial made
    try:
        all_tags = {"smp.job": job, "smp.params_hash": params_hash(params), **(tags or {}),
                    **(context.get("tags", {}) if parent else {})}
        commit = git_commit()
        if commit:
            all_tags.setdefault("mlflow.source.git.commit", commit)
        already = mlflow.get_run(run.info.run_id).data.params if launched else {}  # `mlflow run` logged some
        log_params({k: v for k, v in params.items() if k not in already}, tags=all_tags)
        yield run
    except BaseException as exc:
        if type(exc).__name__ == "TrialPruned":  # optuna pruned this trial: visible as such in MLflow
            mlflow.set_tag("smp.trial_state", "PRUNED")
            mlflow.end_run(status="KILLED")
        else:
            mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    else:
        mlflow.end_run()


def last_job_run_id() -> str:
    """Id of the run made by the last ``job_run`` in this context (``mlflow.last_active_run``
    returns the parent instead when the job ran nested)."""
    return LAST_JOB_RUN.get()


def log_params(params: dict, tags: dict | None = None) -> None:
    """Log params (values stringified; MLflow caps a value at 6000 chars) and tags on the active run.

    One ``log_batch`` request per 90 params (MLflow takes at most 100 a batch); the tags ride on the first.
    """
    from mlflow.entities import Param, RunTag

    def text(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    items = [Param(k, text(v)) for k, v in params.items()]
    tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    batches = [items[i:i + 90] for i in range(0, len(items), 90)] or [[]]
    for i, batch in enumerate(batches):
        if batch or (i == 0 and tag_items):
            client.log_batch(run_id, params=batch, tags=tag_items if i == 0 else [])


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The git commit of the working tree that runs this code, if it is a git checkout."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


_DUPLICATE_KEY = ("UniqueViolation", "duplicate key value", "UNIQUE constraint failed", "Duplicate entry",
                  "already exists")


def upsert(write, *args, attempts: int = 4, **kwargs) -> None:
    """Call an MLflow write that the tracking store performs as "select, then insert or update".

    Two concurrent first writes of one key (a model-version tag, an alias, a dataset that two tuning
    workers log at once) both insert and the second fails on the primary key (seen against
    PostgreSQL). Written again, the row exists and is reused, so the loser retries; any other error
    is raised at once.
    """
    for attempt in range(attempts):
        try:
            write(*args, **kwargs)
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or not any(m in str(exc) for m in _DUPLICATE_KEY):
                raise
            log.info("%s%s written concurrently; writing it again", getattr(write, "__name__", "write"), args[:3])
            time.sleep(0.2 * (attempt + 1))


def log_data_inputs(posts: pd.DataFrame, parts: dict[str, np.ndarray], name: str, digest: str,
                    split: str, seed: int) -> None:
    """Log each split's rows as an MLflow dataset input (context = split), same digest for the data.

    One ``log_inputs`` call for all parts (one request against a tracking server).
    """
    cols = [c for c in posts.columns if c != "image_path"][:40]
    datasets, contexts, tags = [], [], []
    for part, idx in parts.items():
        datasets.append(mlflow.data.from_pandas(
            posts.iloc[idx[:1000]][cols], source=str(posts.attrs.get("source", name)),
            name=f"{name}-{split}-s{seed}-{part}", targets="label" if "label" in cols else None,
            digest=f"{digest}-{part}"))
        contexts.append(part)
        tags.append({"split": split, "seed": str(seed), "rows": str(len(idx))})
    upsert(mlflow.log_inputs, datasets=datasets, contexts=contexts, tags_list=tags)  # workers race on a dataset


def figures_wanted() -> bool:
    """False inside a tuning trial unless the study asks for per-trial figures (``tune`` sets it)."""
    return bool(RUN_CONTEXT.get().get("figures", True))


def log_figure(draw, name: str) -> None:
    """Log the matplotlib figure that ``draw()`` returns as a PNG under ``plots/``, and close it.

    Nothing is drawn when figures are off (tuning trials, see ``figures_wanted``).
    """
    import matplotlib.pyplot as plt

    if not figures_wanted():
        return
    fig = draw()
    mlflow.log_figure(fig, f"plots/{name}")
    plt.close(fig)


def current_experiment_id() -> str:
    """Experiment of the active run (call inside ``job_run``)."""
    return mlflow.active_run().info.experiment_id


def find_finished_run(experiment_id: str, tags: dict[str, str]) -> str | None:
    """Id of the newest FINISHED run in ``experiment_id`` carrying all ``tags``, else None."""
    filt = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"])
    runs = mlflow.search_runs([experiment_id], filter_string=filt, order_by=["attributes.start_time DESC"],
                              max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None
