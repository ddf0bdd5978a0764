"""Stage 8: the best model run -> a registered model version -> the ``@champion`` alias.

``run_promote`` picks the best finished model run by ``val_rmse`` (or the run
it is given), registers its logged model once (a second promote of the same
run reuses its version), and compares it with the current ``@champion`` on the
same test posts: both pyfunc models predict the rows that neither trained on
(the candidate's test split, intersected with the champion's when the two runs
were split differently).  The candidate takes ``@champion`` only when its test
RMSE beats the champion's by more than ``margin``; otherwise it is
``@challenger``.  When the two runs were trained on different data (their
``smp.data_hash`` differ) or the data can no longer be read, the logged
``test_rmse`` values are compared instead and the description says so.  The
comparison is kept as model-version tags and a description, and the decision
as a ``promote`` run.  Aliases only, no stages.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from smp.data import DataCfg, DataError
from smp.evaluate import regression_metrics
from smp.serving import model_input, predict_frame
from smp.splits import SplitCfg
from smp.tracking import flat_params, job_run, logged_model_uri, upsert

log = logging.getLogger("smp.registry")

FAMILIES = ("benchmark", "pca_boost", "ensemble_mlp", "ensemble_conv1d")
CHAMPION, CHALLENGER = "champion", "challenger"
MIN_SHARED_TEST_ROWS = 30  # runs split differently sharing fewer unseen test posts: compare logged test_rmse


@dataclass(frozen=True)
class PromoteJob:
    model_name: str = "smp-popularity"  # registered model name
    family: str = ""       # only runs of this model family ("" = any of benchmark, pca_boost, ensemble_*)
    split: str = ""        # only runs with this split protocol ("" = any)
    margin: float = 0.0    # the candidate takes @champion only if its test RMSE < champion's - margin
    run_id: str = ""       # promote this run instead of searching for the best
    experiment: str = ""   # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)


@dataclass
class Comparison:
    """Candidate vs champion test RMSE and how they were obtained."""

    candidate_rmse: float
    champion_rmse: float
    method: str   # "same_rows" (both models predicted the same posts) or "logged_metrics"
    rows: int     # posts both models predicted (0 for logged_metrics)
    note: str     # one sentence for the description


def run_promote(cfg: PromoteJob = PromoteJob()) -> dict[str, float]:
    """Register the best (or given) model run and move ``@champion`` if it beats the champion; return the outcome."""
    if cfg.family and cfg.family not in FAMILIES:
        raise DataError(f"family={cfg.family!r}: expected one of {FAMILIES} or ''")
    with job_run("promote", cfg.experiment, flat_params(cfg), {"smp.registered_model": cfg.model_name}) as run:
        client = MlflowClient()  # job_run configured the tracking URI
        cand_run = given_run(client, cfg.run_id) if cfg.run_id else best_model_run(
            run.info.experiment_id, cfg.family, cfg.split)
        cand_id = cand_run.info.run_id
        version, created = register_run(client, cfg.model_name, cand_id)
        champ = current_alias(client, cfg.model_name, CHAMPION)
        cand_logged = cand_run.data.metrics.get("test_rmse", math.nan)
        if champ is None:
            comp, decision = Comparison(cand_logged, math.nan, "logged_metrics", 0, "there was no champion"), CHAMPION
        elif str(champ.version) == str(version.version):
            comp, decision = Comparison(cand_logged, cand_logged, "unchanged", 0, "already the champion"), CHAMPION
        else:
            comp = compare(cand_run, client.get_run(champ.run_id), cfg.model_name, version.version, champ.version)
            decision = CHAMPION if comp.candidate_rmse < comp.champion_rmse - cfg.margin else CHALLENGER
        if comp.method != "unchanged":  # a champion promoted again keeps the record of how it won
            set_alias(client, cfg.model_name, decision, version.version)
            record(client, cfg, cand_run, version.version, champ, comp, decision)
        outcome = {"version": int(version.version), "new_version": bool(created), "champion": decision == CHAMPION,
                   "candidate_test_rmse": comp.candidate_rmse, "champion_test_rmse": comp.champion_rmse,
                   "eval_rows": comp.rows}
        # not a training run: the decision is recorded as tags (and on the model version), never as metrics
        decision_tags = {"smp.decision": decision, "smp.candidate_run": cand_id,
                         "smp.registered_version": str(version.version), "smp.comparison": comp.method,
                         "mlflow.runName": f"promote · {cfg.model_name} v{version.version} → {decision}"}
        if champ is not None:
            decision_tags["smp.compared_against_version"] = str(champ.version)
        mlflow.set_tags(decision_tags)
    log.info("%s v%s (run %s) -> @%s: %s", cfg.model_name, version.version, cand_id, decision, comp.note)
    return outcome


# --------------------------------------------------------------------------- finding and registering
def best_model_run(experiment_id: str, family: str = "", split: str = ""):
    """The FINISHED model run with the lowest ``val_rmse`` that has a logged model; ``DataError`` if none."""
    filt = ["attributes.status = 'FINISHED'"]
    if family:
        filt.append(f"tags.`smp.model` = '{family}'")
    if split:
        filt.append(f"tags.`smp.split` = '{split}'")
    runs = mlflow.search_runs([experiment_id], filter_string=" and ".join(filt),
                              order_by=["metrics.val_rmse ASC", "attributes.start_time DESC"], output_format="list")
    for r in runs:
        val = r.data.metrics.get("val_rmse")
        if r.data.tags.get("smp.model") not in FAMILIES or val is None or not np.isfinite(val):
            continue
        if has_logged_model(r.info.run_id):
            return r
        log.warning("run %s (val_rmse %.4f) has no logged model; skipped", r.info.run_id, val)
    what = " and ".join(x for x in (f"family={family}" if family else "", f"split={split}" if split else "") if x)
    raise DataError(f"experiment {experiment_id}: no finished model run with val_rmse and a logged model"
                    + (f" ({what})" if what else ""))


def given_run(client: MlflowClient, run_id: str):
    """The run ``run_id`` if it exists and logged a model; ``DataError`` otherwise."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise DataError(f"run_id={run_id!r}: no such run ({exc.message})") from None
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


