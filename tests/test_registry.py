"""Promotion by alias: the best run becomes @champion, a worse one @challenger, one version per run."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from smp import registry
from smp.boosters import XGBCfg
from smp.config import ConfigError, sig
from smp.data import DataError
from smp.registry import PromoteJob, run_promote
from smp.train import run_benchmark

pytestmark = pytest.mark.slow

NAME = "smp-popularity"
WORSE = XGBCfg(n_estimators=1, max_depth=2, learning_rate=0.01, early_stopping_rounds=10)


@pytest.fixture
def train(tiny):
    """``train(data, xgb=None, **split)``: a benchmark in experiment "t" (``tiny`` settings, or ``xgb``); its
    run id."""
    def train(data, xgb: XGBCfg | None = None, **split) -> str:
        return run_benchmark(tiny.job("benchmark", data, **({"xgb": xgb} if xgb else {}), **split)).run_id

    return train


def versions() -> list:
    return sorted(mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))


def alias(name: str):
    return registry.current_alias(mlflow.MlflowClient(), NAME, name)


def test_champion_then_challenger_and_one_version_per_run(smpd_dir, train):
    good = train(smpd_dir)
    first = run_promote(PromoteJob(experiment="t"))
    assert first["version"] == 1 and first["champion"] is True and first["new_version"] is True
    assert alias("champion").run_id == good

    again = run_promote(PromoteJob(experiment="t"))  # the same best run: reuse its version
    assert again["version"] == 1 and again["new_version"] is False and again["champion"] is True
    assert len(versions()) == 1

    worse = train(smpd_dir, WORSE)
    out = run_promote(PromoteJob(experiment="t", run_id=worse))
    assert out["version"] == 2 and out["champion"] is False
    assert out["eval_rows"] > 0 and out["candidate_test_rmse"] > out["champion_test_rmse"]
    assert str(alias("champion").version) == "1" and str(alias("challenger").version) == "2"

    # the comparison is kept on the version: tags and description; both models saw the same test posts
    v2 = mlflow.MlflowClient().get_model_version(NAME, "2")
    assert v2.run_id == worse
    assert v2.tags["decision"] == "challenger" and v2.tags["compared_against_version"] == "1"
    assert v2.tags["comparison"] == "same_rows" and v2.tags["family"] == "benchmark"
    assert float(v2.tags["champion_test_rmse"]) == pytest.approx(out["champion_test_rmse"], abs=1e-4)
    assert "does not beat champion v1" in v2.description and worse in v2.description
    # ... and says why it won or not: the ranking it was chosen from, the champion's figures, the rule
    val = {r: mlflow.get_run(r).data.metrics["val_rmse"] for r in (good, worse)}
    assert "given as `run_id`, not searched for; by val RMSE it ranks 2 of the 2 finished model runs of " \
           "experiment `t` (any family, any split)" in v2.description
    assert (f"- #1: val RMSE {sig(val[good])}, benchmark, split random, run benchmark · smpd · random · s0 "
            f"(`{good[:8]}`) **← the champion**") in v2.description
    assert (f"- #2: val RMSE {sig(val[worse])}, benchmark, split random, run benchmark · smpd · random · s0 "
            f"(`{worse[:8]}`) **← this version**") in v2.description
    assert (f"test RMSE {sig(out['candidate_test_rmse'])} does not beat champion v1's "
            f"{sig(out['champion_test_rmse'])} by more than the margin 0") in v2.description
    assert f"Champion v1 is run benchmark · smpd · random · s0 (`{good[:8]}`), val RMSE {sig(val[good])}." \
        in v2.description
    assert "**Rule**: the run chosen above becomes `@champion` only when" in v2.description
    assert _figures_beyond_4_digits(v2.description) == []
    # re-evaluated on the rebuilt test split, each model's RMSE matches the one its run logged
    logged = {r: mlflow.get_run(r).data.metrics["test_rmse"] for r in (good, worse)}
    assert out["champion_test_rmse"] == pytest.approx(logged[good], rel=1e-5)
    assert out["candidate_test_rmse"] == pytest.approx(logged[worse], rel=1e-5)

    # the decision is also a `promote` run
    runs = mlflow.search_runs(experiment_names=["t"], filter_string="tags.`smp.job` = 'promote'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    assert len(runs) == 3 and runs[0].data.tags["smp.decision"] == "challenger"
    assert runs[0].data.tags["smp.candidate_run"] == worse and runs[0].data.tags["smp.registered_version"] == "2"
    assert (f"(`{worse[:8]}`) (val RMSE {sig(val[worse])}) is {NAME} v2, `@challenger`: test RMSE "
            f"{sig(out['candidate_test_rmse'])} does not beat champion v1's") in runs[0].data.tags["mlflow.note.content"]
    assert "already the champion." in runs[1].data.tags["mlflow.note.content"]  # the second promote of v1
    assert all(r.data.metrics == {} for r in runs)  # not training runs: the decision is tags, never metrics
    v1 = mlflow.MlflowClient().get_model_version(NAME, "1")  # a first promotion names no champion it beat
    assert "compared_against_version" not in v1.tags and "champion_test_rmse" not in v1.tags
    assert ("**Why this run**: the lowest val RMSE among the 1 finished model runs of experiment `t` (any family, "
            "any split) that logged a model.") in v1.description
    assert "**Decision**: `@champion`: there was no champion to compare with." in v1.description
    assert _figures_beyond_4_digits(v1.description) == []
    assert mlflow.MlflowClient().get_registered_model(NAME).description.startswith("Predicts a Flickr post")


def _figures_beyond_4_digits(text: str) -> list[str]:
    """Decimal figures in ``text`` with more than 4 significant digits (ids in backticks and the date left out)."""
    import re

    text = re.sub(r"`[^`]*`|\d{4}-\d\d-\d\d \d\d:\d\d", "", text)
    return [m for m in re.findall(r"\d+\.\d+", text) if len(m.replace(".", "").lstrip("0")) > 4]


def test_a_searched_candidate_lists_the_runs_it_was_ranked_against(smpd_dir, monkeypatch, train):
    """More candidates than the table shows: the best five by val RMSE, the champion wherever it ranks, the rest
    counted; a run ranked above the chosen one without a logged model is marked as skipped."""
    runs = [train(smpd_dir, XGBCfg(n_estimators=n, max_depth=2, learning_rate=0.1, early_stopping_rounds=0))
            for n in (1, 2, 3, 5, 8, 13, 21)]
    val = {r: mlflow.get_run(r).data.metrics["val_rmse"] for r in runs}
    order = sorted(runs, key=val.get)
    real = registry.has_logged_model
    monkeypatch.setattr(registry, "has_logged_model", lambda rid: rid != order[0] and real(rid))
    out = run_promote(PromoteJob(experiment="t", family="benchmark"))
    v = mlflow.MlflowClient().get_model_version(NAME, str(int(out["version"])))
    assert v.run_id == order[1]
    text = v.description
    assert ("the lowest val RMSE among the 7 finished model runs of experiment `t` (family benchmark, any split) "
            "that logged a model (the 1 ranked above it logged none)") in text
    assert f"- #1: val RMSE {sig(val[order[0]])}, benchmark, split random, run benchmark" in text
    assert f"(`{order[0][:8]}`) **← no logged model: skipped**" in text
    assert f"- #2: val RMSE {sig(val[order[1]])}" in text and f"(`{order[1][:8]}`) **← this version**" in text
    shown = [r for r in runs if f"(`{r[:8]}`)" in text]
    assert shown == [r for r in runs if r in order[:5]]
    rest = [val[r] for r in order[5:]]
    assert f"- and 2 more (val RMSE {sig(min(rest))} to {sig(max(rest))})" in text
    assert _figures_beyond_4_digits(text) == []


def test_margin_keeps_champion_until_beaten_by_enough(smpd_dir, train):
    worse = train(smpd_dir, WORSE)
    run_promote(PromoteJob(experiment="t", run_id=worse))
    better = train(smpd_dir)
    held = run_promote(PromoteJob(experiment="t", run_id=better, margin=100.0))
    assert held["champion"] == 0.0 and alias("challenger").run_id == better
    taken = run_promote(PromoteJob(experiment="t", run_id=better))  # same version, margin 0: now it wins
    assert taken["champion"] == 1.0 and taken["new_version"] == 0.0
    assert alias("champion").run_id == better and alias("challenger") is None  # a champion is not also challenger
    assert len(versions()) == 2


def test_racing_promoters_leave_one_version(smpd_dir, monkeypatch, train):
    run_id = train(smpd_dir)
    run_promote(PromoteJob(experiment="t"))  # v1
    real = registry.versions_of_run
    calls = {"n": 0}

    def late_view(client, name, rid):  # the first look misses v1, as a promoter racing another would
        calls["n"] += 1
        return [] if calls["n"] == 1 else real(client, name, rid)

    monkeypatch.setattr(registry, "versions_of_run", late_view)
    out = run_promote(PromoteJob(experiment="t"))
    assert out["version"] == 1 and out["new_version"] == 0.0
    assert [str(v.version) for v in versions()] == ["1"] and versions()[0].run_id == run_id


def test_different_data_scores_the_champion_on_the_candidates_test_posts(smpd_dir, tmp_path, train):
    champion = train(smpd_dir)
    run_promote(PromoteJob(experiment="t"))
    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame({"Pid": [f"other{i}" for i in range(n)], "Category": rng.choice(["Fashion", "Travel"], n),
                       "Postdate": rng.uniform(1.42e9, 1.46e9, n), "tag_count": rng.integers(0, 40, n)})
    df["label"] = 5 + 0.1 * df["tag_count"] + rng.normal(0, 0.3, n)
    df.to_csv(tmp_path / "posts.csv", index=False)
    other = train(tmp_path / "posts.csv")
    out = run_promote(PromoteJob(experiment="t", run_id=other))
    v = mlflow.MlflowClient().get_model_version(NAME, str(int(out["version"])))
    assert v.tags["comparison"] == "same_rows" and "other data" in v.description
    # no Pid is shared, so every one of the candidate's 40 test posts is unseen by the champion
    assert out["eval_rows"] == 40
    assert out["candidate_test_rmse"] == pytest.approx(mlflow.get_run(other).data.metrics["test_rmse"], rel=1e-5)
    # the champion's figure is its RMSE on those posts, not the one its run logged on its own test split
    assert out["champion_test_rmse"] != pytest.approx(mlflow.get_run(champion).data.metrics["test_rmse"], rel=1e-3)
    assert out["champion"] == float(out["candidate_test_rmse"] < out["champion_test_rmse"])


def test_filters_and_nothing_to_promote(smpd_dir, train):
    with pytest.raises(DataError, match="'t'.*nothing to promote: it has no model runs"):
        run_promote(PromoteJob(experiment="t"))
    run_id = train(smpd_dir)
    with pytest.raises(DataError, match="family=pca_boost"):
        run_promote(PromoteJob(experiment="t", family="pca_boost"))
    with pytest.raises(DataError, match="split=chrono"):
        run_promote(PromoteJob(experiment="t", split="chrono"))
    with pytest.raises(ConfigError, match="run_id='0+': no such run"):
        run_promote(PromoteJob(experiment="t", run_id="0" * 32))
    out = run_promote(PromoteJob(experiment="t", family="benchmark", split="random"))  # both filters match the run
    assert out["version"] == 1 and out["decision"] == "champion" and alias("champion").run_id == run_id


def test_version_tag_written_concurrently_is_retried_and_other_errors_are_not():
    """Two promotes tagging one version at once: the server's insert can lose a primary-key race."""
    from mlflow.exceptions import MlflowException

    from smp.registry import set_version_tag

    class Client:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def set_model_version_tag(self, name, version, key, value):
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)

    race = MlflowException("BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates "
                           'unique constraint "model_version_tag_pk"')
    client = Client([race])
    set_version_tag(client, "m", "1", "family", "benchmark")
    assert client.calls == 2  # retried once, then written
    other = Client([MlflowException("RESOURCE_DOES_NOT_EXIST: no such version")])
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        set_version_tag(other, "m", "9", "family", "benchmark")
    assert other.calls == 1
    stuck = Client([race] * 4)
    with pytest.raises(MlflowException, match="UniqueViolation"):
        set_version_tag(stuck, "m", "1", "family", "benchmark")
    assert stuck.calls == 4


