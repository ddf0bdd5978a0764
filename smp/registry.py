"""Stage 7: the best model run -> a registered model version -> the ``@champion`` alias.

``run_promote`` picks the best finished model run by ``val_rmse`` (or the run
it is given), registers its logged model once (a second promote of the same
run reuses its version), checks it, and compares it with the current
``@champion`` on the same posts.

Candidates.  Only a FINISHED run whose logged model is READY is a candidate
(a ``run_id`` of a failed run, or of one whose model upload never completed,
is refused with a ``DataError``; a searched ranking skips such runs).  Before
any alias moves, first promotion included, the candidate's registered version
is loaded and scored on its own test split (rebuilt from its run's params): it
is **rejected** (tagged ``decision=rejected``, given no alias, and it loses
``@challenger`` if it held it) when it cannot be loaded, fails to predict,
predicts a non-finite value, or does not beat the mean predictor (the train
mean) there.  When its own posts cannot be rebuilt (its data is gone or has
changed) it cannot be checked: refused, ``@challenger`` (the model may be
fine; it was not judged).

Comparing.  Both pyfunc models predict the candidate's test split, less every
post the champion trained or early-stopped on (the champion's own split of its
own data, rebuilt from its run's params; the models read raw rows, so a
champion trained on other data is scored the same way).  The candidate takes
``@champion`` only when its RMSE on those posts beats the champion's by more
than ``margin``.  When no fair comparison is possible (the champion's data can
no longer be read or has changed, fewer than ``MIN_SHARED_TEST_ROWS`` posts
are unseen by both, an image model meets posts without images) the candidate
is refused the title: it becomes ``@challenger`` and the reason is recorded.
A champion whose model can no longer be loaded (artifacts gone or truncated;
not a server that does not answer, which is an error) loses to any candidate
that passed its own check, and the reason is kept on both versions.  Logged
test RMSEs of two runs are never compared: they are figures on different
posts.  The comparison is kept as model-version tags and a description (the
ranking the candidate was chosen from, with each run's val RMSE, the check,
the champion's figures and the rule; numbers to 4 significant digits), and
the decision as a ``promote`` run.  Aliases only, no stages.

Concurrent promotes.  MLflow has no compare-and-set on aliases, so the aliases
of model ``M`` are only moved under M's *promote lease*, and only if
``@champion`` is still the version the candidate was compared with; otherwise
the lease is released and the candidate is compared again with the new
champion (at most ``ROUNDS`` times, then a ``DataError``: nothing moved).
Scoring happens outside the lease; the lease covers re-reading
``@champion``, moving the aliases and writing the decision tags (seconds).

The lease is a ticket lock (Lamport's bakery) on a registered model of its
own, ``M.promote-lease``: a promoter takes a ticket by creating a version of
it (tagged with its owner) and holds the lease while its ticket is the
lowest-numbered live one; it deletes the ticket when done.  Why this is
mutually exclusive with MLflow's SQL stores (sqlite, or PostgreSQL behind
``mlflow server``):

1. Version numbers are unique and never reused: the store inserts
   ``max(version) + 1`` under the primary key (name, version), retrying on
   a conflict, and a deleted version stays as a soft-deleted row.  So a
   ticket created after ticket ``a`` was committed gets a number above ``a``,
   and any number below ``a`` was taken before ``a`` was committed.
2. A promoter reads the tickets only after its own ticket ``b`` was
   committed.  If another promoter holds ticket ``a < b``, ``a`` was
   committed before ``b`` (1), so the read shows ``a``, unless ``a`` was
   deleted (its holder is done) or is expired.  Two promoters therefore never
   both see themselves lowest, except through expiry.
3. Expiry (``LEASE_S``) lets a killed promoter block the others for at most
   that long.  Tickets carry the server's creation time and everything is
   judged on that one clock: a waiter estimates the server's "now" as its own
   ticket's creation time plus its local time since that answer (never ahead
   of the server), and treats a ticket as expired only when the estimate is
   ``LEASE_S`` past its creation.  A holder stops using its ticket
   ``LEASE_S`` after it *sent* the request that created it (never later than
   the server's creation time + ``LEASE_S``): it enters only with at least
   ``LEASE_MARGIN_S`` of it left, and before moving an alias it checks that
   time is still left, else it gives the lease up and moves nothing.  So a
   ticket is only ever treated as expired once its holder has stopped.
   (Assumed: clocks run at the same rate over ``LEASE_S``, and a single
   write after that last check does not stall for ``LEASE_MARGIN_S``; several
   tracking servers on one database need the same clock.)

Under the lease a promoter re-reads ``@champion``: no other promoter can move
it until the lease is released, so the alias moves only when the champion is
the one the candidate was compared with.  Two racing candidates both better
than the champion: the first to take the lease becomes champion; the second
finds a champion it did not compare with, compares again, and becomes
champion only if it beats the first (else ``@challenger``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from smp.data import DataCfg, DataError
from smp.evaluate import baseline_metrics, regression_metrics
from smp.serving import model_input, predict_frame
from smp.splits import MIN_SPLIT_ROWS, Prepared, SplitCfg, prepare
from smp.config import ConfigError, flatten, sig
from smp.families import FAMILIES
from smp.jobs import Job
from smp.tracking import JobResult, describe_run, job_run, logged_model_uri, upsert

log = logging.getLogger("smp.registry")

CHAMPION, CHALLENGER = "champion", "challenger"
REJECTED = "rejected"  # a decision, not an alias: the candidate failed its own check and holds no alias
MIN_SHARED_TEST_ROWS = MIN_SPLIT_ROWS  # fewer posts unseen by both models: no comparison (the test split's minimum)
RANKING_ROWS = 5  # candidates listed by name in a version's description (the rest are counted)
ROUNDS = 4  # comparisons at most when other promotes keep changing the champion meanwhile (then an error)
LEASE_SUFFIX = ".promote-lease"  # the registered model whose versions are the promote tickets of model M
LEASE_S = 120.0  # a ticket this old (server time) is expired: a killed promoter blocks the others this long at most
LEASE_MARGIN_S = 60.0  # a holder enters, and moves an alias, only with this much of its lease left
LEASE_WAIT_S = 600.0  # waiting longer than this for the lease is an error that names the holder
LEASE_POLL_S = 0.5  # seconds between looks at the tickets (plus up to half as much at random)
LEASE_SOURCE = "smp-promote-lease:/ticket"  # a ticket's source: no artifacts behind it


@dataclass(frozen=True)
class PromoteJob:
    model_name: str = "smp-popularity"  # registered model name
    family: str = ""       # only runs of this model family ("" = any of smp.families.FAMILIES)
    split: str = ""        # only runs with this split protocol ("" = any)
    margin: float = 0.0    # the candidate takes @champion only if its test RMSE < champion's - margin
    run_id: str = ""       # promote this run instead of searching for the best
    experiment: str = ""   # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)


@dataclass
class Ranking:
    """The model runs a candidate was chosen from, lowest ``val_rmse`` first, and the rule that chose it."""

    runs: list     # FINISHED model runs with a finite val_rmse (and the filters), best first
    pool: str      # which runs those are, in words
    given: bool = False  # the candidate was given as run_id (not picked from the ranking)
    skipped: dict = field(default_factory=dict)  # run id -> why it was passed over (no logged model, not READY)


@dataclass
class Check:
    """The candidate's own check, before any alias moves: its version loaded and scored on its own test posts."""

    rmse: float = math.nan      # its test RMSE there (nan: not scored)
    baseline: float = math.nan  # the mean predictor's (its train split's mean) on the same posts
    problem: str = ""    # why it is rejected (cannot be loaded, failed, non-finite, not better than the mean)
    unchecked: str = ""  # why it could not be scored at all (its posts cannot be rebuilt): refused, not rejected
    rows: pd.DataFrame | None = None  # its test posts (raw fields, no label), in split order
    y: np.ndarray | None = None       # their labels
    pred: np.ndarray | None = None    # its predictions for them

    @property
    def passed(self) -> bool:
        return not (self.problem or self.unchecked)

    def text(self) -> str:
        """One sentence for the version's description."""
        if self.unchecked:
            return f"not possible: {self.unchecked.rstrip('.')}."
        if self.problem:
            return f"failed: {self.problem.rstrip('.')}."
        return (f"loaded and scored on its own {len(self.y)} test posts before any alias moved: test RMSE "
                f"{_num(self.rmse)}, the mean predictor's {_num(self.baseline)}.")


