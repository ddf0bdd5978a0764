"""Feature groups (smp.groups): each group's columns and values, the user group's leak-freedom, refusals, and a
benchmark with every group predicting from raw posts through its logged MLflow model."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smp.boosters import XGBCfg, fit_booster, make_booster, predict_booster, step_callbacks
from smp.config import ConfigError
from smp.data import DataError
from smp.features import TabularFeaturizer
from smp.groups import (MAX_TITLE_CHARS, USER_COLUMNS, FeaturesCfg, GroupSet, HashedText, TimeGroup, UserHistory,
                        check_groups, parse_features)
from smp.models import BenchmarkModel, Part
from smp.splits import SplitCfg, split_indices
from smp.synth import SynthCfg, draw_posts

REAL_POSTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "smpd2019" / "posts.csv"
FAST = XGBCfg(n_estimators=200, max_depth=4, learning_rate=0.05, early_stopping_rounds=30, n_jobs=1)


def _ts(*args) -> int:
    return int(dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp())


@pytest.fixture(scope="module")
def synthetic():
    """2,000 synthetic posts (half the label variance a latent user quality) and their random split."""
    posts = draw_posts(SynthCfg(n=2000, seed=0))
    return posts, split_indices(posts, SplitCfg(split="random", seed=0))


def _fit(posts, parts, features="tabular", split="random", y=None, xgb=FAST):
    y = posts["label"].to_numpy(dtype=float) if y is None else y
    rows = {k: posts.iloc[v].reset_index(drop=True) for k, v in parts.items()}
    model = BenchmarkModel(xgb, seed=0, features=FeaturesCfg(features), split=split)
    model.fit(Part(rows["train"], y[parts["train"]]), Part(rows["val"], y[parts["val"]]))
    pred = model.predict(rows["test"])
    y_test = y[parts["test"]]
    rmse = float(np.sqrt(np.mean((pred - y_test) ** 2)))
    baseline = float(np.sqrt(np.mean((y[parts["train"]].mean() - y_test) ** 2)))
    return model, rmse, baseline


# --------------------------------------------------------------------------- the setting
def test_features_setting_parses_and_refuses_unknown_groups():
    assert FeaturesCfg().groups == ("tabular",)
    assert parse_features(" user,TABULAR, text,user ") == ("tabular", "user", "text")  # GROUPS order, once each
    with pytest.raises(ConfigError, match=r"features='tabular,bogus'.*unknown group.*bogus"):
        FeaturesCfg("tabular,bogus")
    with pytest.raises(ConfigError, match="at least one"):
        FeaturesCfg(" , ")
    with pytest.raises(ConfigError, match="text_encoder"):
        FeaturesCfg(text_encoder="bert")
    assert FeaturesCfg("text", text_encoder="clip").text_encoder == "clip"


def test_text_encoder_clip_reads_text_with_the_images_clip_model(tiny_clip):
    """``text_encoder=clip``: the text group is the images' CLIP text tower (``smp.text_clip``), its identity a
    run fact; the benchmark fits and predicts with it."""
    posts = draw_posts(SynthCfg(n=300, seed=1))
    parts = split_indices(posts, SplitCfg(split="random", seed=0))
    cfg = FeaturesCfg("tabular,text", text_encoder="clip", text_dim=8, **tiny_clip)
    rows = {k: posts.iloc[v].reset_index(drop=True) for k, v in parts.items()}
    y = posts["label"].to_numpy(dtype=float)
    model = BenchmarkModel(FAST, seed=0, features=cfg).fit(Part(rows["train"], y[parts["train"]]),
                                                           Part(rows["val"], y[parts["val"]]))
    text = model.groups_in_use.group("text")
    assert type(text).__name__ == "ClipText" and text.clip_model == tiny_clip["clip_model"]
    assert model.facts_["features/text_encoder"].startswith("clip:")
    assert [n for n in model.feature_names_ if n.startswith("text_")] == [f"text_{i}" for i in range(8)]
    assert np.isfinite(model.predict(rows["test"])).all()


def test_default_features_give_todays_benchmark_bit_for_bit():
    """features=tabular (the default, or said explicitly) is the committed benchmark: the tabular matrix alone,
    the same booster, the same predictions to the bit."""
    posts = draw_posts(SynthCfg(n=600, seed=2))
    parts = split_indices(posts, SplitCfg(split="random", seed=2))
    rows = {k: posts.iloc[v].reset_index(drop=True) for k, v in parts.items()}
    y = {k: posts["label"].to_numpy(dtype=float)[v] for k, v in parts.items()}
    default = BenchmarkModel(FAST, seed=0).fit(Part(rows["train"], y["train"]), Part(rows["val"], y["val"]))
    explicit = BenchmarkModel(FAST, seed=0, features=FeaturesCfg("tabular")).fit(
        Part(rows["train"], y["train"]), Part(rows["val"], y["val"]))
    # the committed BenchmarkModel.fit, step by step
    featurizer = TabularFeaturizer().fit(rows["train"])
    booster = fit_booster(make_booster(FAST, 0, step_callbacks(None), n_rows=len(rows["train"])),
                          featurizer.transform(rows["train"]), y["train"], featurizer.transform(rows["val"]), y["val"])
    before = predict_booster(booster, featurizer.transform(rows["test"]))
    assert np.array_equal(default.predict(rows["test"]), before)
    assert np.array_equal(explicit.predict(rows["test"]), before)
    assert default.feature_names_ == featurizer.feature_names_ and default.facts_ == {}
    assert default.input_fields_ == featurizer.raw_fields_  # no Uid: the logged schema is today's
    old = BenchmarkModel.__new__(BenchmarkModel)  # a model pickled before feature groups: no groups_, no features
    old.__dict__.update({k: v for k, v in default.__dict__.items() if k not in ("groups_", "features", "split")})
    assert np.array_equal(old.predict(rows["test"]), before) and old.input_fields_ == default.input_fields_


# --------------------------------------------------------------------------- time
def test_time_group_columns_and_values():
    posts = pd.DataFrame({"Pid": ["1", "2", "3"],
                          "Postdate": [_ts(2016, 1, 4, 13, 30), _ts(2016, 3, 6, 23, 59), np.nan]})
    group = TimeGroup()
    X = group.fit_transform(posts, np.zeros(3))
    assert group.feature_names_ == ["time_hour", "time_weekday", "time_month", "time_days"]
    np.testing.assert_allclose(X[:2], [[13, 0, 1, 0], [23, 6, 3, (_ts(2016, 3, 6, 23, 59) - _ts(2016, 1, 4, 13, 30))
                                                       / 86400]], rtol=1e-6)
    assert np.isnan(X[2]).all()  # no date: missing, not zero
    chrono = TimeGroup(replace(TimeGroup().cfg, absolute_date=False, month=False))  # split=chrono's tuned settings
    chrono.fit_transform(posts, np.zeros(3))
    assert chrono.feature_names_ == ["time_hour", "time_weekday"]


# --------------------------------------------------------------------------- user
def _history_frame():
    d = _ts(2016, 1, 1)
    return pd.DataFrame({
        "Pid": [str(i) for i in range(8)],
        "Uid": ["a", "a", "a", "a", "b", None, np.nan, "  "],
        "Postdate": [d, d + 86400, d + 86400, d + 3 * 86400, d, d, d, d],
        "tag_count": [0, 3, 5, 1, 2, 1, 1, 1],
    }), np.array([1.0, 2.0, 4.0, 9.0, 5.0, 6.0, 7.0, 8.0])


def test_user_group_out_of_fold_values_and_the_prior():
    """Leave-one-out folds: each training post's history is exactly its user's other posts; users without one
    (b's single post, missing / NaN / blank Uid) get the prior (training posts' global stats) and the flag."""
    posts, y = _history_frame()
    group = UserHistory(folds=len(posts))
    X = pd.DataFrame(group.fit_transform(posts, y, seed=0, split="random"), columns=USER_COLUMNS)
    assert list(group.feature_names_) == list(USER_COLUMNS)
    others = [2.0, 4.0, 9.0]  # post 0's user "a": posts 1-3
    assert X.loc[0, "user_posts"] == 3 and X.loc[0, "user_mean"] == pytest.approx(np.mean(others))
    assert X.loc[0, "user_median"] == 4.0 and X.loc[0, "user_std"] == pytest.approx(np.std(others))
    assert X.loc[0, "user_tag_share"] == 1.0  # posts 1-3 all have tags
    assert X.loc[1, "user_tag_share"] == pytest.approx(2 / 3)  # post 0 has none
    assert X.loc[0, "user_days_since_first"] == -1.0  # its user's first *other* post is a day later
    assert X.loc[0, "user_unseen"] == 0
    prior = [0.0, y.mean(), np.median(y), y.std()]
    for i in (4, 5, 6, 7):
        np.testing.assert_allclose(X.loc[i, ["user_posts", "user_mean", "user_median", "user_std"]], prior, rtol=1e-6)
        assert X.loc[i, "user_unseen"] == 1
    assert group.facts_["features/user_missing_uid_train"] == 3
    assert group.facts_["features/user_table_users"] == 2  # a and b: the table the logged model carries
    # new posts: a known user gets all its training posts, an unknown one (or none) the prior and the flag
    new = pd.DataFrame({"Pid": ["x", "y", "z"], "Uid": ["a", "stranger", None],
                        "Postdate": [_ts(2016, 1, 11)] * 3})
    Z = pd.DataFrame(group.transform(new), columns=USER_COLUMNS)
    assert Z.loc[0, "user_posts"] == 4 and Z.loc[0, "user_mean"] == pytest.approx(4.0)
    assert Z.loc[0, "user_days_since_first"] == pytest.approx(10.0) and Z.loc[0, "user_unseen"] == 0
    for i in (1, 2):
        assert Z.loc[i, "user_unseen"] == 1 and Z.loc[i, "user_mean"] == pytest.approx(y.mean())
    assert group.unseen(new).tolist() == [False, True, True]


def test_user_group_chrono_reads_strictly_earlier_posts_only():
    posts, y = _history_frame()
    group = UserHistory()
    X = pd.DataFrame(group.fit_transform(posts, y, split="chrono"), columns=USER_COLUMNS)
    assert X.loc[0, "user_unseen"] == 1  # a's first post: nothing before it
    for i in (1, 2):  # the same second: neither sees the other, both see post 0
        assert X.loc[i, "user_posts"] == 1 and X.loc[i, "user_mean"] == 1.0 and X.loc[i, "user_unseen"] == 0
    assert X.loc[3, "user_posts"] == 3 and X.loc[3, "user_mean"] == pytest.approx(7 / 3)


def test_user_group_chrono_scores_any_post_with_its_users_posts_before_it():
    """Under split=chrono a post scored later (a fold model's held-out training post, a served post) gets the
    history its user had at its date, as the training rows did: never a later post's label. A post after all
    of them (every test post) gets the whole table; under split=random the whole table for every date."""
    posts, y = _history_frame()  # user a: label 1 on day 0, 2 and 4 on day 1, 9 on day 3
    d = posts["Postdate"].iloc[0]
    new = pd.DataFrame({"Pid": ["early", "same", "mid", "late", "b"], "Uid": ["a", "a", "a", "a", "b"],
                        "Postdate": [d - 86400, d + 86400, d + 2 * 86400, d + 30 * 86400, d + 86400]})
    chrono = UserHistory()
    chrono.fit_transform(posts, y, split="chrono")
    Z = pd.DataFrame(chrono.transform(new), columns=USER_COLUMNS)
    assert Z.loc[0, "user_unseen"] == 1 and Z.loc[0, "user_mean"] == pytest.approx(y.mean())  # nothing before
    assert Z.loc[1, "user_posts"] == 1 and Z.loc[1, "user_mean"] == 1.0  # day 1: the same second is not before
    assert Z.loc[2, "user_posts"] == 3 and Z.loc[2, "user_mean"] == pytest.approx(7 / 3)  # not day 3's 9
    assert Z.loc[2, "user_median"] == 2.0 and Z.loc[2, "user_days_since_first"] == pytest.approx(2.0)
    assert Z.loc[3, "user_posts"] == 4 and Z.loc[3, "user_mean"] == pytest.approx(4.0)  # after all: the table
    assert Z.loc[4, "user_posts"] == 1 and Z.loc[4, "user_mean"] == 5.0  # b's one post, day 0
    assert chrono.unseen(new).tolist() == [True, False, False, False, False]  # serving's note agrees
    # the held-out rows of training posts get what fit_transform gave them: the same rule
    X = chrono.fit_transform(posts, y, split="chrono")
    np.testing.assert_array_equal(chrono.transform(posts.iloc[:4]), X[:4])

    plain = UserHistory()
    plain.fit_transform(posts, y, split="random")
    W = pd.DataFrame(plain.transform(new), columns=USER_COLUMNS)
    assert (W.loc[:3, "user_posts"] == 4).all() and plain.unseen(new).tolist() == [False] * 5


def test_user_group_under_split_user_gives_training_rows_the_prior():
    posts, y = _history_frame()
    X = pd.DataFrame(UserHistory().fit_transform(posts, y, split="user"), columns=USER_COLUMNS)
    assert (X["user_unseen"] == 1).all() and (X["user_posts"] == 0).all()


def test_a_posts_own_label_and_its_fold_mates_never_enter_its_features(synthetic):
    """Changing the labels of one fold changes the user history of no post in that fold; the posts without a
    history all hold the one prior (global training statistics: a constant, it tells no post from another)."""
    from sklearn.model_selection import KFold

    posts, parts = synthetic
    train = posts.iloc[parts["train"]].reset_index(drop=True)
    y = train["label"].to_numpy(dtype=float)
    before = UserHistory().fit_transform(train, y, seed=7)
    _, fold = next(KFold(5, shuffle=True, random_state=7).split(np.arange(len(train))))
    y2 = y.copy()
    y2[fold] += np.random.default_rng(0).normal(0, 5, len(fold))
    after = UserHistory().fit_transform(train, y2, seed=7)
    history = before[fold, -1] == 0
    assert history.sum() > 100
    assert np.array_equal(before[fold][history], after[fold][history])
    assert not np.array_equal(before[before[:, -1] == 0], after[after[:, -1] == 0])  # the other folds read them
    for X in (before, after):
        prior = X[X[:, -1] == 1][:, :5]
        assert len(prior) > 0 and (prior == prior[0]).all()


def test_user_history_does_not_beat_the_mean_predictor_on_noise_labels(synthetic):
    """Leak test: with the labels shuffled across posts (pure per-post noise, the same marginal) a benchmark with
    tabular+user must not beat the mean predictor on test beyond noise; on the synthetic labels (half their
    variance a latent user quality) user history helps on test. Measured here: noise labels, test RMSE about
    equal to or above the mean predictor's; synthetic labels, tabular+user below tabular alone."""
    posts, parts = synthetic
    noise = np.random.default_rng(1).permutation(posts["label"].to_numpy(dtype=float))
    _, rmse, baseline = _fit(posts, parts, "tabular,user", y=noise)
    assert rmse > 0.98 * baseline, (rmse, baseline)
    _, tab, _ = _fit(posts, parts, "tabular")
    model, with_user, baseline = _fit(posts, parts, "tabular,user")
    assert with_user < tab < baseline, (with_user, tab, baseline)
    assert "Uid" in model.input_fields_ and model.facts_["features/user_table_users"] > 100


# --------------------------------------------------------------------------- text
def test_text_group_columns_and_bounded_inputs():
    posts = pd.DataFrame({
        "Pid": [str(i) for i in range(6)],
        "Title": ["Sunset over the sea", "sea sunset", "x" * (MAX_TITLE_CHARS + 10**6), "nul\x00byte title",
                  None, "dog park"],
        "Alltags": ["sunset sea beach", "sea", "beach", " ".join(f"t{i}" for i in range(100_000)), np.nan,
                    "dog"],
    })
    group = HashedText(dim=3)
    X = group.fit_transform(posts, np.zeros(6))
    assert group.feature_names_ == ["text_0", "text_1", "text_2"] and X.shape == (6, 3)
    assert group.facts_ == {"features/text_truncated_train": 2, "features/text_empty_train": 1}
    assert np.isnan(X[4]).all() and np.isfinite(np.delete(X, 4, axis=0)).all()  # no text: missing
    again = group.transform(posts.iloc[[0, 1]])
    np.testing.assert_allclose(again, X[[0, 1]], rtol=1e-5, atol=1e-6)  # transform = fit's encoding
    assert np.isfinite(group.transform(pd.DataFrame({"Pid": ["n"], "Title": ["never seen words"]}))).all()


# --------------------------------------------------------------------------- refusals
def test_a_group_whose_fields_the_data_lacks_is_refused_naming_group_and_fields():
    posts = pd.DataFrame({"Pid": ["1", "2"], "Postdate": [1.4e9, 1.5e9], "Uid": [np.nan, np.nan]})
    posts.attrs["source"] = "posts.csv"
    with pytest.raises(DataError, match=r"group 'user' reads Uid, which posts.csv lacks"):
        check_groups(FeaturesCfg("tabular,user"), posts)  # a Uid column that is empty everywhere is lacking too
    with pytest.raises(DataError, match=r"group 'text' reads Title or Alltags.*missing or empty: Title, Alltags"):
        check_groups(FeaturesCfg("text"), posts)
    with pytest.raises(DataError, match=r"group 'time' reads Postdate"):
        GroupSet(FeaturesCfg("time")).fit_transform(posts.drop(columns="Postdate"), np.zeros(2))
    check_groups(FeaturesCfg("tabular,time"), posts)  # what it has is fine


@pytest.mark.skipif(not REAL_POSTS.exists(), reason="the real posts (../shared) are not here")
def test_the_real_posts_refuse_the_user_and_text_groups():
    from smp.data import load_data

    posts = load_data(str(REAL_POSTS))
    with pytest.raises(DataError, match=r"group 'user' reads Uid, which .*posts.csv lacks"):
        check_groups(FeaturesCfg("tabular,user"), posts)
    with pytest.raises(DataError, match=r"group 'text' reads Title or Alltags"):
        check_groups(FeaturesCfg("text"), posts)
    check_groups(FeaturesCfg("tabular,time"), posts)


def test_the_benchmark_job_refuses_before_opening_a_run(tmp_path, tiny):
    import mlflow

    from smp.train import run_benchmark

    posts = draw_posts(SynthCfg(n=200, seed=1)).drop(columns=["Uid", "img_path"])
    posts.to_csv(tmp_path / "no_uid.csv", index=False)
    with pytest.raises(DataError, match="group 'user' reads Uid"):
        run_benchmark(tiny.job("benchmark", tmp_path / "no_uid.csv", features="tabular,user"))
    assert mlflow.active_run() is None and not (tmp_path / "mlflow.db").exists()  # no run: the store untouched


# --------------------------------------------------------------------------- the logged model
@pytest.mark.slow
def test_a_model_with_every_group_predicts_raw_posts_through_its_logged_model(smpd_dir, tiny):
    import mlflow

    from smp.data import load_data
    from smp.train import run_benchmark

    from smp.train import reuse_key

    cfg = tiny.job("benchmark", smpd_dir, features="tabular,time,user,text", text_dim=4)
    result = run_benchmark(cfg)
    run = mlflow.get_run(result.run_id)
    assert run.data.params["features"] == "tabular,time,user,text" and run.data.params["text_encoder"] == "hashing"
    assert int(run.data.params["features/user_table_users"]) > 0
    # never found by an ensemble looking for the benchmark it stacks on (default features)
    assert run.data.tags["smp.reuse_key"] != reuse_key(cfg.splitting, cfg.xgb, cfg.tabular)
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/benchmark")
    schema = model.metadata.get_input_schema().input_names()
    assert {"Uid", "Title", "Alltags", "Postdate"} <= set(schema)
    inner = model.unwrap_python_model().model
    raw = load_data(str(smpd_dir)).drop(columns=["label"])
    raw = raw[~inner.groups_.group("user").unseen(raw)].head(4)  # posts of users seen in training
    raw = raw[[c for c in raw.columns if c in schema]].reset_index(drop=True)
    raw.loc[1, "Uid"] = "999@N99"      # a user the model never saw: the prior
    raw.loc[2, "Uid"] = np.nan         # no user at all: the prior too
    raw.loc[3, "Title"] = "x" * 10**6  # a 1 MB title: cut, scored
    out = model.predict(raw)
    assert len(out) == 4 and np.isfinite(out["popularity"]).all()
    assert np.allclose(out["popularity"], inner.predict(raw), rtol=1e-6)
    assert inner.groups_.group("user").unseen(raw).tolist() == [False, True, True, False]
    users = inner.groups_.group("user").transform(raw)
    assert users[0, 0] > 0 and users[1, 0] == 0 == users[2, 0]  # history for the known user, the prior else
