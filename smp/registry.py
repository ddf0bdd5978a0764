"""Stage 7: the best model run -> a registered model version -> the ``@champion`` alias.

``run_promote`` picks the best finished model run by ``val_rmse`` (or the run
it is given), registers its logged model once (a second promote of the same
run reuses its version), and compares it with the current ``@champion`` on the
same posts: both pyfunc models predict the candidate's test split, less every
post the champion trained or early-stopped on (the champion's own split of its
own data, rebuilt from its run's params; the models read raw rows, so a
champion trained on other data is scored the same way).  The candidate takes
``@champion`` only when its RMSE on those posts beats the champion's by more
than ``margin``.  When no fair comparison is possible (either run's data can
no longer be read or has changed, fewer than ``MIN_SHARED_TEST_ROWS`` posts
are unseen by both, an image model meets posts without images) the candidate
is refused the title: it becomes ``@challenger`` and the reason is recorded.
Logged test RMSEs of two runs are never compared: they are figures on
different posts.  The comparison is kept as model-version tags and a
description (the ranking the candidate was chosen from, with each run's val
RMSE, the champion's figures and the rule; numbers to 4 significant digits),
and the decision as a ``promote`` run.  Aliases only, no stages.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from smp.data import DataCfg, DataError
from smp.evaluate import regression_metrics
from smp.serving import model_input, predict_frame
from smp.splits import MIN_SPLIT_ROWS, Prepared, SplitCfg, prepare
from smp.config import ConfigError, flatten
from smp.jobs import FAMILIES
from smp.tracking import NOTE, job_run, logged_model_uri, sig, upsert

log = logging.getLogger("smp.registry")

CHAMPION, CHALLENGER = "champion", "challenger"
MIN_SHARED_TEST_ROWS = MIN_SPLIT_ROWS  # fewer posts unseen by both models: no comparison (the test split's minimum)
RANKING_ROWS = 5  # candidates listed by name in a version's description (the rest are counted)


@dataclass(frozen=True)
class PromoteJob:
    model_name: str = "smp-popularity"  # registered model name
    family: str = ""       # only runs of this model family ("" = any of smp.jobs.FAMILIES)
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
    skipped: set = field(default_factory=set)  # run ids passed over because they have no logged model


@dataclass
class Comparison:
    """Candidate vs champion test RMSE and how they were obtained."""

    candidate_rmse: float
    champion_rmse: float
    method: str   # "same_rows" (both models predicted the same posts), "refused" (no fair comparison: the note
    #               says why), "first" (there was no champion) or "unchanged" (already the champion)
    rows: int     # posts both models predicted (0 unless same_rows)
    note: str     # one sentence for the description


def run_promote(cfg: PromoteJob = PromoteJob()) -> dict[str, float]:
    """Register the best (or given) model run and move ``@champion`` if it beats the champion; return the outcome."""
    if cfg.family and cfg.family not in FAMILIES:
        raise ConfigError(f"family={cfg.family!r}: expected one of {FAMILIES} or ''")
    with job_run("promote", cfg.experiment, flatten(cfg), {"smp.registered_model": cfg.model_name}) as run:
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
        champ = current_alias(client, cfg.model_name, CHAMPION)
        cand_logged = cand_run.data.metrics.get("test_rmse", math.nan)
        if champ is None:
            comp, decision = Comparison(cand_logged, math.nan, "first", 0, "there was no champion"), CHAMPION
        elif str(champ.version) == str(version.version):
            comp, decision = Comparison(cand_logged, cand_logged, "unchanged", 0, "already the champion"), CHAMPION
        else:
            comp = compare(cand_run, client.get_run(champ.run_id), cfg.model_name, version.version, champ.version)
            wins = comp.method == "same_rows" and comp.candidate_rmse < comp.champion_rmse - cfg.margin
            decision = CHAMPION if wins else CHALLENGER
        if comp.method != "unchanged":  # a champion promoted again keeps the record of how it won
            set_alias(client, cfg.model_name, decision, version.version)
            record(client, cfg, cand_run, version.version, champ, comp, decision, ranking)
        outcome = {"version": int(version.version), "new_version": bool(created), "champion": decision == CHAMPION,
                   "candidate_test_rmse": comp.candidate_rmse, "champion_test_rmse": comp.champion_rmse,
                   "eval_rows": comp.rows}
        # not a training run: the decision is recorded as tags (and on the model version), never as metrics
        decision_tags = {"smp.decision": decision, "smp.candidate_run": cand_id,
                         "smp.registered_version": str(version.version), "smp.comparison": comp.method,
                         "mlflow.runName": f"promote · {cfg.model_name} v{version.version} → {decision}"}
        if champ is not None:
            decision_tags["smp.compared_against_version"] = str(champ.version)
        if comp.method == "refused":
            decision_tags["smp.refused_because"] = comp.note[:500]
        champ_run = client.get_run(champ.run_id) if champ is not None else None
        decision_tags[NOTE] = promote_note(cfg, cand_run, version.version, champ, champ_run, comp, decision)
        mlflow.set_tags(decision_tags)
    log.info("%s v%s (run %s) -> @%s: %s", cfg.model_name, version.version, cand_id, decision, comp.note)
    return outcome


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
    """The best run of ``ranking`` that has a logged model (the others are noted as skipped); ``DataError`` if
    none has."""
    for r in ranking.runs:
        if has_logged_model(r.info.run_id):
            return r
        ranking.skipped.add(r.info.run_id)
        log.warning("run %s (val_rmse %.4f) has no logged model; skipped", r.info.run_id, r.data.metrics["val_rmse"])
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
    """The run ``run_id`` if it exists and logged a model; ``DataError`` otherwise."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(f"run_id={run_id!r}: no such run ({exc.message})") from None
    if not has_logged_model(run_id):
        raise DataError(f"run {run_id} has no logged model 'model' to register")
    return run


