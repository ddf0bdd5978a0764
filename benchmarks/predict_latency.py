"""Prediction latency of a champion-like model, in-process (the pyfunc loaded once).

Trains the tabular benchmark (paper depth, fewer trees) on a posts table,
promotes it to ``@champion`` in a throw-away tracking store, loads
``models:/smp-popularity@champion`` once, then times

* single-post requests (a 1-row DataFrame per call): p50 / p90 / p99 / mean;
* one batch of ``--batch`` posts: seconds and posts per second (best of ``--repeats``);
* the same through the bare model (no pyfunc layer) to show what the wrapper costs,
  the tabular featurizer alone, and the bare model with a one-thread booster.

With ``--image``, also an image model (``pca_boost`` on a synthetic SMPD set,
CLIP RN50 with random weights: same compute as the real weights): single
posts and a batch with the image features precomputed (columns sent with the
post), and single posts whose features are computed from the image bytes
(``image_b64``) -- images never seen before, then the same images again
(answered from the content-addressed feature cache).

    .venv/bin/python benchmarks/predict_latency.py                      # real posts.csv when present
    .venv/bin/python benchmarks/predict_latency.py --data demo --json out.json
    .venv/bin/python benchmarks/predict_latency.py --image --json out.json

Targets: single tabular post p50 < 20 ms; 10,000 tabular posts < 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REAL_POSTS = "/work/shared/data/smpd2019/posts.csv"


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def time_single(predict, rows, n: int, warmup: int = 10) -> dict[str, float]:
    """Latency of ``predict`` on one post at a time (``n`` calls after ``warmup``)."""
    singles = [rows.iloc[[i % len(rows)]].reset_index(drop=True) for i in range(n + warmup)]
    for frame in singles[:warmup]:
        predict(frame)
    out = []
    for frame in singles[warmup:]:
        t0 = time.perf_counter()
        predict(frame)
        out.append(time.perf_counter() - t0)
    return percentiles(out)


def time_batch(predict, rows, repeats: int) -> dict[str, float]:
    """Seconds for one call on all ``rows`` (best and median of ``repeats``)."""
    predict(rows.head(100))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pred = predict(rows)
        runs.append(time.perf_counter() - t0)
        pred = getattr(pred, "popularity", pred)  # the pyfunc answers a frame (popularity, status); bare models an array
        assert len(pred) == len(rows) and np.isfinite(np.asarray(pred, dtype=float)).all()
    best = min(runs)
    return {"rows": len(rows), "best_s": best, "median_s": float(np.median(runs)), "posts_per_s": len(rows) / best}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=REAL_POSTS if Path(REAL_POSTS).exists() else "demo")
    parser.add_argument("--sample-size", type=int, default=80000, help="posts to train on (the paper's 80k)")
    parser.add_argument("--n-estimators", type=int, default=300)
    parser.add_argument("--max-depth", type=int, default=18, help="the paper's benchmark depth")
    parser.add_argument("--single", type=int, default=200, help="single-post requests to time")
    parser.add_argument("--batch", type=int, default=10000, help="posts in the batch request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image", action="store_true", help="also time an image model (minutes on a CPU)")
    parser.add_argument("--image-posts", type=int, default=300, help="synthetic posts to train the image model on")
    parser.add_argument("--image-single", type=int, default=20, help="unseen images to time one by one")
    parser.add_argument("--json", default="", help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the throw-away tracking store (path printed)")
    args = parser.parse_args(argv)
    args.json = str(Path(args.json).resolve()) if args.json else ""  # the run happens inside the store
    args.data = str(Path(args.data).resolve()) if Path(args.data).exists() else args.data
    store = tempfile.mkdtemp(prefix="smp-bench-")
    try:
        return run(args, store)
    finally:
        if args.keep:
            print(f"tracking store kept in {store}", file=sys.stderr)
        else:
            shutil.rmtree(store, ignore_errors=True)


def run(args, store: str) -> dict:
    """Train, promote and time; ``store`` holds the throw-away tracking store and feature cache."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    os.environ["SMP_CACHE_DIR"] = f"{store}/cache"  # a cold feature cache: "unseen" images really are
    os.chdir(store)  # artifacts (./mlruns) go to the throw-away store too
    import mlflow

    from smp.data import DataCfg, load_data
    from smp.models import XGBCfg
    from smp.registry import PromoteJob, run_promote
    from smp.splits import SplitCfg
    from smp.train import BenchmarkJob, run_benchmark

    t0 = time.perf_counter()
    metrics = run_benchmark(BenchmarkJob(
        source=DataCfg(data=args.data), splitting=SplitCfg(sample_size=args.sample_size),
        xgb=XGBCfg(n_estimators=args.n_estimators, max_depth=args.max_depth, learning_rate=0.05,
                   early_stopping_rounds=args.n_estimators), experiment="bench"))
    train_s = time.perf_counter() - t0
    run_promote(PromoteJob(experiment="bench"))

    t0 = time.perf_counter()
    model = mlflow.pyfunc.load_model("models:/smp-popularity@champion")
    load_s = time.perf_counter() - t0
    bare = model.unwrap_python_model().model
    posts = load_data(args.data).drop(columns=["label"], errors="ignore")
    posts.attrs = {}  # requests carry no loader metadata (pandas copies attrs on every operation)
    rng = np.random.default_rng(0)
    batch = posts.iloc[rng.integers(0, len(posts), args.batch)].reset_index(drop=True)
    singles = batch.head(args.single)

    result = {
        "data": args.data, "posts_in_file": len(posts), "train_seconds": train_s, "load_seconds": load_s,
        "model": {"family": "benchmark", "n_estimators": args.n_estimators, "max_depth": args.max_depth,
                  "trees_used": bare.best_iteration_, "test_rmse": metrics["test_rmse"]},
        "single_pyfunc": time_single(model.predict, singles, args.single),
        "single_bare": time_single(bare.predict, singles, args.single),
        "batch_pyfunc": time_batch(model.predict, batch, args.repeats),
        "batch_bare": time_batch(bare.predict, batch, args.repeats),
        "single_featurize_only": time_single(bare.featurizer_.transform, singles, args.single),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": os.getloadavg()[0]},
        "targets": {"single_p50_ms": 20.0, "batch_10k_s": 2.0},
    }
    # what the booster costs on one post with one thread instead of all cores (n_jobs=0)
    bare.booster_.set_params(n_jobs=1)
    result["single_bare_1thread"] = time_single(bare.predict, singles, args.single)
    result["meets_targets"] = {"single_p50": result["single_pyfunc"]["p50_ms"] < 20.0,
                               "batch_10k": result["batch_pyfunc"]["best_s"] * 10000 / args.batch < 2.0}
    if args.image:
        result["image_model"] = image_benchmark(args, Path(store))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def image_benchmark(args, store: Path) -> dict:
    """Latency of a pca_boost model: features precomputed vs computed from image bytes."""
    import base64

    import mlflow
    import pandas as pd

    from smp.data import DataCfg, load_data
    from smp.embed import EmbedCfg, EmbedJob, run_embed
    from smp.models import XGBCfg
    from smp.serving import model_input
    from smp.splits import SplitCfg
    from smp.synth import SynthCfg, generate
    from smp.train import PCABoostJob, UpstreamCfg, run_pca_boost

    data = generate(store / "smpd", SynthCfg(n=args.image_posts, seed=0))
    t0 = time.perf_counter()
    run_embed(EmbedJob(source=DataCfg(data=str(data)), embed=EmbedCfg(clip_pretrained="none", progress=False),
                       experiment="bench-img"))
    embed_run = mlflow.last_active_run().info.run_id
    embed_s = time.perf_counter() - t0
    metrics = run_pca_boost(PCABoostJob(
        source=DataCfg(data=str(data)), splitting=SplitCfg(sample_size=0),
        xgb=XGBCfg(n_estimators=args.n_estimators, max_depth=12, learning_rate=0.05,
                   early_stopping_rounds=args.n_estimators),
        upstream=UpstreamCfg(clip_pretrained="none", embed_run=embed_run), experiment="bench-img"))
    model = mlflow.pyfunc.load_model(f"runs:/{mlflow.last_active_run().info.run_id}/benchmark")
    cols = model.unwrap_python_model().model.images.columns

    feats = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=embed_run, artifact_path="features.parquet"))
    posts = load_data(str(data)).drop(columns=["label"])
    posts.attrs = {}
    given = model_input(model, posts.merge(feats[["Pid", *cols]], on="Pid")).drop(columns=["image_path"])
    rng = np.random.default_rng(0)
    batch = given.iloc[rng.integers(0, len(given), args.batch)].reset_index(drop=True)

    fresh = load_data(str(generate(store / "fresh", SynthCfg(n=args.image_single + 2, seed=1))))
    fresh["image_b64"] = [base64.b64encode(Path(p).read_bytes()).decode() for p in fresh["image_path"]]
    fresh = model_input(model, fresh.drop(columns=["label", "image_path"]))
    fresh.attrs = {}
    model.predict(fresh.iloc[:2])  # warm-up: CLIP weights loaded, first forward done
    unseen, cached = [], []
    for timings in (unseen, cached):  # the same images twice: computed, then from the feature cache
        for i in range(2, len(fresh)):
            row = fresh.iloc[[i]].reset_index(drop=True)
            t0 = time.perf_counter()
            model.predict(row)
            timings.append(time.perf_counter() - t0)
    return {"family": "pca_boost", "train_posts": args.image_posts, "embed_seconds": embed_s,
            "image_columns": len(cols), "test_rmse": metrics["test_rmse"], "clip": "RN50, random weights, CPU",
            "single_features_given": time_single(model.predict, given, args.single),
            "batch_features_given": time_batch(model.predict, batch, args.repeats),
            "single_from_image_bytes_unseen": percentiles(unseen),
            "single_from_image_bytes_cached": percentiles(cached)}


if __name__ == "__main__":
    main()
