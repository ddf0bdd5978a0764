"""Stage 6: the model jobs behind the entry points, each ``run(cfg, parent=None, on_step=None) -> JobResult``.

A job loads the posts, drops unlabelled rows (counted), subsamples, splits,
fits its model on train (early stopping on val), evaluates on val and test,
and logs params, dataset inputs, metrics, figures and a pyfunc model that
predicts from raw post rows.  Lineage is explicit: a job made under another
run (an upstream embed or benchmark run, a study's trial) receives that run
as ``parent`` and returns its own run id, metrics and model as a
``JobResult``; ``on_step(step, val_rmse)`` is the one hook into fitting.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from smp import plots
from smp.config import ConfigError, check, flatten, one_of, zero_or_at_least
from smp.data import DataCfg, DataError
from smp.evaluate import baseline_metrics, regression_metrics
from smp.features import TabularCfg
from smp.image_features import PAPER_CLIP_MODEL, PAPER_CLIP_PRETRAINED
from smp.models import (BenchmarkModel, ImageFeatureSource, Part, PCACfg, XGBCfg, create_model, cross_fit,
                        fold_count)
from smp.nets import Conv1DCfg, MLPCfg
from smp.serving import example_input, log_model
from smp.splits import Prepared, SplitCfg, prepare
from smp.tracking import (JobResult, Parent, describe_run, find_finished_run, job_run, log_data_inputs, log_figure,
                          log_params, logged_model_uri, sig)

log = logging.getLogger("smp.train")


@dataclass(frozen=True)
class BenchmarkJob:
    source: DataCfg = field(default_factory=DataCfg)
    splitting: SplitCfg = field(default_factory=SplitCfg)
    xgb: XGBCfg = field(default_factory=XGBCfg)
    tabular: TabularCfg = field(default_factory=TabularCfg)
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


def log_effective(settings: dict[str, object]) -> None:
    """The settings a job used where they differ from what was asked (a protocol's defaults, an ``auto``
    resolved, a fallback), as ``effective/<setting>`` params beside the requested ``<setting>``."""
    if settings:
        log_params({f"effective/{k}": v for k, v in settings.items()})


def tree_effective(model) -> dict[str, object]:
    """The tree method, bins, device and threads the booster(s) used (``auto`` / 0 resolved); threads 0
    (every core) as the number of cores."""
    import os

    settings = dict(getattr(model, "tree_settings_", None) or {})
    if "n_jobs" in settings and not settings["n_jobs"]:
        settings["n_jobs"] = os.cpu_count() or 1
    return settings


def headline(metrics: dict[str, float]) -> str:
    """The run's test figures for its description, 4 significant digits, beside the mean predictor."""
    if "test_rmse" not in metrics:
        return ""
    return (f"Test RMSE {sig(metrics['test_rmse'])} (mean predictor {sig(metrics.get('test_rmse_baseline'))}), "
            f"MAE {sig(metrics.get('test_mae'))}, Spearman {sig(metrics.get('test_spearman'))}, "
            f"bias {sig(metrics.get('test_bias'))}.")


def model_run_note(family: str, prep: Prepared, splitting: SplitCfg, metrics: dict[str, float],
                   changed: dict[str, object], requested: dict[str, object], reused: dict[str, str]) -> str:
    """A model run's description: what it is, on what, its test figures, what the job changed, what it reused."""
    from smp.jobs import JOBS

    source = str(prep.posts.attrs.get("source", "data")).rstrip("/").split("/")[-1]
    sizes = " / ".join(f"{len(prep.parts[p]):,}" for p in ("train", "val", "test"))
    text = (f"{family}: {JOBS[family].description}, on {source} (split {splitting.split}, seed {splitting.seed}; "
            f"{sizes} train / val / test posts). {headline(metrics)}")
    if changed:
        why = "split=chrono's settings for later posts (chrono_tuned=true)" if splitting.split == "chrono" else "the job"
        text += (" Settings changed by " + why + ": "
                 + ", ".join(f"{k} {requested.get(k)} -> {v}" for k, v in changed.items())
                 + " (effective/ params; the requested values are the plain params).")
    if reused:
        text += " Upstream: " + ", ".join(f"{k} run {v}" for k, v in reused.items()) + "."
    return text