@dataclass
class Comparison:
    """Candidate vs champion test RMSE and how they were obtained."""

    candidate_rmse: float
    champion_rmse: float
    method: str   # "same_rows" (both models predicted the same posts), "refused" (no fair comparison: the note
    #               says why), "first" (there was no champion), "unchanged" (already the champion), "rejected"
    #               (the candidate failed its own check) or "champion_unloadable" (the champion cannot be loaded)
    rows: int     # posts both models predicted (0 unless same_rows)
    note: str     # one sentence for the description


def run_promote(cfg: PromoteJob = PromoteJob()) -> JobResult:
    """Register the best (or given) model run, check it, and move ``@champion`` if it beats the champion (under
    the model's promote lease, compared again if another promote changed the champion meanwhile); return the
    outcome."""
    if cfg.family and cfg.family not in FAMILIES:
        raise ConfigError(f"family={cfg.family!r}: expected one of {tuple(FAMILIES)} or ''")
    with job_run("promote", cfg.experiment, flatten(cfg), {"smp.registered_model": cfg.model_name},
                 what=PROMOTE.help) as run:
        client = MlflowClient()  # job_run configured the tracking URI
        if cfg.run_id:
            cand_run = given_run(client, cfg.run_id)
            ranking = ranked_runs(cand_run.info.experiment_id, cfg.family, cfg.split)
            ranking.given = True
        else:
            ranking = ranked_runs(run.info.experiment_id, cfg.family, cfg.split)
            cand_run = best_model_run(ranking, run.info.experiment_id, cfg.family, cfg.split)
        cand_id = cand_run.info.run_id
        version, created = register_run(client, cfg.model_name, cand_id)
        check = check_candidate(cand_run, cfg.model_name, version.version)
        champ, comp, decision, rounds = decide(client, cfg, cand_run, version.version, check, ranking)
        outcome = {"version": int(version.version), "new_version": bool(created), "champion": decision == CHAMPION,
                   "decision": decision, "candidate_test_rmse": comp.candidate_rmse,
                   "champion_test_rmse": comp.champion_rmse, "eval_rows": comp.rows,
                   "check_test_rmse": check.rmse, "check_mean_predictor_rmse": check.baseline, "rounds": rounds}
        # not a training run: the decision is recorded as tags (and on the model version), never as metrics
        decision_tags = {"smp.decision": decision, "smp.candidate_run": cand_id,
                         "smp.registered_version": str(version.version), "smp.comparison": comp.method,
                         "smp.check": check_state(check), "smp.compare_rounds": str(rounds),
                         "mlflow.runName": f"promote · {cfg.model_name} v{version.version} → {decision}"}
        if champ is not None and comp.method not in ("rejected", "unchanged"):
            decision_tags["smp.compared_against_version"] = str(champ.version)
        because = BECAUSE.get(comp.method)
        if because:
            decision_tags[f"smp.{because}"] = comp.note[:500]
        champ_run = client.get_run(champ.run_id) if champ is not None else None
        mlflow.set_tags(decision_tags)
        describe_run(promote_note(cfg, cand_run, version.version, champ, champ_run, comp, decision, rounds))
    level = logging.WARNING if decision == REJECTED or comp.method == "champion_unloadable" else logging.INFO
    log.log(level, "%s v%s (run %s) -> %s: %s", cfg.model_name, version.version, cand_id,
            "no alias (rejected)" if decision == REJECTED else f"@{decision}", comp.note)
    return JobResult(run.info.run_id, outcome)


