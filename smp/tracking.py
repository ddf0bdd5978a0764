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
    """Use ``MLFLOW_TRACKING_URI`` when set, else the sqlite default in the working directory, once checked
    (``check_tracking``); a fresh sqlite store is set up by one smp process at a time (``init_sqlite``)."""
    uri = check_tracking()
    path = sqlite_path(uri) if uri.lower().startswith("sqlite:") else None
    if path is not None:
        init_sqlite(uri, str(path))
    mlflow.set_tracking_uri(uri)
    return uri


def check_tracking() -> str:
    """The tracking URI, checked in seconds (no MLflow store is built): a tracking server must answer, a sqlite
    file must be whole and in a directory that exists; ``TrackingUnavailable`` naming it otherwise.

    Sets smp's bounded HTTP retries (``HTTP_DEFAULTS``) where the environment has not set its own.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)  # read by MLflow at each request: the user's own values win
    _checked_once(uri)
    return uri


@functools.lru_cache(maxsize=64)
def _checked_once(uri: str) -> bool:
    """``check_store(uri)`` the first time a process uses ``uri`` (a failure is not cached: the next job checks
    again). Later jobs of the process (a study's trials, upstream runs) ride out a short outage on MLflow's
    bounded retries instead of failing at once on the seconds-long check (a server restart mid-study)."""
    check_store(uri)
    return True


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


_SIGTERM: dict[str, bool] = {}  # "seen": a SIGTERM arrived in this process (see stop_if_terminated)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into ``Terminated``: the runs a job has open end KILLED with ``smp.end_reason=SIGTERM``
    instead of staying RUNNING forever (the default SIGTERM action kills the process at once)."""
    import signal
    import threading

    def handler(signum, frame):
        _SIGTERM["seen"] = True
        raise Terminated("SIGTERM")

    if threading.current_thread() is threading.main_thread():
        _SIGTERM.clear()
        signal.signal(signal.SIGTERM, handler)


def sigterm_seen() -> bool:
    """Whether this process has had SIGTERM since ``raise_on_sigterm``."""
    return bool(_SIGTERM.get("seen"))


def stop_if_terminated() -> None:
    """Raise ``Terminated`` again if SIGTERM has arrived.  The handler's exception is lost when the signal lands
    in a weakref callback or ``__del__`` (SQLAlchemy's state cleanup, for one): Python prints "Exception
    ignored" and goes on, and the job would finish as if never stopped.  Called where stopping is safe: each
    training step's hook and a run's normal end."""
    if sigterm_seen():
        raise Terminated("SIGTERM")


@contextlib.contextmanager
def job_run(job: str, experiment: str, params: dict, tags: dict | None = None, parent: Parent | None = None,
            what: str = ""):
    """Start (or join, under ``mlflow run``) a run for ``job``, log params and tags, yield it; ``what``: what the
    job does (its ``smp.jobs.Job.help``), for the run's first description.

    Under ``mlflow run`` the launcher has already created the run (in the
    experiment given by ``--experiment-name``) and exported ``MLFLOW_RUN_ID``;
    ``mlflow.start_run()`` joins it.  With ``parent`` the run is its child, in
    its experiment (a trial's parent is not the active run; an upstream job's
    is).  Otherwise a new run is made in ``experiment`` ("" = MLflow's default
    resolution).  A failure marks the run FAILED (KILLED on Ctrl-C / SIGTERM) with ``smp.end_reason``, in one
    short attempt (``close_run``); a failure of the tracking store or the disk is raised as
    ``TrackingUnavailable`` / ``StorageError`` (``store_failure``), from the original.
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
        all_tags = {"smp.job": job, "smp.params_hash": params_hash(params), **process_tags(), **(tags or {}),
                    **dict(parent.tags if parent else ())}
        commit = git_commit()
        if commit:
            all_tags.setdefault("mlflow.source.git.commit", commit)
        all_tags.setdefault(NOTE, job_note(job, params, parent, what))  # replaced by the job's own once it has results
        log_params(params, tags=all_tags, skip_logged=launched)
        yield run
        stop_if_terminated()  # a SIGTERM whose exception was swallowed still ends the run KILLED
    except BaseException as exc:
        if type(exc).__name__ == "TrialPruned":  # optuna pruned this trial: visible as such in MLflow
            # MLflow draws KILLED as a failure: the description says it was the pruner, where and why
            mlflow.set_tags({"smp.trial_state": "PRUNED", NOTE: f"{job_note(job, params, parent, what)} Stopped early by "
                             f"the study's pruner ({exc}): its validation RMSE at that step was behind the study's "
                             "other trials; not a failure."})
            mlflow.end_run(status="KILLED")
        else:  # one short attempt to close the run (a job whose store is gone must not retry for minutes)
            stopped = isinstance(exc, (KeyboardInterrupt, Terminated))
            failure = None if stopped else store_failure(exc, places={
                "the run's artifacts": run.info.artifact_uri,
                "the feature cache": os.environ.get("SMP_CACHE_DIR") or ".smp_cache"})
            told = failure or exc
            close_run("KILLED" if stopped else "FAILED", "SIGTERM" if isinstance(exc, Terminated) else
                      "Ctrl-C (SIGINT)" if stopped else f"{type(told).__name__}: {str(told)[:400]}")
            if failure is not None and failure is not exc:
                raise failure from exc
        raise
    else:
        mlflow.end_run()


NOTE = "mlflow.note.content"  # the run page's Description (and the runs table's Description column)


def job_note(job: str, params: dict, parent: "Parent | None" = None, what: str = "") -> str:
    """A run's first description, set when it starts: what the job is (``what``) and on what (the job replaces
    it with its results when it has them, so a run that failed or was killed still says what it was)."""
    what = what or job
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


# --------------------------------------------------------------------------- a failing tracking store
# MLflow's own HTTP settings (7 retries, backoff factor 2, 120 s timeout) keep a job retrying one request for
# about four minutes once its server is down, and every later request as long again. smp's, used unless the
# environment sets its own: an outage of about 30 s is ridden out; a longer one fails the job about 30 s in.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",      # waits 0, 2, 4, 8, 16 s between the tries: about 30 s
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",         # s per try against a server that accepts but does not answer
}
HEALTH_TIMEOUT = 5.0                               # s: the check at start (``GET <uri>/health``, one try)
FINAL_ATTEMPT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}  # closing a failed run
STALE_REASON = "its job's process ({pid} on {host}) ended without closing the run; closed by `smp runs --close-stale`"


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used: a server that does not answer, a damaged or unwritable sqlite file.
    The message names the URI or the file and what to do; ``smp`` prints it on one line and exits 2."""