def log_prepared(prep: Prepared, splitting: SplitCfg) -> None:
    """Log the data inputs, the data hash and the row counts of a prepared split."""
    name = str(prep.posts.attrs.get("source", "data")).rstrip("/").split("/")[-1] or "data"
    prep.datasets = log_data_inputs(prep.posts, prep.parts, name, prep.digest, splitting.split, splitting.seed)
    mlflow.set_tags({"smp.data_hash": prep.digest, "smp.data_source": str(prep.posts.attrs.get("source")),
                     "smp.split": splitting.split})
    issues = prep.posts.attrs.get("parse_issues") or {}
    # what was used, beside the requested `sample_size` (counts are params: facts of the run, not curves)
    log_params({"data/posts": len(prep.posts), **{f"data/rows_{k}": len(v) for k, v in prep.parts.items()},
                "data/missing_label_rows": prep.n_missing_label, "data/parse_issues": sum(issues.values())})
    if issues:
        mlflow.log_dict(issues, "data/parse_issues.json")


def evaluate_and_log(model, prep: Prepared, preds: dict[str, np.ndarray] | None = None,
                     figures: bool = True) -> dict[str, float]:
    """Compute val/test metrics (and the mean baseline) and log the two standard figures; the metrics are
    logged by ``log_model_and_metrics`` once the model exists (so they are linked to it)."""
    metrics: dict[str, float] = {}
    preds = preds or {}
    for part in ("val", "test"):
        p = preds.get(part)
        if p is None:
            p = model.predict(prep.rows(part))
            preds[part] = p
        metrics.update(regression_metrics(prep.y(part), p, part))
        metrics.update(baseline_metrics(prep.y("train"), prep.y(part), part))
    y, p = prep.y("test"), preds["test"]
    log_figure(lambda: plots.pred_vs_actual(y, p, f"{model.family}: test"), "pred_vs_actual.png", figures)
    log_figure(lambda: plots.error_hist(y, p, f"{model.family}: test error"), "error_hist.png", figures)
    return metrics


def log_model_and_metrics(model, example: pd.DataFrame, metrics: dict[str, float], prep: Prepared,
                          note: str = "") -> None:
    """Log the model, then each split's metrics on the run, linked to the model and to that split's dataset
    (the logged model's page lists them with the data they were measured on); ``note``: the run's
    description (the logged model's carries the same figures)."""
    beats = bool(metrics.get("test_rmse", np.inf) < metrics.get("test_rmse_baseline", -np.inf))
    mlflow.set_tag("smp.beats_mean_predictor", str(beats).lower())  # promote and the UI see a model that learnt nothing
    if not beats:
        log.warning("%s: test RMSE %s is not below the mean predictor's %s: the model learnt nothing that holds on "
                    "the test posts (tagged smp.beats_mean_predictor=false)", model.family,
                    sig(metrics.get("test_rmse")), sig(metrics.get("test_rmse_baseline")))
        note += " WARNING: it does not beat the mean predictor on the test posts (smp.beats_mean_predictor=false)."
    if note:
        describe_run(note)
    info = log_model(model, example, name=model.family, summary=headline(metrics))  # named after its family
    for part in ("val", "test"):
        values = {k: v for k, v in metrics.items() if k.startswith(f"{part}_") and np.isfinite(v)}
        mlflow.log_metrics(values, model_id=getattr(info, "model_id", None), dataset=prep.datasets.get(part))


def part(prep: Prepared, name: str, blocks: dict | None = None, stacked: dict | None = None) -> Part:
    """The model inputs of split ``name``: its rows and labels (and image block, stacked predictions)."""
    return Part(prep.rows(name), prep.y(name), None if blocks is None else blocks[name],
                None if stacked is None else stacked[name])


def figures_for(parent: Parent | None) -> bool:
    """Whether a job logs its figures: always, except under a parent that turned them off (a trial)."""
    return parent is None or parent.figures


def child_of(run, parent: Parent | None) -> Parent:
    """The ``Parent`` an upstream job gets from the job running it: nested under ``run``, same figure rule."""
    return Parent(run.info.run_id, run.info.experiment_id, figures=figures_for(parent))