def decide(client: MlflowClient, cfg: PromoteJob, cand_run, version, check: Check, ranking: Ranking):
    """Compare the candidate with the champion and, under the promote lease, act on it if that is still the
    champion; else compare again with the new one (at most ``ROUNDS`` times). ``(champ, comparison, decision,
    rounds)``: the champion it was compared with, as it was read."""
    for rounds in range(1, ROUNDS + 1):
        champ = current_alias(client, cfg.model_name, CHAMPION)
        comp, decision = judge(client, cfg, cand_run, version, check, champ)
        with promote_lease(client, cfg.model_name, f"run {cand_run.info.run_id} (v{version})") as lease:
            now = current_alias(client, cfg.model_name, CHAMPION)
            if _version(now) == _version(champ):
                apply_decision(client, cfg, cand_run, version, champ, comp, decision, ranking, check, lease)
                return champ, comp, decision, rounds
        log.warning("%s: the champion changed from %s to %s while v%s was compared with it; comparing again (round "
                    "%d of %d)", cfg.model_name, _label(champ), _label(now), version, rounds + 1, ROUNDS)
    raise DataError(f"{cfg.model_name}: the champion changed {ROUNDS} times while v{version} (run "
                    f"{cand_run.info.run_id}) was being compared with it (other promotes at the same time); no alias "
                    f"was moved: run promote again")


BECAUSE = {"refused": "refused_because", "rejected": "rejected_because",
           "champion_unloadable": "champion_unloadable_because"}  # the tag that keeps the note, by method


def _version(mv) -> str | None:
    return None if mv is None else str(mv.version)


def _label(mv) -> str:
    return "none" if mv is None else f"v{mv.version}"


def check_state(check: Check) -> str:
    """``passed``, ``failed`` or ``unchecked``: the candidate's own check in a word (a tag value)."""
    return "unchecked" if check.unchecked else "failed" if check.problem else "passed"


# --------------------------------------------------------------------------- finding and registering
def ranked_runs(experiment_id: str, family: str = "", split: str = "") -> Ranking:
    """The experiment's FINISHED model runs with a finite ``val_rmse`` (of ``family`` / ``split`` when given),
    lowest ``val_rmse`` first (newest first on ties): what ``promote`` picks its candidate from."""
    filt = ["attributes.status = 'FINISHED'"]
    if family:
        filt.append(f"tags.`smp.model` = '{family}'")
    if split:
        filt.append(f"tags.`smp.split` = '{split}'")
    runs = mlflow.search_runs([experiment_id], filter_string=" and ".join(filt),
                              order_by=["metrics.val_rmse ASC", "attributes.start_time DESC"], output_format="list")
    runs = [r for r in runs if r.data.tags.get("smp.model") in FAMILIES
            and np.isfinite(r.data.metrics.get("val_rmse", math.nan))]
    name = MlflowClient().get_experiment(experiment_id).name
    scope = ", ".join(x for x in (f"family {family}" if family else "any family",
                                  f"split {split}" if split else "any split"))
    return Ranking(runs, f"finished model runs of experiment `{name}` ({scope})")


def best_model_run(ranking: Ranking, experiment_id: str, family: str = "", split: str = ""):
    """The best run of ``ranking`` whose logged model is READY (the others are noted as skipped, with why);
    ``DataError`` if there is none."""
    client = MlflowClient()
    for r in ranking.runs:
        problem = "no logged model" if not has_logged_model(r.info.run_id) else model_problem(client, r.info.run_id)
        if not problem:
            return r
        ranking.skipped[r.info.run_id] = problem
        log.warning("run %s (val_rmse %.4f): %s; skipped", r.info.run_id, r.data.metrics["val_rmse"], problem)
    raise DataError(nothing_to_promote(experiment_id, family, split))


def nothing_to_promote(experiment_id: str, family: str = "", split: str = "") -> str:
    """Why there is no run to promote: the experiment is empty, its model runs all failed, or none matches."""
    name = mlflow.MlflowClient().get_experiment(experiment_id).name
    what = " and ".join(x for x in (f"family={family}" if family else "", f"split={split}" if split else "") if x)
    models = [r for r in mlflow.search_runs([experiment_id], output_format="list")
              if r.data.tags.get("smp.model") in FAMILIES]
    head = f"experiment {name!r} (id {experiment_id}): nothing to promote: "
    if not models:
        return head + ("it has no model runs; train one first (e.g. `smp benchmark`, or "
                       "`mlflow run . -e benchmark --experiment-name smp`)")
    statuses = pd.Series([r.info.status for r in models]).value_counts()
    if "FINISHED" not in statuses:
        counts = ", ".join(f"{n} {status}" for status, n in statuses.items())
        return head + f"none of its {len(models)} model runs finished ({counts}); see their logs, then train again"
    return head + ("no finished model run with val_rmse and a logged model"
                   + (f" ({what})" if what else "") + f"; it has {int(statuses['FINISHED'])} finished model run(s)")


def given_run(client: MlflowClient, run_id: str):
    """The run ``run_id`` if it is a candidate: FINISHED, with a READY logged model; ``DataError`` otherwise."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(f"run_id={run_id!r}: no such run ({exc.message})") from None
    status = run.info.status
    if status != "FINISHED":
        reason = run.data.tags.get("smp.end_reason")
        raise DataError(f"run {run_id} is {status}, not FINISHED: only a finished run's model can be promoted (a "
                        f"run that failed or was stopped may have logged an incomplete model)"
                        + (f"; it ended with: {reason[:300]}" if reason else ""))
    if not has_logged_model(run_id):
        raise DataError(f"run {run_id} has no logged model 'model' to register")
    problem = model_problem(client, run_id)
    if problem:
        raise DataError(f"run {run_id}: {problem}; only a READY model can be promoted")
    return run


def has_logged_model(run_id: str) -> bool:
    """True when the run logged a model (``tracking.logged_model_uri``)."""
    return logged_model_uri(run_id) is not None


def model_problem(client: MlflowClient, run_id: str) -> str:
    """Why the model ``run_id`` logged cannot be a candidate ("" when it can): MLflow 3 records a logged model's
    status, READY once its upload completed (PENDING or FAILED when it was cut short)."""
    uri = logged_model_uri(run_id)
    if uri is None:
        return "no logged model"
    if not uri.startswith("models:/"):
        return ""  # an older layout (runs:/.../model) has no status to check
    model_id = uri.split("/", 1)[1]
    try:
        status = client.get_logged_model(model_id).status
    except MlflowException as exc:
        return f"its logged model {model_id} cannot be read ({exc.message})"
    name = getattr(status, "name", str(status))
    if name != "READY":
        return f"its logged model {model_id} is {name}, not READY (its upload did not complete)"
    return ""


def versions_of_run(client: MlflowClient, name: str, run_id: str) -> list:
    """Versions of ``name`` registered from ``run_id``, lowest first."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return sorted(found, key=lambda v: int(v.version))


