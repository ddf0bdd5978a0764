"""The Spark engine at scale (issue 29): scoring and embedding, the pandas path against Spark ``local[2]``.

    .venv/bin/python benchmarks/spark_scale.py                       # everything (35-40 min on 2 cores, +9 min
                                                                     # to train the model on a first run)
    .venv/bin/python benchmarks/spark_scale.py --rows 100000 --skip-embed
    .venv/bin/python benchmarks/spark_scale.py --report WORK/spark_scale.json   # the tables again

Measures, each in a process of its own (so a peak is that run's own), in ``--work`` (default
``.smp_cache/spark_scale``; data, model and caches are kept there and reused by a rerun):

* scoring ``--rows`` synthetic posts (Parquet; 0.1 % of rows with an out-of-range number, a NaN or a time
  zone that is not one -- ``partial`` -- and 1 in 100,000 with a blank Pid -- ``error``) with the paper's
  benchmark XGBoost (the job's defaults, trained on 20,000 synthetic posts): ``smp predict`` as users run
  it, ``run_predict`` (pandas) against ``smp.spark.run_predict_spark`` on ``local[2]``: wall time, rows/s
  of the scoring itself (``time/rows_per_s``), peak memory of the driver's Python process, of the JVM
  (``local`` mode: driver and executors in one JVM) and of the Python workers together (sampled every
  0.2 s); then parity of the two outputs (max |difference| of ``popularity``, statuses equal);
* Spark's fixed cost: session start and a first one-row job, in three fresh processes (median);
* at the smallest size also MLflow's own ``mlflow.pyfunc.spark_udf`` on the same rows without the
  refused and unparseable ones (it fails the job on those), against the engine on the same clean rows;
* embedding the demo set (2,000 posts with JPEGs, CLIP RN50 with random weights: the same architecture
  and FLOPs as OpenAI's, no download): ``embed_images`` (the local ``embed``'s defaults: 2 decoding
  workers, torch's threads, frozen graph) against ``embed_spark`` on ``local[2]`` into a fresh cache, the
  per-worker model load, a rerun over the filled cache, the features' agreement, and the cost of indexing
  the cache per embed call (per chunk, extrapolated);
* an estimate for the full SMPD (486,000 posts) on N executor cores, from the per-core rates above.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_SMPD = 486_000
POST_COLUMNS = ["Uid", "Pid", "Category", "Subcategory", "Concept", "Postdate", "Latitude", "Longitude", "Geoaccuracy",
                "tag_count", "photo_count", "ispro", "canbuypro", "photo_firstdate", "photo_firstdatetaken",
                "timezone_offset", "Title", "Alltags"]


# --------------------------------------------------------------------------- memory of this process tree
def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TreeMemory:
    """Peak RSS (MiB) of this process's descendants, sampled: the JVM (``java``) and the Python processes below
    it (Spark's Python workers, summed)."""

    def __init__(self, every: float = 0.2):
        self.jvm = self.workers = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            kids = _children()
            stack, jvm_kb, workers_kb = list(kids.get(me, [])), 0, 0
            while stack:
                pid = stack.pop()
                stack += kids.get(pid, [])
                cmd = _cmd(pid)
                if "java" in cmd.split(" ")[0]:
                    jvm_kb = max(jvm_kb, _status_kb(pid, "VmRSS"))
                elif "python" in cmd:
                    workers_kb += _status_kb(pid, "VmRSS")
            self.jvm, self.workers = max(self.jvm, jvm_kb / 1024), max(self.workers, workers_kb / 1024)
            self._stop.wait(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def peak_self_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- children
def child(argv: list[str]) -> dict:
    """One measurement in this (fresh) process; returns its figures."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    what, work = argv[0], Path(argv[1])
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    os.environ["SMP_CACHE_DIR"] = str(work / "smp_cache")
    load_before = os.getloadavg()[0]
    out = {"data": make_data, "model": train_model, "startup": startup, "score": score, "udf": score_udf,
            "parity": parity, "warm": warm, "embed_local": embed_local, "embed_spark": embed_spark, "index": index_cost}[what](
        work, *argv[2:])
    return {**out, "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)]}


def make_data(work: Path, rows: str) -> dict:
    """posts_<N>.parquet (with bad rows) and posts_<N>_clean.parquet; 100,000 drawn posts tiled with new Pids."""
    import numpy as np
    import pandas as pd

    from smp.synth import SynthCfg, draw_posts

    n = int(rows)
    base = draw_posts(SynthCfg(n=min(n, 100_000), seed=21))[POST_COLUMNS]
    reps = -(-n // len(base))
    posts = pd.concat([base] * reps, ignore_index=True).iloc[:n].copy()
    posts["Pid"] = [str(10_000_000 + i) for i in range(n)]
    posts.to_parquet(work / f"posts_{n}_clean.parquet", index=False)
    rng = np.random.default_rng(0)
    partial = rng.choice(n, size=max(1, n // 1000), replace=False)
    kinds = np.arange(len(partial)) % 4
    posts["timezone_offset"] = posts["timezone_offset"].astype(object)
    posts.loc[partial[kinds == 0], "tag_count"] = -3             # out of range
    posts.loc[partial[kinds == 1], "Latitude"] = 200.0           # out of range
    posts.loc[partial[kinds == 2], "photo_count"] = np.nan       # missing: no note
    posts.loc[partial[kinds == 3], "timezone_offset"] = "abc"    # unparseable
    errors = rng.choice(np.setdiff1d(np.arange(n), partial), size=max(1, n // 100_000), replace=False)
    posts.loc[errors, "Pid"] = [" " * (k + 1) for k in range(len(errors))]  # blank Pids (distinct): refused
    posts.to_parquet(work / f"posts_{n}.parquet", index=False)
    return {"rows": n, "partial_injected": int((kinds != 2).sum()), "missing_injected": int((kinds == 2).sum()),
            "errors_injected": len(errors)}


def train_model(work: Path) -> dict:
    """The paper's benchmark (the job's defaults) on 20,000 synthetic posts, downloaded to work/model."""
    import mlflow

    from smp.data import DataCfg
    from smp.splits import SplitCfg
    from smp.synth import SynthCfg, draw_posts
    from smp.tracking import logged_model_uri
    from smp.train import BenchmarkJob, run_benchmark

    draw_posts(SynthCfg(n=20_000, seed=1))[POST_COLUMNS + ["label"]].to_csv(work / "train.csv", index=False)
    t0 = time.perf_counter()
    result = run_benchmark(BenchmarkJob(source=DataCfg(data=str(work / "train.csv")),
                                        splitting=SplitCfg(sample_size=0), experiment="spark_scale"))
    seconds = time.perf_counter() - t0
    path = mlflow.artifacts.download_artifacts(artifact_uri=logged_model_uri(result.run_id), dst_path=str(work / "model"))
    trees = mlflow.get_run(result.run_id).data.metrics.get("fit/best_iteration")
    return {"train_s": seconds, "test_rmse": float(result.metrics.get("test_rmse", float("nan"))),
            "best_iteration": trees, "model": path}


def startup(work: Path) -> dict:
    """Spark's fixed cost: a local[2] session and a first one-row job."""
    from smp.spark import spark_session

    t0 = time.perf_counter()
    spark, _ = spark_session("local[2]")
    started = time.perf_counter() - t0
    t0 = time.perf_counter()
    spark.range(1).count()
    first_job = time.perf_counter() - t0
    t0 = time.perf_counter()
    spark.stop()
    return {"session_s": started, "first_job_s": first_job, "stop_s": time.perf_counter() - t0}


def score(work: Path, engine: str, rows: str, variant: str = "") -> dict:
    """``smp predict`` on posts_<rows>[_clean].parquet with engine pandas or spark (local[2])."""
    from smp.predict import PredictJob, run_predict

    name = f"posts_{rows}{'_' + variant if variant else ''}"
    out = work / f"pred_{engine}_{name}.{'csv' if engine == 'pandas' else 'parquet'}"
    job = PredictJob(model=str(work / "model"), input=str(work / f"{name}.parquet"), output=str(out),
                     experiment="spark_scale")
    t0 = time.perf_counter()
    with TreeMemory() as tree:
        if engine == "pandas":
            metrics = dict(run_predict(job))
        else:
            from smp.spark import run_predict_spark

            metrics = dict(run_predict_spark(job, master="local[2]"))
    wall = time.perf_counter() - t0
    return {"engine": engine, "table": name, "wall_s": wall, "driver_peak_mib": peak_self_mib(),
            "jvm_peak_mib": tree.jvm, "workers_peak_mib": tree.workers,
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def score_udf(work: Path, rows: str) -> dict:
    """MLflow's ``spark_udf`` on posts_<rows>_clean.parquet: struct of the schema's columns -> popularity/status."""
    import mlflow
    from pyspark.sql import functions as F

    from smp.spark import spark_session

    spark, _ = spark_session("local[2]")
    t0 = time.perf_counter()
    udf = mlflow.pyfunc.spark_udf(spark, str(work / "model"), env_manager="local")
    sdf = spark.read.parquet(str(work / f"posts_{rows}_clean.parquet"))
    sdf = sdf.repartition(spark.sparkContext.defaultParallelism)
    names = [c for c in udf.metadata.get_input_schema().input_names() if c in sdf.columns]
    out = sdf.select("Pid", udf(F.struct(*names)).alias("p")).select("Pid", "p.popularity", "p.status")
    out.write.mode("overwrite").parquet(str(work / f"pred_udf_{rows}.parquet"))
    seconds = time.perf_counter() - t0
    spark.stop()
    return {"engine": "spark_udf", "rows": int(rows), "predict_s": seconds, "rows_per_s": int(rows) / seconds}


def warm(work: Path, rows: str) -> dict:
    """One local[2] session, two rounds of: the engine, the engine without keeping the order, MLflow's spark_udf,
    on posts_<rows>_clean.parquet (the second round is warm: Python workers and page cache)."""
    import mlflow
    from pyspark.sql import functions as F

    from smp.spark import predict_spark, spark_session

    spark, _ = spark_session("local[2]")
    spark.range(1).count()
    table = str(work / f"posts_{rows}_clean.parquet")

    def udf_run():
        udf = mlflow.pyfunc.spark_udf(spark, str(work / "model"), env_manager="local")
        sdf = spark.read.parquet(table)
        names = [c for c in udf.metadata.get_input_schema().input_names() if c in sdf.columns]
        sdf.select("Pid", udf(F.struct(*names)).alias("p")).select("Pid", "p.popularity", "p.status") \
            .write.mode("overwrite").parquet(str(work / "pred_warm_udf.parquet"))

    runs = {"engine": lambda: predict_spark(str(work / "model"), table, str(work / "pred_warm.parquet"), spark=spark),
            "engine_unordered": lambda: predict_spark(str(work / "model"), table, str(work / "pred_warm.parquet"),
                                                      spark=spark, keep_order=False),
            "spark_udf": udf_run}
    rounds = []
    for _ in range(2):
        times = {}
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name] = time.perf_counter() - t0
        rounds.append(times)
    spark.stop()
    return {"rows": int(rows), "rounds": rounds}


def parity(work: Path, rows: str) -> dict:
    """The pandas path's CSV against Spark's Parquet for posts_<rows>: order, statuses, predictions."""
    import numpy as np
    import pandas as pd

    a = pd.read_csv(work / f"pred_pandas_posts_{rows}.csv", dtype={"Pid": str, "status": str}, keep_default_na=False,
                    na_values={"popularity": [""]})
    b = pd.read_parquet(work / f"pred_spark_posts_{rows}.parquet")
    b_pid = b["Pid"].fillna("")
    pa_, pb = a["popularity"].to_numpy(dtype=float), b["popularity"].to_numpy(dtype=float)
    both = ~np.isnan(pa_) & ~np.isnan(pb)
    return {"rows": len(a), "same_rows": len(a) == len(b), "same_order": bool((a["Pid"] == b_pid).all()),
            "same_status": bool((a["status"] == b["status"]).all()),
            "same_unscored": bool((np.isnan(pa_) == np.isnan(pb)).all()),
            "max_abs_diff": float(np.max(np.abs(pa_[both] - pb[both]))) if both.any() else 0.0,
            "statuses": a["status"].str.split(":").str[0].value_counts().to_dict()}


def _demo_posts(work: Path):
    from smp.data import load_data
    from smp.synth import demo_data_dir

    return load_data(str(demo_data_dir(cache_dir=work / "demo")))


def embed_local(work: Path) -> dict:
    """The local embed's defaults (RN50, random weights) on the demo set into a fresh cache."""
    import shutil

    from smp.embed import EmbedCfg, embed_images

    posts = _demo_posts(work)
    shutil.rmtree(work / "cache_local", ignore_errors=True)
    cfg = EmbedCfg(clip_pretrained="none", cache_dir=str(work / "cache_local"), progress=False)
    t0 = time.perf_counter()
    result = embed_images(posts["Pid"].tolist(), posts["image_path"].tolist(), cfg)
    wall = time.perf_counter() - t0
    result.features.to_parquet(work / "features_local.parquet", index=False)
    return {"engine": "local", "wall_s": wall, "driver_peak_mib": peak_self_mib(),
            **{k: v for k, v in result.stats.items()}, "compile": result.info.get("compile")}


def embed_spark(work: Path) -> dict:
    """embed_spark on local[2] into a fresh cache, a rerun over it, the features against the local run's."""
    import shutil

    import numpy as np
    import pandas as pd

    from smp.embed import EmbedCfg, embed_images
    from smp.spark import embed_spark as run, spark_session

    posts = _demo_posts(work)
    shutil.rmtree(work / "cache_spark", ignore_errors=True)
    cfg = EmbedCfg(clip_pretrained="none", cache_dir=str(work / "cache_spark"), progress=False)
    t0 = time.perf_counter()
    spark, _ = spark_session("local[2]")
    startup_s = time.perf_counter() - t0
    with TreeMemory() as tree:
        first = run(posts, cfg, spark=spark)
    rerun = run(posts, cfg, spark=spark)
    spark.stop()
    again = embed_images(posts["Pid"].tolist(), posts["image_path"].tolist(), cfg)
    local = pd.read_parquet(work / "features_local.parquet")
    cols = [c for c in local.columns if c not in ("Pid", "has_image")]  # handcrafted and CLIP
    diff = np.nanmax(np.abs(again.features[cols].to_numpy(dtype=float) - local[cols].to_numpy(dtype=float)))
    scale = np.nanmax(np.abs(local[cols].to_numpy(dtype=float)))
    return {"engine": "spark", "startup_s": startup_s, "first": {k: v for k, v in first.items() if k != "bad_examples"},
            "rerun": {k: v for k, v in rerun.items() if k != "bad_examples"},
            "local_reads_spark_cache": {"computed": again.stats["computed"], "cache_hits": again.stats["cache_hits"]},
            "max_abs_diff_vs_local": float(diff), "max_abs_value": float(scale),
            "same_has_image": bool((again.features["has_image"] == local["has_image"]).all()),
            "jvm_peak_mib": tree.jvm, "workers_peak_mib": tree.workers, "driver_peak_mib": peak_self_mib()}


def index_cost(work: Path) -> dict:
    """Time to build the feature cache's index (``FeatureCache``: every chunk read and checked), per chunk."""
    from smp.embed import EmbedCfg
    from smp.feature_cache import FeatureCache, feature_spec, spec_directory

    cfg = EmbedCfg(clip_pretrained="none", cache_dir=str(work / "cache_local"))
    spec = feature_spec(cfg)
    directory = spec_directory(cfg.cache_dir, spec)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        cache = FeatureCache(directory, widths={"hc": 5, "clip": spec["embedding_dim"]})
        times.append(time.perf_counter() - t0)
    chunks = len(list(directory.glob("chunk-*.npz")))
    per_chunk = statistics.median(times) / max(chunks, 1)
    return {"chunks": chunks, "images": len(cache.index), "index_s": statistics.median(times),
            "per_chunk_ms": 1000 * per_chunk, "full_smpd_chunks": -(-FULL_SMPD // 256),
            "full_smpd_index_s": per_chunk * -(-FULL_SMPD // 256)}


# --------------------------------------------------------------------------- the parent
def run_child(work: Path, *args: str, timeout: float = 3600) -> dict:
    cmd = [sys.executable, __file__, "--child", args[0], str(work), *args[1:]]
    print("  $", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=work)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(args)} failed (exit {proc.returncode})")
    out = json.loads(lines[-1][len("RESULT "):])
    print(f"    {time.perf_counter() - t0:.0f}s: {json.dumps(out)[:300]}", flush=True)
    return out


def measure(work: Path, sizes: list[int], skip_embed: bool) -> dict:
    res: dict = {"sizes": sizes, "cores": os.cpu_count(), "scoring": {}, "parity": {}}
    if not (work / "model").exists():
        res["model"] = run_child(work, "model")
    res["startup"] = [run_child(work, "startup") for _ in range(3)]
    for n in sizes:
        if not (work / f"posts_{n}.parquet").exists():
            res.setdefault("data", {})[n] = run_child(work, "data", str(n))
        res["scoring"][n] = {engine: run_child(work, "score", engine, str(n)) for engine in ("pandas", "spark")}
        res["parity"][n] = run_child(work, "parity", str(n))
    n = min(sizes)
    res["clean"] = {"spark": run_child(work, "score", "spark", str(n), "clean"), "spark_udf": run_child(work, "udf", str(n))}
    res["warm"] = run_child(work, "warm", str(n))
    if not skip_embed:
        res["embed"] = {"local": run_child(work, "embed_local"), "spark": run_child(work, "embed_spark")}
        res["index"] = run_child(work, "index")
    return res


def report(res: dict) -> str:
    """Markdown tables of the figures and the full-SMPD estimate."""
    out = []
    st = res["startup"]
    session = statistics.median(s["session_s"] for s in st)
    first = statistics.median(s["first_job_s"] for s in st)
    out.append(f"Spark's fixed cost (local[2], median of {len(st)} fresh processes): session start {session:.1f} s, "
               f"first one-row job {first:.1f} s.\n")
    out.append("| rows | engine | wall s | scoring s | rows/s (scoring) | driver Python peak MiB | JVM peak MiB "
               "| Python workers peak MiB | model loads x s | load avg before, after |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for n, by in res["scoring"].items():
        for engine, r in by.items():
            loads = f"{r.get('spark/model_loads', 1)} x {r.get('spark/model_load_s', r.get('time/load_s', 0)):.1f}"
            jvm, workers = (f"{r['jvm_peak_mib']:,.0f}", f"{r['workers_peak_mib']:,.0f}") if engine == "spark" \
                else ("–", "–")
            out.append(f"| {int(n):,} | {engine} | {r['wall_s']:.0f} | {r['time/predict_s']:.0f} | "
                       f"{r['time/rows_per_s']:,.0f} | {r['driver_peak_mib']:,.0f} | {jvm} | {workers} | {loads} | "
                       f"{r.get('load_avg_1min')} |")
    out.append("")
    for n, p in res["parity"].items():
        out.append(f"Parity at {int(n):,} rows: same rows {p['same_rows']}, same order {p['same_order']}, same "
                   f"statuses {p['same_status']} ({p['statuses']}), same unscored {p['same_unscored']}, "
                   f"max |popularity difference| {p['max_abs_diff']:.1e}.")
    if "clean" in res:
        c = res["clean"]
        out.append(f"\nClean rows ({c['spark_udf']['rows']:,}): the engine {c['spark']['time/rows_per_s']:,.0f} rows/s "
                   f"({c['spark']['time/predict_s']:.0f} s), MLflow's spark_udf {c['spark_udf']['rows_per_s']:,.0f} "
                   f"rows/s ({c['spark_udf']['predict_s']:.0f} s).")
    if "warm" in res:
        rounds = "; ".join(", ".join(f"{k} {v:.1f} s" for k, v in r.items()) for r in res["warm"]["rounds"])
        out.append(f"One session, {res['warm']['rows']:,} clean rows, two rounds (the second warm): {rounds}.")
    if "embed" in res:
        lo, sp = res["embed"]["local"], res["embed"]["spark"]
        f, r = sp["first"], sp["rerun"]
        out.append(f"\nEmbed, demo set ({int(lo['images']):,} posts, RN50 random weights): local "
                   f"{lo['images_per_s']:.1f} images/s ({lo['wall_s']:.0f} s, {lo['compile']}); Spark local[2] "
                   f"{f['images_per_s']:.1f} images/s ({f['seconds']:.0f} s after a {sp['startup_s']:.0f} s start, "
                   f"{f['spark/partitions']} partitions, {f['spark/model_loads']} model loads of "
                   f"{f['spark/model_load_s']:.1f} s each); rerun over the filled cache {r['seconds']:.1f} s "
                   f"({r['computed']} computed, {r['cache_hits']} from the cache); features against the local run's: "
                   f"max |difference| {sp['max_abs_diff_vs_local']:.1e} (values up to {sp['max_abs_value']:.1f}).")
        ix = res.get("index")
        if ix:
            out.append(f"Cache index: {ix['per_chunk_ms']:.1f} ms a chunk of 256 images ({ix['chunks']} chunks in "
                       f"{ix['index_s']:.2f} s); the full SMPD's {ix['full_smpd_chunks']:,} chunks: "
                       f"{ix['full_smpd_index_s']:.0f} s per embed call that has images to compute.")
    out.append("\n" + estimate(res))
    return "\n".join(out)


def estimate(res: dict) -> str:
    """Wall time for the full SMPD (486,000 posts) on N executor cores, from the measured per-core rates."""
    st = res["startup"]
    fixed = statistics.median(s["session_s"] + s["first_job_s"] for s in st)
    big = str(max(int(n) for n in res["scoring"]))
    sp = res["scoring"][big]["spark"]
    pd_ = res["scoring"][big]["pandas"]
    per_core_score = sp["time/rows_per_s"] / 2  # local[2]: two tasks at once
    load = sp.get("spark/model_load_s", 0.0)
    lines = [f"Estimate for the full SMPD ({FULL_SMPD:,} posts), N executor cores, from local[2]'s per-core rates "
             f"(scoring {per_core_score:,.0f} rows/s a core at {int(big):,} rows"
             + (", embedding {:.1f} images/s a core".format(res['embed']['spark']['first']['images_per_s'] / 2)
                if "embed" in res else "") + f"; fixed: {fixed:.0f} s start + model load {load:.1f} s a worker):", "",
             "| N cores | scoring | embedding |", "|---|---|---|",
             f"| pandas path, 1 process | {FULL_SMPD / pd_['time/rows_per_s']:.0f} s | "
             + (f"{FULL_SMPD / res['embed']['local']['images_per_s'] / 3600:.1f} h |" if "embed" in res else "- |")]
    for n in (2, 8, 32, 128):
        score_s = fixed + load + FULL_SMPD / (n * per_core_score)
        cell = "-"
        if "embed" in res:
            e = res["embed"]["spark"]["first"]
            per_core = e["images_per_s"] / 2
            index = res.get("index", {}).get("full_smpd_index_s", 0.0) / 2  # the cache grows: half full on average
            parts = -(-FULL_SMPD // 1024)
            embed_s = fixed + e["spark/model_load_s"] + FULL_SMPD / (n * per_core) + parts * index / n
            cell = f"{embed_s / 3600:.1f} h"
        lines.append(f"| {n} | {score_s:.0f} s | {cell} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(sys.argv[2:]), default=str), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / ".smp_cache" / "spark_scale"))
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated table sizes")
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--report", default="", help="print the tables of an earlier run's JSON and stop")
    parser.add_argument("--add", default="", help="run one more measurement (warm) into the work dir's JSON")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    work = Path(args.work).resolve()
    if args.add:
        saved = json.loads((work / "spark_scale.json").read_text())
        saved[args.add] = run_child(work, args.add, str(min(saved["sizes"])))
        (work / "spark_scale.json").write_text(json.dumps(saved, indent=1, default=str))
        print(report(saved))
        return
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.rows.split(",") if s]
    res = measure(work, sizes, args.skip_embed)
    res["scoring"] = {str(k): v for k, v in res["scoring"].items()}
    res["parity"] = {str(k): v for k, v in res["parity"].items()}
    (work / "spark_scale.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"\nfigures: {work / 'spark_scale.json'}\n")
    print(report(res))


if __name__ == "__main__":
    main()
