"""End-to-end: the benchmark job logs metrics, figures and a model that predicts from raw rows."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from smp.boosters import XGBCfg
from smp.data import DataCfg, load_data
from smp.splits import SplitCfg
from smp.train import BenchmarkJob, run_benchmark

pytestmark = pytest.mark.slow


def test_benchmark_end_to_end(smpd_dir, tiny):
    metrics = run_benchmark(tiny.job("benchmark", smpd_dir))
    run = mlflow.last_active_run()
    assert run.info.status == "FINISHED"
    logged = mlflow.get_run(run.info.run_id).data
    for split in ("val", "test"):
        for m in ("rmse", "mae", "bias", "error_var", "spearman", "r2"):
            assert f"{split}_{m}" in logged.metrics
    assert logged.metrics["test_rmse"] == pytest.approx(metrics["test_rmse"])
    assert logged.metrics["test_rmse"] < logged.metrics["test_rmse_baseline"]  # it learns something
    assert logged.params["max_depth"] == "4" and logged.params["split"] == "random"
    assert logged.tags["smp.model"] == "benchmark" and len(logged.tags["smp.data_hash"]) == 16
    rows = [int(logged.params[f"data/rows_{p}"]) for p in ("train", "val", "test")]
    assert sum(rows) == 160 == int(logged.params["data/posts"]) and min(rows) > 0
    assert logged.params["sample_size"] == "0"  # requested (0 = all) beside what was used
    # the headline metrics are the {split}_{metric} set; counts are params, timings and fit facts grouped
    assert all(k.startswith(("val_", "test_", "time/", "fit/")) for k in logged.metrics), sorted(logged.metrics)
    assert run.info.run_name == f"benchmark · {smpd_dir.name} · random · s0"
    exp = mlflow.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["mlflow.note.content"]
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert {"plots/pred_vs_actual.png", "plots/error_hist.png", "plots/feature_importance.png"} <= arts
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs}
    assert set(by_context) == {"train", "val", "test"}
    for part, i in by_context.items():  # the dataset drawer shows the split's true row count
        assert json.loads(i.dataset.profile)["num_rows"] == int(logged.params[f"data/rows_{part}"])

    # the logged model predicts from raw SMPD rows, with unseen levels and missing fields
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/benchmark")  # named after its family
    raw = load_data(str(smpd_dir)).head(5).drop(columns=["label"])
    pred = model.predict(raw)["popularity"]  # one popularity and status per post (smp.serving)
    assert len(pred) == 5 and np.isfinite(pred).all()
    odd = raw.copy()
    odd["Category"] = "NeverSeen"
    odd.loc[0, "photo_count"] = np.nan
    assert np.isfinite(model.predict(odd)["popularity"]).all()


def test_benchmark_chrono_and_user_splits(smpd_dir, tiny):
    for split in ("chrono", "user"):  # whole users per side: 160 posts need a larger val share for 10 rows
        metrics = run_benchmark(tiny.job("benchmark", smpd_dir, split=split, val_frac=0.2))
        assert np.isfinite(metrics["test_rmse"])
        assert mlflow.last_active_run().data.tags["smp.split"] == split


def test_real_posts_table_shape(tmp_path):
    """The real posts.csv layout (no images, no user fields) trains the benchmark."""
    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({"Pid": np.arange(n), "Category": rng.choice(["Fashion", "Travel"], n),
                       "Subcategory": rng.choice(["a", "b", "c"], n), "Concept": [None] * n,
                       "Postdate": rng.uniform(1.42e9, 1.46e9, n), "postdate_estimated": True,
                       "tag_count": rng.integers(0, 40, n)})
    df["label"] = 5 + 0.1 * df["tag_count"] + rng.normal(0, 0.5, n)
    df.to_csv(tmp_path / "posts.csv", index=False)
    cfg = BenchmarkJob(source=DataCfg(data=str(tmp_path / "posts.csv")), splitting=SplitCfg(sample_size=0),
                       xgb=XGBCfg(n_estimators=80, max_depth=3, learning_rate=0.1), experiment="t")
    metrics = run_benchmark(cfg)
    # beats the mean predictor by 20%: tag_count explains most of the label (noise alone is 0.40 of baseline);
    # data seeds 0-2 x split seeds 0-1 measured 0.44-0.57 of baseline
    assert metrics["test_rmse"] < 0.8 * metrics["test_rmse_baseline"]


def test_chrono_protocol_defaults_replace_only_default_settings():
    from smp.features import TabularCfg
    from smp.train import CHRONO_XGB, BenchmarkJob, PCABoostJob, for_protocol, protocol_defaults

    xgb, tab = protocol_defaults(SplitCfg(split="chrono"), XGBCfg(), TabularCfg())
    assert {k: getattr(xgb, k) for k in CHRONO_XGB} == CHRONO_XGB
    assert tab.absolute_date is False and tab.month is False and tab.time_trend is False
    mine = XGBCfg(max_depth=5)
    xgb, _ = protocol_defaults(SplitCfg(split="chrono"), mine, TabularCfg())
    assert xgb.max_depth == 5 and xgb.n_estimators == CHRONO_XGB["n_estimators"]  # an explicit choice is kept
    assert protocol_defaults(SplitCfg(split="chrono", chrono_tuned=False), XGBCfg(), TabularCfg()) == (
        XGBCfg(), TabularCfg())
    assert protocol_defaults(SplitCfg(split="random"), XGBCfg(), TabularCfg()) == (XGBCfg(), TabularCfg())
    assert for_protocol(BenchmarkJob()) == BenchmarkJob()
    pca = for_protocol(PCABoostJob(splitting=SplitCfg(split="chrono")))  # its paper depth 12 is its default
    assert pca.xgb.max_depth == CHRONO_XGB["max_depth"]


def test_changed_settings_are_the_ones_the_protocol_replaced():
    from smp.train import CHRONO_XGB, BenchmarkJob, for_protocol, protocol_changes

    asked = BenchmarkJob(splitting=SplitCfg(split="chrono"))
    changed = protocol_changes(asked, for_protocol(asked))
    assert changed == {k: v for k, v in {**CHRONO_XGB, "absolute_date": False, "month": False}.items()
                       if getattr(asked.xgb, k, None) != v and k not in ("absolute_date", "month")} | {
        "absolute_date": False, "month": False}
    assert changed["max_depth"] == 6 and "n_estimators" not in changed  # 2000 is asked and used
    assert protocol_changes(BenchmarkJob(), for_protocol(BenchmarkJob())) == {}


def test_upstream_runs_are_named_after_their_job_and_trials_by_number():
    from smp.tracking import run_label

    params = {"data": "demo", "split": "random", "seed": 0}
    assert run_label("benchmark", params, "") == "benchmark · demo · random · s0"  # Parent.trial's default
    assert run_label("benchmark", params, None) == "benchmark · demo · random · s0"
    assert run_label("benchmark", params, "7") == "trial 7"
