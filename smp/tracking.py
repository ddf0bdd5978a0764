"""MLflow plumbing shared by every job: runs, params, data inputs, figures, upstream reuse.

The tracking store is MLflow's default (``sqlite:///mlflow.db`` with artifacts
under ``./mlruns``) unless ``MLFLOW_TRACKING_URI`` is set; nothing here touches
MLflow at import time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
import numpy as np
import pandas as pd

log = logging.getLogger("smp.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "smp"  # used unless `experiment`, MLFLOW_EXPERIMENT_NAME or MLFLOW_EXPERIMENT_ID says otherwise
EXPERIMENT_DESCRIPTION = (
    "Social-media popularity prediction (SMP Challenge 2019, SMPD): the paper's XGBoost benchmark, PCA-boost and "
    "the stacked MLP / Conv1D ensembles, one run per job. Compare runs on `test_rmse`, `test_mae` and "
    "`test_spearman` beside `test_rmse_baseline` (the mean predictor); `data/`, `time/` and `fit/` hold counts "
    "and timings. Runs compared side by side must share `smp.data_hash` and `smp.split`.")
# The UI opens an experiment as model training (not GenAI: traces, assistant) when it carries this tag.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


@dataclass(frozen=True)
class Parent:
    """The run a job's run is made under, handed to the job (a study's trial; an upstream job run by another)."""

    run_id: str
    experiment_id: str = ""   # the parent's experiment (looked up when empty)
    tags: tuple[tuple[str, str], ...] = ()  # tags the child's run gets (the study and trial number)
    trial: str = ""           # the trial number: names the run ``trial N``
    figures: bool = True      # the job logs its figures (tuning trials: off unless asked)


@dataclass(frozen=True)
class JobResult(Mapping):
    """What a job made: its run, its metrics (the mapping itself: ``result["test_rmse"]``) and its model."""

    run_id: str
    metrics: dict = field(default_factory=dict)
    model: object = None

    def __getitem__(self, key):
        return self.metrics[key]

    def __iter__(self):
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)


def configure_tracking() -> str:
    """Use ``MLFLOW_TRACKING_URI`` when set, else the sqlite default in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    return uri


def resolve_experiment(name: str = "") -> str:
    """Id of the experiment a job logs to: ``name``, else ``MLFLOW_EXPERIMENT_ID`` / ``MLFLOW_EXPERIMENT_NAME``,
    else the project's ``smp``; created if missing, and described (see ``describe_experiment``)."""
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "")
    if not name and env_id:
        exp_id = env_id
    else:
        name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = mlflow.create_experiment(name)
            except MlflowException:  # another worker created it first
                exp_id = mlflow.get_experiment_by_name(name).experiment_id
        else:
            exp_id = exp.experiment_id
    describe_experiment(exp_id)
    return exp_id


def describe_experiment(experiment_id: str) -> None:
    """Give the experiment the project's description and the model-training kind, unless it has its own."""
    try:
        client = mlflow.MlflowClient()
        tags = client.get_experiment(experiment_id).tags
        if "mlflow.note.content" not in tags:
            client.set_experiment_tag(experiment_id, "mlflow.note.content", EXPERIMENT_DESCRIPTION)
        if EXPERIMENT_KIND[0] not in tags:
            client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    except MlflowException as exc:  # a read-only or older server: the runs matter more than the description
        log.debug("experiment %s not described: %s", experiment_id, exc)


def data_label(data: object) -> str:
    """Short name of a data source for run names: ``demo``, a directory's or a table's stem."""
    text = str(data or "demo").rstrip("/")
    if text in ("", "demo"):
        return "demo"
    return Path(text).stem or text


def run_label(job: str, params: dict, trial: str | None = None) -> str:
    """The run's name: what it is, e.g. ``ensemble_mlp · demo · random · s0`` (a tuning trial: ``trial 7``;
    an upstream run, whose ``Parent`` has no trial, is named after its own job)."""
    if trial not in (None, ""):
        return f"trial {trial}"
    parts = [job]
    if job == "promote":
        parts.append(str(params.get("model_name", "")))
    elif job == "predict":
        parts.append(data_label(params.get("input")))
    elif job == "compare":
        parts.append(str(params.get("split", "")))
    else:
        if "data" in params:
            parts.append(data_label(params.get("data")))
        if "split" in params:
            parts.append(str(params["split"]))
        if "seed" in params and "split" in params:
            parts.append(f"s{params['seed']}")
    return " · ".join(p for p in parts if p)


