"""Bad input to training and the registry: each case ends in a clear error or a refused promotion.

Families (issue 13): degenerate training data (text, infinite or constant labels, splits too small to mean
anything) and promotions that cannot be compared fairly (data gone or changed, no posts unseen by both
models, an empty experiment, only failed runs). The serving, predict and embed-cache families are in
``test_bad_input_serving.py`` and ``test_bad_input_embed.py``.
"""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest

from smp.boosters import XGBCfg
from smp.data import MAX_INVALID_LABEL_SHARE, DataCfg, DataError, load_data
from smp.registry import PromoteJob, run_promote
from smp.splits import MIN_SPLIT_ROWS, SplitCfg, prepare
from smp.train import run_benchmark

NAME = "smp-popularity"


def posts_table(path, n: int = 300, seed: int = 0, prefix: str = "p", **columns):
    """A posts CSV with a learnable label (``columns`` overrides whole columns); returns its path."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"Pid": [f"{prefix}{i}" for i in range(n)], "Category": rng.choice(["Fashion", "Travel"], n),
                       "Postdate": rng.uniform(1.42e9, 1.46e9, n), "tag_count": rng.integers(0, 40, n)})
    df["label"] = 5 + 0.1 * df["tag_count"] + rng.normal(0, 0.3, n)
    for name, values in columns.items():
        df[name] = values
    df.to_csv(path, index=False)
    return path


def prepared(path, **split):
    return prepare(DataCfg(data=str(path)), SplitCfg(sample_size=0, **split))


# --------------------------------------------------------------------------- degenerate training data
def test_text_labels_in_a_table_are_refused_naming_file_and_count(tmp_path):
    labels = [str(5.0 + i % 7) if i % 3 else "popular" for i in range(300)]  # a third are words
    path = posts_table(tmp_path / "posts.csv", label=labels)
    with pytest.raises(DataError, match=r"posts\.csv: field label: 100 of 300 values are not numbers"):
        prepared(path)


def test_infinite_labels_above_the_share_are_refused_below_it_excluded_and_counted(tmp_path):
    y = 5 + np.arange(300) % 7.0
    few, many = y.copy(), y.copy()
    few[:2] = np.inf   # 0.7% <= 1%: excluded, counted
    many[4:] = np.inf  # the case: only 4 usable rows
    ok = prepared(posts_table(tmp_path / "few.csv", label=few))
    assert ok.n_missing_label == 2 and len(ok.posts) == 298 and np.isfinite(ok.posts["label"]).all()
    assert MAX_INVALID_LABEL_SHARE == 0.01
    with pytest.raises(DataError, match=r"many\.csv: field label: 296 of 300 values are infinite"):
        prepared(posts_table(tmp_path / "many.csv", label=many))


def test_a_split_below_the_minimum_is_refused_with_the_minimum_stated(tmp_path):
    path = posts_table(tmp_path / "tiny.csv", n=60)  # 6 test and 5 validation posts
    with pytest.raises(DataError, match=rf"too few rows \(val 5, test 6\); every split needs at least "
                                        rf"{MIN_SPLIT_ROWS}"):
        prepared(path)
    assert len(prepared(path, val_frac=0.2, test_frac=0.2).parts["test"]) == 12  # larger fractions: accepted


def test_a_constant_label_is_refused(tmp_path):
    path = posts_table(tmp_path / "flat.csv", label=3.0)
    with pytest.raises(DataError, match="every training label is 3 .*nothing to learn"):
        prepared(path)


def test_benchmark_job_refuses_degenerate_data_before_starting_a_run(tmp_path, tiny):
    path = posts_table(tmp_path / "posts.csv", label=[np.inf] * 296 + [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(DataError, match="infinite"):
        run_benchmark(tiny.job("benchmark", path, experiment="bad"))
    # refused while preparing: no run is left behind, RUNNING or FAILED
    assert not (tmp_path / "mlflow.db").exists() or mlflow.search_runs(search_all_experiments=True).empty


# --------------------------------------------------------------------------- promotions that cannot be fair
@pytest.fixture
def train(tiny):
    """``train(path, xgb=None, **split)``: a benchmark on the posts table ``path`` in experiment "reg" (``tiny``
    settings, or ``xgb``); its run id."""
    def train(path, xgb: XGBCfg | None = None, **split) -> str:
        return run_benchmark(tiny.job("benchmark", path, experiment="reg", **({"xgb": xgb} if xgb else {}),
                                      **split)).run_id

    return train


def version_of(out: dict):
    return mlflow.MlflowClient().get_model_version(NAME, str(int(out["version"])))


def alias_run(alias: str) -> str:
    return mlflow.MlflowClient().get_model_version_by_alias(NAME, alias).run_id


@pytest.mark.slow
def test_promote_on_an_empty_experiment_or_only_failed_runs_says_so():
    mlflow.set_experiment("reg")
    with pytest.raises(DataError, match=r"'reg' \(id \d+\): nothing to promote: it has no model runs; train one"):
        run_promote(PromoteJob(experiment="reg"))
    client = mlflow.MlflowClient()
    for status in ("FAILED", "FAILED", "KILLED"):
        with mlflow.start_run() as run:
            mlflow.set_tag("smp.model", "benchmark")
        client.set_terminated(run.info.run_id, status)
    with pytest.raises(DataError, match=r"none of its 3 model runs finished \(2 FAILED, 1 KILLED\)"):
        run_promote(PromoteJob(experiment="reg"))


@pytest.mark.slow
def test_candidate_whose_data_is_gone_is_refused_and_becomes_challenger(tmp_path, train):
    champion = train(posts_table(tmp_path / "a.csv", prefix="a"))
    run_promote(PromoteJob(experiment="reg"))
    gone = tmp_path / "gone"
    gone.mkdir()
    candidate = train(posts_table(gone / "b.csv", seed=1, prefix="b"))
    shutil.rmtree(gone)
    out = run_promote(PromoteJob(experiment="reg", run_id=candidate))
    v = version_of(out)
    assert out["champion"] is False and alias_run("champion") == champion and alias_run("challenger") == candidate
    assert v.tags["comparison"] == "refused" and "cannot be read again" in v.tags["refused_because"]
    assert "not compared with champion v1" in v.description
    promote = mlflow.search_runs(experiment_names=["reg"], filter_string="tags.`smp.job` = 'promote'",
                                 order_by=["attributes.start_time DESC"], output_format="list")[0]
    assert promote.data.tags["smp.comparison"] == "refused" and promote.data.tags["smp.decision"] == "challenger"


@pytest.mark.slow
def test_champion_whose_data_changed_cannot_be_checked_so_candidate_is_refused(tmp_path, train):
    champ_data = posts_table(tmp_path / "a.csv", prefix="a")
    champion = train(champ_data)
    run_promote(PromoteJob(experiment="reg"))
    posts_table(champ_data, seed=7, prefix="a")  # rewritten: the champion's split cannot be rebuilt
    candidate = train(posts_table(tmp_path / "b.csv", seed=1, prefix="b"))
    out = run_promote(PromoteJob(experiment="reg", run_id=candidate))
    v = version_of(out)
    assert out["champion"] is False and alias_run("champion") == champion
    assert v.tags["comparison"] == "refused"
    assert "cannot be checked which of the candidate's test posts the champion trained on" in v.tags["refused_because"]
    assert "has changed since run" in v.tags["refused_because"]


@pytest.mark.slow
def test_candidate_tested_on_posts_the_champion_trained_on_is_refused(tmp_path, train):
    """The issue's second case: a run on a small part of the champion's data (other data hash, same posts).
    Its test posts are posts the champion trained on, so it cannot be scored fairly against it."""
    full = posts_table(tmp_path / "full.csv", n=400, prefix="x")
    champion = train(full, split="random", seed=0)
    run_promote(PromoteJob(experiment="reg"))
    part = pd.read_csv(full, dtype={"Pid": str})
    champ_train = set(prepared(full).rows("train")["Pid"])
    part[part["Pid"].isin(champ_train)].head(160).to_csv(tmp_path / "part.csv", index=False)  # a new hash
    candidate = train(tmp_path / "part.csv", xgb=XGBCfg(n_estimators=300, max_depth=6, learning_rate=0.3))
    out = run_promote(PromoteJob(experiment="reg", run_id=candidate))
    v = version_of(out)
    assert out["champion"] is False and alias_run("champion") == champion
    assert v.tags["comparison"] == "refused"
    assert v.tags["refused_because"].startswith("only 0 of the candidate's test posts are unseen by both models")


@pytest.mark.slow
def test_candidate_on_other_data_wins_only_on_the_posts_both_can_be_scored_on(tmp_path, train):
    """Champion and candidate on overlapping data: the champion is scored on the candidate's test posts it never
    trained on, and each model's RMSE there decides."""
    full = posts_table(tmp_path / "full.csv", n=400, prefix="x")
    train(full, xgb=XGBCfg(n_estimators=1, max_depth=1, learning_rate=0.01, early_stopping_rounds=0))
    run_promote(PromoteJob(experiment="reg"))
    more = pd.concat([pd.read_csv(full, dtype={"Pid": str}),
                      pd.read_csv(posts_table(tmp_path / "new.csv", n=400, seed=3, prefix="y"), dtype={"Pid": str})])
    more.to_csv(tmp_path / "more.csv", index=False)
    candidate = train(tmp_path / "more.csv")
    out = run_promote(PromoteJob(experiment="reg", run_id=candidate))
    cand_test = prepared(tmp_path / "more.csv").rows("test")["Pid"]
    champ_seen = pd.concat([prepared(full).rows(p)["Pid"] for p in ("train", "val")])
    assert out["eval_rows"] == int((~cand_test.isin(champ_seen)).sum()) < len(cand_test)
    assert version_of(out).tags["comparison"] == "same_rows"
    assert out["champion"] is True and alias_run("champion") == candidate  # one stump vs a real booster
    assert out["candidate_test_rmse"] < out["champion_test_rmse"]


def test_loaded_labels_stay_numbers(tmp_path):
    """Loading never turns a label into anything but a float (NaN where it was blank)."""
    path = posts_table(tmp_path / "posts.csv", n=12, label=[""] + [str(i) for i in range(11)])
    labels = load_data(str(path))["label"]
    assert labels.dtype == float and np.isnan(labels.iloc[0]) and labels.iloc[1:].tolist() == list(range(11))
