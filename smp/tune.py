"""Optuna studies in place of the paper's grid searches, recorded in MLflow.

One parent MLflow run per study; each trial is a nested child run made by the
same job function as the entry point (``run_benchmark``, ``run_pca_boost``,
``run_ensemble_mlp``, ``run_ensemble_conv1d``): the objective only turns a
plain dict of ``trial.suggest_*`` values into that job's config.

Search spaces (each covers the paper's grid and goes beyond it):

* ``benchmark`` / ``pca_boost`` (XGBoost, early stopping on val): ``max_depth``
  3-18, ``learning_rate`` 0.005-0.3 (log), ``n_estimators`` 200-3000,
  ``min_child_weight`` 1-50 (log), ``subsample`` 0.5-1, ``colsample_bytree``
  0.3-1, ``reg_lambda`` 1e-3-10 (log), ``reg_alpha`` 1e-3-10 (log); plus
  ``n_components`` 20-400 for ``pca_boost``.
* ``ensemble_mlp``: ``hidden`` (first width 64-512, second 16-128), ``dropout``
  0-0.7, ``lr`` 1e-4-1e-2 (log), ``weight_decay`` 1e-6-1e-2 (log),
  ``batch_size`` 32-256, ``epochs`` 10-50 with early stopping.
* ``ensemble_conv1d``: ``n_pca`` 8-40, ``channels`` (8-32, 16-64),
  ``kernel_sizes`` 3 or 5, ``dropout`` 0.3-0.85, ``lr`` 1e-4-3e-3 (log),
  ``weight_decay`` 1e-6-1e-2 (log), ``batch_size`` 32-256, ``epochs`` 10-40.

Pruning: every family's job takes one hook, ``on_step(step, val_rmse)``,
called after each boosting round or epoch; the objective reports it to the
trial (every ``report_every`` rounds for the boosters, each a storage round
trip) and prunes there.  A pruned trial's run ends KILLED with the tag
``smp.trial_state=PRUNED``.

What a trial logs: its params, metrics, dataset inputs and model (so any
trial can be promoted); its figures only with ``trial_figures=true`` (drawing
and uploading them was the largest cost after the model, benchmarks/team.py).
The parent run gets the study's figures (labels inside the picture, whole trial
numbers), best params and the best model, and logs ``val_rmse`` (the best
trial's), ``study/best_trial`` and ``study/trials_{state}``: what ``run_tune``
returns and ``smp tune`` prints.  The study names its objective ``val_rmse``
and carries a note (optuna-dashboard's, when that is installed; a one-line
``summary`` user attribute always): family, data, split, the best trial and
what it changed from the defaults, numbers to 4 significant digits.

Storage: ``storage=""`` keeps the study in ``optuna.db`` beside the MLflow
store (sqlite); any Optuna storage URL works (``postgresql://...``), and
``journal:PATH`` uses a journal file, safe for several processes on one
machine.  The study's ``mlflow_parent_run_id`` user attribute holds the parent
run so every worker logs its trials under it.  Several workers on one study:
create the study and its parent first (``n_trials=0``), then start each worker
with ``parent_run=<id>`` (``scripts/tune_workers.sh`` does both).

Faults (docs/reliability.md, "Studies"):

* Bad settings are refused before any study or run exists: ``StudyCfg`` (and the data and split configs) check
  their values when built, and ``run_tune`` prepares the data and split once before opening the study
  (``DataError`` / ``ConfigError``).  Should a fresh study's trials still all fail on a bad setting, the study
  and the parent run this process made are removed.
* Identity: a new study stores what it is tuned on (family, data hash, split and the hash of its rows) as the
  user attribute ``identity``; opening it with other data, another split or family is refused, naming both.
* Dead workers: each trial records its worker (machine, pid, process start) as the user attribute ``worker``.
  On resume (and at the end) a RUNNING trial whose worker on this machine is gone is failed at once; with
  ``heartbeat`` S > 0 (RDB storage), one that sent no heartbeat for ``GRACE_BEATS`` x S seconds is failed by
  Optuna, wherever its worker ran.  Either way its MLflow runs end KILLED with ``smp.end_reason`` and
  ``smp.trial_state=STALE``.
* Resume: a study that holds trials already gets a sampler seed derived from (``sampler_seed``, trials in the
  study), so its random start does not replay the first trials' parameters (``resume_seed``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import optuna

from smp.config import ConfigError, apply, at_least, check, flatten, leaves, one_of, sig
from smp.data import DataCfg, DataError
from smp.families import FAMILIES, family
from smp.jobs import Job
from smp.splits import Prepared, SplitCfg, prepare
from smp.tracking import (NOTE, JobResult, Parent, configure_tracking, data_label, describe_experiment, job_note,
                          log_figure, log_params, logged_model_uri, resolve_experiment, stop_if_terminated)

log = logging.getLogger("smp.tune")

PARENT_ATTR = "mlflow_parent_run_id"
SUMMARY_ATTR = "summary"  # one line: family, data, split, best trial (the full note is optuna-dashboard's)
OBJECTIVE = "val_rmse"  # what every trial returns: the validation RMSE of the family's job (lower is better)
IDENTITY_ATTR = "identity"  # what the study is tuned on (study_identity): set when it is created, checked on open
WORKER_ATTR = "worker"      # the trial's worker: host, machine, pid, process start (a dead one is found on resume)
RUN_ATTR = "mlflow_run_id"  # the trial's MLflow run
GRACE_BEATS = 5  # heartbeat S > 0: a trial with no heartbeat for 5 x S seconds is stale (a live worker beats
#                  every S s; a missed beat or two, e.g. a busy database, must not fail a live trial)
PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class StudyCfg:
    model: str = "benchmark"  # a model family (smp.families): benchmark, pca_boost, the ensembles, fusion
    n_trials: int = 20        # trials this process runs (-1 = until timeout; 0 = only create study + parent run)
    max_trials: int = 0       # stop once the study holds this many finished trials, all workers together (0 = no cap)
    timeout: int = 0          # seconds for this process (0 = none)
    study_name: str = ""      # "" = smp-{model}-{split}; the same name continues the study
    storage: str = ""         # Optuna storage URL; "" = sqlite optuna.db beside the MLflow store
    sampler_seed: int = 0     # seeds the TPE sampler (reproducible studies)
    pruner: str = "median"    # median | hyperband | none
    startup_trials: int = 5   # trials before the median pruner prunes
    report_every: int = 10    # XGBoost: report the validation RMSE to Optuna every this many rounds
    heartbeat: int = 0        # seconds between trial heartbeats (RDB storage; 0 = off): stale trials fail
    trial_figures: bool = False  # each trial's run logs the job's figures too (off: params, metrics, model)
    parent_run: str = ""      # MLflow run to log trials under ("" = the study's, created by its first worker)

    def __post_init__(self) -> None:
        check(self, model=one_of(*FAMILIES), n_trials=at_least(-1, "-1 (until timeout), 0 (only create) or more"),
              max_trials=at_least(0), timeout=at_least(0), pruner=one_of(*PRUNERS), startup_trials=at_least(0),
              report_every=at_least(1), heartbeat=at_least(0))


@dataclass(frozen=True)
class TuneJob:
    source: DataCfg = field(default_factory=DataCfg)
    splitting: SplitCfg = field(default_factory=SplitCfg)
    study: StudyCfg = field(default_factory=StudyCfg)
    experiment: str = ""  # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)


def space_for(model: str):
    """The search space of model family ``model`` (its ``Family.space``)."""
    return family(model).space


def default_storage() -> str:
    """``optuna.db`` beside the MLflow store when that is a sqlite file, else in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return "sqlite:///optuna.db"


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose heartbeat survives a failed write: Optuna's heartbeat thread ends at the first
    error (a locked sqlite file, a database restart), after which a live trial would look dead."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # noqa: BLE001 - the next beat tries again
            log.warning("trial heartbeat not recorded (retried in %s s): %s", self.heartbeat_interval, exc)