class _Muted(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def muted(logger: str, *prefixes: str):
    """Drop the records of ``logger`` (``""`` = root) whose message starts with one of ``prefixes`` while
    inside: a library's notice the user cannot act on, said better (or not needed) by smp itself."""
    target, muting = logging.getLogger(logger), _Muted(prefixes)
    target.addFilter(muting)
    try:
        yield
    finally:
        target.removeFilter(muting)


def params_hash(params: dict) -> str:
    """Stable short hash of a params dict (for finding reusable upstream runs)."""
    text = json.dumps({k: str(v) for k, v in sorted(params.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (``smp`` installs the handler) so every open run ends KILLED."""


def raise_on_sigterm() -> None:
    """Turn SIGTERM into ``Terminated``: the runs a job has open end KILLED with ``smp.end_reason=SIGTERM``
    instead of staying RUNNING forever (the default SIGTERM action kills the process at once)."""
    import signal
    import threading

    def handler(signum, frame):
        raise Terminated("SIGTERM")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def job_run(job: str, experiment: str, params: dict, tags: dict | None = None, parent: Parent | None = None):
    """Start (or join, under ``mlflow run``) a run for ``job``, log params and tags, yield it.

    Under ``mlflow run`` the launcher has already created the run (in the
    experiment given by ``--experiment-name``) and exported ``MLFLOW_RUN_ID``;
    ``mlflow.start_run()`` joins it.  With ``parent`` the run is its child, in
    its experiment (a trial's parent is not the active run; an upstream job's
    is).  Otherwise a new run is made in ``experiment`` ("" = MLflow's default
    resolution).  A failure marks the run FAILED (KILLED on Ctrl-C / SIGTERM).
    """
    configure_tracking()
    active = mlflow.active_run()
    if parent is None and active is not None:  # called inside an open run (a notebook's): its child
        parent = Parent(active.info.run_id, active.info.experiment_id)
    launched = bool(os.environ.get("MLFLOW_RUN_ID")) and parent is None  # made by `mlflow run`: joined
    under_active = parent is not None and active is not None and active.info.run_id == parent.run_id
    experiment_id = None
    if parent is not None:
        experiment_id = parent.experiment_id or mlflow.get_run(parent.run_id).info.experiment_id
    elif not launched:
        experiment_id = resolve_experiment(experiment)
    name = run_label(job, params, parent.trial if parent else None)
    run = mlflow.start_run(run_name=None if launched else name, nested=under_active,
                           parent_run_id=None if (parent is None or under_active) else parent.run_id,
                           experiment_id=experiment_id)
    if launched:  # the launcher named its run at random: name it after the job
        mlflow.set_tag("mlflow.runName", name)
        describe_experiment(run.info.experiment_id)
    try:
        all_tags = {"smp.job": job, "smp.params_hash": params_hash(params), **(tags or {}),
                    **dict(parent.tags if parent else ())}
        commit = git_commit()
        if commit:
            all_tags.setdefault("mlflow.source.git.commit", commit)
        all_tags.setdefault(NOTE, job_note(job, params, parent))  # replaced by the job's own once it has results
        log_params(params, tags=all_tags, skip_logged=launched)
        yield run
    except BaseException as exc:
        if type(exc).__name__ == "TrialPruned":  # optuna pruned this trial: visible as such in MLflow
            mlflow.set_tag("smp.trial_state", "PRUNED")
            mlflow.end_run(status="KILLED")
        else:
            stopped = isinstance(exc, (KeyboardInterrupt, Terminated))
            try:
                mlflow.set_tag("smp.end_reason", "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C (SIGINT)"
                               if stopped else f"{type(exc).__name__}: {str(exc)[:400]}")
            finally:
                mlflow.end_run(status="KILLED" if stopped else "FAILED")
        raise
    else:
        mlflow.end_run()


NOTE = "mlflow.note.content"  # the run page's Description (and the runs table's Description column)


def sig(value, digits: int = 4) -> str:
    """A figure as descriptions show it: 4 significant digits (``1.904``, ``0.5763``, ``2.333e+04``)."""
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def job_note(job: str, params: dict, parent: "Parent | None" = None) -> str:
    """A run's first description, set when it starts: what the job is and on what (the job replaces it with
    its results when it has them, so a run that failed or was killed still says what it was)."""
    from smp.jobs import JOBS

    what = JOBS[job].help if job in JOBS else job
    on = []
    if "data" in params:
        on.append(f"data {data_label(params.get('data'))}")
    if "split" in params and job not in ("promote", "predict"):
        on.append(f"split {params['split']}")
    if "seed" in params and "split" in params:
        on.append(f"seed {params['seed']}")
    text = f"{job}: {what}" + (f" ({', '.join(on)})" if on else "") + "."
    if parent is not None and parent.trial not in (None, ""):
        text += f" Trial {parent.trial} of the study in its parent run."
    elif parent is not None:
        text += f" Made by run {parent.run_id} (its parent)."
    return text


def describe_run(text: str) -> None:
    """Set the active run's description (the run page's Description)."""
    mlflow.set_tag(NOTE, text)


def name_launched_run(name: str, tags: dict | None = None) -> None:
    """For a job that logs nothing else: name the run ``mlflow run`` made (it names it at random)."""
    configure_tracking()
    run_id = os.environ["MLFLOW_RUN_ID"]
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "mlflow.runName", name)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    describe_experiment(client.get_run(run_id).info.experiment_id)


def logged_model_uri(run_id: str) -> str | None:
    """``models:/<model_id>`` of the model a run logged (MLflow 3 records it as the run's model output;
    the model is named after its family), else ``runs:/<run_id>/model`` if an older layout has one, else None."""
    client = mlflow.MlflowClient()
    try:
        outputs = client.get_run(run_id).outputs
    except MlflowException:
        return None
    models = list(getattr(outputs, "model_outputs", None) or [])
    if models:
        return f"models:/{models[-1].model_id}"
    try:
        mlflow.models.get_model_info(f"runs:/{run_id}/model")
    except (MlflowException, OSError):
        return None
    return f"runs:/{run_id}/model"


def param_text(value) -> str:
    """How a param value is logged: the CLI's and MLproject's rendering (``true``, ``1,2``)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def log_params(params: dict, tags: dict | None = None, skip_logged: bool = False) -> None:
    """Log params and tags on the active run; empty values are not logged (the UI would show ``''``).

    ``skip_logged``: leave out params the run already has (``mlflow run`` logs the MLproject parameters
    as it passed them, and MLflow refuses to log a param twice with another rendering).
    One ``log_batch`` request per 90 params (MLflow takes at most 100 a batch); the tags ride on the first.
    """
    from mlflow.entities import Param, RunTag

    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    already = client.get_run(run_id).data.params if skip_logged else {}
    items = [Param(k, param_text(v)) for k, v in params.items() if k not in already and param_text(v) != ""]
    tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
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


def dataset_source(location: str):
    """The MLflow dataset source for a local path, given explicitly: from a plain string MLflow guesses among
    its registered source types and warns that the string "can be interpreted in multiple ways"."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    for cls in get_registered_sources():
        if cls.__name__ == "LocalArtifactDatasetSource" and cls._can_resolve(location):
            return cls._resolve(location)
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    return resolve_dataset_source(location)


def log_data_inputs(posts: pd.DataFrame, parts: dict[str, np.ndarray], name: str, digest: str,
                    split: str, seed: int) -> dict:
    """Log each split's rows as an MLflow dataset input (context = split), same digest for the data; return
    ``{split: dataset}``.

    Every row of a split is passed (only its schema and row count are stored, so the dataset drawer shows
    the true count); one ``log_inputs`` call for all parts (one request against a tracking server).
    """
    cols = [c for c in posts.columns if c != "image_path"][:40]
    source = dataset_source(str(Path(str(posts.attrs.get("source", name))).resolve()))
    datasets, contexts, tags = [], [], []
    for part, idx in parts.items():
        datasets.append(mlflow.data.from_pandas(
            posts.iloc[idx][cols], source=source, name=f"{name}-{split}-s{seed}-{part}",
            targets="label" if "label" in cols else None, digest=f"{digest}-{part}"))
        contexts.append(part)
        tags.append({"split": split, "seed": str(seed), "rows": str(len(idx))})
    import warnings

    with warnings.catch_warnings():  # the dataset's schema is for display; its int columns are not a model input
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        for d in datasets:
            d.schema  # noqa: B018 - inferred (and cached) here, inside the filter
        upsert(mlflow.log_inputs, datasets=datasets, contexts=contexts, tags_list=tags)  # workers race on a dataset
    return dict(zip(contexts, datasets))


def log_figure(draw, name: str, enabled: bool = True) -> None:
    """Log the matplotlib figure that ``draw()`` returns as a PNG under ``plots/``, and close it.

    Nothing is drawn when not ``enabled`` (a tuning trial's figures are off unless its study asks).
    """
    import matplotlib.pyplot as plt

    if not enabled:
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
