"""Stage 7, a model job's record phase: one call logs what the fit made, on the job's open run.

``record`` logs the data inputs and counts, the settings used where they differ from those asked
(``effective/``), the upstream runs, the fit's metrics, figures and tables, the run's description and
the model, with each split's metrics linked to the model and to that split's dataset. ``epoch_curves`` is
the one thing logged while fitting: a net's per-epoch curves, live in the UI.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np

from smp.fit import Fitted
from smp.jobs import Family
from smp.packaging import example_input, log_model
from smp.splits import Prepared, SplitCfg
from smp.config import sig
from smp.tracking import describe_run, log_data_inputs, log_figure, log_params
from smp.upstream import Upstream

log = logging.getLogger("smp.record")


def headline(metrics: dict[str, float]) -> str:
    """The run's test figures for its description, 4 significant digits, beside the mean predictor."""
    if "test_rmse" not in metrics:
        return ""
    return (f"Test RMSE {sig(metrics['test_rmse'])} (mean predictor {sig(metrics.get('test_rmse_baseline'))}), "
            f"MAE {sig(metrics.get('test_mae'))}, Spearman {sig(metrics.get('test_spearman'))}, "
            f"bias {sig(metrics.get('test_bias'))}.")


def model_run_note(family: Family, prep: Prepared, splitting: SplitCfg, metrics: dict[str, float],
                   changed: dict[str, object], requested: dict[str, object], reused: dict[str, str]) -> str:
    """A model run's description: what it is, on what, its test figures, what the job changed, what it reused."""
    source = str(prep.posts.attrs.get("source", "data")).rstrip("/").split("/")[-1]
    sizes = " / ".join(f"{len(prep.parts[p]):,}" for p in ("train", "val", "test"))
    groups = f"; features {requested['features']}" if requested.get("features") else ""
    text = (f"{family.name}: {family.description}, on {source} (split {splitting.split}, seed {splitting.seed}; "
            f"{sizes} train / val / test posts{groups}). {headline(metrics)}")
    if changed:
        why = "split=chrono's settings for later posts (chrono_tuned=true)" if splitting.split == "chrono" else "the job"
        text += (" Settings changed by " + why + ": "
                 + ", ".join(f"{k} {requested.get(k)} -> {v}" for k, v in changed.items())
                 + " (effective/ params; the requested values are the plain params).")
    if reused:
        text += " Upstream: " + ", ".join(f"{k} run {v}" for k, v in reused.items()) + "."
    return text


def log_prepared(prep: Prepared, splitting: SplitCfg) -> dict:
    """Log the data inputs, the data hash and the row counts of a prepared split; return ``{split: dataset}``."""
    name = str(prep.posts.attrs.get("source", "data")).rstrip("/").split("/")[-1] or "data"
    datasets = log_data_inputs(prep.posts, prep.parts, name, prep.digest, splitting.split, splitting.seed)
    mlflow.set_tags({"smp.data_hash": prep.digest, "smp.data_source": str(prep.posts.attrs.get("source")),
                     "smp.split": splitting.split})
    issues = prep.posts.attrs.get("parse_issues") or {}
    # what was used, beside the requested `sample_size` (counts are params: facts of the run, not curves)
    log_params({"data/posts": len(prep.posts), **{f"data/rows_{k}": len(v) for k, v in prep.parts.items()},
                "data/missing_label_rows": prep.n_missing_label, "data/parse_issues": sum(issues.values())})
    if issues:
        mlflow.log_dict(issues, "data/parse_issues.json")
    return datasets


def epoch_curves(on_step=None):
    """A net's ``on_epoch(epoch, train_loss, val_rmse)``: logs both curves at that step (live in the UI), then
    calls the caller's ``on_step(epoch, val_rmse)``."""

    def on_epoch(epoch: int, train_loss: float, val_rmse: float) -> None:
        mlflow.log_metrics({"train_loss": train_loss, "val_rmse_epoch": val_rmse}, step=epoch)
        if on_step is not None:
            on_step(epoch, val_rmse)

    return on_epoch


def record(family: Family, fitted: Fitted, prep: Prepared, splitting: SplitCfg, requested: dict[str, object],
           changed: dict[str, object], upstream: Upstream | None = None, figures: bool = True) -> None:
    """Log everything a model job made on the active run: data inputs and counts, upstream runs, effective
    settings (``changed``: the job's protocol replaced them; then upstream's and the fit's), the fit's facts,
    metrics, figures (``figures``: drawn at all) and tables, the description, and the model with each
    split's metrics linked to it and to that split's dataset."""
    upstream = upstream or Upstream()
    model, metrics = fitted.model, fitted.metrics
    datasets = log_prepared(prep, splitting)
    if upstream.tags or fitted.tags:
        mlflow.set_tags({**upstream.tags, **fitted.tags})
    effective = {**changed, **upstream.effective, **fitted.effective}
    if effective:  # what was used, beside the requested value (a protocol's default, an auto resolved, a fallback)
        log_params({f"effective/{k}": v for k, v in effective.items()})
    if fitted.facts:
        log_params(fitted.facts)
    mlflow.log_metrics({**upstream.metrics, **fitted.run_metrics})
    for name, draw in fitted.figures.items():
        log_figure(draw, name, figures)
    for name, content in fitted.tables.items():
        mlflow.log_dict(content, name)
    note = " ".join([model_run_note(family, prep, splitting, metrics, changed, requested, upstream.runs),
                     *fitted.notes])
    beats = bool(metrics.get("test_rmse", np.inf) < metrics.get("test_rmse_baseline", -np.inf))
    mlflow.set_tag("smp.beats_mean_predictor", str(beats).lower())  # promote and the UI see a model that learnt nothing
    if not beats:
        log.warning("%s: test RMSE %s is not below the mean predictor's %s: the model learnt nothing that holds on "
                    "the test posts (tagged smp.beats_mean_predictor=false)", family.name,
                    sig(metrics.get("test_rmse")), sig(metrics.get("test_rmse_baseline")))
        note += " WARNING: it does not beat the mean predictor on the test posts (smp.beats_mean_predictor=false)."
    describe_run(note)
    example = example_input(prep.rows("test"), model.input_fields_, images=fitted.example_images)
    info = log_model(model, example, name=family.name, summary=headline(metrics), description=family.description)
    for part in ("val", "test"):
        values = {k: v for k, v in metrics.items() if k.startswith(f"{part}_") and np.isfinite(v)}
        mlflow.log_metrics(values, model_id=getattr(info, "model_id", None), dataset=datasets.get(part))