def test_dataset_inputs_logged_concurrently_are_retried(monkeypatch):
    """Two tuning workers logging the same dataset at once: the loser's insert is retried, not fatal."""
    from mlflow.exceptions import MlflowException

    from smp import tracking

    real, calls = mlflow.log_inputs, []

    def racing(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("INTERNAL_ERROR: (psycopg2.errors.UniqueViolation) duplicate key value violates "
                                  'unique constraint "dataset_pk"')
        return real(**kwargs)

    monkeypatch.setattr(mlflow, "log_inputs", racing)
    posts = pd.DataFrame({"Pid": [str(i) for i in range(6)], "label": np.arange(6.0)})
    parts = {"train": np.arange(4), "test": np.arange(4, 6)}
    with mlflow.start_run() as run:
        tracking.log_data_inputs(posts, parts, "posts", "abc", "random", 0)
    assert len(calls) == 2
    logged = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in logged) == ["posts-random-s0-test", "posts-random-s0-train"]


# --------------------------------------------------------------------------- candidates are checked (issue 26)
MID = XGBCfg(n_estimators=5, max_depth=2, learning_rate=0.1, early_stopping_rounds=0)  # worse than tiny.xgb, beats the mean


def model_dir(run_id: str):
    """The directory holding the artifacts of the model ``run_id`` logged (the sqlite store's ./mlruns)."""
    from pathlib import Path
    from urllib.parse import urlparse

    from smp.tracking import logged_model_uri

    model = mlflow.MlflowClient().get_logged_model(logged_model_uri(run_id).split("/", 1)[1])
    return Path(urlparse(model.artifact_location).path)