class StorageError(RuntimeError):
    """A directory smp or MLflow writes to (the feature cache, the run's artifacts, a temporary folder) is
    read-only, missing or full; the message names the path and the problem. ``smp`` exits 2."""


def check_store(uri: str) -> None:
    """Fail fast, naming ``uri``, when the tracking store cannot be used (see ``check_tracking``)."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        check_server(uri)
    elif scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            return
        if not path.parent.is_dir():
            raise TrackingUnavailable(f"tracking store {uri}: its directory {path.parent} does not exist; create "
                                      "it, or point MLFLOW_TRACKING_URI elsewhere")
        damage = sqlite_damage(path) if path.exists() else None
        if damage:
            raise TrackingUnavailable(f"tracking store {path} is {damage}; restore it from a backup, or point "
                                      "MLFLOW_TRACKING_URI at another store")


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """``GET <uri>/health`` once: no connection, no answer within ``timeout`` s, or a 5xx (a proxy whose server
    is down) raises ``TrackingUnavailable``. Any other answer counts as up (a server without ``/health``)."""
    import requests

    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true")
    verify = False if insecure else (os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True)
    try:
        answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout, verify=verify)
    except requests.exceptions.SSLError:
        return  # a TLS setting smp does not read (client certificates): MLflow's own requests will say
    except requests.RequestException as exc:
        raise TrackingUnavailable(f"tracking server {uri} is not answering ({_why(exc)}); start it, or point "
                                  "MLFLOW_TRACKING_URI at one that runs") from None
    if answer.status_code >= 500:
        raise TrackingUnavailable(f"tracking server {uri} answers HTTP {answer.status_code} to /health; "
                                  "it (or the proxy in front of it) is not serving")


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (relative to the working directory, as SQLAlchemy reads it); None for
    an in-memory store."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    path = rest[1:].split("?", 1)[0] if rest.startswith("/") else ""
    return None if path in ("", ":memory:") else Path(path).absolute()


SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_damage(path: Path) -> str | None:
    """What is wrong with the sqlite file at ``path`` judged from its 100-byte header, else None: not an SQLite
    file, or shorter than its header says (truncated). A page damaged further in shows when it is read."""
    with open(path, "rb") as f:
        head = f.read(100)
    size = path.stat().st_size
    if size == 0:
        return None  # a fresh file: MLflow makes its tables
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return "not an SQLite database (the file does not start with the SQLite header)"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages, change, valid_for = (int.from_bytes(head[i:i + 4], "big") for i in (28, 24, 92))
    if pages and change == valid_for and size < page * pages:
        return f"truncated (its header counts {page * pages} bytes, the file holds {size})"
    return None


_CONCURRENT_SETUP = ("already exists", "duplicate column", "Online migration expected", "no such table",
                     "no such column")  # the words of another process migrating at once


@functools.lru_cache(maxsize=None)
def init_sqlite(uri: str, path: str, wait: float = 20.0) -> None:
    """Once per process and file: build MLflow's store holding a lock on the file's directory, so two smp jobs
    starting at once on a new store do not both run MLflow's migrations (one failed with ``table
    _alembic_tmp_... already exists``). A process that takes no lock (``mlflow ui``, a notebook) may be setting
    up the same new store: while the file was new when this began, or the error has the words of a concurrent
    setup, it is tried again for up to ``wait`` s."""
    fresh = not Path(path).exists() or Path(path).stat().st_size == 0
    deadline = time.monotonic() + wait
    while True:
        with directory_lock(Path(path).parent):
            try:
                mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # builds (migrates) it
                return
            except Exception as exc:  # noqa: BLE001 - said in a sentence when it is the store's fault
                failure = store_failure(exc, uri)
                concurrent = any(words in str(exc) for words in _CONCURRENT_SETUP) or (fresh and failure is None)
                if concurrent and time.monotonic() > deadline:  # two setups at once broke it off half way
                    raise TrackingUnavailable(
                        f"tracking store {path} is half set up ({str(exc).splitlines()[0][:200]}): another process "
                        "set it up at the same time without smp's lock; if it holds no runs yet, delete it and "
                        "start again") from exc
                if not concurrent:
                    if failure is None:
                        raise
                    raise failure from exc
                log.info("tracking store %s is being set up by another process (%s); trying again", path,
                         str(exc).splitlines()[0][:200])
        time.sleep(1.0)


@contextlib.contextmanager
def directory_lock(directory: Path):
    """An exclusive ``flock`` on ``directory`` while inside (waits for the holder); none where the file system
    has no flock (the block then runs unlocked)."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _why(exc: BaseException) -> str:
    """A connection failure in a few words: ``Connection refused``, ``timed out``, ``HTTP 503 responses``."""
    import re

    text = str(exc)
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno_text:
        return errno_text.group(1).strip()
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "timed out"
    status = re.search(r"too many (\d{3}) error responses", text)
    if status:
        return f"HTTP {status.group(1)} responses"
    return text[:200]