def has_logged_model(run_id: str) -> bool:
    """True when the run logged a model (``tracking.logged_model_uri``)."""
    return logged_model_uri(run_id) is not None




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


def compare(cand_run, champ_run, name: str, cand_version, champ_version) -> Comparison:
    """Test RMSE of the candidate and the champion on the same posts, unseen by both in training; or a refusal.

    The posts are the candidate's test split, less every post the champion trained or early-stopped on
    (``eval_posts``). Logged test RMSEs are never compared: two runs' test splits are different posts.
    """
    try:
        rows, y, where = eval_posts(cand_run, champ_run)
    except (DataError, OSError) as exc:
        return refused(cand_run, str(exc))
    if len(rows) < MIN_SHARED_TEST_ROWS:
        return refused(cand_run, f"only {len(rows)} of the candidate's test posts are unseen by both models "
                                 f"(at least {MIN_SHARED_TEST_ROWS} are needed to compare them)")
    rmse = []
    for run, version in ((cand_run, cand_version), (champ_run, champ_version)):
        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
            pred = np.asarray(predict_frame(model, model_input(model, model_rows(rows, run))), dtype=float)
        except DataError as exc:
            return refused(cand_run, f"v{version} cannot be scored fairly on those posts: {exc}")
        except Exception as exc:  # noqa: BLE001 - recorded in the description and as the refusal reason
            log.exception("v%s could not predict the shared test posts", version)
            return refused(cand_run, f"v{version} could not predict the shared test posts ({type(exc).__name__}: "
                                     f"{exc})")
        rmse.append(regression_metrics(y, pred, "test")["test_rmse"])
    return Comparison(rmse[0], rmse[1], "same_rows", len(rows),
                      f"both models predicted the same {len(rows)} posts ({where})")


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


def eval_posts(cand_run, champ_run) -> tuple[pd.DataFrame, np.ndarray, str]:
    """Raw rows, labels and a description of the posts to score both models on: the candidate's test split
    minus the posts in the champion's train and validation splits (its own data, rebuilt from its params)."""
    cand = prepared_for(cand_run)
    rows, y = cand.rows("test"), cand.y("test")
    same_data = cand_run.data.tags.get("smp.data_hash") == champ_run.data.tags.get("smp.data_hash")
    if same_data and split_cfg(cand_run.data.params) == split_cfg(champ_run.data.params):
        return rows.drop(columns=["label"]), y, "the candidate's test split, also the champion's"
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
    return rows.loc[keep].drop(columns=["label"]).reset_index(drop=True), y[keep], where


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
    "`challenger` is the latest candidate that did not beat it on the same test posts. Each version's "
    "description and tags say how it was compared. Input schema: the model version's page; request format: "
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


