"""Stage 8: the model jobs behind the entry points, each ``run(cfg, parent=None, on_step=None) -> JobResult``,
and each model family's ``Family`` (its config, model class, search space, run function and words).

Every model job reads in three phases:

1. resolve (``smp.upstream``): open the job's run, then find or make what it stands on (the embed run and the
   image blocks, the benchmark run and its fold models);
2. fit (``smp.fit``): pure functions from arrays and configs to ``Fitted`` (model, metrics, figures);
3. record (``smp.record``): one call logs the data inputs, effective settings, metrics, figures and the model.

A job made under another run (an upstream job, a study's trial) receives that run as ``parent`` and returns
its own run id, metrics and model as a ``JobResult``; ``on_step(step, val_rmse)`` is the one hook into
fitting (a study reports and prunes there).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

from smp import fit, record, upstream
from smp.boosters import XGBCfg
from smp.config import ConfigError, check, flatten, one_of, zero_or_at_least
from smp.data import DataCfg
from smp.features import TabularCfg
from smp.groups import FeaturesCfg, check_groups
from smp.image_features import PAPER_CLIP_MODEL, PAPER_CLIP_PRETRAINED
from smp.jobs import Family
from smp.models import BenchmarkModel, EnsembleModel, PCABoostModel, PCACfg
from smp.nets import Conv1DCfg, Conv1DRegressor, MLPCfg, MLPRegressor
from smp.spaces import conv1d_space, mlp_space, pca_boost_space, xgb_space
from smp.splits import SplitCfg, prepare
from smp.tracking import JobResult, Parent, job_run, params_hash

log = logging.getLogger("smp.train")


@dataclass(frozen=True)
class ImageInputCfg:
    """Where a job's image block comes from (the ``image`` feature group)."""

    embed_run: str = ""          # an embed run id to read image features from ("" = find or run one)
    clip_model: str = PAPER_CLIP_MODEL  # the paper's CLIP backbone (used when embed runs upstream)
    clip_pretrained: str = PAPER_CLIP_PRETRAINED  # open_clip weights tag; "none" = random weights (offline demo/tests)
    checkpoint: str = ""         # local CLIP checkpoint file (overrides clip_pretrained)


@dataclass(frozen=True)
class UpstreamCfg(ImageInputCfg):
    benchmark_run: str = ""      # a benchmark run id to stack on ("" = find or run one)


def image_features() -> FeaturesCfg:
    """The image families' default groups: the paper's inputs (tabular metadata and the image)."""
    return FeaturesCfg("tabular,image")


@dataclass(frozen=True)
class BenchmarkJob:
    source: DataCfg = field(default_factory=DataCfg)
    splitting: SplitCfg = field(default_factory=SplitCfg)
    xgb: XGBCfg = field(default_factory=XGBCfg)
    tabular: TabularCfg = field(default_factory=TabularCfg)
    feature_groups: FeaturesCfg = field(default_factory=FeaturesCfg)  # features: tabular, time, user, text, image
    images: ImageInputCfg = field(default_factory=ImageInputCfg)  # read only with features=...,image
    experiment: str = ""  # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)


# split=chrono (unless chrono_tuned=false): settings measured to generalise to later posts on the real posts
# (docs/benchmarks.md: benchmarks/chrono_entry.py through the launcher, benchmarks/chrono.py); each replaces a
# setting only where it is still the job's default. Shallower, slower boosting that early-stops on the
# validation window (the posts right before the test window): RMSE 2.25-2.27 and MAE 1.82-1.83 on the posts
# after the cut at 20,000 and 80,000 training posts, where 400 fixed rounds at depth 8 and lr 0.05 gave
# 2.33-2.44 and 1.89-1.96 (the mean predictor: 2.44 and 1.95).
CHRONO_XGB = {"max_depth": 6, "learning_rate": 0.02, "n_estimators": 2000, "early_stopping_rounds": 100}
# The calendar month goes too: the real posts span one year, so under a chronological split the test posts'
# month is seen in training only on posts a year older (the 25 posts of February 2015 for a February 2016 test
# window), and the model carried their level over (bias +0.6 to +1.6, worse than the mean predictor).
CHRONO_TABULAR = {"absolute_date": False, "month": False}  # time_trend did not help on the holdout (an option)


