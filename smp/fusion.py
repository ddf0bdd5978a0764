"""Stage 8: the ``fusion`` model family's job: one network learning from every feature group at once (tabular,
time, user, text, image: ``smp.fusion_net``), on the benchmark's out-of-fold prediction as a residual base.

The job reads in the three phases of every model job (``smp.train``): resolve (``smp.upstream.for_ensemble``:
the embed run's image blocks, the benchmark run of the same groups without ``image`` and its fold models),
fit (``smp.fit.fit_ensemble``, as for the stacking nets: pure, no MLflow) and record (``smp.record.record``).
``FUSION`` is its family, listed in ``smp.families``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

from smp import fit, record, upstream
from smp.config import flatten
from smp.fusion_net import FusionCfg, FusionModel, fusion_space
from smp.groups import GROUPS, FeaturesCfg, check_groups
from smp.jobs import Family
from smp.splits import prepare
from smp.tracking import JobResult, Parent, job_run
from smp.train import (BenchmarkJob, StackedJob, benchmark_key, child_of, figures_for, for_protocol, protocol_changes,
                       run_benchmark)

log = logging.getLogger("smp.fusion")


def all_groups() -> FeaturesCfg:
    """The family's default groups: every one (learning across them all is what it is for)."""
    return FeaturesCfg(",".join(GROUPS))


@dataclass(frozen=True)
class FusionJob(StackedJob):
    net: FusionCfg = field(default_factory=FusionCfg)
    # the net reads every group; the benchmark it stacks on reads them all but image
    feature_groups: FeaturesCfg = field(default_factory=all_groups)
    family: ClassVar[str] = "fusion"


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
        fitted = fit.fit_ensemble(FUSION, cfg, prep, up.images, up.blocks, up.stacked, up.predictor,
                                  record.epoch_curves(on_step))
        record.record(FUSION, fitted, prep, cfg.splitting, flatten(requested), protocol_changes(requested, cfg),
                      up, figures_for(parent))
    return JobResult(run.info.run_id, fitted.metrics, fitted.model)


FUSION = Family(
    "fusion", "every feature group through its own encoder, fused, over the benchmark prediction", run_fusion,
    FusionJob, model=FusionModel, space=fusion_space, epochs=True,
    description="a network with an encoder per feature group (tabular, time, user, text, image), fused, over the "
                "benchmark's prediction")