def run_benchmark(cfg: BenchmarkJob = BenchmarkJob(), parent: Parent | None = None, on_step=None) -> JobResult:
    """Train the paper's tabular XGBoost benchmark and log it; return its run, metrics and model.

    ``on_step(round, val_rmse)`` is called after every boosting round (tuning reports and prunes there)."""
    requested, cfg = cfg, for_protocol(cfg)
    changed = protocol_changes(requested, cfg)
    prep = prepare(cfg.source, cfg.splitting)
    figures = figures_for(parent)
    tags = {"smp.model": "benchmark", "smp.reuse_key": reuse_key(cfg.splitting, cfg.xgb, cfg.tabular)}
    with job_run("benchmark", cfg.experiment, flatten(requested), tags, parent) as run:
        log_prepared(prep, cfg.splitting)
        t0 = time.perf_counter()
        model = create_model("benchmark", cfg).fit(part(prep, "train"), part(prep, "val"), on_step)
        log_effective({**changed, **tree_effective(model)})
        mlflow.log_metrics({"time/fit_s": time.perf_counter() - t0, "fit/best_iteration": model.best_iteration_,
                            "fit/n_features": float(len(model.featurizer_.feature_names_))})
        metrics = evaluate_and_log(model, prep, figures=figures)
        note = model_run_note("benchmark", prep, cfg.splitting, metrics, changed, flatten(requested), {})
        log_model_and_metrics(model, example_input(prep.rows("test"), model.input_fields_), metrics, prep, note)
        names, gain = model.importance()
        log_figure(lambda: plots.feature_importance(names, gain), "feature_importance.png", figures)
        mlflow.log_dict(json.loads(pd.Series(gain, index=names).sort_values(ascending=False).to_json()),
                        "feature_importance.json")
    log.info("benchmark: test RMSE %.4f (baseline %.4f)", metrics["test_rmse"], metrics["test_rmse_baseline"])
    return JobResult(run.info.run_id, metrics, model)


# --------------------------------------------------------------------------- image jobs
@dataclass(frozen=True)
class UpstreamCfg:
    embed_run: str = ""          # an embed run id to read image features from ("" = find or run one)
    benchmark_run: str = ""      # a benchmark run id to stack on ("" = find or run one)
    clip_model: str = PAPER_CLIP_MODEL  # the paper's CLIP backbone (used when embed runs upstream)
    clip_pretrained: str = PAPER_CLIP_PRETRAINED  # open_clip weights tag; "none" = random weights (offline demo/tests)
    checkpoint: str = ""         # local CLIP checkpoint file (overrides clip_pretrained)


def reuse_key(*cfgs, extra: dict | None = None) -> str:
    """Hash of the result-affecting settings, used to find a reusable upstream run."""
    from smp.tracking import params_hash

    return params_hash({**flatten(*cfgs), **(extra or {})})


def _features_path(run_id: str) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="features.parquet")


def upstream_embed(prep: Prepared, source: DataCfg, up: UpstreamCfg, parent: Parent) -> tuple[str, object]:
    """Id of the embed run that holds this data's image features (reused, or run now under ``parent``)."""
    from smp.embed import EmbedCfg, EmbedJob, embedding_key, run_embed

    if "image_path" not in prep.posts.columns:
        raise DataError(f"{prep.posts.attrs.get('source')}: this data has no images (e.g. the real posts.csv), "
                        "so image models cannot be trained on it; use the `benchmark` entry point instead")
    embed_cfg = EmbedCfg(clip_model=up.clip_model, clip_pretrained=up.clip_pretrained, checkpoint=up.checkpoint)
    run_id = up.embed_run or find_finished_run(parent.experiment_id, {
        "smp.job": "embed", "smp.data_hash": prep.digest, "smp.reuse_key": embedding_key(embed_cfg)})
    if run_id:
        log.info("reusing embed run %s", run_id)
    else:
        run_id = run_embed(EmbedJob(source=source, embed=embed_cfg), parent=parent).run_id
    tags = mlflow.get_run(run_id).data.tags
    effective = EmbedCfg(clip_model=up.clip_model, clip_pretrained=tags.get("smp.clip_effective_pretrained",
                                                                             up.clip_pretrained),
                         checkpoint=up.checkpoint, progress=False)
    mlflow.set_tags({"smp.embed_run": run_id,
                     "smp.clip_random_weights": tags.get("smp.clip_random_weights", "unknown")})
    if effective.clip_pretrained != up.clip_pretrained:  # a fallback (the demo offline): beside the requested one
        log_effective({"clip_pretrained": effective.clip_pretrained})
    return run_id, effective