def protocol_defaults(splitting: SplitCfg, xgb: XGBCfg, tabular: TabularCfg,
                      default_xgb: XGBCfg = XGBCfg()) -> tuple[XGBCfg, TabularCfg]:
    """The booster and tabular settings a job uses under ``splitting``: as given, except that under
    ``split=chrono`` with ``chrono_tuned`` every setting still at the job's default (``default_xgb``,
    ``TabularCfg()``) takes its value from ``CHRONO_XGB`` / ``CHRONO_TABULAR``."""
    if splitting.split != "chrono" or not splitting.chrono_tuned:
        return xgb, tabular
    xgb_changes = {k: v for k, v in CHRONO_XGB.items() if getattr(xgb, k) == getattr(default_xgb, k)}
    tab_changes = {k: v for k, v in CHRONO_TABULAR.items() if getattr(tabular, k) == getattr(TabularCfg(), k)}
    return replace(xgb, **xgb_changes), replace(tabular, **tab_changes)


def for_protocol(cfg):
    """A job config with ``protocol_defaults`` applied (what is logged is what is used)."""
    if not hasattr(cfg, "xgb"):
        return cfg
    xgb, tabular = protocol_defaults(cfg.splitting, cfg.xgb, cfg.tabular, type(cfg)().xgb)
    if (xgb, tabular) != (cfg.xgb, cfg.tabular):
        log.info("split=chrono: settings for later posts (chrono_tuned=true): %s",
                 {k: v for k, v in {**asdict(xgb), **asdict(tabular)}.items()
                  if v != {**asdict(cfg.xgb), **asdict(cfg.tabular)}[k]})
    return replace(cfg, xgb=xgb, tabular=tabular)


def protocol_changes(requested, used) -> dict[str, object]:
    """``{setting: value used}`` for every setting of ``used`` that differs from ``requested`` (the job's
    protocol replaced it)."""
    asked = flatten(requested)
    return {k: v for k, v in flatten(used).items() if k in asked and asked[k] != v}


# --------------------------------------------------------------------------- image jobs
@dataclass(frozen=True)
class StackingCfg:
    stacking: str = "oof"          # oof = out-of-fold benchmark predictions on train (no label leak); in_sample = paper
    stacking_folds: int = 0      # K of the K-fold; 0 = from the data: 3 below 50,000 training rows, else 2
    stacking_fit: str = "refit"  # refit = val/test/new posts get the benchmark run's own model (fitted on all
    #                              of train); crossfit = the K fold models' mean (no full fit needed)
    fold_rounds: str = "benchmark"  # benchmark = each fold model grows as many trees as the benchmark run's
    #                                 model (no early stopping); early_stop = each fold early-stops on val

    def __post_init__(self) -> None:
        check(self, stacking=one_of("oof", "in_sample"), stacking_folds=zero_or_at_least(2, "from the data"),
              stacking_fit=one_of("crossfit", "refit"), fold_rounds=one_of("benchmark", "early_stop"))


@dataclass(frozen=True)
class PCABoostJob:
    source: DataCfg = field(default_factory=DataCfg)
    splitting: SplitCfg = field(default_factory=SplitCfg)
    xgb: XGBCfg = field(default_factory=lambda: XGBCfg(max_depth=12))  # paper: depth 12 for this model
    pca: PCACfg = field(default_factory=PCACfg)
    tabular: TabularCfg = field(default_factory=TabularCfg)
    feature_groups: FeaturesCfg = field(default_factory=image_features)  # features: tabular, time, user, text, image
    upstream: UpstreamCfg = field(default_factory=UpstreamCfg)
    experiment: str = ""


def stacked_groups(features: FeaturesCfg, family: str, needs_image: bool) -> None:
    """Refuse the groups a stacking ensemble cannot take: its benchmark needs one group besides ``image``; the
    Conv1D net convolves the image vector, so it needs ``image``."""
    if not features.table:
        raise ConfigError(f"features={features.features!r}: {family} stacks on a benchmark, which needs at least "
                          "one of tabular, time, user, text")
    if needs_image and not features.image:
        raise ConfigError(f"features={features.features!r}: {family} convolves the image features, so features "
                          "must include image (ensemble_mlp can do without)")


