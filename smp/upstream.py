"""Stage 7, a model job's resolve phase: find or make what the job stands on, before anything is fitted.

* the embed run holding the data's image features (reused by content and embedding settings, or run now as a
  child of the job's run), and the image block of each split read from it;
* the benchmark run the ensembles stack on (same data, split and booster settings), and its fitted model;
* the benchmark's fold models, whose out-of-fold predictions are the ensembles' training input: cached as an
  artifact of the benchmark run (``fold_models``), fitted and attached when absent or stale.

Everything found is returned as an ``Upstream`` (run ids, inputs, what was used instead of what was asked);
the job's record phase logs it. MLflow is read and written here and in ``smp.record``, never while fitting.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from smp.data import DataCfg, DataError
from smp.models import BenchmarkModel, CrossFitBenchmark, ImageFeatureSource, cross_fit, fold_count
from smp.splits import Prepared
from smp.tracking import Parent, find_finished_run, logged_model_uri

log = logging.getLogger("smp.upstream")


@dataclass
class Upstream:
    """What a job found or made before fitting, and what the record phase logs about it."""

    runs: dict[str, str] = field(default_factory=dict)   # {"embed": run id, "benchmark": run id}
    tags: dict[str, str] = field(default_factory=dict)
    effective: dict[str, object] = field(default_factory=dict)  # settings used where they differ from the asked
    metrics: dict[str, float] = field(default_factory=dict)     # e.g. time/oof_s when fold models were fitted
    images: ImageFeatureSource | None = None   # how the logged model computes image features for new posts
    blocks: dict[str, np.ndarray] | None = None   # split -> image block (float32, NaN = no usable image)
    stacked: dict[str, np.ndarray] | None = None  # split -> the benchmark prediction the ensembles stack on
    predictor: object = None  # the benchmark predictor the logged ensemble uses for new posts


# --------------------------------------------------------------------------- image features
def embed_run(prep: Prepared, source: DataCfg, up, parent: Parent) -> tuple[str, object, dict, dict]:
    """The embed run holding this data's image features (``up.embed_run``, else a finished one with the same
    data and embedding settings, else one run now under ``parent``): ``(run id, the EmbedCfg it used, tags,
    effective settings)``. ``up``: the job's ``UpstreamCfg``."""
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
    run_tags = mlflow.get_run(run_id).data.tags
    used = EmbedCfg(clip_model=up.clip_model, clip_pretrained=run_tags.get("smp.clip_effective_pretrained",
                                                                          up.clip_pretrained),
                    checkpoint=up.checkpoint, progress=False)
    tags = {"smp.embed_run": run_id, "smp.clip_random_weights": run_tags.get("smp.clip_random_weights", "unknown")}
    # a fallback (the demo offline) is logged beside the requested weights
    effective = {"clip_pretrained": used.clip_pretrained} if used.clip_pretrained != up.clip_pretrained else {}
    return run_id, used, tags, effective


def image_blocks(prep: Prepared, run_id: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The image block (float32, NaN = no usable image) for each split, aligned to its rows, and its columns."""
    import pyarrow.parquet as pq

    from smp.models import image_columns

    # column by column from Arrow into one float32 block: the 1024-wide CLIP part is never held as a
    # pandas frame (that would be two more copies of it at the peak)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="features.parquet")
    table = pq.read_table(path)
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


def for_images(prep: Prepared, source: DataCfg, images, parent: Parent, up: Upstream | None = None) -> Upstream:
    """The image inputs of a job reading the ``image`` group (``images``: its ``ImageInputCfg`` / ``UpstreamCfg``,
    which embed run or settings)."""
    up = up or Upstream()
    run_id, embed_cfg, tags, effective = embed_run(prep, source, images, parent)
    up.blocks, cols = image_blocks(prep, run_id)
    up.images = ImageFeatureSource(cols, embed_cfg)
    up.runs["embed"] = run_id
    up.tags.update(tags)
    up.effective.update(effective)
    return up


# --------------------------------------------------------------------------- the stacked benchmark
def benchmark_run(prep: Prepared, key: str, given: str, parent: Parent,
                  make: Callable[[], object]) -> tuple[str, BenchmarkModel]:
    """The benchmark run to stack on and its fitted model: ``given``, else a finished one with this data and
    ``key`` (``smp.reuse_key``: the booster and feature settings), else ``make()`` (the benchmark job, run now
    under ``parent``; it returns a ``JobResult``)."""
    run_id = given or find_finished_run(parent.experiment_id, {
        "smp.job": "benchmark", "smp.data_hash": prep.digest, "smp.reuse_key": key})
    if run_id:
        log.info("reusing benchmark run %s", run_id)
        return run_id, mlflow.pyfunc.load_model(logged_model_uri(run_id)).unwrap_python_model().model
    made = make()
    return made.run_id, made.model


FOLDS_DIR = "stacking"  # the benchmark run's artifact folder holding its cached fold models


def fold_artifact(k: int, rounds: int | None) -> str:
    """The cached fold models' artifact name: one per K and tree count (``es``: each fold early-stopped)."""
    return f"{FOLDS_DIR}/folds_k{k}_{'es' if rounds is None else f't{rounds}'}.pkl"


def cached_fold_models(bench_run: str, name: str, train_pids: np.ndarray) -> tuple[CrossFitBenchmark | None, str]:
    """The fold models cached on ``bench_run`` under ``name`` if they were fitted on exactly these training
    posts: ``(models, "")``, else ``(None, why not)`` (absent, unreadable, or fitted on other posts)."""
    import cloudpickle  # noqa: F401 - the cache was written by cloudpickle; plain pickle reads it once imported

    try:
        path = mlflow.artifacts.download_artifacts(run_id=bench_run, artifact_path=name)
    except (MlflowException, OSError) as exc:
        return None, f"none cached ({type(exc).__name__})"
    try:
        with open(path, "rb") as fh:
            pids, fitted = pickle.load(fh)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, TypeError, ValueError) as exc:
        return None, f"the cached file is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(fitted, CrossFitBenchmark):
        return None, f"the cached file holds a {type(fitted).__name__}, not fold models"
    if not np.array_equal(np.asarray(pids), train_pids):
        return None, "the cached fold models were fitted on another training set"
    return fitted, ""


