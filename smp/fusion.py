"""Stage 8: the ``fusion`` model family's job: one network learning from every feature group at once (tabular,
time, user, text, image: ``smp.fusion_net``), on the benchmark's out-of-fold prediction as a residual base.

The job reads in the three phases of every model job (``smp.train``): resolve (``smp.upstream.for_ensemble``:
the embed run's image blocks, the benchmark run of the same groups without ``image`` and its fold models),
fit (``fit_fusion``: pure, no MLflow) and record (``smp.record.record``). ``FUSION`` is its family, listed in
``smp.families``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from smp import plots, record, upstream
from smp.boosters import XGBCfg
from smp.config import flatten, sig
from smp.data import DataCfg
from smp.evaluate import regression_metrics
from smp.features import TabularCfg
from smp.fit import Fitted, evaluate, part
from smp.fusion_net import FusionCfg, FusionModel, fusion_space
from smp.groups import GROUPS, FeaturesCfg, check_groups
from smp.jobs import Family
from smp.splits import Prepared, SplitCfg, prepare
from smp.tracking import JobResult, Parent, job_run
from smp.train import (BenchmarkJob, StackingCfg, UpstreamCfg, benchmark_key, child_of, figures_for, for_protocol,
                       protocol_changes, run_benchmark, stacked_groups)

log = logging.getLogger("smp.fusion")


def all_groups() -> FeaturesCfg:
    """The family's default groups: every one (learning across them all is what it is for)."""
    return FeaturesCfg(",".join(GROUPS))


@dataclass(frozen=True)
class FusionJob:
    source: DataCfg = field(default_factory=DataCfg)
    splitting: SplitCfg = field(default_factory=SplitCfg)
    net: FusionCfg = field(default_factory=FusionCfg)
    stacking: StackingCfg = field(default_factory=StackingCfg)
    xgb: XGBCfg = field(default_factory=XGBCfg)  # the benchmark it stacks on
    tabular: TabularCfg = field(default_factory=TabularCfg)
    # the net reads every group; the benchmark it stacks on reads them all but image
    feature_groups: FeaturesCfg = field(default_factory=all_groups)
    upstream: UpstreamCfg = field(default_factory=UpstreamCfg)
    experiment: str = ""  # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)

    def __post_init__(self) -> None:
        stacked_groups(self.feature_groups, "fusion", needs_image=False)


def fit_fusion(family: Family, cfg: FusionJob, prep: Prepared, images, blocks: dict, stacked: dict, predictor,
               on_epoch=None) -> Fitted:
    """The fusion net on every chosen group and the benchmark's prediction (``stacked``, per split: out-of-fold
    on train); ``images`` / ``blocks``: the image source and each split's block (no columns without ``image``);
    ``predictor``: the benchmark the logged model stacks on for new posts; ``on_epoch(epoch, train_loss,
    val_rmse)`` after every epoch. Pure: no MLflow."""
    model = family.build(cfg, images=images, benchmark=predictor)
    net = model.net
    hook = None if on_epoch is None else (
        lambda epoch, val_rmse: on_epoch(epoch, net.history_[-1]["train_loss"], val_rmse))
    t0 = time.perf_counter()
    model.fit(part(prep, "train", blocks, stacked), part(prep, "val", blocks, stacked), hook)
    seconds = time.perf_counter() - t0
    beats = net.beats_input_
    if beats is False:
        log.warning("%s: validation RMSE %.4f does not beat its stacked benchmark input (%.4f); the net fell back "
                    "to the input (epoch 0)", family.name, net.best_val_rmse_, net.input_val_rmse_)
    preds = {p: model.predict_stacked(prep.rows(p), stacked[p], blocks[p] if images is not None else None)
             for p in ("val", "test")}
    metrics, figures = evaluate(model, prep, preds)
    figures = {"training_curve.png": lambda: plots.training_curve(net.history_, family.name, net.best_epoch_,
                                                                  net.input_val_rmse_), **figures}
    # the benchmark prediction the net was handed, scored on the same test posts (what the net must beat)
    stacked_test = regression_metrics(prep.y("test"), stacked["test"], "test")["test_rmse"]
    metrics["stacked_input/test_rmse"] = stacked_test
    note = (f"Its stacked benchmark input scores test RMSE {sig(stacked_test)}"
            + ("; the net did not beat it on validation and fell back to it (epoch 0)." if beats is False else "."))
    layout = {g: w for g, w in net.layout}
    return Fitted(model, metrics,
                  run_metrics={"time/fit_s": seconds, "fit/best_epoch": float(net.best_epoch_),
                               "stacked_input/val_rmse": net.input_val_rmse_, "stacked_input/test_rmse": stacked_test},
                  facts={"data/train_images": int(np.isfinite(blocks["train"]).all(axis=1).sum())
                         if blocks["train"].shape[1] else 0, **model.benchmark_facts(), **model.facts_},
                  tags={"smp.beats_stacked_benchmark": str(beats).lower()}, figures=figures,
                  tables={"fusion_inputs.json": layout}, notes=[note], example_images=images is not None)


def run_fusion(cfg: FusionJob = FusionJob(), parent: Parent | None = None, on_step=None) -> JobResult:
    """Train the fusion net on every chosen feature group over the benchmark's out-of-fold prediction and log
    it; ``on_step(epoch, val_rmse)`` after every epoch."""
    requested, cfg = cfg, for_protocol(cfg)
    prep = prepare(cfg.source, cfg.splitting)
    tags = {"smp.model": FUSION.name, "smp.stacking": cfg.stacking.stacking, "smp.head": cfg.net.head}
    check_groups(cfg.feature_groups, prep.rows("train"))  # a group the data cannot feed is refused before any run
    bench = BenchmarkJob(source=cfg.source, splitting=cfg.splitting, xgb=cfg.xgb, tabular=cfg.tabular,
                         feature_groups=cfg.feature_groups.without_image())
    with job_run(FUSION.name, cfg.experiment, flatten(requested), tags, parent, what=FUSION.help) as run:
        below = child_of(run, parent)
        up = upstream.for_ensemble(prep, cfg, benchmark_key(bench), below, lambda: run_benchmark(bench, parent=below))
        fitted = fit_fusion(FUSION, cfg, prep, up.images, up.blocks, up.stacked, up.predictor,
                            record.epoch_curves(on_step))
        record.record(FUSION, fitted, prep, cfg.splitting, flatten(requested), protocol_changes(requested, cfg),
                      up, figures_for(parent))
    return JobResult(run.info.run_id, fitted.metrics, fitted.model)


FUSION = Family(
    "fusion", "every feature group through its own encoder, fused, over the benchmark prediction", run_fusion,
    FusionJob, model=FusionModel, space=fusion_space, epochs=True,
    description="a network with an encoder per feature group (tabular, time, user, text, image), fused, over the "
                "benchmark's prediction")