def last_promote():
    return mlflow.search_runs(experiment_names=["t"], filter_string="tags.`smp.job` = 'promote'",
                              order_by=["attributes.start_time DESC"], output_format="list")[0]


def test_a_failed_run_or_a_model_that_is_not_ready_is_no_candidate(smpd_dir, train):
    client = mlflow.MlflowClient()
    failed = train(smpd_dir)
    client.set_tag(failed, "smp.end_reason", "OSError: [Errno 28] No space left on device")
    client.set_terminated(failed, "FAILED")  # the case: the model upload was cut short by a full disk
    with pytest.raises(DataError, match=rf"run {failed} is FAILED, not FINISHED: only a finished run's model can be "
                                        r"promoted \(a run that failed or was stopped may have logged an incomplete "
                                        r"model\); it ended with: OSError: \[Errno 28\] No space left on device"):
        run_promote(PromoteJob(experiment="t", run_id=failed))
    pending = train(smpd_dir)
    model_id = client.get_run(pending).outputs.model_outputs[-1].model_id
    client.finalize_logged_model(model_id, "FAILED")
    with pytest.raises(DataError, match=rf"run {pending}: its logged model {model_id} is FAILED, not READY \(its "
                                        r"upload did not complete\); only a READY model can be promoted"):
        run_promote(PromoteJob(experiment="t", run_id=pending))
    assert versions() == []  # refused before anything was registered
    # searched: the failed run is not ranked, the finished one with a FAILED model is passed over, said so
    mid = train(smpd_dir, MID)
    out = run_promote(PromoteJob(experiment="t"))
    v = mlflow.MlflowClient().get_model_version(NAME, str(out["version"]))
    assert v.run_id == mid and out["decision"] == "champion"
    assert "that logged a model (the 1 ranked above it had no READY logged model)" in v.description
    assert (f"(`{pending[:8]}`) **← its logged model {model_id} is FAILED, not READY (its upload did not "
            f"complete): skipped**") in v.description
    assert failed[:8] not in v.description