def fold_models(prep: Prepared, cfg, bench_run: str, k: int, rounds: int | None) -> tuple[CrossFitBenchmark, float]:
    """The K benchmark fold models of this training set: cached on ``bench_run``, else fitted now and attached
    to it for the next job. Returns them and the seconds spent fitting (0 when cached)."""
    import cloudpickle

    name = fold_artifact(k, rounds)
    train = prep.rows("train")
    train_pids = train["Pid"].astype(str).to_numpy()
    fitted, why = cached_fold_models(bench_run, name, train_pids)
    if fitted is not None:
        log.info("reusing the %d fold models of benchmark run %s", k, bench_run)
        return fitted, 0.0
    log.info("fitting %d fold models (%s)", k, why)
    t0 = time.perf_counter()
    fitted = cross_fit(train, prep.y("train"), prep.rows("val"), prep.y("val"), cfg.xgb, cfg.tabular,
                       cfg.splitting.seed, k, rounds, cfg.feature_groups.without_image(), cfg.splitting.split)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        path.write_bytes(cloudpickle.dumps((train_pids, fitted)))
        mlflow.MlflowClient().log_artifact(bench_run, str(path), FOLDS_DIR)
    return fitted, seconds


def stacking_inputs(prep: Prepared, cfg, bench_run: str, bench: BenchmarkModel, up: Upstream) -> Upstream:
    """The benchmark predictions fed to the ensemble (``up.stacked``) and the benchmark predictor the logged
    model uses (``up.predictor``).

    ``stacking=oof``, ``stacking_fit=refit`` (default): K fold models give the training rows their
    out-of-fold predictions, the benchmark fitted on all of train (the benchmark run's model) everything
    else. ``stacking_fit=crossfit``: everything else gets the K fold models' mean (no full fit needed;
    on small data the fold models are weaker than the full one: docs/benchmarks.md). ``stacking=in_sample``: the
    paper's leak. ``fold_rounds=benchmark`` (default): the fold models grow as many trees as the benchmark run's
    model, so the out-of-fold predictions come from models like the one val/test get, and no fold pays the
    early-stopping patience; ``early_stop``: each fold early-stops on val.
    """
    sc = cfg.stacking
    if sc.stacking == "in_sample":
        log.warning("stacking=in_sample: training rows get predictions of a model fitted on their own labels "
                    "(the paper's leak), kept only to measure its effect")
        up.stacked = {part: bench.predict(prep.rows(part)) for part in ("train", "val", "test")}
        up.predictor = bench
        return up
    rounds = int(bench.best_iteration_) if sc.fold_rounds == "benchmark" else None
    k = fold_count(sc.stacking_folds, len(prep.parts["train"]))
    if k != sc.stacking_folds:  # 0 = from the data
        up.effective["stacking_folds"] = k
    fitted, seconds = fold_models(prep, cfg, bench_run, k, rounds)
    if seconds:
        up.metrics["time/oof_s"] = seconds
    predictor = fitted if sc.stacking_fit == "crossfit" else bench
    up.stacked = {part: predictor.predict(prep.rows(part)) for part in ("val", "test")}
    up.stacked["train"] = fitted.oof_
    up.predictor = predictor
    return up


def for_ensemble(prep: Prepared, cfg, key: str, parent: Parent, make_benchmark: Callable[[], object]) -> Upstream:
    """Everything an ensemble stands on: the image inputs (none without the ``image`` group: each split's block
    then has no columns), the benchmark run and model (``key``: its reuse key; ``make_benchmark()`` runs it when
    none is found) and the stacked predictions."""
    if cfg.feature_groups.image:
        up = for_images(prep, cfg.source, cfg.upstream, parent)
    else:
        up = Upstream(blocks={p: np.empty((len(idx), 0), dtype=np.float32) for p, idx in prep.parts.items()})
    bench_run, bench = benchmark_run(prep, key, cfg.upstream.benchmark_run, parent, make_benchmark)
    up.runs["benchmark"] = bench_run
    up.tags["smp.benchmark_run"] = bench_run
    return stacking_inputs(prep, cfg, bench_run, bench, up)