def make_storage(url: str, heartbeat: int = 0):
    """An Optuna storage from a URL (``journal:PATH`` for a journal file).  With ``heartbeat`` S > 0 an RDB
    storage records each running trial's heartbeat every S seconds and fails a trial silent for
    ``GRACE_BEATS`` x S seconds, ending its MLflow runs (``end_trial_runs``); a journal file has no heartbeats
    (its workers share one machine, where ``fail_stale_trials`` finds a dead one by its process)."""
    url = url or default_storage()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        if heartbeat > 0:
            log.info("heartbeat=%d ignored: a journal file has no heartbeats (dead workers on this machine are "
                     "found by their process)", heartbeat)
        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    if heartbeat <= 0:
        return _Storage(url)
    grace = GRACE_BEATS * heartbeat

    def on_stale(study, trial) -> None:
        end_trial_runs(study, trial, f"no heartbeat from its worker{_worker_text(trial)} for {grace} s "
                                     f"(one every {heartbeat} s expected): presumed dead")

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: experimental since 2.9
        return _Storage(url, heartbeat_interval=heartbeat, grace_period=grace,
                        heartbeat_stale_trial_callback=on_stale)


# --------------------------------------------------------------------------- dead workers
def _machine() -> str:
    """This machine and pid namespace (a pid means the same process only there): host, boot id, pid namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{boot}|{namespace}"


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc); None when it is gone or a zombie, ""
    where /proc cannot tell (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else ""
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def this_worker() -> dict:
    """The running process as a trial's ``worker`` attribute."""
    return {"host": socket.gethostname(), "machine": _machine(), "pid": os.getpid(),
            "started": _process_start(os.getpid())}


