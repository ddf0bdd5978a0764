"""Stage 6, a model job's fit phase: arrays and configs in, ``Fitted`` out; nothing is logged here.

Each function fits one family's model on the train split (early stopping on val), predicts val and test,
scores them against the mean predictor, and returns the model with what the record phase logs: metrics,
the settings the fit resolved (``effective``), fit facts, tags, figures (drawn only if logged) and notes for
the run's description. ``on_step(step, val_rmse)`` is the one hook into fitting (a study reports and prunes
there); the nets take ``on_epoch(epoch, train_loss, val_rmse)``, which the record phase makes from it to log
the per-epoch curves live. This module imports no MLflow (``tests/test_architecture.py`` checks).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from smp import plots
from smp.config import sig
from smp.evaluate import baseline_metrics, regression_metrics
from smp.jobs import Family
from smp.models import Part
from smp.splits import Prepared

log = logging.getLogger("smp.fit")


@dataclass
class Fitted:
    """A fitted model and everything the record phase logs about it."""

    model: object
    metrics: dict[str, float]                  # {val,test}_{metric} and their _baseline: linked to the model
    run_metrics: dict[str, float] = field(default_factory=dict)  # time/, fit/, stacked_input/: the run's own
    effective: dict[str, object] = field(default_factory=dict)   # settings the fit resolved (auto, 0)
    facts: dict[str, object] = field(default_factory=dict)       # counts logged as params (data/train_images)
    tags: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Callable] = field(default_factory=dict)   # file name -> draw() returning a figure
    tables: dict[str, dict] = field(default_factory=dict)        # artifact name -> JSON-able content
    notes: list[str] = field(default_factory=list)               # sentences for the run's description
    example_images: bool = False                                 # the model's input example carries images


def part(prep: Prepared, name: str, blocks: dict | None = None, stacked: dict | None = None) -> Part:
    """The model inputs of split ``name``: its rows and labels (and image block, stacked predictions)."""
    return Part(prep.rows(name), prep.y(name), None if blocks is None else blocks[name],
                None if stacked is None else stacked[name])


def evaluate(model, prep: Prepared, preds: dict[str, np.ndarray] | None = None) -> tuple[dict, dict]:
    """Val/test metrics (and the mean predictor's) and the two standard figures of the test predictions;
    ``preds``: predictions already made (image models), else the model predicts the raw rows."""
    metrics: dict[str, float] = {}
    preds = dict(preds or {})
    for name in ("val", "test"):
        if preds.get(name) is None:
            preds[name] = model.predict(prep.rows(name))
        metrics.update(regression_metrics(prep.y(name), preds[name], name))
        metrics.update(baseline_metrics(prep.y("train"), prep.y(name), name))
    y, p, family = prep.y("test"), preds["test"], model.family
    figures = {"pred_vs_actual.png": lambda: plots.pred_vs_actual(y, p, f"{family}: test"),
               "error_hist.png": lambda: plots.error_hist(y, p, f"{family}: test error")}
    return metrics, figures


def tree_effective(model) -> dict[str, object]:
    """The tree method, bins, device and threads the booster(s) used (``auto`` / 0 resolved); threads 0
    (every core) as the number of cores."""
    settings = dict(getattr(model, "tree_settings_", None) or {})
    if "n_jobs" in settings and not settings["n_jobs"]:
        settings["n_jobs"] = os.cpu_count() or 1
    return settings


def fit_benchmark(family: Family, cfg, prep: Prepared, on_step=None, up=None) -> Fitted:
    """The paper's tabular XGBoost on the train split; ``on_step(round, val_rmse)`` after every round; ``up``:
    the image inputs (``smp.upstream.Upstream``) when the ``image`` group is chosen."""
    images, blocks = (None, None) if up is None else (up.images, up.blocks)
    t0 = time.perf_counter()
    model = family.build(cfg, images=images).fit(part(prep, "train", blocks), part(prep, "val", blocks), on_step)
    seconds = time.perf_counter() - t0
    preds = None if blocks is None else {p: model.predict(prep.rows(p), blocks[p]) for p in ("val", "test")}
    metrics, figures = evaluate(model, prep, preds)
    names, gain = model.importance()
    figures["feature_importance.png"] = lambda: plots.feature_importance(names, gain)
    importance = json.loads(pd.Series(gain, index=names).sort_values(ascending=False).to_json())
    return Fitted(model, metrics,
                  run_metrics={"time/fit_s": seconds, "fit/best_iteration": model.best_iteration_,
                               "fit/n_features": float(len(model.feature_names_))}, facts=model.facts_,
                  effective=tree_effective(model), figures=figures, tables={"feature_importance.json": importance},
                  example_images=blocks is not None)


def fit_pca_boost(family: Family, cfg, prep: Prepared, images, blocks: dict, on_step=None) -> Fitted:
    """[CLIP, handcrafted, tabular] -> PCA -> XGBoost; ``images``: the model's ``ImageFeatureSource``,
    ``blocks``: each split's image block."""
    t0 = time.perf_counter()
    model = family.build(cfg, images=images).fit(part(prep, "train", blocks), part(prep, "val", blocks), on_step)
    seconds = time.perf_counter() - t0
    preds = {p: model.predict(prep.rows(p), None if blocks is None else blocks[p]) for p in ("val", "test")}
    metrics, figures = evaluate(model, prep, preds)
    ratio = model.pca_.explained_variance_ratio_
    figures = {"explained_variance.png": lambda: plots.explained_variance(ratio), **figures}
    return Fitted(model, metrics,
                  run_metrics={"time/fit_s": seconds, "fit/best_iteration": model.best_iteration_,
                               "fit/pca_components": float(model.pca_.n_components_),
                               "fit/pca_explained_variance": float(ratio.sum())},
                  facts=model.facts_, effective=tree_effective(model), figures=figures,
                  example_images=blocks is not None)


def fit_ensemble(family: Family, cfg, prep: Prepared, images, blocks: dict, stacked: dict, predictor,
                 on_epoch=None) -> Fitted:
    """The benchmark's prediction (``stacked``, per split: out-of-fold on train) and the family's other inputs
    (the image block; the fusion family's feature groups too) through the family's net: the stacking ensembles
    and ``fusion``. ``predictor``: the benchmark the logged model stacks on for new posts; ``on_epoch(epoch,
    train_loss, val_rmse)`` after every epoch. The model answers ``predict_stacked(rows, stacked, img)``."""
    model = family.build(cfg, images=images, benchmark=predictor)
    net = model.net
    hook = None if on_epoch is None else (
        lambda epoch, val_rmse: on_epoch(epoch, net.history_[-1]["train_loss"], val_rmse))
    t0 = time.perf_counter()
    model.fit(part(prep, "train", blocks, stacked), part(prep, "val", blocks, stacked), hook)
    seconds = time.perf_counter() - t0
    beats, residual = net.beats_input_, cfg.net.head == "residual"
    if beats is False:
        log.warning("%s: validation RMSE %.4f does not beat its stacked benchmark input (%.4f)%s", family.name,
                    net.best_val_rmse_, net.input_val_rmse_,
                    "; the residual net fell back to the input (epoch 0)" if residual else "")
    preds = {p: model.predict_stacked(prep.rows(p), stacked[p], blocks[p] if images is not None else None)
             for p in ("val", "test")}
    metrics, figures = evaluate(model, prep, preds)
    figures = {"training_curve.png": lambda: plots.training_curve(net.history_, family.name, net.best_epoch_,
                                                                  net.input_val_rmse_), **figures}
    # the benchmark prediction the net was handed, scored on the same test posts (what the net must beat)
    stacked_test = regression_metrics(prep.y("test"), stacked["test"], "test")["test_rmse"]
    metrics["stacked_input/test_rmse"] = stacked_test
    note = (f"Its stacked benchmark input scores test RMSE {sig(stacked_test)}"
            + ("; the residual net did not beat it on validation and fell back to it (epoch 0)."
               if beats is False and residual else "."))
    return Fitted(model, metrics,
                  run_metrics={"time/fit_s": seconds, "fit/best_epoch": float(net.best_epoch_),
                               "stacked_input/val_rmse": net.input_val_rmse_, "stacked_input/test_rmse": stacked_test},
                  facts={"data/train_images": int(np.isfinite(blocks["train"]).all(axis=1).sum())
                         if blocks["train"].shape[1] else 0, **model.benchmark_facts(), **model.facts_},
                  tags={"smp.beats_stacked_benchmark": str(beats).lower()}, figures=figures,
                  tables=dict(getattr(model, "tables_", {})), notes=[note], example_images=images is not None)