@dataclass(frozen=True)
class StackedJob:
    """The settings every net over the benchmark's out-of-fold prediction shares. A family subclasses it with
    its own ``net`` config (same place among the fields, so the parameters keep their order), its
    ``feature_groups`` default where it differs, and ``family`` / ``needs_image`` for ``stacked_groups``."""
    source: DataCfg = field(default_factory=DataCfg)
    splitting: SplitCfg = field(default_factory=SplitCfg)
    net: object = None  # the family's net config
    stacking: StackingCfg = field(default_factory=StackingCfg)
    xgb: XGBCfg = field(default_factory=XGBCfg)  # the benchmark it stacks on
    tabular: TabularCfg = field(default_factory=TabularCfg)
    # the net reads image; the benchmark it stacks on reads the other groups
    feature_groups: FeaturesCfg = field(default_factory=image_features)
    upstream: UpstreamCfg = field(default_factory=UpstreamCfg)
    experiment: str = ""  # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)

    family: ClassVar[str] = ""
    needs_image: ClassVar[bool] = False

    def __post_init__(self) -> None:
        stacked_groups(self.feature_groups, self.family, needs_image=self.needs_image)


@dataclass(frozen=True)
class EnsembleMLPJob(StackedJob):
    net: MLPCfg = field(default_factory=MLPCfg)
    family: ClassVar[str] = "ensemble_mlp"


@dataclass(frozen=True)
class EnsembleConv1DJob(StackedJob):
    net: Conv1DCfg = field(default_factory=Conv1DCfg)
    family: ClassVar[str] = "ensemble_conv1d"
    needs_image: ClassVar[bool] = True


def reuse_key(*cfgs, extra: dict | None = None) -> str:
    """Hash of the result-affecting settings, used to find a reusable upstream run."""
    return params_hash({**flatten(*cfgs), **(extra or {})})


def benchmark_key(cfg: BenchmarkJob) -> str:
    """A benchmark run's reuse key: its booster, tabular and feature settings (the default groups hash as they
    did before groups existed, so earlier runs are still found)."""
    groups = None if cfg.feature_groups.groups == FeaturesCfg().groups else flatten(cfg.feature_groups)
    if cfg.feature_groups.image:
        groups = {**groups, **flatten(cfg.images)}
    return reuse_key(cfg.splitting, cfg.xgb, cfg.tabular, extra=groups)


def figures_for(parent: Parent | None) -> bool:
    """Whether a job logs its figures: always, except under a parent that turned them off (a trial)."""
    return parent is None or parent.figures


def child_of(run, parent: Parent | None) -> Parent:
    """The ``Parent`` an upstream job gets from the job running it: nested under ``run``, same figure rule."""
    return Parent(run.info.run_id, run.info.experiment_id, figures=figures_for(parent))


def run_benchmark(cfg: BenchmarkJob = BenchmarkJob(), parent: Parent | None = None, on_step=None) -> JobResult:
    """Train the paper's tabular XGBoost benchmark and log it; ``on_step(round, val_rmse)`` after every round."""
    requested, cfg = cfg, for_protocol(cfg)
    prep = prepare(cfg.source, cfg.splitting)
    # other feature groups: never the benchmark an ensemble (default features) finds and stacks on
    tags = {"smp.model": BENCHMARK.name, "smp.reuse_key": benchmark_key(cfg)}
    check_groups(cfg.feature_groups, prep.rows("train"))  # a group the data cannot feed is refused before any run
    with job_run(BENCHMARK.name, cfg.experiment, flatten(requested), tags, parent, what=BENCHMARK.help) as run:
        up = upstream.for_images(prep, cfg.source, cfg.images, child_of(run, parent)) \
            if cfg.feature_groups.image else None
        fitted = fit.fit_benchmark(BENCHMARK, cfg, prep, on_step, up)
        record.record(BENCHMARK, fitted, prep, cfg.splitting, flatten(requested), protocol_changes(requested, cfg),
                      up, figures=figures_for(parent))
    log.info("benchmark: test RMSE %.4f (baseline %.4f)", fitted.metrics["test_rmse"],
             fitted.metrics["test_rmse_baseline"])
    return JobResult(run.info.run_id, fitted.metrics, fitted.model)


