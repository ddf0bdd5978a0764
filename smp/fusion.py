"""Stage 8: the ``fusion`` model family's job: one network learning from every feature group at once (tabular,
time, user, text, image: ``smp.fusion_net``), on the benchmark's out-of-fold prediction as a residual base.

The job is every stacked net's (``smp.train.run_ensemble``): resolve (``smp.upstream.for_ensemble``: the embed
run's image blocks, the benchmark run of the same groups without ``image`` and its fold models), fit
(``smp.fit.fit_ensemble``: pure, no MLflow) and record (``smp.record.record``). What is fusion's own is its
config (``FusionJob``), its model (``smp.fusion_net``) and ``FUSION``, its family, listed in ``smp.families``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from smp.fusion_net import FusionCfg, FusionModel, fusion_space
from smp.groups import GROUPS, FeaturesCfg
from smp.jobs import Family
from smp.tracking import JobResult, Parent
from smp.train import StackedJob, run_ensemble


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
    it; ``on_step(epoch, val_rmse)`` after every epoch. The job is every stacked net's (``run_ensemble``:
    resolve -> fit -> record); only the model differs."""
    return run_ensemble(cfg, FUSION, parent, on_step)


FUSION = Family(
    "fusion", "every feature group through its own encoder, fused, over the benchmark prediction", run_fusion,
    FusionJob, model=FusionModel, space=fusion_space, epochs=True,
    description="a network with an encoder per feature group (tabular, time, user, text, image), fused, over the "
                "benchmark's prediction")