def test_a_first_promotion_of_a_model_that_learnt_nothing_is_rejected(smpd_dir, tmp_path, train):
    """Labels that are noise: a deep booster without early stopping fits the noise and loses to the mean."""
    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({"Pid": [f"n{i}" for i in range(n)], "Category": rng.choice(["Fashion", "Travel"], n),
                       "Postdate": rng.uniform(1.42e9, 1.46e9, n), "tag_count": rng.integers(0, 40, n),
                       "label": rng.normal(6, 2, n)})
    df.to_csv(tmp_path / "noise.csv", index=False)
    noise = train(tmp_path / "noise.csv", XGBCfg(n_estimators=200, max_depth=6, learning_rate=0.3,
                                                 early_stopping_rounds=0))
    logged = mlflow.get_run(noise).data.metrics
    assert logged["test_rmse"] > logged["test_rmse_baseline"]
    out = run_promote(PromoteJob(experiment="t"))
    assert out["decision"] == "rejected" and out["champion"] is False and out["version"] == 1
    assert alias("champion") is None and alias("challenger") is None  # no alias at all, first promotion included
    assert out["check_test_rmse"] == pytest.approx(logged["test_rmse"], rel=1e-5)
    assert out["check_mean_predictor_rmse"] == pytest.approx(logged["test_rmse_baseline"], rel=1e-5)
    v1 = mlflow.MlflowClient().get_model_version(NAME, "1")
    because = (f"its test RMSE on its own 30 test posts, {sig(logged['test_rmse'])}, does not beat the mean "
               f"predictor's {sig(logged['test_rmse_baseline'])} (it learnt nothing usable)")
    assert v1.tags["decision"] == "rejected" and v1.tags["check"] == "failed" and v1.tags["rejected_because"] == because
    assert "compared_against_version" not in v1.tags
    assert f"**Decision**: **rejected**, it takes no alias: it fails the check every candidate passes before an alias " \
           f"moves: {because}." in v1.description
    assert f"**Check**: failed: {because}." in v1.description
    promote = last_promote()
    assert promote.data.tags["smp.decision"] == "rejected" and promote.data.tags["smp.rejected_because"] == because
    assert promote.data.tags["smp.check"] == "failed"
    assert f"is {NAME} v1, **rejected**, it takes no alias" in promote.data.tags["mlflow.note.content"]
    # a model that learnt something is the first champion after it
    good = train(smpd_dir)
    out = run_promote(PromoteJob(experiment="t", run_id=good))
    assert out["decision"] == "champion" and alias("champion").run_id == good
    v2 = mlflow.MlflowClient().get_model_version(NAME, "2")
    assert v2.tags["check"] == "passed" and v2.tags["comparison"] == "first"
    assert "**Check**: loaded and scored on its own 16 test posts before any alias moved: test RMSE " in v2.description


