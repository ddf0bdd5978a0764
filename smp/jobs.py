"""The one table of jobs: every entry point, and for the model families what the rest of smp needs.

``cli`` (subcommands, MLproject), ``tune`` (run function, search space), ``registry`` and ``report``
(which runs are models, the paper's figures), ``serving`` (model descriptions) and ``models`` (which
class a family builds) all read this table; adding a model family is one entry here plus its code.
Names are strings and modules are imported only when a job is used, so this module imports nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    name: str
    module: str           # smp.<module> holds the run function and the config class
    run: str              # run(cfg, ...) -> JobResult
    config: str           # the frozen config dataclass (its defaults are the paper's)
    help: str
    space: str = ""       # model families: smp.tune.<space>(trial) -> {leaf: value}, the Optuna search space
    paper: tuple[float, float, float] | None = None  # the paper's test RMSE, bias, error variance (SMPD, 80k)
    description: str = ""  # model families: what the logged model is (its registry/model page)
    model: str = ""       # model families: the smp.models class (``models.create_model``)
    net: str = ""         # net families: the smp.nets regressor class

    @property
    def family(self) -> bool:
        """A model family: trained, logged as a model, compared, tuned and promoted."""
        return bool(self.model)

    def run_function(self):
        return getattr(importlib.import_module(f"smp.{self.module}"), self.run)

    def default_config(self):
        return getattr(importlib.import_module(f"smp.{self.module}"), self.config)()


JOBS: dict[str, Job] = {job.name: job for job in (
    Job("synth", "synth", "run_synth", "SynthJob", "write a synthetic SMPD dataset (official layout, JPEGs)"),
    Job("embed", "embed", "run_embed", "EmbedJob", "CLIP + handcrafted image features, cached by content"),
    Job("benchmark", "train", "run_benchmark", "BenchmarkJob", "the paper's tabular XGBoost benchmark",
        space="xgb_space", paper=(1.178, 0.01, 1.37),
        description="the paper's XGBoost on post and user metadata (no image)", model="BenchmarkModel"),
    Job("pca_boost", "train", "run_pca_boost", "PCABoostJob", "[CLIP, handcrafted, tabular] -> PCA -> XGBoost",
        space="pca_boost_space", paper=(1.238, 0.02, 1.77),
        description="XGBoost on PCA of [CLIP, handcrafted image features, tabular features]", model="PCABoostModel"),
    Job("ensemble_mlp", "train", "run_ensemble_mlp", "EnsembleMLPJob",
        "benchmark prediction + image features -> MLP (the main job)", space="mlp_space",
        paper=(1.168, -0.19, 1.33), description="MLP over the benchmark's prediction and the image features",
        model="EnsembleModel", net="MLPRegressor"),
    Job("ensemble_conv1d", "train", "run_ensemble_conv1d", "EnsembleConv1DJob",
        "benchmark prediction + PCA'd image features -> Conv1D net", space="conv1d_space",
        paper=(1.176, 0.07, 1.38), description="Conv1D net over the benchmark's prediction and PCA'd image features",
        model="EnsembleModel", net="Conv1DRegressor"),
    Job("compare", "report", "run_compare", "CompareJob", "the paper's results table from this experiment's runs"),
    Job("tune", "tune", "run_tune", "TuneJob", "an Optuna study (nested MLflow runs) for one model family"),
    Job("promote", "registry", "run_promote", "PromoteJob",
        "register the best run; alias champion only if it beats the current champion"),
    Job("predict", "predict", "run_predict", "PredictJob", "predict popularity for raw posts with a model URI"),
)}

FAMILIES: tuple[str, ...] = tuple(name for name, job in JOBS.items() if job.family)
NET_FAMILIES: tuple[str, ...] = tuple(name for name, job in JOBS.items() if job.net)


def job(name: str) -> Job:
    """The table entry of ``name``; ``KeyError`` naming the known jobs otherwise."""
    try:
        return JOBS[name]
    except KeyError:
        raise KeyError(f"unknown job {name!r}; expected one of {sorted(JOBS)}") from None


def family(name: str) -> Job:
    """The table entry of model family ``name``; ``ConfigError`` naming the families otherwise."""
    if name not in FAMILIES:
        from smp.config import ConfigError

        raise ConfigError(f"model family {name!r}: expected one of {', '.join(FAMILIES)}")
    return JOBS[name]