def register_run(client: MlflowClient, name: str, run_id: str) -> tuple[object, bool]:
    """The version of ``name`` for ``run_id``'s model, registered now only if none exists; ``(version, created)``.

    Two promoters racing on the same run may both register; each re-checks
    afterwards, keeps the lowest version and deletes the others, so one
    version survives and both return it.
    """
    existing = versions_of_run(client, name, run_id)
    if existing:
        return existing[0], False
    mine = mlflow.register_model(logged_model_uri(run_id), name)
    versions = versions_of_run(client, name, run_id) or [mine]
    for extra in versions[1:]:
        try:
            client.delete_model_version(name, extra.version)
            log.warning("%s: deleted duplicate version %s of run %s (kept %s)", name, extra.version, run_id,
                        versions[0].version)
        except MlflowException:
            pass  # the other promoter deleted it first
    keep = versions[0]
    return keep, int(keep.version) == int(mine.version)


def current_alias(client: MlflowClient, name: str, alias: str):
    """The model version behind ``name@alias``, or None when the alias (or the model) does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(client: MlflowClient, name: str, alias: str, version) -> None:
    """Point ``alias`` at ``version``; a new champion stops being the challenger."""
    upsert(client.set_registered_model_alias, name, alias, str(version))
    if alias == CHAMPION:
        challenger = current_alias(client, name, CHALLENGER)
        if challenger is not None and str(challenger.version) == str(version):
            client.delete_registered_model_alias(name, CHALLENGER)


# --------------------------------------------------------------------------- the promote lease
@dataclass
class Lease:
    """A held promote lease: its ticket and when the request that created it was sent (``time.monotonic``)."""

    model: str     # the lease's registered model (``M.promote-lease``)
    ticket: str    # our ticket, a version of it
    sent: float    # time.monotonic() when the ticket was asked for: the lease ends LEASE_S after this at the latest

    def left(self) -> float:
        """Seconds of the lease left (local clock, never more than the others allow it)."""
        return self.sent + LEASE_S - time.monotonic()

    def check(self, what: str) -> None:
        """``DataError`` (nothing more is written) unless at least ``LEASE_MARGIN_S`` of the lease is left."""
        if self.left() < LEASE_MARGIN_S:
            raise DataError(f"the promote lease on {self.model} ran short ({self.left():.0f} s left, at least "
                            f"{LEASE_MARGIN_S:.0f} s are needed) before {what}: the tracking server answers too "
                            f"slowly; nothing more was changed: run promote again")


def lease_model(client: MlflowClient, name: str) -> str:
    """The registered model whose versions are the promote tickets of ``name``, created (and described) if new."""
    lock = name + LEASE_SUFFIX
    try:
        client.create_registered_model(lock, description=(
            f"Not a model: the promote lease of `{name}` (smp.registry). Each version is an `smp promote` that "
            f"holds or waits for the right to move `{name}`'s aliases, deleted when it is done; tags say whose. "
            f"A version older than {LEASE_S:.0f} s is ignored (its promoter was killed)."))
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
            raise
    return lock


def _drop_ticket(client: MlflowClient, lock: str, version: str) -> None:
    try:
        client.delete_model_version(lock, version)
    except MlflowException as exc:  # gone already (cleaned up as expired), or the store is away: it expires
        log.debug("ticket %s/%s not deleted: %s", lock, version, exc)


@contextlib.contextmanager
def promote_lease(client: MlflowClient, name: str, who: str):
    """Hold the promote lease of registered model ``name`` for the ``with`` block (the module docstring says why
    it is exclusive); ``DataError`` after ``LEASE_WAIT_S`` s of waiting, naming the holder."""
    lock = lease_model(client, name)
    tags = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": str(os.getpid()), "promoting": who[:200]}
    give_up = time.monotonic() + LEASE_WAIT_S
    while True:
        sent = time.monotonic()
        mine = client.create_model_version(lock, LEASE_SOURCE, tags=tags, description=f"promote lease: {who}")
        answered = time.monotonic()
        ticket, created_s = str(mine.version), mine.creation_timestamp / 1000
        try:
            if _wait_for_turn(client, name, lock, ticket, tags["owner"], created_s, sent, answered, give_up):
                yield Lease(lock, ticket, sent)
                return
        finally:
            _drop_ticket(client, lock, ticket)
        log.info("%s: promote ticket v%s waited too long to be used; taking a new one", name, ticket)


def _wait_for_turn(client: MlflowClient, name: str, lock: str, ticket: str, owner: str, created_s: float,
                   sent: float, answered: float, give_up: float) -> bool:
    """Wait until ``ticket`` is the lowest live ticket (True), or until too little of it would be left or it was
    removed as expired (False: take a new one); ``DataError`` past ``give_up``."""
    while True:
        tickets = client.search_model_versions(f"name = '{lock}'")
        if ticket not in {str(t.version) for t in tickets}:
            return False  # removed as expired by another promoter (we were that slow)
        server_now = created_s + (time.monotonic() - answered)  # never ahead of the server's clock
        live = []
        for t in tickets:
            if str(t.version) == ticket:
                live.append(t)
            elif (t.tags or {}).get("owner") == owner:  # ours, from a request the client sent again: unused
                _drop_ticket(client, lock, str(t.version))
            elif server_now - t.creation_timestamp / 1000 < LEASE_S:
                live.append(t)
            else:  # expired: its promoter has stopped (module docstring, 3), and numbers are never reused
                log.warning("%s: promote ticket v%s (%s) expired: its promoter stopped without releasing it; "
                            "removed", name, t.version, _ticket_owner(t))
                _drop_ticket(client, lock, str(t.version))
        if time.monotonic() - sent > LEASE_S - LEASE_MARGIN_S:
            return False  # too little of our ticket would be left
        holder = min(live, key=lambda t: int(t.version))
        if str(holder.version) == ticket:
            return True
        if time.monotonic() > give_up:
            raise DataError(f"{name}: waited {LEASE_WAIT_S:.0f} s for the promote lease, held by "
                            f"{_ticket_owner(holder)} (ticket v{holder.version} of {lock}); nothing was changed: "
                            f"run promote again")
        time.sleep(LEASE_POLL_S * (1 + random.random() / 2))


def _ticket_owner(t) -> str:
    tags = t.tags or {}
    return f"{tags.get('promoting', '?')} on {tags.get('host', '?')}, pid {tags.get('pid', '?')}"


# --------------------------------------------------------------------------- comparing on the same test posts
def split_cfg(params: dict) -> SplitCfg:
    """The ``SplitCfg`` a run was trained with, from its logged params."""
    d = SplitCfg()
    return SplitCfg(sample_size=int(float(params.get("sample_size", d.sample_size))),
                    split=params.get("split", d.split), seed=int(float(params.get("seed", d.seed))),
                    val_frac=float(params.get("val_frac", d.val_frac)),
                    test_frac=float(params.get("test_frac", d.test_frac)))


def refused(cand_run, reason: str) -> Comparison:
    """No fair comparison is possible: the candidate becomes ``@challenger`` and ``reason`` says why."""
    return Comparison(cand_run.data.metrics.get("test_rmse", math.nan), math.nan, "refused", 0, reason)


UNREACHABLE = ("Max retries exceeded", "Connection refused", "Connection aborted", "Read timed out",
               "timed out", "Name or service not known", "Temporary failure in name resolution")


def unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a store that does not answer, rather than a broken model."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in (
                "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "MaxRetryError", "NewConnectionError"):
            return True
        if any(m in str(exc) for m in UNREACHABLE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


MISSING = ("No such artifact", "No such file", 'Could not find an "MLmodel"')  # a model whose files are gone


def load_version(name: str, version):
    """The pyfunc of ``name`` version ``version``: ``(model, "")``, or ``(None, why)`` when it cannot be loaded
    (artifacts gone, truncated, unreadable).  A failure that looks like a store not answering is tried once more
    after the registry has answered for the version; ``DataError`` if it does not answer (nothing is judged on
    an outage)."""
    for attempt in (1, 2):
        try:
            return mlflow.pyfunc.load_model(f"models:/{name}/{version}"), ""
        except Exception as exc:  # noqa: BLE001 - any failure to load is the reason recorded
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
            if isinstance(exc, FileNotFoundError) or any(m in str(exc) for m in MISSING):
                why = f"its artifacts are missing from {_download_uri(name, version)}; {why}"
            log.debug("%s v%s cannot be loaded (attempt %d)", name, version, attempt, exc_info=True)
            if not unreachable(exc) or attempt == 2:
                return None, why
            try:
                MlflowClient().get_model_version(name, str(version))
            except Exception as again:  # noqa: BLE001 - the registry does not answer either
                raise DataError(f"{name} v{version} could not be loaded: the tracking server did not answer "
                                f"({type(again).__name__}: {str(again)[:300]}); nothing was changed") from None
    return None, why


def _download_uri(name: str, version) -> str:
    try:
        return MlflowClient().get_model_version_download_uri(name, str(version))
    except Exception:  # noqa: BLE001 - only a detail of a message
        return "their location"


def check_candidate(cand_run, name: str, version) -> Check:
    """Load the candidate's version and score it on its own test posts (its run's split, rebuilt): rejected
    (``problem``) when it cannot be loaded, fails, predicts a non-finite value or does not beat the mean predictor;
    unchecked when its posts cannot be rebuilt."""
    try:
        prep = prepared_for(cand_run)
    except (DataError, OSError) as exc:
        return Check(unchecked=str(exc))
    rows, y = prep.rows("test").drop(columns=["label"]), prep.y("test")
    baseline = baseline_metrics(prep.y("train"), y, "test")["test_rmse_baseline"]
    try:
        inputs = model_rows(rows, cand_run)
    except (DataError, OSError, MlflowException) as exc:
        if unreachable(exc):
            raise DataError(f"the inputs of run {cand_run.info.run_id} could not be read: the store did not answer "
                            f"({exc}); nothing was changed") from None
        return Check(baseline=baseline, unchecked=f"its test posts' inputs cannot be rebuilt: {exc}")
    model, why = load_version(name, version)
    if model is None:
        return Check(baseline=baseline, problem=f"its model cannot be loaded ({why})")
    try:
        pred = np.asarray(predict_frame(model, model_input(model, inputs)), dtype=float).reshape(-1)
    except Exception as exc:  # noqa: BLE001 - recorded as the reason it is rejected
        if unreachable(exc):
            raise DataError(f"v{version} could not be scored: the store did not answer ({exc})") from None
        log.debug("v%s could not predict its own test posts", version, exc_info=True)
        return Check(baseline=baseline, problem=f"it failed to predict its own test posts ({type(exc).__name__}: "
                                                f"{str(exc)[:300]})")
    bad = int((~np.isfinite(pred)).sum()) if len(pred) == len(y) else -1
    if bad:
        what = (f"{bad} of its {len(y)} predictions on its own test posts are not finite" if bad > 0 else
                f"it returned {len(pred)} predictions for its {len(y)} test posts")
        return Check(baseline=baseline, problem=what)
    rmse = regression_metrics(y, pred, "test")["test_rmse"]
    check = Check(rmse, baseline, rows=rows, y=y, pred=pred)
    if not rmse < baseline:
        check.problem = (f"its test RMSE on its own {len(y)} test posts, {_num(rmse)}, does not beat the mean "
                         f"predictor's {_num(baseline)} (it learnt nothing usable)")
    return check


def judge(client: MlflowClient, cfg: PromoteJob, cand_run, version, check: Check, champ) -> tuple[Comparison, str]:
    """What the candidate's version should become against ``champ`` (the champion read now, or None): its
    ``Comparison`` and decision (``champion``, ``challenger`` or ``rejected``). Reads and scores only."""
    if check.problem:
        held = (f"; it still holds `@{CHAMPION}` until a candidate that passes this check replaces it"
                if champ is not None and str(champ.version) == str(version) else "")
        return Comparison(check.rmse, math.nan, "rejected", 0, check.problem + held), REJECTED
    if check.unchecked:
        return refused(cand_run, check.unchecked), CHALLENGER
    if champ is None:
        return Comparison(check.rmse, math.nan, "first", 0, "there was no champion"), CHAMPION
    if str(champ.version) == str(version):
        return Comparison(check.rmse, check.rmse, "unchanged", 0, "already the champion"), CHAMPION
    model, why = load_version(cfg.model_name, champ.version)
    if model is None:
        return Comparison(check.rmse, math.nan, "champion_unloadable", 0,
                          f"champion v{champ.version} can no longer be loaded ({why})"), CHAMPION
    comp = compare(check, cand_run, client.get_run(champ.run_id), model, champ.version)
    wins = comp.method == "same_rows" and comp.candidate_rmse < comp.champion_rmse - cfg.margin
    return comp, CHAMPION if wins else CHALLENGER


def compare(check: Check, cand_run, champ_run, champ_model, champ_version) -> Comparison:
    """Test RMSE of the candidate (its checked predictions) and the champion on the same posts, unseen by both in
    training; or a refusal.

    The posts are the candidate's test split, less every post the champion trained or early-stopped on
    (``eval_mask``). Logged test RMSEs are never compared: two runs' test splits are different posts.
    """
    try:
        keep, where = eval_mask(check.rows, cand_run, champ_run)
    except (DataError, OSError) as exc:
        return refused(cand_run, str(exc))
    if keep.sum() < MIN_SHARED_TEST_ROWS:
        return refused(cand_run, f"only {int(keep.sum())} of the candidate's test posts are unseen by both models "
                                 f"(at least {MIN_SHARED_TEST_ROWS} are needed to compare them)")
    rows, y = check.rows.loc[keep].reset_index(drop=True), check.y[keep]
    try:
        pred = np.asarray(predict_frame(champ_model, model_input(champ_model, model_rows(rows, champ_run))),
                          dtype=float)
    except DataError as exc:
        return refused(cand_run, f"v{champ_version} cannot be scored fairly on those posts: {exc}")
    except Exception as exc:  # noqa: BLE001 - recorded in the description and as the refusal reason
        if unreachable(exc):
            raise DataError(f"champion v{champ_version} could not be scored: the store did not answer ({exc})") \
                from None
        log.exception("v%s could not predict the shared test posts", champ_version)
        return refused(cand_run, f"v{champ_version} could not predict the shared test posts ({type(exc).__name__}: "
                                 f"{exc})")
    champ_rmse = regression_metrics(y, pred, "test")["test_rmse"] if np.isfinite(pred).all() else math.nan
    if not np.isfinite(champ_rmse):
        return refused(cand_run, f"v{champ_version} predicted non-finite values on the shared test posts")
    cand_rmse = regression_metrics(y, check.pred[keep], "test")["test_rmse"]
    return Comparison(cand_rmse, champ_rmse, "same_rows", int(keep.sum()),
                      f"both models predicted the same {int(keep.sum())} posts ({where})")


def prepared_for(run) -> Prepared:
    """A run's labelled posts and split rebuilt from its params; ``DataError`` if its data changed or is gone."""
    params = run.data.params
    source = DataCfg(data=params.get("data", DataCfg.data), images=params.get("images", ""))
    try:
        prep = prepare(source, split_cfg(params))
    except (DataError, OSError) as exc:
        raise DataError(f"the data of run {run.info.run_id} ({source.data}) cannot be read again: {exc}") from None
    logged = run.data.tags.get("smp.data_hash")
    if prep.digest != logged:
        raise DataError(f"{source.data} has changed since run {run.info.run_id} was trained "
                        f"(data hash {prep.digest}, the run has {logged})")
    return prep