def test_a_model_predicting_one_value_for_every_post_is_not_crowned(smpd_dir, train):
    class Constant(mlflow.pyfunc.PythonModel):
        """The issue's model: 0.5 for every post (an XGBoost with no trees predicts its base score)."""

        _skip_type_hint_validation = True  # (else MLflow warns that predict has no type hints)

        def predict(self, context, model_input, params=None):
            return np.full(len(model_input), 0.5)

    src = mlflow.get_run(train(smpd_dir))
    with mlflow.start_run(experiment_id=src.info.experiment_id) as run:  # the same run, with that model
        mlflow.log_params(src.data.params)
        mlflow.log_metrics(src.data.metrics)
        mlflow.set_tags({k: v for k, v in src.data.tags.items() if k.startswith("smp.")})
        mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=[])
    run_id = run.info.run_id
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    out = run_promote(PromoteJob(experiment="t", run_id=run_id))
    assert out["decision"] == "rejected" and alias("champion") is None
    assert out["check_test_rmse"] > 4 > out["check_mean_predictor_rmse"]  # labels around 6; the mean predictor ~2
    assert "does not beat the mean predictor's" in mlflow.MlflowClient().get_model_version(NAME, "1").tags[
        "rejected_because"]


def test_a_model_that_cannot_be_loaded_is_rejected_and_loses_challenger(smpd_dir, train):
    train(smpd_dir)
    run_promote(PromoteJob(experiment="t"))  # v1 champion
    worse = train(smpd_dir, WORSE)
    assert run_promote(PromoteJob(experiment="t", run_id=worse))["decision"] == "challenger"  # v2
    pkl = model_dir(worse) / "artifacts" / "smp_model.pkl"
    pkl.write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])  # truncated, as by a full disk
    out = run_promote(PromoteJob(experiment="t", run_id=worse))
    assert out["version"] == 2 and out["decision"] == "rejected" and out["new_version"] is False
    assert str(alias("champion").version) == "1" and alias("challenger") is None
    v2 = mlflow.MlflowClient().get_model_version(NAME, "2")
    assert v2.tags["decision"] == "rejected" and v2.tags["comparison"] == "rejected"
    assert v2.tags["rejected_because"].startswith("its model cannot be loaded (")
    assert "truncated" in v2.tags["rejected_because"]
    # what the earlier promote wrote and is no longer true is gone
    assert "compared_against_version" not in v2.tags and "champion_test_rmse" not in v2.tags