_SQLITE_PROBLEMS = (  # SQLite's words -> what they mean, what to do
    ("file is not a database", "not an SQLite database", "restore it from a backup"),
    ("database disk image is malformed", "damaged (database disk image is malformed)", "restore it from a backup"),
    ("database or disk is full", "on a full disk (database or disk is full)", "free space on its disk"),
    ("readonly database", "read-only (attempt to write a readonly database)", "make it and its directory writable"),
    ("unable to open database file", "not openable (unable to open database file)",
     "check that its directory exists and is writable"),
)
_CONNECTION = ("Max retries exceeded", "Failed to establish a new connection", "Connection refused",
               "Connection aborted", "Read timed out", "failed with timeout exception", "RemoteDisconnected")
_STORAGE_ERRNOS = {"ENOSPC": "no space left on the disk", "EDQUOT": "disk quota exceeded",
                   "EROFS": "the file system is read-only", "EACCES": "permission denied",
                   "EPERM": "permission denied", "ENOENT": "no such file or directory",
                   "ENOTDIR": "a part of the path is not a directory", "EFBIG": "file too large"}


def _chain(exc: BaseException, depth: int = 8):
    """``exc`` and the exceptions it was raised from or during, nearest first."""
    seen = []
    while exc is not None and len(seen) < depth and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def store_failure(exc: BaseException, uri: str | None = None, places: dict | None = None) -> Exception | None:
    """``exc`` told as a ``TrackingUnavailable`` or ``StorageError`` (one sentence naming the URI, file or path
    and the problem) when the tracking store or the disk is at fault, else None.

    ``places``: ``{what: directory}`` to look at when the disk is full and the error names no file (a write
    that hit a full disk mid-file): the one with no space left is named.
    """
    import errno
    import re

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    for e in _chain(exc):
        if isinstance(e, (TrackingUnavailable, StorageError)):
            return e
    in_store = any(_in_mlflow_store(e) for e in _chain(exc))  # not another database (an Optuna storage)
    for e in _chain(exc):
        text = str(e)
        for words, meaning, todo in _SQLITE_PROBLEMS if in_store else ():
            if words in text:
                where = sqlite_path(uri) if uri.startswith("sqlite") else uri
                return TrackingUnavailable(f"tracking store {where} is {meaning}; {todo}, or point "
                                           "MLFLOW_TRACKING_URI at another store")
        if in_store and "out-of-date database schema" in text:  # MLflow's advice (`mlflow db upgrade`) is the fix
            return TrackingUnavailable(f"tracking store {uri}: {text.strip().splitlines()[0]}")
        if _names_server(text, uri) and any(words in text for words in _CONNECTION):
            return TrackingUnavailable(f"tracking server {uri} stopped answering ({_why(e)})")
    for e in _chain(exc):
        missing = re.search(r"Failed to download artifacts from path '([^']*)'", str(e))
        if missing:  # MLflow's words for an artifact whose files are gone (it keeps no cause)
            return StorageError(f"artifact {missing.group(1)!r} of a run this job reads is missing: its run's "
                                "artifact directory was moved or deleted (the run page shows where it was); "
                                "restore it, or delete that run so that it is not reused")
        if isinstance(e, OSError) and errno.errorcode.get(e.errno or -1) in _STORAGE_ERRNOS:
            what = _STORAGE_ERRNOS[errno.errorcode[e.errno]]
            full = full_disk(places or {}) if e.errno in (errno.ENOSPC, errno.EDQUOT) else None
            if full:  # a copy that filled the disk names its source file: the full disk is the news
                return StorageError(f"{full}: {what}" + (f" (writing {e.filename})" if e.filename else ""))
            if e.filename is None:
                return StorageError(f"{what} ({e.strerror or e})")
            return StorageError(f"{e.filename}{_role(str(e.filename), places or {})}: {what}"
                                + (f" ({e.strerror})" if e.strerror else ""))
    return None