def eval_mask(rows: pd.DataFrame, cand_run, champ_run) -> tuple[np.ndarray, str]:
    """Which of the candidate's test posts ``rows`` to score both models on (a boolean mask) and a description:
    all of them, less the posts in the champion's train and validation splits (its own data, rebuilt from its
    params)."""
    same_data = cand_run.data.tags.get("smp.data_hash") == champ_run.data.tags.get("smp.data_hash")
    if same_data and split_cfg(cand_run.data.params) == split_cfg(champ_run.data.params):
        return np.ones(len(rows), dtype=bool), "the candidate's test split, also the champion's"
    try:
        champ = prepared_for(champ_run)
    except DataError as exc:
        raise DataError(f"it cannot be checked which of the candidate's test posts the champion trained on ({exc})") \
            from None
    seen = pd.concat([champ.rows("train")["Pid"], champ.rows("val")["Pid"]])
    keep = ~rows["Pid"].isin(seen).to_numpy()
    what = "the same data split differently" if same_data else "other data"
    where = (f"the candidate's test split less the {int((~keep).sum())} posts the champion trained on; the champion "
             f"was trained on {what}")
    return keep, where


def model_rows(rows: pd.DataFrame, run) -> pd.DataFrame:
    """The rows a run's model predicts from: raw fields plus, for image models, the image features of its embed
    run; when that run lacks some of the posts (other data), the model computes them from ``image_path``."""
    embed_run = run.data.tags.get("smp.embed_run")
    if not embed_run:
        return rows
    from smp.models import image_columns

    path = mlflow.artifacts.download_artifacts(run_id=embed_run, artifact_path="features.parquet")
    feats = pd.read_parquet(path)
    feats["Pid"] = feats["Pid"].astype(str)
    if rows["Pid"].isin(feats["Pid"]).all():
        cols = [c for c in image_columns(feats) if c not in rows.columns]
        merged = rows.merge(feats[["Pid", *cols]], on="Pid", how="left", validate="one_to_one")
        return merged.drop(columns=[c for c in ("image_path",) if c in merged.columns])
    has_image = rows["image_path"].notna() if "image_path" in rows.columns else pd.Series(False, index=rows.index)
    if not has_image.any():
        raise DataError("it reads images and these posts have none (no image_path)")
    return rows