def worker_gone(worker: dict) -> bool:
    """True when ``worker`` (a trial's ``worker`` attribute) ran on this machine and its process is gone (its
    pid free, a zombie, or now another process's).  A worker elsewhere is never judged here (heartbeats)."""
    if not worker or worker.get("machine") != _machine():
        return False
    pid, started = int(worker["pid"]), worker.get("started") or ""
    now = _process_start(pid)
    if now is None:
        return True
    if started and now:
        return now != started
    try:  # no /proc: is the pid in use at all
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _worker_text(trial) -> str:
    worker = trial.user_attrs.get(WORKER_ATTR) or {}
    return f" (pid {worker['pid']} on {worker['host']})" if worker.get("pid") else ""


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the study's RUNNING trials whose worker is dead and end their MLflow runs KILLED (``end_trial_runs``):
    a worker on this machine whose process is gone, at once; with heartbeats, one silent for the grace period
    (Optuna's ``fail_stale_trials``, which also runs before every trial).  Returns the trial numbers failed here."""
    import warnings

    failed = []
    by = f"pid {os.getpid()} on {socket.gethostname()}"
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not worker_gone(trial.user_attrs.get(WORKER_ATTR)):
            continue
        reason = f"its worker{_worker_text(trial)} is gone (killed or crashed); failed by {by}"
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            if not study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
        end_trial_runs(study, trial, reason)
        failed.append(trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # heartbeats (a no-op without them)
    if failed:
        log.warning("study %s: trial(s) %s were RUNNING with their worker gone: failed, their MLflow runs ended "
                    "KILLED", study.study_name, failed)
    return failed


def _trial_runs(study: optuna.Study, trial) -> list[str]:
    """The MLflow run of ``trial`` (its ``mlflow_run_id``, else found by its tags under the study's parent run)
    and the runs nested under it (an ensemble trial's upstream jobs)."""
    client = mlflow.MlflowClient()
    runs = [trial.user_attrs[RUN_ATTR]] if trial.user_attrs.get(RUN_ATTR) else []
    parent = study.user_attrs.get(PARENT_ATTR)
    if not runs and parent:  # killed before its first step recorded the run
        experiment = client.get_run(parent).info.experiment_id
        found = client.search_runs([experiment], filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent}' AND tags.`optuna.study` = '{study.study_name}' "
            f"AND tags.`optuna.trial_number` = '{trial.number}'"))
        runs = [r.info.run_id for r in found]
    for run_id in list(runs):
        experiment = client.get_run(run_id).info.experiment_id
        runs += [r.info.run_id for r in client.search_runs(
            [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")]
    return runs


def end_trial_runs(study: optuna.Study, trial, reason: str) -> list[str]:
    """End a stale trial's MLflow runs that are still RUNNING: status KILLED, ``smp.end_reason`` (why) and
    ``smp.trial_state=STALE``.  Returns the runs ended; never raises (the study must go on)."""
    ended = []
    try:
        client = mlflow.MlflowClient()
        for run_id in _trial_runs(study, trial):
            if client.get_run(run_id).info.status != "RUNNING":
                continue
            client.set_tag(run_id, "smp.end_reason", f"trial {trial.number} of study {study.study_name}: {reason}")
            client.set_tag(run_id, "smp.trial_state", "STALE")
            client.set_terminated(run_id, status="KILLED")
            ended.append(run_id)
    except Exception as exc:  # noqa: BLE001 - the study must go on
        log.warning("could not end the MLflow runs of stale trial %d: %s", trial.number, exc)
    return ended


def make_pruner(cfg: StudyCfg):
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=5)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"pruner={cfg.pruner!r}: expected median, hyperband or none")


def job_for(model: str, source: DataCfg, splitting: SplitCfg, experiment: str):
    """The family's run function and its default config with this data and split."""
    entry = family(model)
    return entry.run, replace(entry.default_config(), source=source, splitting=splitting, experiment=experiment)


def objective_for(cfg: TuneJob, parent_run_id: str):
    """The Optuna objective: suggested values -> the family's config -> its run() -> val RMSE."""
    run_fn, base = job_for(cfg.study.model, cfg.source, cfg.splitting, cfg.experiment)
    space = space_for(cfg.study.model)
    experiment_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id  # once, not per trial
    every = 1 if family(cfg.study.model).epochs else max(1, cfg.study.report_every)  # boosters: rounds are cheap

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, this_worker())  # a resumed study fails this trial if its process dies
        parent = Parent(parent_run_id, experiment_id, figures=cfg.study.trial_figures, trial=str(trial.number),
                        tags=(("optuna.study", trial.study.study_name), ("optuna.trial_number", str(trial.number))))

        result = run_fn(apply(base, space(trial)), parent=parent, on_step=step_reporter(trial, every))
        trial.set_user_attr("mlflow_run_id", result.run_id)
        for key in ("val_mae", "val_spearman", "test_rmse"):  # shown beside the value: 4 significant digits
            if key in result:
                trial.set_user_attr(key, float(sig(result[key])))
        return result[OBJECTIVE]

    return objective