def _in_mlflow_store(exc: BaseException) -> bool:
    """Whether ``exc`` passed through MLflow's store code (``mlflow/store/``) on its way up."""
    marker = f"{os.sep}mlflow{os.sep}store{os.sep}"
    tb = exc.__traceback__
    while tb is not None:
        if marker in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _names_server(text: str, uri: str) -> bool:
    """Whether an error's text is about the tracking server at ``uri`` (not another host smp talks to)."""
    from urllib.parse import urlsplit

    if not uri.startswith(("http:", "https:")):
        return False
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return uri.rstrip("/") in text or (f"host='{parts.hostname}'" in text and f"port={port}" in text)


def _role(path: str, places: dict) -> str:
    """`` (the run's artifacts)`` when ``path`` is one of ``places`` or lies above or below it, else ""."""
    here = Path(path).absolute()
    for what, where in places.items():
        place = Path(str(where).removeprefix("file://")).absolute()
        if here == place or here in place.parents or place in here.parents:
            return f" ({what})"
    return ""


def full_disk(places: dict) -> str | None:
    """The first of ``places`` (``{what: directory or file:// URI}``, plus the temporary folder) whose disk
    has no space left, as ``<path> (<what>)``; None if none."""
    import tempfile

    for what, where in {**places, "the temporary folder": tempfile.gettempdir()}.items():
        path = Path(str(where).removeprefix("file://"))
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            stats = os.statvfs(path)
        except (OSError, AttributeError):
            continue
        if stats.f_bavail * stats.f_frsize < 1 << 20:  # under 1 MiB free
            return f"{path} ({what})"
    return None