def run_pca_boost(cfg: PCABoostJob = PCABoostJob(), parent: Parent | None = None, on_step=None) -> JobResult:
    """[CLIP, handcrafted, tabular] -> PCA -> XGBoost (the paper's second model); ``on_step(round, val_rmse)``
    after every boosting round."""
    requested, cfg = cfg, for_protocol(cfg)
    prep = prepare(cfg.source, cfg.splitting)
    tags = {"smp.model": PCA_BOOST.name}
    check_groups(cfg.feature_groups, prep.rows("train"))
    with job_run(PCA_BOOST.name, cfg.experiment, flatten(requested), tags, parent, what=PCA_BOOST.help) as run:
        up = upstream.for_images(prep, cfg.source, cfg.upstream, child_of(run, parent)) \
            if cfg.feature_groups.image else upstream.Upstream()
        fitted = fit.fit_pca_boost(PCA_BOOST, cfg, prep, up.images, up.blocks, on_step)
        record.record(PCA_BOOST, fitted, prep, cfg.splitting, flatten(requested), protocol_changes(requested, cfg),
                      up, figures_for(parent))
    return JobResult(run.info.run_id, fitted.metrics, fitted.model)


def run_ensemble(cfg, family: Family, parent: Parent | None = None, on_step=None) -> JobResult:
    """Stack the benchmark's prediction with the family's other inputs in its net (the paper's MLP or Conv1D
    over the image features, or fusion over every group); ``on_step(epoch, val_rmse)`` after every epoch."""
    requested, cfg = cfg, for_protocol(cfg)
    prep = prepare(cfg.source, cfg.splitting)
    tags = {"smp.model": family.name, "smp.stacking": cfg.stacking.stacking, "smp.head": cfg.net.head}
    check_groups(cfg.feature_groups, prep.rows("train"))
    bench = BenchmarkJob(source=cfg.source, splitting=cfg.splitting, xgb=cfg.xgb, tabular=cfg.tabular,
                         feature_groups=cfg.feature_groups.without_image())
    with job_run(family.name, cfg.experiment, flatten(requested), tags, parent, what=family.help) as run:
        below = child_of(run, parent)
        up = upstream.for_ensemble(prep, cfg, benchmark_key(bench), below, lambda: run_benchmark(bench, parent=below))
        fitted = fit.fit_ensemble(family, cfg, prep, up.images, up.blocks, up.stacked, up.predictor,
                                  record.epoch_curves(on_step))
        record.record(family, fitted, prep, cfg.splitting, flatten(requested), protocol_changes(requested, cfg),
                      up, figures_for(parent))
    return JobResult(run.info.run_id, fitted.metrics, fitted.model)


def run_ensemble_mlp(cfg: EnsembleMLPJob = EnsembleMLPJob(), parent: Parent | None = None,
                     on_step=None) -> JobResult:
    """The paper's ensemble MLP (the main job)."""
    return run_ensemble(cfg, ENSEMBLE_MLP, parent, on_step)


def run_ensemble_conv1d(cfg: EnsembleConv1DJob = EnsembleConv1DJob(), parent: Parent | None = None,
                        on_step=None) -> JobResult:
    """The paper's ensemble Conv1D."""
    return run_ensemble(cfg, ENSEMBLE_CONV1D, parent, on_step)


# --------------------------------------------------------------------------- the families
BENCHMARK = Family(
    "benchmark", "the paper's tabular XGBoost benchmark", run_benchmark, BenchmarkJob, model=BenchmarkModel,
    space=xgb_space, paper=(1.178, 0.01, 1.37),
    description="the paper's XGBoost on post and user metadata (no image)")
PCA_BOOST = Family(
    "pca_boost", "[CLIP, handcrafted, tabular] -> PCA -> XGBoost", run_pca_boost, PCABoostJob, model=PCABoostModel,
    space=pca_boost_space, paper=(1.238, 0.02, 1.77),
    description="XGBoost on PCA of [CLIP, handcrafted image features, tabular features]")
ENSEMBLE_MLP = Family(
    "ensemble_mlp", "benchmark prediction + image features -> MLP (the main job)", run_ensemble_mlp, EnsembleMLPJob,
    model=EnsembleModel, net=MLPRegressor, space=mlp_space, paper=(1.168, -0.19, 1.33), epochs=True,
    description="MLP over the benchmark's prediction and the image features")
ENSEMBLE_CONV1D = Family(
    "ensemble_conv1d", "benchmark prediction + PCA'd image features -> Conv1D net", run_ensemble_conv1d,
    EnsembleConv1DJob, model=EnsembleModel, net=Conv1DRegressor, space=conv1d_space, paper=(1.176, 0.07, 1.38),
    epochs=True,
    description="Conv1D net over the benchmark's prediction and PCA'd image features")