def compare(cand_run, champ_run, name: str, cand_version, champ_version) -> Comparison:
    """Test RMSE of the candidate and the champion on the same unseen posts (or their logged figures)."""
    cand_hash = cand_run.data.tags.get("smp.data_hash", "")
    champ_hash = champ_run.data.tags.get("smp.data_hash", "")
    logged = (cand_run.data.metrics.get("test_rmse", math.nan), champ_run.data.metrics.get("test_rmse", math.nan))
    if not cand_hash or cand_hash != champ_hash:
        return Comparison(*logged, "logged_metrics", 0,
                          f"the runs were trained on different data (data hash {cand_hash or '?'} vs "
                          f"{champ_hash or '?'}), so their logged test RMSEs (on different test posts) are compared")
    try:
        rows, y = shared_test_rows(cand_run, champ_run)
    except (DataError, OSError) as exc:
        return Comparison(*logged, "logged_metrics", 0,
                          f"the training data could not be read again ({exc}); logged test RMSEs compared")
    same = split_cfg(cand_run.data.params) == split_cfg(champ_run.data.params)
    if len(rows) == 0 or (not same and len(rows) < MIN_SHARED_TEST_ROWS):
        return Comparison(*logged, "logged_metrics", 0,
                          f"the runs were split differently and only {len(rows)} test posts are unseen by both "
                          "models, so their logged test RMSEs are compared")
    rmse = []
    for run, version in ((cand_run, cand_version), (champ_run, champ_version)):
        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
            pred = np.asarray(predict_frame(model, model_input(model, model_rows(rows, run))), dtype=float)
        except Exception as exc:  # noqa: BLE001 - recorded in the description; the logged figures decide
            log.exception("v%s could not predict the shared test posts", version)
            return Comparison(*logged, "logged_metrics", 0, f"v{version} could not predict the shared test posts "
                              f"({type(exc).__name__}: {exc}); logged test RMSEs compared")
        rmse.append(regression_metrics(y, pred, "test")["test_rmse"])
    where = "the candidate's test split" if same else "the posts in both runs' test splits"
    return Comparison(rmse[0], rmse[1], "same_rows", len(rows),
                      f"both models predicted the same {len(rows)} posts ({where})")