def step_reporter(trial, every: int = 1):
    """The ``on_step(step, val_rmse)`` hook of a trial: records the trial's MLflow run at the first step,
    reports every ``every``-th step to Optuna (each report is a storage round trip) and prunes there."""

    def on_step(step: int, val_rmse: float) -> None:
        stop_if_terminated()  # a SIGTERM lost in a cleanup callback stops the trial at its next step
        _record_run_id(trial)
        if step % max(1, every):
            return
        trial.report(val_rmse, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}, val RMSE {sig(val_rmse)}")

    return on_step


def _record_run_id(trial) -> None:
    """Store the active MLflow run id on the trial (so a dead worker's run can be marked FAILED)."""
    run = mlflow.active_run()
    if run is not None and "mlflow_run_id" not in trial.user_attrs:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)


def study_name(cfg: TuneJob) -> str:
    """The study's name: ``study_name``, else ``smp-{model}-{split}``."""
    return cfg.study.study_name or f"smp-{cfg.study.model}-{cfg.splitting.split}"


def study_identity(cfg: TuneJob, prep: Prepared) -> dict:
    """What a study is tuned on: family, data (its content hash, as runs tag ``smp.data_hash``), split settings and
    a hash of the rows on each side of the split (``rows``: same data and settings give the same rows).  Trials
    of one study are comparable only when this is the same; ``data`` (the path given) is shown, not compared."""
    import pandas as pd

    split = cfg.splitting
    rows = hashlib.sha256(prep.digest.encode())
    rows.update(pd.util.hash_pandas_object(prep.posts["Pid"].astype(str), index=False).to_numpy().tobytes())
    for part in ("train", "val", "test"):
        rows.update(part.encode() + prep.parts[part].astype("int64").tobytes())
    identity = {"model": cfg.study.model, "data": str(cfg.source.data), "data_hash": prep.digest,
                "split": split.split, "sample_size": split.sample_size, "seed": split.seed,
                "val_frac": split.val_frac, "test_frac": split.test_frac, "rows": rows.hexdigest()[:16]}
    if split.split == "chrono":  # the protocol's own booster and feature settings, or the paper's
        identity["chrono_tuned"] = split.chrono_tuned
    return identity


COMPARED = ("model", "data_hash", "split", "rows", "chrono_tuned")  # what must match to continue a study


