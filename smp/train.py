"""Stage 5: the jobs behind the entry points, each ``run(cfg) -> dict[str, float]``.

A job loads the posts, drops unlabelled rows (counted), subsamples, splits,
fits its model on train (early stopping on val), evaluates on val and test,
and logs params, dataset inputs, metrics, figures and a pyfunc model that
predicts from raw post rows.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import mlflow
import numpy as np
import pandas as pd

from smp import plots
from smp.data import data_hash, labelled, load_data
from smp.evaluate import baseline_metrics, regression_metrics
from smp.features import TabularCfg
from smp.models import BenchmarkModel, XGBCfg
from smp.serving import example_input, log_model
from smp.splits import SplitCfg, split_indices, subsample
from smp.tracking import flat_params, job_run, log_data_inputs, log_figure

log = logging.getLogger("smp.train")


@dataclass(frozen=True)
class DataCfg:
    data: str = "demo"  # an SMPD directory, a posts table (.csv/.parquet/.json) or "demo"
    images: str = ""    # images root when not under the SMPD directory


@dataclass(frozen=True)
class BenchmarkJob:
    source: DataCfg = field(default_factory=DataCfg)
    splitting: SplitCfg = field(default_factory=SplitCfg)
    xgb: XGBCfg = field(default_factory=XGBCfg)
    tabular: TabularCfg = field(default_factory=TabularCfg)
    experiment: str = ""  # "" = MLflow's default (or the one `mlflow run --experiment-name` gives)


@dataclass
class Prepared:
    """Labelled, subsampled posts and their split, ready for any model."""

    posts: pd.DataFrame
    parts: dict[str, np.ndarray]
    digest: str
    n_missing_label: int

    def rows(self, part: str) -> pd.DataFrame:
        return self.posts.iloc[self.parts[part]].reset_index(drop=True)

    def y(self, part: str) -> np.ndarray:
        return self.posts["label"].to_numpy(dtype=float)[self.parts[part]]


def prepare(source: DataCfg, splitting: SplitCfg) -> Prepared:
    """Load, drop unlabelled rows, subsample and split."""
    t0 = time.perf_counter()
    posts = load_data(source.data, images_root=source.images or None)
    digest = data_hash(posts)
    posts, n_missing = labelled(posts)
    posts = subsample(posts, splitting.sample_size, splitting.seed)
    parts = split_indices(posts, splitting)
    log.info("data %s: %d labelled posts (%d without label excluded), split %s -> %s in %.1fs",
             posts.attrs.get("source"), len(posts), n_missing, splitting.split,
             {k: len(v) for k, v in parts.items()}, time.perf_counter() - t0)
    return Prepared(posts, parts, digest, n_missing)


def log_prepared(prep: Prepared, splitting: SplitCfg) -> None:
    """Log the data inputs, the data hash and the row counts of a prepared split."""
    name = str(prep.posts.attrs.get("source", "data")).rstrip("/").split("/")[-1] or "data"
    log_data_inputs(prep.posts, prep.parts, name, prep.digest, splitting.split, splitting.seed)
    mlflow.set_tags({"smp.data_hash": prep.digest, "smp.data_source": str(prep.posts.attrs.get("source")),
                     "smp.split": splitting.split})
    mlflow.log_metrics({f"{k}_rows": float(len(v)) for k, v in prep.parts.items()})
    mlflow.log_metric("missing_label_rows", float(prep.n_missing_label))
    issues = prep.posts.attrs.get("parse_issues") or {}
    mlflow.log_metric("data_parse_issues", float(sum(issues.values())))
    if issues:
        mlflow.log_dict(issues, "data/parse_issues.json")


def evaluate_and_log(model, prep: Prepared, preds: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Compute val/test metrics (and the mean baseline), log them and the two standard figures."""
    metrics: dict[str, float] = {}
    preds = preds or {}
    for part in ("val", "test"):
        p = preds.get(part)
        if p is None:
            p = model.predict(prep.rows(part))
            preds[part] = p
        metrics.update(regression_metrics(prep.y(part), p, part))
        metrics.update(baseline_metrics(prep.y("train"), prep.y(part), part))
    mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
    log_figure(plots.pred_vs_actual(prep.y("test"), preds["test"], f"{model.family}: test"), "pred_vs_actual.png")
    log_figure(plots.error_hist(prep.y("test"), preds["test"], f"{model.family}: test error"), "error_hist.png")
    return metrics


def run_benchmark(cfg: BenchmarkJob = BenchmarkJob()) -> dict[str, float]:
    """Train the paper's tabular XGBoost benchmark and log it; return the metrics."""
    prep = prepare(cfg.source, cfg.splitting)
    with job_run("benchmark", cfg.experiment, flat_params(cfg), {"smp.model": "benchmark"}):
        log_prepared(prep, cfg.splitting)
        t0 = time.perf_counter()
        model = BenchmarkModel(cfg.xgb, cfg.tabular, cfg.splitting.seed).fit(
            prep.rows("train"), prep.y("train"), prep.rows("val"), prep.y("val"))
        mlflow.log_metrics({"fit_seconds": time.perf_counter() - t0, "best_iteration": model.best_iteration_,
                            "n_features": float(len(model.featurizer_.feature_names_))})
        metrics = evaluate_and_log(model, prep)
        names, gain = model.importance()
        log_figure(plots.feature_importance(names, gain), "feature_importance.png")
        mlflow.log_dict(json.loads(pd.Series(gain, index=names).sort_values(ascending=False).to_json()),
                        "feature_importance.json")
        log_model(model, example_input(prep.rows("test"), model.input_fields_))
    log.info("benchmark: test RMSE %.4f (baseline %.4f)", metrics["test_rmse"], metrics["test_rmse_baseline"])
    return metrics