def record(client: MlflowClient, cfg: PromoteJob, cand_run, version, champ, comp: Comparison,
           decision: str, ranking: Ranking | None = None) -> None:
    """Keep the comparison on the candidate's model version: tags and a description (``version_description``)."""
    tags = cand_run.data.tags
    rmse = lambda v: "nan" if not np.isfinite(v) else f"{v:.4f}"  # noqa: E731
    version_tags = {"decision": decision, "comparison": comp.method, "margin": str(cfg.margin),
                    "family": tags.get("smp.model", ""), "split": tags.get("smp.split", ""),
                    "data_hash": tags.get("smp.data_hash", ""), "candidate_test_rmse": rmse(comp.candidate_rmse)}
    if champ is not None:  # only what was compared: a first promotion has no champion to name
        version_tags.update({"compared_against_version": str(champ.version), "eval_rows": str(comp.rows),
                             "champion_test_rmse": rmse(comp.champion_rmse)})
    if comp.method == "refused":
        version_tags["refused_because"] = comp.note[:500]
    for key, value in version_tags.items():
        if value not in ("", "nan"):
            set_version_tag(client, cfg.model_name, str(version), key, value)
    describe_model(client, cfg.model_name)
    champ_run = client.get_run(champ.run_id) if champ is not None else None
    text = version_description(cfg, cand_run, champ, champ_run, comp, decision, ranking)
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
                else "no logged model: skipped" if r.info.run_id in ranking.skipped else "")
        lines.append(f"- #{i + 1}: val RMSE {_num(r.data.metrics.get('val_rmse'))}, "
                     f"{r.data.tags.get('smp.model', '?')}, split {r.data.tags.get('smp.split', '?')}, "
                     f"run {_run_label(r)}" + (f" **← {mark}**" if mark else ""))
    hidden = [runs[i] for i in range(len(runs)) if i not in show]
    if hidden:
        vals = [r.data.metrics["val_rmse"] for r in hidden]
        lines.append(f"- and {len(hidden)} more (val RMSE {_num(min(vals))} to {_num(max(vals))})")
    return "\n".join(lines)


def version_description(cfg: PromoteJob, cand_run, champ, champ_run, comp: Comparison, decision: str,
                        ranking: Ranking | None = None) -> str:
    """A model version's description (Markdown): what it is, the ranking it was chosen from (candidates, their
    val RMSE, the rule), and how it fared against the champion; numbers to 4 significant digits."""
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
            why = f"the lowest val RMSE among {pool} that logged a model" + (
                f" (the {rank - 1} ranked above it logged none)" if rank and rank > 1 else "")
        parts.append(f"**Why this run**: {why}.\n\n"
                     + ranking_list(ranking, cand_id, champ_run.info.run_id if champ_run else None))
    decided = decision_text(cfg, champ, champ_run, comp, decision)
    parts += [f"**Decision**: {decided}",
              f"**Rule**: the run chosen above becomes `@{CHAMPION}` only when its RMSE on test posts unseen by both "
              f"models beats the champion's by more than the margin ({_num(cfg.margin)}); otherwise "
              f"`@{CHALLENGER}`. Logged test RMSEs of two runs are never compared (they are on different posts).",
              f"Promoted {when}."]
    return "\n\n".join(parts)


def decision_text(cfg: PromoteJob, champ, champ_run, comp: Comparison, decision: str) -> str:
    """The decision in a sentence or two: the alias taken and the comparison with the champion behind it."""
    if champ is None:
        decided = "there was no champion to compare with"
    else:
        if comp.method == "refused":
            decided = f"not compared with champion v{champ.version}, so it cannot take `{CHAMPION}`: {comp.note}"
        else:
            verb = "beats" if decision == CHAMPION else "does not beat"
            decided = (f"test RMSE {_num(comp.candidate_rmse)} {verb} champion v{champ.version}'s "
                       f"{_num(comp.champion_rmse)} by more than the margin {_num(cfg.margin)}; {comp.note}")
        if champ_run is not None:
            decided = (f"{decided.rstrip('.')}. Champion v{champ.version} is run {_run_label(champ_run)}, val RMSE "
                       f"{_num(champ_run.data.metrics.get('val_rmse'))}")
    return f"`@{decision}`: {decided.rstrip('.')}."


def promote_note(cfg: PromoteJob, cand_run, version, champ, champ_run, comp: Comparison, decision: str) -> str:
    """The ``promote`` run's description: which run became which version and alias, and why in one sentence
    (the version's description has the ranking and the rule)."""
    decided = "already the champion." if comp.method == "unchanged" else decision_text(
        cfg, champ, champ_run, comp, decision)
    return (f"promote: run {_run_label(cand_run)} (val RMSE {_num(cand_run.data.metrics.get('val_rmse'))}) is "
            f"{cfg.model_name} v{version}, {decided} The version's description lists the runs it was ranked "
            f"against and the rule.")
