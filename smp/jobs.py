"""What a job and a model family are (types only; the tables live above the jobs: ``smp.families`` for the
model families, ``smp.catalog`` for every entry point).

Each job's module defines its own ``Job`` (a model family's module its ``Family``) beside its run function and
config class, so the run function can say what it is (``help``) without looking itself up, and the tables
that list them import them directly: the import graph shows every real dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Job:
    name: str
    help: str             # one line: the CLI's help, the MLproject comment, a run's first description
    run: Callable         # run(cfg, ...) -> smp.tracking.JobResult
    config: type          # the frozen config dataclass (its defaults are the paper's)

    def default_config(self):
        return self.config()


@dataclass(frozen=True)
class Family(Job):
    """A model family: trained, logged as a model, compared, tuned and promoted."""

    model: type = object          # the model class (``model.from_config(job_cfg, **inputs)``)
    space: Callable | None = None  # space(trial) -> {leaf: value}: the Optuna search space
    description: str = ""         # what the logged model is (its registry/model page)
    paper: tuple[float, float, float] | None = None  # the paper's test RMSE, bias, error variance (SMPD, 80k);
    #                                                  None for a family beyond the paper
    net: type | None = None       # net families: the smp.nets regressor class the model wraps
    epochs: bool = False          # its steps are epochs (a study reports each), not boosting rounds (every Nth)

    def build(self, cfg, **inputs):
        """An unfitted model of this family from its job config ``cfg``; ``inputs``: what it is built around
        beyond its settings (``images``: an ``ImageFeatureSource``; ``benchmark``: the fitted predictor the
        ensembles stack on)."""
        model = self.model.from_job(cfg, family=self.name, net=self.net, **inputs)
        model.family = self.name
        return model


def table(*jobs: Job) -> dict[str, Job]:
    """``{name: job}``, refusing two jobs of one name."""
    out: dict[str, Job] = {}
    for job in jobs:
        if job.name in out:
            raise ValueError(f"two jobs named {job.name!r}")
        out[job.name] = job
    return out