def check_identity(study: optuna.Study, identity: dict, storage: str = "") -> None:
    """Refuse to continue ``study`` on other data, another split or family (``ConfigError`` naming the study, what
    it was made on and what this run has); a study made before identities were kept gets this run's."""
    stored = study.user_attrs.get(IDENTITY_ATTR)
    if not stored:
        if study.get_trials(deepcopy=False):
            log.warning("study %s predates smp's study identity: recording this run's data and split (%s)",
                        study.study_name, _identity_text(identity))
        study.set_user_attr(IDENTITY_ATTR, identity)
        return
    differ = [k for k in COMPARED if stored.get(k) != identity.get(k)]
    if not differ:
        return
    shown = [k for k in ("model", "data_hash", "split", "sample_size", "seed", "val_frac", "test_frac",
                         "chrono_tuned") if stored.get(k) != identity.get(k) and k in stored and k in identity]
    changes = "; ".join(f"{k} {stored[k]} -> {identity[k]}" for k in shown) or "other rows: the split's code changed"
    raise ConfigError(
        f"study {study.study_name!r}{f' in {storage}' if storage else ''} was made on other data or another split "
        f"({changes}): its {len(study.trials)} trials would be compared with this run's across different data. "
        f"It was made on: {_identity_text(stored)}. Continue it with those, or name a new study "
        f"(--study-name smp-{identity['model']}-{identity['split']}-{identity['rows'][:8]})")


def _identity_text(identity: dict) -> str:
    keys = ("model", "data", "data_hash", "split", "sample_size", "seed", "val_frac", "test_frac", "chrono_tuned")
    return ", ".join(f"{k} {identity[k]}" for k in keys if k in identity)


def resume_seed(seed: int, n_trials: int) -> int:
    """The sampler seed of a study that holds ``n_trials`` trials: ``seed`` itself for a new study, else one
    derived from both.  A sampler seeded alike again would replay its first proposals (TPE's random start
    trials: trial 2 = trial 0 after a restart).  Derived, not persisted: nothing to keep in sync, several
    workers (seeds ``seed + i``) stay apart, and a resumed study is still reproducible from its history."""
    if n_trials == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{n_trials}".encode()).digest()[:4], "big")


def open_study(cfg: TuneJob, identity: dict | None = None) -> optuna.Study:
    """Create or load the study (seeded TPE sampler, the chosen pruner); its objective is named ``val_rmse``.
    A new study stores ``identity`` (``study_identity``: computed here when not given); an existing one must
    have the same (``check_identity``) and gets a sampler seed that continues its sequence (``resume_seed``)."""
    return _open_study(cfg, identity)[0]


def _open_study(cfg: TuneJob, identity: dict | None = None) -> tuple[optuna.Study, bool]:
    """``(study, created by this call)``."""
    import warnings

    if identity is None:
        identity = study_identity(cfg, prepare(cfg.source, cfg.splitting))
    name, storage = study_name(cfg), make_storage(cfg.study.storage, cfg.study.heartbeat)
    sampler = optuna.samplers.TPESampler(seed=cfg.study.sampler_seed)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler,
                                    pruner=make_pruner(cfg.study))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=make_pruner(cfg.study))
        created = False
    if not created or IDENTITY_ATTR in study.user_attrs:
        check_identity(study, identity, cfg.study.storage or default_storage())
    else:
        study.set_user_attr(IDENTITY_ATTR, identity)
    n = len(study.get_trials(deepcopy=False))
    if n:
        study.sampler = optuna.samplers.TPESampler(seed=resume_seed(cfg.study.sampler_seed, n))
    if study.metric_names != [OBJECTIVE]:  # optuna-dashboard and the plots name the axis after it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE])
    return study, created


def parent_name(cfg: TuneJob) -> str:
    """The study's parent run name, e.g. ``tune · benchmark · demo · random``."""
    return f"tune · {cfg.study.model} · {data_label(cfg.source.data)} · {cfg.splitting.split}"


def parent_tags(cfg: TuneJob, study: optuna.Study) -> dict[str, str]:
    """The parent run's tags; its first description says what the study is (the summary replaces it)."""
    return {"smp.job": "tune", "smp.model": f"tune:{cfg.study.model}", "optuna.study": study.study_name,
            "smp.split": cfg.splitting.split,
            NOTE: job_note("tune", flatten(cfg), what=TUNE.help) + f" Optuna study {study.study_name}; no finished trial yet."}


def parent_run(study: optuna.Study, cfg: TuneJob) -> str:
    """The study's parent MLflow run id (created by the first worker, found by the others)."""
    run_id = cfg.study.parent_run or study.user_attrs.get(PARENT_ATTR)
    if run_id:
        if PARENT_ATTR not in study.user_attrs:
            study.set_user_attr(PARENT_ATTR, run_id)
        return run_id
    run = mlflow.MlflowClient().create_run(
        experiment_id=resolve_experiment(cfg.experiment), run_name=parent_name(cfg), tags=parent_tags(cfg, study))
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    # another worker may have raced us: the first value stored wins
    winner = optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs[PARENT_ATTR]
    if winner != run.info.run_id:
        mlflow.MlflowClient().delete_run(run.info.run_id)
        return winner
    with mlflow.start_run(run_id=run.info.run_id):
        log_params(flatten(cfg))
    return run.info.run_id