# --------------------------------------------------------------------------- recording the decision
MODEL_DESCRIPTION = (
    "Predicts a Flickr post's popularity score (SMP Challenge 2019, log-scaled views) from its raw SMPD "
    "fields; image models also read the image (`image_b64` or `image_path`). Aliases: `champion` is served, "
    "`challenger` is the latest candidate that did not beat it on the same test posts. A version tagged "
    "`decision=rejected` holds no alias: it failed the check every candidate passes first (loaded and scored on "
    "its own test posts, better than the mean predictor). Each version's description and tags say how it was "
    "checked and compared. Input schema: the model version's page; request format: "
    "`mlflow models serve -m models:/smp-popularity@champion`.")


def describe_model(client: MlflowClient, name: str) -> None:
    """Describe the registered model once (a description someone wrote is kept)."""
    try:
        if not (client.get_registered_model(name).description or "").strip():
            client.update_registered_model(name, description=MODEL_DESCRIPTION)
    except MlflowException as exc:
        log.debug("registered model %s not described: %s", name, exc)


def set_version_tag(client: MlflowClient, name: str, version: str, key: str, value: str, attempts: int = 4) -> None:
    """``set_model_version_tag``, safe when two promotes tag the same version at once."""
    upsert(client.set_model_version_tag, name, version, key, value, attempts=attempts)