@contextlib.contextmanager
def one_short_attempt():
    """MLflow HTTP requests inside make one try with a short timeout (``FINAL_ATTEMPT``): closing the run of a
    job that is failing or stopped must not retry for minutes against a server that is gone."""
    saved = {key: os.environ.get(key) for key in FINAL_ATTEMPT}
    os.environ.update(FINAL_ATTEMPT)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def close_run(status: str, reason: str) -> None:
    """End the active run ``status`` with ``smp.end_reason``: one short attempt; a run that cannot be closed
    (its store is gone) is left RUNNING, with a warning, for ``smp runs --close-stale`` to close later."""
    run_id = mlflow.active_run().info.run_id
    with one_short_attempt():
        try:
            mlflow.set_tag("smp.end_reason", reason)
            mlflow.end_run(status=status)
            return
        except Exception as exc:  # noqa: BLE001 - the job's own error is the news; this is said beside it
            log.warning("run %s could not be marked %s (%s); once the store is back, `smp runs --close-stale` "
                        "closes it", run_id, status, _why(exc))
        try:
            if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
                mlflow.end_run(status=status)  # leaves the run (no retry); the store may refuse again
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- runs left RUNNING by dead jobs
def _proc_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), "" where /proc cannot say, None if no
    such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text.rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:  # another user's: alive
        pass
    return ""


def _machine() -> str:
    """This boot of this machine's pid namespace: ``<boot id>/<pid namespace>`` ("" parts where unknown)."""
    parts = []
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            parts.append("")
    return "/".join(parts)


def process_tags() -> dict[str, str]:
    """Who runs this job: ``smp.host``, ``smp.pid`` and ``smp.process`` (boot, pid namespace, start time), so
    ``stale_runs`` can tell later whether the job is still alive."""
    import socket

    pid = os.getpid()
    return {"smp.host": socket.gethostname(), "smp.pid": str(pid),
            "smp.process": f"{_machine()}/{_proc_start(pid) or ''}"}


def run_liveness(tags: dict) -> tuple[bool, str]:
    """``(stale, why)`` for a RUNNING run from its process tags. Stale only when it was started on this host,
    in this boot and pid namespace, and its process is gone (or its pid now belongs to a later process). A run
    of another host, of an earlier boot, or without the tags (not started by ``job_run``) is never stale here."""
    import socket

    host, pid, process = tags.get("smp.host"), tags.get("smp.pid", ""), tags.get("smp.process", "")
    if not host or not pid.isdigit() or process.count("/") < 2:
        return False, "not checked: no smp.host/smp.pid tags (not started by an smp job)"
    if host != socket.gethostname():
        return False, f"not checked: started on host {host}; run this command there"
    machine, started = process.rsplit("/", 1)
    if machine != _machine():
        return False, f"not checked: started by pid {pid} on {host} in another boot or container"
    now = _proc_start(int(pid))
    if now is None:
        return True, f"stale: its process (pid {pid} on {host}) is gone"
    if started and now and now != started:
        return True, f"stale: its process (pid {pid} on {host}) is gone (the pid belongs to a later process)"
    return False, f"live: pid {pid} on {host} is running"


def stale_runs(experiment_ids: list[str] | None = None) -> list[tuple[object, bool, str]]:
    """Every RUNNING run of ``experiment_ids`` (None: every active experiment) as ``(run, stale, why)``."""
    client = mlflow.MlflowClient()
    ids = experiment_ids or [e.experiment_id for e in client.search_experiments()]
    out, token = [], None
    while ids:
        page = client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=1000, page_token=token)
        out += [(run, *run_liveness(run.data.tags)) for run in page]
        token = page.token
        if not token:
            break
    return out


def close_stale_runs(experiment_ids: list[str] | None = None) -> list[tuple[object, bool, str]]:
    """Mark FAILED (with ``smp.end_reason``) the RUNNING runs whose job is gone (``run_liveness``); return what
    ``stale_runs`` found, the closed ones included."""
    client = mlflow.MlflowClient()
    found = stale_runs(experiment_ids)
    for run, stale, _ in found:
        if stale:
            tags = run.data.tags
            client.set_tag(run.info.run_id, "smp.end_reason",
                           STALE_REASON.format(pid=tags.get("smp.pid"), host=tags.get("smp.host")))
            client.set_terminated(run.info.run_id, "FAILED")
            log.info("run %s (%s) closed FAILED: its job is gone", run.info.run_id, run.info.run_name)
    return found