def shared_test_rows(cand_run, champ_run) -> tuple[pd.DataFrame, np.ndarray]:
    """Raw test rows (and labels) that neither run trained on: the candidate's test split, less any post
    that is not also in the champion's test split when the two were split differently."""
    from smp.train import prepare

    params = cand_run.data.params
    source = DataCfg(data=params.get("data", DataCfg.data), images=params.get("images", ""))
    prep = prepare(source, split_cfg(params))
    if prep.digest != cand_run.data.tags.get("smp.data_hash"):
        raise DataError(f"{source.data} has changed since run {cand_run.info.run_id} was trained "
                        f"(data hash {prep.digest}, run has {cand_run.data.tags.get('smp.data_hash')})")
    rows, y = prep.rows("test"), prep.y("test")
    champ_split = split_cfg(champ_run.data.params)
    if champ_split != split_cfg(params):
        other = prepare(source, champ_split)
        keep = rows["Pid"].isin(other.rows("test")["Pid"]).to_numpy()
        rows, y = rows.loc[keep].reset_index(drop=True), y[keep]
    return rows.drop(columns=["label"]), y


def model_rows(rows: pd.DataFrame, run) -> pd.DataFrame:
    """The rows a run's model predicts from: raw fields plus, for image models, its embed run's features."""
    embed_run = run.data.tags.get("smp.embed_run")
    if not embed_run:
        return rows
    from smp.models import image_columns

    path = mlflow.artifacts.download_artifacts(run_id=embed_run, artifact_path="features.parquet")
    feats = pd.read_parquet(path)
    feats["Pid"] = feats["Pid"].astype(str)
    cols = [c for c in image_columns(feats) if c not in rows.columns]
    merged = rows.merge(feats[["Pid", *cols]], on="Pid", how="left", validate="one_to_one")
    return merged.drop(columns=[c for c in ("image_path",) if c in merged.columns])


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
           decision: str) -> None:
    """Keep the comparison on the candidate's model version: tags and a description."""
    tags = cand_run.data.tags
    rmse = lambda v: "nan" if not np.isfinite(v) else f"{v:.4f}"  # noqa: E731
    version_tags = {"decision": decision, "comparison": comp.method, "margin": str(cfg.margin),
                    "family": tags.get("smp.model", ""), "split": tags.get("smp.split", ""),
                    "data_hash": tags.get("smp.data_hash", ""), "candidate_test_rmse": rmse(comp.candidate_rmse)}
    if champ is not None:  # only what was compared: a first promotion has no champion to name
        version_tags.update({"compared_against_version": str(champ.version), "eval_rows": str(comp.rows),
                             "champion_test_rmse": rmse(comp.champion_rmse)})
    for key, value in version_tags.items():
        if value not in ("", "nan"):
            set_version_tag(client, cfg.model_name, str(version), key, value)
    describe_model(client, cfg.model_name)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"{tags.get('smp.model', '?')} model from run {cand_run.info.run_id} "
            f"(split {tags.get('smp.split', '?')}, data {tags.get('smp.data_hash', '?')}, "
            f"val RMSE {rmse(cand_run.data.metrics.get('val_rmse', math.nan))}).")
    if champ is None:
        body = f"Alias `{CHAMPION}`: {comp.note} (logged test RMSE {rmse(comp.candidate_rmse)})."
    else:
        verb = "beats" if decision == CHAMPION else "does not beat"
        body = (f"Alias `{decision}`: test RMSE {rmse(comp.candidate_rmse)} {verb} champion v{champ.version}'s "
                f"{rmse(comp.champion_rmse)} by more than the margin {cfg.margin}; {comp.note}.")
    client.update_model_version(cfg.model_name, str(version), description=f"{head}\n{body}\nPromoted {when}.")