def apply_decision(client: MlflowClient, cfg: PromoteJob, cand_run, version, champ, comp: Comparison,
                   decision: str, ranking: Ranking, check: Check, lease: Lease) -> None:
    """Under the promote lease, with ``champ`` still the champion: move the aliases, then write the decision on
    the versions (this one's tags and description; ``replaced_by`` on a champion it replaced)."""
    name, version = cfg.model_name, str(version)
    if comp.method == "unchanged":  # a champion promoted again keeps the record of how it won
        return
    lease.check(f"moving {name}'s aliases")
    if decision == REJECTED:
        challenger = current_alias(client, name, CHALLENGER)
        if challenger is not None and str(challenger.version) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
        if champ is not None and str(champ.version) == version:
            log.error("%s v%s holds @champion but fails its own check (%s); no alias was moved: promote a valid "
                      "run to replace it", name, version, comp.note)
    else:
        set_alias(client, name, decision, version)
        if decision == CHAMPION and champ is not None:
            set_version_tag(client, name, str(champ.version), "replaced_by", version)
            if comp.method == "champion_unloadable":
                set_version_tag(client, name, str(champ.version), "unloadable_because", comp.note[:500])
    record(client, cfg, cand_run, version, champ, comp, decision, ranking, check)


OPTIONAL_TAGS = ("compared_against_version", "eval_rows", "champion_test_rmse", "candidate_test_rmse", "check",
                 "check_test_rmse", "check_mean_predictor_rmse", *BECAUSE.values())  # written only when they apply


def record(client: MlflowClient, cfg: PromoteJob, cand_run, version, champ, comp: Comparison,
           decision: str, ranking: Ranking | None = None, check: Check | None = None) -> None:
    """Keep the check and the comparison on the candidate's model version: tags and a description
    (``version_description``)."""
    tags = cand_run.data.tags
    rmse = lambda v: "nan" if not np.isfinite(v) else f"{v:.4f}"  # noqa: E731
    version_tags = {"decision": decision, "comparison": comp.method, "margin": str(cfg.margin),
                    "family": tags.get("smp.model", ""), "split": tags.get("smp.split", ""),
                    "data_hash": tags.get("smp.data_hash", ""), "candidate_test_rmse": rmse(comp.candidate_rmse)}
    if check is not None:
        version_tags.update({"check": check_state(check), "check_test_rmse": rmse(check.rmse),
                             "check_mean_predictor_rmse": rmse(check.baseline)})
    if champ is not None and comp.method != "rejected":  # only what was compared: a first promotion names none
        version_tags.update({"compared_against_version": str(champ.version), "eval_rows": str(comp.rows),
                             "champion_test_rmse": rmse(comp.champion_rmse)})
    if comp.method in BECAUSE:
        version_tags[BECAUSE[comp.method]] = comp.note[:500]
    written = {k: v for k, v in version_tags.items() if v not in ("", "nan")}
    # what an earlier promote of this version left and is no longer true (a replaced champion that lost again
    # stays replaced; one that passes its check now can be loaded)
    stale = [k for k in OPTIONAL_TAGS if k not in written]
    stale += (["replaced_by"] if decision == CHAMPION else []) + (["unloadable_because"] if check and check.passed
                                                                   else [])
    for key, value in written.items():
        set_version_tag(client, cfg.model_name, str(version), key, value)
    current = client.get_model_version(cfg.model_name, str(version)).tags
    for key in stale:
        if key in current:
            client.delete_model_version_tag(cfg.model_name, str(version), key)
    describe_model(client, cfg.model_name)
    champ_run = client.get_run(champ.run_id) if champ is not None else None
    text = version_description(cfg, cand_run, champ, champ_run, comp, decision, ranking, check)
    client.update_model_version(cfg.model_name, str(version), description=text)


def _num(value) -> str:
    """A figure in a description: 4 significant digits, ``n/a`` when missing."""
    return sig(value) if value is not None and np.isfinite(value) else "n/a"


def _run_label(run) -> str:
    return f"{run.info.run_name or run.info.run_id} (`{run.info.run_id[:8]}`)"