def run_tune(cfg: TuneJob = TuneJob()) -> JobResult:
    """Run (or continue) the study for ``cfg.study.model``; log the summary on the parent run.

    The data and split are prepared once first, so bad data or settings fail before any study or run exists;
    a study made on other data or another split is refused (``check_identity``); trials left RUNNING by dead
    workers are failed and their MLflow runs ended (``fail_stale_trials``)."""
    configure_tracking()
    launched = os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run`: that run becomes the parent
    identity = study_identity(cfg, prepare(cfg.source, cfg.splitting))
    study, created = _open_study(cfg, identity)
    own_parent = not (launched or cfg.study.parent_run or study.user_attrs.get(PARENT_ATTR))
    if launched and PARENT_ATTR not in study.user_attrs:
        study.set_user_attr(PARENT_ATTR, launched)
        with mlflow.start_run(run_id=launched) as run:
            log_params(flatten(cfg), tags={**parent_tags(cfg, study), "mlflow.runName": parent_name(cfg)},
                       skip_logged=True)  # the launcher logged the MLproject parameters already
            describe_experiment(run.info.experiment_id)
    parent = parent_run(study, cfg)
    fail_stale_trials(study)
    callbacks = []
    if cfg.study.max_trials > 0:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        callbacks.append(optuna.study.MaxTrialsCallback(cfg.study.max_trials, states=states))
    log.info("study %s: parent run %s, %d trials so far", study.study_name, parent, len(study.trials))
    print(f"study {study.study_name}: parent run {parent}")
    if cfg.study.n_trials == 0:
        return JobResult(parent, trial_counts(study))
    try:
        study.optimize(objective_for(cfg, parent), n_trials=cfg.study.n_trials if cfg.study.n_trials > 0 else None,
                       timeout=cfg.study.timeout or None, callbacks=callbacks,
                       catch=(RuntimeError, FloatingPointError), gc_after_trial=True)
    except (ConfigError, DataError) as exc:
        if created:
            discard_failed_study(study, parent if own_parent else None, exc)
        raise
    except BaseException as exc:  # SIGTERM is no Exception to Optuna, which then leaves the trial RUNNING
        fail_own_trials(study, exc)
        raise
    fail_stale_trials(study)
    return JobResult(parent, summarise(study, parent, cfg))


def fail_own_trials(study: optuna.Study, exc: BaseException) -> list[int]:
    """Fail the trials this process leaves RUNNING as it stops (SIGTERM, an error Optuna does not catch), with
    ``fail_reason`` saying why; their MLflow runs were ended by the job (KILLED on SIGTERM / Ctrl-C).  Returns
    the trial numbers failed; never raises (the stop is the news)."""
    from smp.tracking import Terminated

    reason = ("stopped by SIGTERM" if isinstance(exc, Terminated) else "stopped by Ctrl-C (SIGINT)"
              if isinstance(exc, KeyboardInterrupt) else f"its worker failed: {type(exc).__name__}: {str(exc)[:300]}")
    me, failed = this_worker(), []
    try:
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            worker = trial.user_attrs.get(WORKER_ATTR) or {}
            if (worker.get("machine"), worker.get("pid")) != (me["machine"], me["pid"]):
                continue
            try:
                study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
                study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            end_trial_runs(study, trial, reason)
            failed.append(trial.number)
    except Exception as err:  # noqa: BLE001 - e.g. the storage is what failed
        log.warning("could not fail the trials of this worker in study %s: %s", study.study_name, err)
    return failed


def discard_failed_study(study: optuna.Study, parent: str | None, exc: Exception) -> bool:
    """Remove a study this process created whose every trial failed on a bad setting or bad data, and the parent
    run it made (with its trial runs; MLflow keeps them restorable): no failed study, no empty parent run left
    behind.  A study with any trial not failed (another worker's) is kept.  Returns whether it was removed."""
    if any(t.state != optuna.trial.TrialState.FAIL for t in study.get_trials(deepcopy=False)):
        return False
    optuna.delete_study(study_name=study.study_name, storage=study._storage)
    if parent:
        client = mlflow.MlflowClient()
        experiment = client.get_run(parent).info.experiment_id
        for run in client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"):
            client.delete_run(run.info.run_id)
        client.delete_run(parent)
    log.error("study %s removed%s: every trial of it failed (%s)", study.study_name,
              f" with its parent run {parent}" if parent else "", exc)
    return True


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """``{"study/trials_complete": n, ...}``: the study's trials per state, under the keys the parent logs."""
    states = [t.state for t in study.trials]
    return {f"study/trials_{s.name.lower()}": states.count(s) for s in optuna.trial.TrialState}


def summarise(study: optuna.Study, parent: str, cfg: TuneJob | None = None) -> dict[str, float]:
    """Log best params/value, the study's figures and the best trial's model on the parent run; write the
    study's note (``study_note``).  Returns what the parent logged, under the same keys: ``val_rmse`` (the
    best trial's), ``study/best_trial`` and ``study/trials_{state}``."""
    counts = trial_counts(study)
    try:
        best = study.best_trial
    except ValueError:
        log.warning("study %s has no completed trial yet", study.study_name)
        return dict(counts)
    note = None
    if cfg is not None:
        try:
            save_study_note(study, study_summary(study, cfg), study_note(study, cfg, parent))
            note = study_note(study, cfg)  # the parent run's description (that run's own page: no link to itself)
        except Exception as exc:  # noqa: BLE001 - a note must not fail the study
            log.warning("could not write the note of study %s: %s", study.study_name, exc)
    summary = {OBJECTIVE: best.value, "study/best_trial": best.number, **counts}
    for attempt in range(3):  # several workers may summarise at once; the server can refuse a racing write
        try:
            _log_summary(study, best, parent, summary, note)
            break
        except mlflow.exceptions.MlflowException as exc:
            log.warning("summary on parent run %s failed (attempt %d/3): %s", parent, attempt + 1, exc)
            time.sleep(1.0 + attempt)
    return summary


def best_vs_defaults(cfg: TuneJob, params: dict) -> list[tuple[str, object, object]]:
    """``[(config field, default, trial's value)]`` for every field a trial's ``params`` set through the
    family's search space; the default is what ``smp {model}`` uses on the study's data and split (the split's
    protocol settings included)."""
    from smp.train import for_protocol

    _, base = job_for(cfg.study.model, cfg.source, cfg.splitting, cfg.experiment)
    defaults = {path[-1]: value for path, value in leaves(for_protocol(base))}
    suggested = space_for(cfg.study.model)(optuna.trial.FixedTrial(params))
    return [(name, defaults.get(name), value) for name, value in suggested.items()]


def _value_text(value) -> str:
    """A setting as the note shows it (floats to 4 significant digits, tuples comma-separated)."""
    if isinstance(value, float):
        return sig(value)
    if isinstance(value, (tuple, list)):
        return ", ".join(_value_text(v) for v in value)
    return str(value)


def study_note(study: optuna.Study, cfg: TuneJob, parent: str = "") -> str:
    """The study's note (Markdown): family, data, split, the best trial and what it changed from the defaults;
    numbers to 4 significant digits; with ``parent``, where the study is in MLflow."""
    model, split = cfg.study.model, cfg.splitting
    counts = {k.rsplit("_", 1)[1]: n for k, n in trial_counts(study).items() if n}
    best = study.best_trial
    run = best.user_attrs.get("mlflow_run_id", "")
    fields = best_vs_defaults(cfg, best.params)
    changed = [f for f in fields if f[1] != f[2]]
    same = [f for f in fields if f[1] == f[2]]
    lines = [
        f"**{model}**: {family(model).help}.",
        f"Data `{cfg.source.data}` (sample_size {split.sample_size}, 0 = all posts); split `{split.split}` "
        f"(seed {split.seed}, val {_value_text(split.val_frac)}, test {_value_text(split.test_frac)}).",
        f"Objective: `{OBJECTIVE}`, the validation RMSE of the family's job (lower is better).",
        "",
        f"**Best trial {best.number}, {OBJECTIVE} {sig(best.value)}**"
        + (f" (MLflow run `{run}`)" if run else "") + f", of {len(study.trials)} trials ("
        + ", ".join(f"{n} {state}" for state, n in counts.items()) + ").",
        "",
    ]
    defaults = f"the defaults (what `smp {model}` uses on this split)"
    if changed:
        lines += [f"What trial {best.number} changed from {defaults}:", "",
                  "| parameter | default | best trial |", "| --- | --- | --- |"]
        lines += [f"| {name} | {_value_text(default)} | {_value_text(value)} |" for name, default, value in changed]
        if same:
            lines += ["", "Searched but left at the default: "
                      + ", ".join(f"{name} {_value_text(value)}" for name, _, value in same) + "."]
    else:
        lines.append(f"Trial {best.number} used {defaults}.")
    if parent:
        lines += ["", f"MLflow: the study's parent run `{parent}` (its trials nested under it). Written by `smp tune`."]
    return "\n".join(lines) + "\n"


def study_summary(study: optuna.Study, cfg: TuneJob) -> str:
    """One line for the study's ``summary`` user attribute: family, data, split and the best trial."""
    best = study.best_trial
    changed = [name for name, default, value in best_vs_defaults(cfg, best.params) if default != value]
    return (f"{cfg.study.model} on {data_label(cfg.source.data)}, split {cfg.splitting.split}: best trial "
            f"{best.number}, {OBJECTIVE} {sig(best.value)}; changed from the defaults: "
            f"{', '.join(changed) or 'nothing'}")


def save_study_note(study: optuna.Study, summary: str, note: str) -> None:
    """Keep ``summary`` as the study's ``summary`` user attribute (optuna-dashboard lists user attributes as
    plain text) and, with optuna-dashboard installed, ``note`` (Markdown) as the note it shows on the study's
    Note page."""
    study.set_user_attr(SUMMARY_ATTR, summary)
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    save_note(study, note)


def _log_summary(study, best, parent: str, summary: dict, note: str | None = None) -> None:
    client = mlflow.MlflowClient()
    # the best trial's val_rmse under the headline name (the parent charts beside the trials); counts grouped
    client.log_batch(parent, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
                                      for k, v in summary.items()])
    with mlflow.start_run(run_id=parent):
        mlflow.log_dict(best.params, "best_params.json")
        best_run = best.user_attrs.get("mlflow_run_id")
        if best_run:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    local = mlflow.artifacts.download_artifacts(logged_model_uri(best_run), dst_path=tmp)
                    mlflow.log_artifacts(local, "best_model")
                except Exception as exc:  # noqa: BLE001 - the summary still gets logged
                    log.warning("could not copy the best trial's model: %s", exc)
        _log_study_figures(study)
    # the best params, floats to 4 significant digits (best_params.json keeps the exact values)
    tags = {f"best.{k}": sig(v) if isinstance(v, float) else str(v) for k, v in best.params.items()}
    if note:  # the parent run's description is the study's note (the MLflow run page of the study)
        tags[NOTE] = f"Optuna study `{study.study_name}`. " + note
    if best.user_attrs.get("mlflow_run_id"):
        tags["smp.best_run_id"] = best.user_attrs["mlflow_run_id"]
    current = client.get_run(parent).data.tags
    for key, value in tags.items():  # one tag at a time: an upsert that loses a race is retried by the caller
        if current.get(key) != value:
            client.set_tag(parent, key, value)


def _figure(ax):
    """The figure behind what an optuna matplotlib plot returns (one Axes or an array of them)."""
    return ax.figure if hasattr(ax, "figure") else ax.flat[0].figure


def study_figure(plot, study: optuna.Study):
    """One of optuna's matplotlib plots of ``study``, made readable: the objective named ``val_rmse``, whole
    trial numbers on a trial axis, room for every label (the parallel coordinates get a wider figure) and a
    layout that keeps them all inside the picture."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(plot(study, target_name=OBJECTIVE))
    for ax in fig.axes:
        if ax.get_xlabel() == "Trial":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(fig.axes) > 1:  # parallel coordinates: one axis per parameter, the objective's and a colour bar
        fig.set_size_inches(max(6.4, 1.1 * len(fig.axes) + 1), 5)
    fig.tight_layout()
    return fig


def _log_study_figures(study: optuna.Study) -> None:
    import warnings

    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    figures = [("optimization_history.png", ovm.plot_optimization_history)]
    if len(complete) >= 2:
        figures += [("param_importances.png", ovm.plot_param_importances),
                    ("parallel_coordinate.png", ovm.plot_parallel_coordinate)]
    for name, plot in figures:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            try:
                log_figure(lambda: study_figure(plot, study), name)
            except Exception as exc:  # noqa: BLE001 - a figure must not fail the study
                log.warning("could not plot %s: %s", name, exc)


TUNE = Job("tune", "an Optuna study (nested MLflow runs) for one model family", run_tune, TuneJob)