def image_blocks(prep: Prepared, run_id: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The image block (float32, NaN = no usable image) for each split, aligned to its rows."""
    from smp.models import image_columns

    import pyarrow.parquet as pq

    # column by column from Arrow into one float32 block: the 1024-wide CLIP part is never held as a
    # pandas frame (that would be two more copies of it at the peak)
    table = pq.read_table(_features_path(run_id))
    cols = image_columns(pd.DataFrame(columns=table.column_names))
    pos = pd.Index(table.column("Pid").to_pandas().astype(str)).get_indexer(prep.posts["Pid"])
    block = np.empty((table.num_rows, len(cols)), dtype=np.float32)
    for j, col in enumerate(cols):
        block[:, j] = table.column(col).to_numpy()
    del table
    blocks = {}
    for part, idx in prep.parts.items():
        rows = pos[idx]
        out = block[np.clip(rows, 0, None)]
        out[rows < 0] = np.nan  # a post the embed run did not see has no image features
        blocks[part] = out
    missing = int((pos < 0).sum())
    if missing:
        log.warning("%d posts have no row in the embed run's features; treated as without image", missing)
    return blocks, cols


def upstream_benchmark(prep: Prepared, cfg, parent: Parent) -> tuple[str, BenchmarkModel]:
    """The benchmark run (same data, split and booster settings) and its fitted model (reused, or run now
    under ``parent``)."""
    key = reuse_key(cfg.splitting, cfg.xgb, cfg.tabular)
    run_id = cfg.upstream.benchmark_run or find_finished_run(parent.experiment_id, {
        "smp.job": "benchmark", "smp.data_hash": prep.digest, "smp.reuse_key": key})
    if run_id:
        log.info("reusing benchmark run %s", run_id)
        model = mlflow.pyfunc.load_model(logged_model_uri(run_id)).unwrap_python_model().model
    else:
        made = run_benchmark(BenchmarkJob(source=cfg.source, splitting=cfg.splitting, xgb=cfg.xgb,
                                          tabular=cfg.tabular), parent=parent)
        run_id, model = made.run_id, made.model
    mlflow.set_tag("smp.benchmark_run", run_id)
    return run_id, model


def stacking_inputs(prep: Prepared, cfg, bench_run: str, bench: BenchmarkModel):
    """Benchmark predictions fed to the ensemble, and the benchmark predictor the logged model uses.

    ``stacking=oof``, ``stacking_fit=refit`` (default): K fold models give the training rows their
    out-of-fold predictions, the benchmark fitted on all of train (the benchmark run's model) everything
    else. ``stacking_fit=crossfit``: everything else gets the K fold models' mean (no full fit needed;
    on small data the fold models are weaker than the full one: docs/benchmarks.md). ``stacking=in_sample``: the
    paper's leak. ``fold_rounds=benchmark`` (default): the fold models grow as many trees as the benchmark run's
    model, so the out-of-fold predictions come from models like the one val/test get, and no fold pays the
    early-stopping patience; ``early_stop``: each fold early-stops on val. Fold models / out-of-fold
    predictions are cached on the benchmark run.
    """
    sc = cfg.stacking
    if sc.stacking == "in_sample":
        log.warning("stacking=in_sample: training rows get predictions of a model fitted on their own labels "
                    "(the paper's leak), kept only to measure its effect")
        return {part: bench.predict(prep.rows(part)) for part in ("train", "val", "test")}, bench
    if sc.stacking != "oof":
        raise ConfigError(f"stacking={sc.stacking!r}: expected 'oof' or 'in_sample'")
    if sc.stacking_fit not in ("crossfit", "refit"):
        raise ConfigError(f"stacking_fit={sc.stacking_fit!r}: expected 'crossfit' or 'refit'")
    if sc.fold_rounds not in ("benchmark", "early_stop"):
        raise ConfigError(f"fold_rounds={sc.fold_rounds!r}: expected 'benchmark' or 'early_stop'")
    if sc.stacking_folds < 0 or sc.stacking_folds == 1:
        raise ConfigError(f"stacking_folds={sc.stacking_folds}: expected 0 (from the data) or at least 2")
    rounds = int(bench.best_iteration_) if sc.fold_rounds == "benchmark" else None
    k = fold_count(sc.stacking_folds, len(prep.rows("train")))
    if k != sc.stacking_folds:  # 0 = from the data
        log_effective({"stacking_folds": k})
    name = f"stacking/folds_k{k}_{'es' if rounds is None else f't{rounds}'}.pkl"
    train_pids = prep.rows("train")["Pid"].astype(str).to_numpy()
    client = mlflow.MlflowClient()
    try:
        import cloudpickle

        with open(mlflow.artifacts.download_artifacts(run_id=bench_run, artifact_path=name), "rb") as fh:
            pids, fitted = cloudpickle.load(fh)
        if not np.array_equal(pids, train_pids):
            raise LookupError("cached fold models were fitted on another training set")
        log.info("reusing the %d fold models of benchmark run %s", k, bench_run)
    except Exception:  # absent or stale: fit and attach to the benchmark run for next time
        import cloudpickle

        t0 = time.perf_counter()
        fitted = cross_fit(prep.rows("train"), prep.y("train"), prep.rows("val"), prep.y("val"), cfg.xgb,
                           cfg.tabular, cfg.splitting.seed, k, rounds)
        mlflow.log_metric("time/oof_s", time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_bytes(cloudpickle.dumps((train_pids, fitted)))
            client.log_artifact(bench_run, str(path), "stacking")
    predictor = fitted if sc.stacking_fit == "crossfit" else bench
    preds = {part: predictor.predict(prep.rows(part)) for part in ("val", "test")}
    preds["train"] = fitted.oof_
    return preds, predictor


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
    upstream: UpstreamCfg = field(default_factory=UpstreamCfg)
    experiment: str = ""


@dataclass(frozen=True)
class EnsembleMLPJob:
    source: DataCfg = field(default_factory=DataCfg)
    splitting: SplitCfg = field(default_factory=SplitCfg)
    net: MLPCfg = field(default_factory=MLPCfg)
    stacking: StackingCfg = field(default_factory=StackingCfg)
    xgb: XGBCfg = field(default_factory=XGBCfg)  # the benchmark it stacks on
    tabular: TabularCfg = field(default_factory=TabularCfg)
    upstream: UpstreamCfg = field(default_factory=UpstreamCfg)
    experiment: str = ""


@dataclass(frozen=True)
class EnsembleConv1DJob:
    source: DataCfg = field(default_factory=DataCfg)
    splitting: SplitCfg = field(default_factory=SplitCfg)
    net: Conv1DCfg = field(default_factory=Conv1DCfg)
    stacking: StackingCfg = field(default_factory=StackingCfg)
    xgb: XGBCfg = field(default_factory=XGBCfg)  # the benchmark it stacks on
    tabular: TabularCfg = field(default_factory=TabularCfg)
    upstream: UpstreamCfg = field(default_factory=UpstreamCfg)
    experiment: str = ""


def run_pca_boost(cfg: PCABoostJob = PCABoostJob(), parent: Parent | None = None, on_step=None) -> JobResult:
    """[CLIP, handcrafted, tabular] -> PCA -> XGBoost (the paper's second model); ``on_step(round, val_rmse)``
    after every boosting round."""
    requested, cfg = cfg, for_protocol(cfg)
    changed = protocol_changes(requested, cfg)
    prep = prepare(cfg.source, cfg.splitting)
    figures = figures_for(parent)
    with job_run("pca_boost", cfg.experiment, flatten(requested), {"smp.model": "pca_boost"}, parent) as run:
        log_prepared(prep, cfg.splitting)
        embed_run, embed_cfg = upstream_embed(prep, cfg.source, cfg.upstream, child_of(run, parent))
        blocks, cols = image_blocks(prep, embed_run)
        t0 = time.perf_counter()
        model = create_model("pca_boost", cfg, images=ImageFeatureSource(cols, embed_cfg)).fit(
            part(prep, "train", blocks), part(prep, "val", blocks), on_step)
        log_effective({**changed, **tree_effective(model)})
        mlflow.log_metrics({"time/fit_s": time.perf_counter() - t0, "fit/best_iteration": model.best_iteration_,
                            "fit/pca_components": float(model.pca_.n_components_),
                            "fit/pca_explained_variance": float(model.pca_.explained_variance_ratio_.sum())})
        log_figure(lambda: plots.explained_variance(model.pca_.explained_variance_ratio_), "explained_variance.png",
                   figures)
        preds = {p: model.predict(prep.rows(p), blocks[p]) for p in ("val", "test")}
        metrics = evaluate_and_log(model, prep, preds, figures)
        note = model_run_note("pca_boost", prep, cfg.splitting, metrics, changed, flatten(requested),
                              {"embed": embed_run})
        log_model_and_metrics(model, example_input(prep.rows("test"), model.input_fields_, images=True), metrics,
                              prep, note)
    return JobResult(run.info.run_id, metrics, model)


def run_ensemble(cfg, family: str, parent: Parent | None = None, on_step=None) -> JobResult:
    """Stack the benchmark's prediction with image features in the paper's MLP or Conv1D net;
    ``on_step(epoch, val_rmse)`` after every epoch."""
    requested, cfg = cfg, for_protocol(cfg)
    changed = protocol_changes(requested, cfg)
    prep = prepare(cfg.source, cfg.splitting)
    figures = figures_for(parent)
    tags = {"smp.model": family, "smp.stacking": cfg.stacking.stacking, "smp.head": cfg.net.head}
    with job_run(family, cfg.experiment, flatten(requested), tags, parent) as run:
        log_prepared(prep, cfg.splitting)
        log_effective(changed)  # the stacked benchmark's booster and features (its own run logs its tree settings)
        upstream = child_of(run, parent)
        embed_run, embed_cfg = upstream_embed(prep, cfg.source, cfg.upstream, upstream)
        bench_run, bench = upstream_benchmark(prep, cfg, upstream)
        stack, predictor = stacking_inputs(prep, cfg, bench_run, bench)
        blocks, cols = image_blocks(prep, embed_run)
        model = create_model(family, cfg, images=ImageFeatureSource(cols, embed_cfg), benchmark=predictor)
        net = model.net

        def epoch_hook(epoch, val_rmse):  # the per-epoch curves, live in the UI; then the caller's hook
            mlflow.log_metrics({"train_loss": net.history_[-1]["train_loss"], "val_rmse_epoch": val_rmse}, step=epoch)
            if on_step is not None:
                on_step(epoch, val_rmse)

        t0 = time.perf_counter()
        model.fit(part(prep, "train", blocks, stack), part(prep, "val", blocks, stack), epoch_hook)
        mlflow.log_metrics({"time/fit_s": time.perf_counter() - t0, "fit/best_epoch": float(net.best_epoch_),
                            "stacked_input/val_rmse": net.input_val_rmse_})
        log_params({"data/train_images": int(np.isfinite(blocks["train"]).all(axis=1).sum())})
        beats = net.beats_input_
        mlflow.set_tag("smp.beats_stacked_benchmark", str(beats).lower())
        if beats is False:
            log.warning("%s: validation RMSE %.4f does not beat its stacked benchmark input (%.4f)%s", family,
                        net.best_val_rmse_, net.input_val_rmse_,
                        "; the residual net fell back to the input (epoch 0)" if cfg.net.head == "residual" else "")
        log_figure(lambda: plots.training_curve(net.history_, family, net.best_epoch_, net.input_val_rmse_),
                   "training_curve.png", figures)
        preds = {p: np.asarray(net.predict(model.stack(stack[p], blocks[p])), dtype=float) for p in ("val", "test")}
        metrics = evaluate_and_log(model, prep, preds, figures)
        # the benchmark prediction the net was handed, scored on the same test posts (what the net must beat)
        metrics["stacked_input/test_rmse"] = regression_metrics(prep.y("test"), stack["test"], "test")["test_rmse"]
        mlflow.log_metric("stacked_input/test_rmse", metrics["stacked_input/test_rmse"])
        note = model_run_note(family, prep, cfg.splitting, metrics, changed, flatten(requested),
                              {"embed": embed_run, "benchmark": bench_run})
        note += (f" Its stacked benchmark input scores test RMSE {sig(metrics['stacked_input/test_rmse'])}"
                 + ("; the residual net did not beat it on validation and fell back to it (epoch 0)."
                    if beats is False and cfg.net.head == "residual" else "."))
        log_model_and_metrics(model, example_input(prep.rows("test"), model.input_fields_, images=True),
                              metrics, prep, note)
    return JobResult(run.info.run_id, metrics, model)


def run_ensemble_mlp(cfg: EnsembleMLPJob = EnsembleMLPJob(), parent: Parent | None = None,
                     on_step=None) -> JobResult:
    """The paper's ensemble MLP (the main job)."""
    return run_ensemble(cfg, "ensemble_mlp", parent, on_step)


def run_ensemble_conv1d(cfg: EnsembleConv1DJob = EnsembleConv1DJob(), parent: Parent | None = None,
                        on_step=None) -> JobResult:
    """The paper's ensemble Conv1D."""
    return run_ensemble(cfg, "ensemble_conv1d", parent, on_step)