def ranking_list(ranking: Ranking, cand_id: str, champ_id: str | None = None, rows: int = RANKING_ROWS) -> str:
    """The candidates as a Markdown list, best ``val_rmse`` first: the first ``rows``, plus the candidate and the
    champion wherever they rank; the rest counted."""
    runs = ranking.runs
    show = [i for i, r in enumerate(runs) if i < rows or r.info.run_id in (cand_id, champ_id)]
    lines = []
    for i in show:
        r = runs[i]
        mark = ("this version" if r.info.run_id == cand_id else "the champion" if r.info.run_id == champ_id
                else f"{ranking.skipped[r.info.run_id]}: skipped" if r.info.run_id in ranking.skipped else "")
        lines.append(f"- #{i + 1}: val RMSE {_num(r.data.metrics.get('val_rmse'))}, "
                     f"{r.data.tags.get('smp.model', '?')}, split {r.data.tags.get('smp.split', '?')}, "
                     f"run {_run_label(r)}" + (f" **← {mark}**" if mark else ""))
    hidden = [runs[i] for i in range(len(runs)) if i not in show]
    if hidden:
        vals = [r.data.metrics["val_rmse"] for r in hidden]
        lines.append(f"- and {len(hidden)} more (val RMSE {_num(min(vals))} to {_num(max(vals))})")
    return "\n".join(lines)


def version_description(cfg: PromoteJob, cand_run, champ, champ_run, comp: Comparison, decision: str,
                        ranking: Ranking | None = None, check: Check | None = None) -> str:
    """A model version's description (Markdown): what it is, the ranking it was chosen from (candidates, their
    val RMSE, the rule), its own check, and how it fared against the champion; numbers to 4 significant digits."""
    tags = cand_run.data.tags
    cand_id = cand_run.info.run_id
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"**{tags.get('smp.model', '?')}** model from run {_run_label(cand_run)}: split "
             f"{tags.get('smp.split', '?')}, data {tags.get('smp.data_hash', '?')}, "
             f"val RMSE {_num(cand_run.data.metrics.get('val_rmse'))}, "
             f"logged test RMSE {_num(cand_run.data.metrics.get('test_rmse'))}. Full id: `{cand_id}`."]
    if ranking is not None:
        runs = ranking.runs
        rank = next((i + 1 for i, r in enumerate(runs) if r.info.run_id == cand_id), None)
        pool = f"the {len(runs)} {ranking.pool}"
        if ranking.given:
            why = (f"given as `run_id`, not searched for; by val RMSE it ranks {rank} of {pool}" if rank
                   else f"given as `run_id`, not searched for; it is not one of {pool}")
        else:
            above = [ranking.skipped.get(r.info.run_id, "") for r in runs[:rank - 1]] if rank else []
            none = "logged none" if set(above) <= {"no logged model"} else "had no READY logged model"
            why = f"the lowest val RMSE among {pool} that logged a model" + (
                f" (the {rank - 1} ranked above it {none})" if rank and rank > 1 else "")
        parts.append(f"**Why this run**: {why}.\n\n"
                     + ranking_list(ranking, cand_id, champ_run.info.run_id if champ_run else None))
    if check is not None:
        parts.append(f"**Check**: {check.text()}")
    decided = decision_text(cfg, champ, champ_run, comp, decision)
    parts += [f"**Decision**: {decided}",
              f"**Rule**: the run chosen above becomes `@{CHAMPION}` only when its RMSE on test posts unseen by both "
              f"models beats the champion's by more than the margin ({_num(cfg.margin)}); otherwise "
              f"`@{CHALLENGER}`. Logged test RMSEs of two runs are never compared (they are on different posts). "
              f"First, before any alias moves, it is loaded and scored on its own test posts: it is rejected (no "
              f"alias) when that fails or when it does not beat the mean predictor there, and `@{CHALLENGER}` when "
              f"its posts cannot be rebuilt. A champion that can no longer be loaded loses to any candidate that "
              f"passed this check.",
              f"Promoted {when}."]
    return "\n\n".join(parts)


def decision_text(cfg: PromoteJob, champ, champ_run, comp: Comparison, decision: str) -> str:
    """The decision in a sentence or two: the alias taken (or none) and the check or comparison behind it."""
    if comp.method == "rejected":
        return (f"**rejected**, it takes no alias: it fails the check every candidate passes before an alias moves: "
                f"{comp.note.rstrip('.')}.")
    if champ is None:
        decided = ("there was no champion to compare with" if comp.method != "refused" else
                   f"there is no champion, but it could not be checked, so it cannot take `{CHAMPION}`: {comp.note}")
    else:
        if comp.method == "refused":
            decided = f"not compared with champion v{champ.version}, so it cannot take `{CHAMPION}`: {comp.note}"
        elif comp.method == "champion_unloadable":
            decided = (f"{comp.note}, so it loses to this version, which passed its own check (test RMSE "
                       f"{_num(comp.candidate_rmse)} on its own test posts)")
        else:
            verb = "beats" if decision == CHAMPION else "does not beat"
            decided = (f"test RMSE {_num(comp.candidate_rmse)} {verb} champion v{champ.version}'s "
                       f"{_num(comp.champion_rmse)} by more than the margin {_num(cfg.margin)}; {comp.note}")
        if champ_run is not None:
            decided = (f"{decided.rstrip('.')}. Champion v{champ.version} is run {_run_label(champ_run)}, val RMSE "
                       f"{_num(champ_run.data.metrics.get('val_rmse'))}")
    return f"`@{decision}`: {decided.rstrip('.')}."


def promote_note(cfg: PromoteJob, cand_run, version, champ, champ_run, comp: Comparison, decision: str,
                 rounds: int = 1) -> str:
    """The ``promote`` run's description: which run became which version and alias, and why in one sentence
    (the version's description has the ranking and the rule)."""
    decided = "already the champion." if comp.method == "unchanged" else decision_text(
        cfg, champ, champ_run, comp, decision)
    again = (f" It was compared {rounds} times: other promotes changed the champion while it was being compared."
             if rounds > 1 else "")
    return (f"promote: run {_run_label(cand_run)} (val RMSE {_num(cand_run.data.metrics.get('val_rmse'))}) is "
            f"{cfg.model_name} v{version}, {decided}{again} The version's description lists the runs it was "
            f"ranked against and the rule.")


PROMOTE = Job("promote", "register the best run; alias champion only if it beats the current champion", run_promote,
              PromoteJob)