def test_a_champion_that_can_no_longer_be_loaded_loses_to_any_valid_candidate(smpd_dir, monkeypatch, train):
    good = train(smpd_dir)
    run_promote(PromoteJob(experiment="t"))  # v1
    mid = train(smpd_dir, MID)  # worse than the champion on every post set, but a valid model

    # a store that does not answer is not a broken champion: the promote fails and nothing moves
    real_load, real_get = mlflow.pyfunc.load_model, mlflow.MlflowClient.get_model_version
    down = mlflow.exceptions.MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow-artifacts failed with exception HTTPConnectionPool("
        "host='127.0.0.1', port=5000): Max retries exceeded (Caused by NewConnectionError: Connection refused)")

    def load(uri, *args, **kwargs):
        if uri == f"models:/{NAME}/1":
            raise down
        return real_load(uri, *args, **kwargs)

    def get(self, name, version):
        if str(version) == "1":
            raise down
        return real_get(self, name, version)

    with monkeypatch.context() as m:
        m.setattr(mlflow.pyfunc, "load_model", load)
        m.setattr(mlflow.MlflowClient, "get_model_version", get)
        with pytest.raises(DataError, match=rf"{NAME} v1 could not be loaded: the tracking server did not answer "
                                            r"\(MlflowException: .*Connection refused.*\); nothing was changed"):
            run_promote(PromoteJob(experiment="t", run_id=mid))
    assert alias("champion").run_id == good and alias("challenger") is None

    import shutil

    shutil.rmtree(model_dir(good))  # its artifacts are gone
    again = run_promote(PromoteJob(experiment="t", run_id=good))  # promoted again, it fails its own check ...
    assert again["decision"] == "rejected" and alias("champion").run_id == good  # ... but no valid one replaces it
    assert mlflow.MlflowClient().get_model_version(NAME, "1").tags["rejected_because"].endswith(
        "; it still holds `@champion` until a candidate that passes this check replaces it")
    out = run_promote(PromoteJob(experiment="t", run_id=mid))
    assert out["decision"] == "champion" and alias("champion").run_id == mid
    client = mlflow.MlflowClient()
    v1, v2 = client.get_model_version(NAME, "1"), client.get_model_version(NAME, "2")
    because = v2.tags["champion_unloadable_because"]
    assert because.startswith(f"champion v1 can no longer be loaded (its artifacts are missing from "
                              f"{model_dir(good)}; ") and v2.tags["comparison"] == "champion_unloadable"
    assert v2.tags["compared_against_version"] == "1" and v2.tags["check"] == "passed"
    assert v1.tags["replaced_by"] == "2" and v1.tags["unloadable_because"] == because
    assert (f"**Decision**: `@champion`: {because}, so it loses to this version, which passed its own check (test "
            f"RMSE {sig(out['check_test_rmse'])} on its own test posts). Champion v1 is run") in v2.description
    promote = last_promote()
    assert promote.data.tags["smp.comparison"] == "champion_unloadable"
    assert promote.data.tags["smp.champion_unloadable_because"] == because
    mlflow.pyfunc.load_model(f"models:/{NAME}@champion")  # what predict and serve load works again
