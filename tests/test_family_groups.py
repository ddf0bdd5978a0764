"""Feature groups on every model family: ``features`` on pca_boost and the stacking ensembles (their benchmark
and its fold models read the non-image groups), the ``image`` group on the benchmark, the refusals, and the
default that reproduces the paper's inputs (and finds the benchmark runs made before groups existed)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from smp.boosters import XGBCfg
from smp.config import ConfigError, flatten
from smp.groups import FeaturesCfg
from smp.models import cross_fit
from smp.splits import SplitCfg, split_indices
from smp.synth import SynthCfg, draw_posts
from smp.tracking import logged_model_uri
from smp.train import (BenchmarkJob, EnsembleConv1DJob, EnsembleMLPJob, PCABoostJob, benchmark_key, reuse_key,
                       run_benchmark, run_ensemble_mlp, run_pca_boost)


def test_each_family_defaults_to_the_papers_inputs():
    assert BenchmarkJob().feature_groups.groups == ("tabular",)
    for job in (PCABoostJob, EnsembleMLPJob, EnsembleConv1DJob):
        assert job().feature_groups.groups == ("tabular", "image")
    assert EnsembleMLPJob().feature_groups.without_image().groups == ("tabular",)


def test_default_benchmark_key_is_the_one_runs_made_before_groups_carry():
    """An ensemble with default features stacks on the benchmark runs already in a store: their reuse key was
    the hash of the split, booster and tabular settings alone."""
    cfg = BenchmarkJob()
    assert benchmark_key(cfg) == reuse_key(cfg.splitting, cfg.xgb, cfg.tabular)
    assert benchmark_key(BenchmarkJob(feature_groups=FeaturesCfg("tabular,user"))) != benchmark_key(cfg)
    with_image = BenchmarkJob(feature_groups=FeaturesCfg("tabular,image"))
    assert benchmark_key(with_image) != benchmark_key(cfg)


def test_groups_a_stacking_ensemble_cannot_take_are_refused_naming_the_setting():
    with pytest.raises(ConfigError, match=r"features='image'.*ensemble_mlp stacks on a benchmark"):
        EnsembleMLPJob(feature_groups=FeaturesCfg("image"))
    with pytest.raises(ConfigError, match=r"features='tabular,user'.*ensemble_conv1d.*must include image"):
        EnsembleConv1DJob(feature_groups=FeaturesCfg("tabular,user"))
    EnsembleMLPJob(feature_groups=FeaturesCfg("tabular,user"))  # the MLP can read the stack alone


def test_fold_models_with_the_user_group_leak_no_label():
    """The ensembles' training input is the fold models' out-of-fold prediction: with ``user`` each fold model
    fits the user table on its own fold's posts, so on labels that are pure per-post noise the out-of-fold
    predictions carry nothing of the held-out labels (a table with the held-out posts in it would)."""
    posts = draw_posts(SynthCfg(n=1500, seed=4))
    y = np.random.default_rng(0).normal(6.0, 2.0, len(posts))
    parts = split_indices(posts, SplitCfg(split="random", seed=0))
    rows = {k: posts.iloc[v].reset_index(drop=True) for k, v in parts.items()}
    xgb = XGBCfg(n_estimators=80, max_depth=4, learning_rate=0.1, early_stopping_rounds=0, n_jobs=1)
    fitted = cross_fit(rows["train"], y[parts["train"]], rows["val"], y[parts["val"]], xgb, seed=0, folds=3,
                       tabular=BenchmarkJob().tabular, features=FeaturesCfg("tabular,user"))
    assert all(m.groups_in_use.group("user") is not None for m in fitted.models)
    r = np.corrcoef(fitted.oof_, y[parts["train"]])[0, 1]
    assert abs(r) < 0.1, r


def test_fold_models_under_chrono_give_held_out_posts_no_later_post_of_their_user():
    """Under split=chrono the ensembles' training input must read what a test post can: its user's history
    before its date. Each fold model's user group gives a held-out training post at most as many history
    posts as its user has strictly before it (a table with the user's later posts in it gives more)."""
    from smp.groups import USER_COLUMNS, user_ids

    posts = draw_posts(SynthCfg(n=1500, seed=4))
    y = posts["label"].to_numpy(dtype=float)
    parts = split_indices(posts, SplitCfg(split="chrono", seed=0))
    train = posts.iloc[parts["train"]].reset_index(drop=True)
    xgb = XGBCfg(n_estimators=20, max_depth=3, learning_rate=0.1, early_stopping_rounds=0, n_jobs=1)
    fitted = cross_fit(train, y[parts["train"]], posts.iloc[parts["val"]].reset_index(drop=True), y[parts["val"]],
                       xgb, seed=0, folds=3, tabular=BenchmarkJob().tabular, features=FeaturesCfg("tabular,user"),
                       split="chrono")
    uid, dates = user_ids(train), train["Postdate"].to_numpy(dtype=float)
    by_user = {u: np.sort(dates[[v == u for v in uid]]) for u in set(uid) if u is not None}
    earlier = np.array([np.searchsorted(by_user[u], t, "left") if u is not None else 0 for u, t in zip(uid, dates)])
    later = np.array([len(by_user[u]) - np.searchsorted(by_user[u], t, "right") if u is not None else 0
                      for u, t in zip(uid, dates)])
    assert (later > 0).sum() > 100  # many posts have a later post of their user in the training set
    col = USER_COLUMNS.index("user_posts")
    for model in fitted.models:
        counts = model.groups_in_use.group("user").transform(train)[:, col]
        assert (counts <= earlier).all()
        assert (counts > 0).sum() > 100  # and they do read the earlier ones


def _params(run_id: str) -> dict:
    return mlflow.get_run(run_id).data.params


@pytest.mark.slow
def test_pca_boost_reads_the_user_group_beside_the_image(smpd_dir, tiny):
    result = run_pca_boost(tiny.job("pca_boost", smpd_dir, features="tabular,user,image"))
    model = result.model
    assert "Uid" in model.input_fields_ and model.groups_in_use.group("user") is not None
    params = _params(result.run_id)
    assert params["features"] == "tabular,user,image"
    assert int(params["features/user_table_users"]) > 0
    assert np.isfinite(result.metrics["test_rmse"])


@pytest.mark.slow  # trains and logs a pca_boost job
def test_pca_boost_without_image_needs_no_embed_run(smpd_dir, tiny):
    result = run_pca_boost(tiny.job("pca_boost", smpd_dir, features="tabular,time"))
    assert not result.model.needs_images and result.model.images is None
    assert mlflow.search_runs(experiment_names=["t"], filter_string="tags.`smp.job` = 'embed'").empty
    assert "Postdate" in result.model.input_fields_


@pytest.mark.slow  # trains and logs the job and its benchmark
def test_ensemble_mlp_without_image_stacks_on_a_benchmark_of_its_groups(smpd_dir, tiny):
    result = run_ensemble_mlp(tiny.job("ensemble_mlp", smpd_dir, features="tabular,user"))
    model = result.model
    assert not model.needs_images and model.net.n_features_in_ == 1  # the stacked prediction alone
    assert model.groups_in_use.group("user") is not None and "Uid" in model.input_fields_
    bench_run = mlflow.get_run(result.run_id).data.tags["smp.benchmark_run"]
    assert _params(bench_run)["features"] == "tabular,user"  # the benchmark it stacks on read the same groups
    assert int(_params(result.run_id)["features/user_table_users"]) > 0
    # new posts through the logged model: raw rows with Uid, no image fields
    loaded = mlflow.pyfunc.load_model(logged_model_uri(result.run_id))
    rows = draw_posts(SynthCfg(n=5, seed=9))[["Pid", "Uid", "Category", "Subcategory", "Postdate"]]
    pred = loaded.predict(rows)
    assert len(pred) == 5 and np.isfinite(np.asarray(pred["popularity"], dtype=float)).all()


@pytest.mark.slow
def test_benchmark_reads_the_image_group_when_asked(smpd_dir, tiny):
    result = run_benchmark(tiny.job("benchmark", smpd_dir, features="tabular,image"))
    model = result.model
    assert model.needs_images and model.feature_names_[-1] == "has_image"
    assert any(n.startswith("clip_") for n in model.feature_names_)
    tags = mlflow.get_run(result.run_id).data.tags
    assert tags.get("smp.embed_run")  # the embed run it read, found or made as the image families do
    default = run_benchmark(tiny.job("benchmark", smpd_dir))
    assert not default.model.needs_images and "has_image" not in default.model.feature_names_
    assert flatten(tiny.job("benchmark", smpd_dir))["features"] == "tabular"


@pytest.mark.slow  # trains and logs benchmark jobs
def test_compare_gives_each_feature_set_its_own_row(smpd_dir, tiny):
    """A run with other groups than its family's default (an ablation's) never stands in for the paper's row."""
    from smp.families import FAMILIES
    from smp.report import compare_table

    default = run_benchmark(tiny.job("benchmark", smpd_dir))
    user = run_benchmark(tiny.job("benchmark", smpd_dir, features="user,tabular"))  # the newest run
    table = compare_table(mlflow.get_run(user.run_id).info.experiment_id, "random", FAMILIES)
    rows = dict(zip(table["model"], table["run_id"]))
    assert rows == {"benchmark": default.run_id, "benchmark [tabular,user]": user.run_id}
    assert table.set_index("model").loc["benchmark [tabular,user]", "test_rmse"] == user.metrics["test_rmse"]
    note = mlflow.get_run(user.run_id).data.tags["mlflow.note.content"]
    assert "; features user,tabular)" in note  # the run's description says what it read, as asked
