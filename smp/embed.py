"""Image features per post: CLIP image embeddings + handcrafted features, cached by image content.

``embed_images(pids, paths, cfg) -> EmbedResult`` streams the images once:

    file bytes -> sha256 -> cached?  yes: take the stored row
                                     no:  decode -> handcrafted features
                                          -> open_clip preprocess -> CLIP encode_image

Decoding and preprocessing run in DataLoader workers (``_Images``, ``_loader``), the model in the main
process (``smp.clip``: loading, the encoder and its graph; CUDA + fp16 autocast when a GPU is there,
fp32 on CPU). Results are cached by image content (``smp.feature_cache``: chunk files written
atomically), so a rerun over the same images computes nothing and an interrupted run resumes
where it stopped: a chunk is written every ``chunk_size`` images and at least every ``flush_seconds``,
so a kill loses at most that much work. A damaged chunk (unreadable, wrong shapes, non-finite values)
is renamed ``*.npz.damaged`` and its images are recomputed.

Bad images (no path, missing, zero-byte, truncated, not an image, unreadable
colour mode) never stop a run: their row is kept with ``has_image=0`` and NaN
features and they are listed in ``EmbedResult.bad`` with the reason.

The ``embed`` job (``run_embed``) logs the features of a data set as an MLflow run; request-time
features (``smp predict``, the served model) are in ``smp.image_requests``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from smp.clip import Encoder, graph_mode, load_clip, preprocess_for, resolve_device
from smp.config import at_least, check, device, one_of
from smp.data import DataCfg
from smp.feature_cache import ChunkWriter, FeatureCache, feature_spec, spec_directory
from smp.image_features import (HANDCRAFTED, PAPER_CLIP_MODEL, PAPER_CLIP_PRETRAINED, BadImage, decode_image,
                                handcrafted_features)
from smp.jobs import Job

log = logging.getLogger("smp.embed")


@dataclass(frozen=True)
class EmbedCfg:
    """How to embed images; defaults follow the paper (CLIP RN50, OpenAI weights)."""

    clip_model: str = PAPER_CLIP_MODEL  # the paper's backbone; width comes from the model (RN50: 1024)
    clip_pretrained: str = PAPER_CLIP_PRETRAINED  # open_clip tag; "none" = random weights (tests, offline demo)
    checkpoint: str = ""  # local checkpoint file; overrides clip_pretrained
    batch_size: int = 32  # images per forward pass
    num_workers: int = 2  # DataLoader workers decoding+preprocessing in parallel
    device: str = "auto"  # auto -> cuda if available else cpu
    chunk_size: int = 256  # images per cache chunk written atomically
    flush_seconds: float = 30.0  # also write a (smaller) chunk this long after the last write: a kill loses at most this much work; 0 = by count only
    cache_dir: str = ""  # "" -> $SMP_CACHE_DIR or ./.smp_cache, subfolder "features"
    clip_cache_dir: str = ""  # where open_clip downloads weights ("" = open_clip default)
    force_quick_gelu: bool = False  # set when a local checkpoint is OpenAI's (RN50 needs QuickGELU)
    compile: str = "auto"  # "freeze" (jit trace+freeze), "inductor" (torch.compile), "none" (eager); auto: freeze on CPU from 128 images
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        check(self, batch_size=at_least(1), num_workers=at_least(0), device=device(), chunk_size=at_least(1),
              flush_seconds=at_least(0), compile=one_of("auto", "freeze", "inductor", "none"))


@dataclass
class EmbedResult:
    """Output of :func:`embed_images`."""

    features: pd.DataFrame  # one row per input pid, in input order
    bad: pd.DataFrame  # Pid, path, reason for every post without a usable image
    stats: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # model/weights/device/cache description


# ----------------------------------------------------------------------------- dataset


def _no_path(path) -> bool:
    """True for None, NaN (a missing value from pandas) and ""."""
    return path is None or (isinstance(path, float) and np.isnan(path)) or str(path) == ""


class _Images:
    """Map-style dataset over ``paths[i]`` for each i in ``rows`` (default: all): read -> sha256 ->
    (cached: key only | decode -> handcrafted -> preprocess). Never raises for a bad image: it returns
    a reason. Items carry ``i``, the row in ``paths``."""

    def __init__(self, paths: Sequence[str | None], cached: frozenset[str], preprocess,
                 rows: Sequence[int] | None = None):
        self.paths, self.cached, self.preprocess = paths, cached, preprocess
        self.rows = range(len(paths)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> dict:
        i = self.rows[j]
        path = self.paths[i]
        if _no_path(path):
            return {"i": i, "bad": "no image path"}
        if "\x00" in str(path):  # the OS cannot open it (Python raises ValueError, not OSError)
            return {"i": i, "bad": "the path holds a NUL byte"}
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return {"i": i, "bad": "missing file"}
        except OSError as e:
            return {"i": i, "bad": f"unreadable file ({type(e).__name__}: {e})"}
        key = hashlib.sha256(data).hexdigest()
        if key in self.cached:
            return {"i": i, "key": key}
        try:
            rgb = decode_image(data)
            hc = handcrafted_features(rgb)
            pixels = self.preprocess(Image.fromarray(rgb))
        except BadImage as e:
            return {"i": i, "bad": str(e)}
        except Exception as e:  # noqa: BLE001 - one odd image must not stop a 300k-image run
            return {"i": i, "bad": f"cannot process image ({type(e).__name__}: {e})"}
        return {"i": i, "key": key, "hc": np.array([hc[k] for k in HANDCRAFTED]), "pixels": pixels}


def _collate(items: list[dict]) -> dict:
    """Split a batch into bad / cached / to-compute items; stack the pixels (in the worker)."""
    todo = [it for it in items if "pixels" in it]
    return {
        "n": len(items),
        "bad": [(it["i"], it["bad"]) for it in items if "bad" in it],
        "cached": [(it["i"], it["key"]) for it in items if "key" in it and "pixels" not in it],
        "todo": [(it["i"], it["key"]) for it in todo],
        "hc": np.stack([it["hc"] for it in todo]) if todo else None,
        "pixels": torch.stack([it["pixels"] for it in todo]) if todo else None,
    }


def _loader(dataset: _Images, cfg: EmbedCfg, device: str) -> DataLoader:
    """Batches of ``dataset`` decoded and preprocessed in ``cfg.num_workers`` workers, in order."""
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        # fork workers: no re-import; torch sets 1 thread in each, OpenCV inherits the 1
        # thread set by embed_images (calling cv2.setNumThreads inside a forked child can deadlock)
        pin_memory=device.startswith("cuda"),
        prefetch_factor=2 if cfg.num_workers > 0 else None,  # bounds memory: 2 batches per worker
        generator=torch.Generator().manual_seed(0),  # worker seeds without touching global RNG
    )


# ----------------------------------------------------------------------------- pipeline


def _check_loaded(loaded_info: dict, spec: dict) -> None:
    """Refuse a preloaded model (``load_clip``'s info) built with other settings than ``spec``'s."""
    same = ("model", "weights_id", "precision", "force_quick_gelu")
    if any(loaded_info.get(k) != spec[k] for k in same):
        raise ValueError(f"`loaded` was built for {[loaded_info.get(k) for k in same]}, "
                         f"cfg asks for {[spec[k] for k in same]}")


@contextlib.contextmanager
def _one_opencv_thread():
    """OpenCV single-threaded inside: the parallelism is across images (workers), not inside OpenCV calls."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


class _Run:
    """One :func:`embed_images` call: the output rows, counts and timings, filled batch by batch.

    The model is loaded (or ``loaded`` taken) on the first batch with an image to compute, so a run
    served from the cache never builds it; ``info`` then gets the model's own description.
    """

    def __init__(self, n: int, d: int, cfg: EmbedCfg, info: dict, mode: str, writer: ChunkWriter,
                 loaded: tuple | None):
        self.hc = np.full((n, len(HANDCRAFTED)), np.nan, dtype=np.float64)
        self.clip = np.full((n, d), np.nan, dtype=np.float32)
        self.has_image = np.zeros(n, dtype=np.int64)
        self.bad: list[tuple[int, str]] = []  # (row, reason)
        self.hits = 0  # images served from the cache
        self.computed = 0
        self.computed_after_first = 0  # after the first batch: without model load / graph build
        self.t_first_done: float | None = None
        self.read_s = 0.0  # time spent reading cached rows (not computing)
        self.cfg, self.info, self.mode, self.writer, self.loaded = cfg, info, mode, writer, loaded
        self.encoder: Encoder | None = None

    def encode(self, pixels) -> np.ndarray:
        """CLIP vectors of a pixel batch; the first call loads the model."""
        if self.encoder is None:
            model, _, model_info = self.loaded if self.loaded is not None else load_clip(self.cfg)
            self.info.update(model_info)
            self.encoder = Encoder(model, self.info["device"], self.cfg.batch_size, self.mode)
        return self.encoder(pixels)

    def take(self, batch: dict, hits: dict[str, list[int]]) -> None:
        """Note a batch's bad and cached images (``hits``: key -> rows, read later), compute the rest and
        queue them for the cache."""
        self.bad += batch["bad"]
        for i, key in batch["cached"]:
            hits.setdefault(key, []).append(i)
        self.hits += len(batch["cached"])
        if not batch["todo"]:
            self.writer.flush(final=False)  # rows computed before a run of cached batches wait no longer
            return
        t_batch = time.perf_counter()
        emb = self.encode(batch["pixels"])
        rows = [i for i, _ in batch["todo"]]
        self.hc[rows], self.clip[rows], self.has_image[rows] = batch["hc"], emb, 1
        self.computed += len(rows)
        if self.t_first_done is None:
            self.t_first_done = time.perf_counter()
            log.info("first batch of %d took %.1fs (model load%s)", len(rows), self.t_first_done - t_batch,
                     f" + {self.encoder.mode} graph" if self.encoder.mode != "eager" else "")
        else:
            self.computed_after_first += len(rows)
        self.writer.add([k for _, k in batch["todo"]], batch["hc"], emb)

    def read_cached(self, cache: FeatureCache, hits: dict[str, list[int]]) -> list[int]:
        """Fill the rows of cached images; return the rows whose chunk could not be read back (to compute)."""
        t_read = time.perf_counter()
        lost = cache.read(hits, self.hc, self.clip) if hits else set()
        self.read_s += time.perf_counter() - t_read
        for key, rows in hits.items():
            if key not in lost:
                self.has_image[rows] = 1
        again = sorted(i for key in lost for i in hits[key])
        if again:
            log.warning("%d cached images could not be read back; computing them again", len(again))
            self.hits -= len(again)
        return again


def _embed_pass(batches: Iterable[dict], run: _Run, bar) -> dict[str, list[int]]:
    """Go through the batches once, computing what is not cached; return the cached images (key -> rows)."""
    hits: dict[str, list[int]] = {}
    for batch in batches:
        run.take(batch, hits)
        if batch["todo"]:
            bar.set_postfix(computed=run.computed, cached=run.hits)
        bar.update(batch["n"])
    run.writer.flush(final=True)
    return hits


def _features_table(pids: Sequence[str], run: _Run) -> pd.DataFrame:
    """Pid, has_image, the handcrafted features and ``clip_0..clip_{d-1}``, one row per post."""
    return pd.concat(
        [
            pd.Series([str(p) for p in pids], name="Pid", dtype=object).to_frame(),
            pd.DataFrame({"has_image": run.has_image}),
            pd.DataFrame(run.hc, columns=list(HANDCRAFTED)),
            pd.DataFrame(run.clip, columns=[f"clip_{j}" for j in range(run.clip.shape[1])]),
        ],
        axis=1,
    )


def _bad_table(pids: Sequence[str], paths: Sequence[str | None], bad: list[tuple[int, str]]) -> pd.DataFrame:
    """Pid, path and reason of every post without a usable image, in input order."""
    bad = sorted(bad)
    return pd.DataFrame(
        {
            "Pid": pd.Series([str(pids[i]) for i, _ in bad], dtype=object),
            "path": pd.Series([None if _no_path(paths[i]) else str(paths[i]) for i, _ in bad], dtype=object),
            "reason": pd.Series([r for _, r in bad], dtype=object),
        }
    )


def _log_summary(run: _Run, n: int, cache: FeatureCache) -> None:
    if run.computed == 0 and run.hits:
        log.info("all %d images served from cache (%s)", run.hits, cache.dir)
    elif run.hits:
        log.info("%d images served from cache, %d computed", run.hits, run.computed)
    if run.bad:
        log.warning("%d of %d posts have no usable image (kept with NaN features)", len(run.bad), n)


def embed_images(
    pids: Sequence[str],
    paths: Sequence[str | None],
    cfg: EmbedCfg,
    on_chunk: Callable[[dict], None] | None = None,
    loaded: tuple | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> EmbedResult:
    """Handcrafted + CLIP features for each post; one row per pid, in input order.

    Returns an :class:`EmbedResult`: ``features`` has Pid, has_image (0/1), the five
    :data:`~smp.image_features.HANDCRAFTED` features and ``clip_0..clip_{d-1}``
    (float32, the unnormalised ``encode_image`` output); posts without a usable
    image keep their row with NaN features and appear in ``bad``. ``stats`` has
    images, bad_images, cache_hits, computed, damaged_chunks (cache chunks found
    damaged and set aside; their images are among ``computed``), seconds,
    images_per_s (computed / compute seconds), steady_images_per_s (after the
    first batch, i.e. without model load / compilation), embedding_dim;
    ``info["damaged_chunks"]`` lists them as (file, problem). ``on_chunk(info)`` is called
    after each cache chunk is written (``info``: path, rows, chunks_written, computed).
    ``loaded`` is ``load_clip(cfg)``'s result, to reuse one model across calls (serving);
    by default the model is loaded on the first image that is not in the cache.
    ``clock`` times ``cfg.flush_seconds`` (a fake one in tests).
    """
    t_start = time.perf_counter()
    if len(pids) != len(paths):
        raise ValueError(f"{len(pids)} pids but {len(paths)} paths")
    n = len(pids)
    spec = feature_spec(cfg)
    d = spec["embedding_dim"]
    if loaded is not None:
        _check_loaded(loaded[2], spec)
    cache = FeatureCache(spec_directory(cfg.cache_dir, spec), widths={"hc": len(HANDCRAFTED), "clip": d})
    log.info("feature cache %s: %d images indexed%s", cache.dir, len(cache.index),
             f", {len(cache.damaged)} damaged chunks set aside" if cache.damaged else "")
    info = dict(spec, cache_dir=str(cache.dir), device=resolve_device(cfg))
    mode = graph_mode(cfg.compile, info["device"], sum(not _no_path(p) for p in paths))
    writer = ChunkWriter(cache, spec, cfg.chunk_size, cfg.flush_seconds, on_chunk, clock)
    run = _Run(n, d, cfg, info, mode, writer, loaded)
    preprocess = preprocess_for(cfg)
    bar = tqdm(total=n, unit="img", desc="embed", disable=not cfg.progress, smoothing=0.1)
    t_loop = time.perf_counter()
    visit: Sequence[int] = range(n)  # rows to go through: all, then those whose cached chunk failed to read
    try:
        with _one_opencv_thread():
            while visit:
                images = _Images(list(paths), frozenset(cache.index), preprocess, visit)
                hits = _embed_pass(_loader(images, cfg, info["device"]), run, bar)
                visit = run.read_cached(cache, hits)
                bar.total += len(visit)
    finally:
        bar.close()
    t_end = time.perf_counter()
    _log_summary(run, n, cache)

    features, bad = _features_table(pids, run), _bad_table(pids, paths, run.bad)
    loop_s = t_end - t_loop - run.read_s
    steady_s = t_end - run.t_first_done if run.t_first_done is not None else 0.0
    stats = {
        "images": float(n),
        "bad_images": float(len(run.bad)),
        "cache_hits": float(run.hits),
        "computed": float(run.computed),
        "damaged_chunks": float(len(cache.damaged)),
        "seconds": time.perf_counter() - t_start,
        "images_per_s": run.computed / loop_s if run.computed and loop_s > 0 else 0.0,
        "steady_images_per_s": (run.computed_after_first / steady_s
                                if run.computed_after_first and steady_s > 0 else 0.0),
        "embedding_dim": float(d),
    }
    info["compile"] = run.encoder.mode if run.encoder is not None else "not loaded (nothing to compute)"
    info["damaged_chunks"] = list(cache.damaged)
    return EmbedResult(features=features, bad=bad, stats=stats, info=info)


# --------------------------------------------------------------------------- the `embed` job
@dataclass(frozen=True)
class EmbedJob:
    """The `embed` entry point's parameters."""

    source: DataCfg = field(default_factory=DataCfg)
    embed: EmbedCfg = field(default_factory=EmbedCfg)
    engine: str = "local"  # local = this process; spark = Spark executors fill the cache first (pip install -e .[spark])
    spark_master: str = "local[*]"  # engine=spark: any Spark master URL (local[N], spark://, yarn, k8s://)
    experiment: str = ""  # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)

    def __post_init__(self) -> None:
        check(self, engine=one_of("local", "spark"))


def embedding_key(cfg: EmbedCfg) -> str:
    """Hash of the settings that change the vectors (model, weights, preprocessing)."""
    from smp.tracking import params_hash

    spec = feature_spec(cfg)  # weights by content (a checkpoint's sha256), precision by device (fp32 / CUDA amp)
    return params_hash({k: spec[k] for k in ("model", "weights_id", "precision", "force_quick_gelu",
                                             "preprocess_version")})


def run_embed(cfg: EmbedJob = EmbedJob(), parent=None, spark: dict | None = None) -> "JobResult":
    """Compute image features for every post of ``cfg.source`` and log them as ``features.parquet``.

    ``engine=spark`` runs through ``smp.engines.run_embed``: Spark executors fill the feature cache first
    (``smp.spark.embed_spark``), then this pass finds every image there and logs the table; ``spark`` holds
    what the executors did (logged under ``spark/``)."""
    import mlflow

    from smp.config import ConfigError, flatten
    from smp.data import DataError, data_hash, load_data

    if cfg.engine == "spark" and spark is None:
        raise ConfigError("engine=spark: the images are embedded on Spark by smp.engines.run_embed (`smp embed "
                          "--engine spark`, `mlflow run . -e embed -P engine=spark`); smp.embed.run_embed is the "
                          "local engine")
    from smp.tracking import JobResult, dataset_source, describe_run, job_run, log_params

    posts = load_data(cfg.source.data, images_root=cfg.source.images or None)
    if "image_path" not in posts.columns:
        raise DataError(f"{posts.attrs.get('source')}: has no images (no train_img_filepath.txt / image_path "
                        "column); image features cannot be computed. The tabular benchmark is the model for it.")
    digest = data_hash(posts)
    embed_cfg = cfg.embed
    tags = {"smp.data_hash": digest, "smp.reuse_key": embedding_key(cfg.embed), "smp.model": "embed"}
    with job_run("embed", cfg.experiment, flatten(cfg), tags, parent, what=EMBED.help) as run:
        try:
            loaded = load_clip(embed_cfg)  # loaded once, here: fails early (offline) and is reused below
        except RuntimeError as exc:
            if str(cfg.source.data) not in ("", "demo"):
                raise
            log.warning("%s -- the built-in demo data falls back to RANDOM CLIP weights "
                        "(clip_pretrained=none); the run is tagged smp.clip_random_weights=true", exc)
            embed_cfg = replace(embed_cfg, clip_pretrained="none", checkpoint="")
            loaded = None  # embed_images loads the random-weights model if any image is not cached
        result = embed_images(posts["Pid"].tolist(), posts["image_path"].tolist(), embed_cfg, loaded=loaded)
        info = result.info
        if info.get("random_weights") and embed_cfg is cfg.embed:  # asked for (the fallback warned above)
            log.warning("CLIP %s has RANDOM weights (clip_pretrained=%r): the image features carry no learned "
                        "semantics; the run is tagged smp.clip_random_weights=true", embed_cfg.clip_model,
                        embed_cfg.clip_pretrained)
        mlflow.set_tags({"smp.clip_random_weights": str(bool(info.get("random_weights"))).lower(),
                         "smp.clip_effective_pretrained": embed_cfg.clip_pretrained,
                         "smp.embedding_dim": str(info.get("embedding_dim"))})
        stats = result.stats
        # what ran (weights after any fallback, device) and counts are params; speeds are grouped metrics
        if embed_cfg.clip_pretrained != cfg.embed.clip_pretrained:  # the demo's fallback to random weights
            log_params({"effective/clip_pretrained": embed_cfg.clip_pretrained})
        log_params({"effective/device": info.get("device"),
                    "clip/image_size": info.get("image_size"), "clip/embedding_dim": int(stats["embedding_dim"]),
                    "data/images": int(stats["images"]), "data/bad_images": int(stats["bad_images"]),
                    "cache/hits": int(stats["cache_hits"]), "cache/computed": int(stats["computed"]),
                    "cache/damaged_chunks": int(stats["damaged_chunks"])})
        mlflow.log_metrics({"time/embed_s": stats["seconds"], "time/images_per_s": stats["images_per_s"],
                            "time/steady_images_per_s": stats["steady_images_per_s"]})
        if spark is not None:  # what the executors computed (this pass read it from the cache)
            mlflow.set_tag("smp.engine", "spark")
            log_params({f"spark/{k}": int(spark[k]) for k in ("images", "computed", "cache_hits", "bad_images")}
                       | {"spark/partitions": int(spark["spark/partitions"]),
                          "spark/model_loads": int(spark["spark/model_loads"])})
            mlflow.log_metrics({"spark/embed_s": float(spark["seconds"]),
                                "spark/images_per_s": float(spark["images_per_s"]),
                                "spark/startup_s": float(spark["spark/startup_s"]),
                                "spark/model_load_s": float(spark["spark/model_load_s"])})
        counts = ("images", "bad_images", "cache_hits", "computed", "damaged_chunks", "embedding_dim")
        metrics = {k: int(v) if k in counts else float(v)
                   for k, v in stats.items() if isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "features.parquet"
            result.features.to_parquet(path, index=False)
            mlflow.log_artifact(str(path))
            bad = Path(tmp) / "bad_images.csv"
            result.bad.to_csv(bad, index=False)
            mlflow.log_artifact(str(bad))
        mlflow.log_input(mlflow.data.from_pandas(result.features[["Pid", "has_image"]].astype({"has_image": float}),
                                                 name="image-features",
                                                 source=dataset_source(str(Path(str(posts.attrs.get("source")))
                                                                           .resolve())), digest=digest),
                         context="features")
        describe_run(
            f"embed: CLIP {embed_cfg.clip_model} ({embed_cfg.clip_pretrained} weights"
            + (", RANDOM: the image features carry no learned semantics" if info.get("random_weights") else "")
            + (f"; asked for {cfg.embed.clip_pretrained}" if embed_cfg.clip_pretrained != cfg.embed.clip_pretrained
               else "")
            + f") + 5 handcrafted features for {int(stats['images'])} images of "
            f"{str(posts.attrs.get('source', 'data')).rstrip('/').split('/')[-1]}: {int(stats['bad_images'])} "
            f"unusable, {int(stats['cache_hits'])} from the cache, {int(stats['computed'])} computed on "
            f"{info.get('device')}. The features are this run's features.parquet; image models reuse it.")
    log.info("embed: %d images (%d bad, %d from cache)", metrics.get("images", 0), metrics.get("bad_images", 0),
             metrics.get("cache_hits", 0))
    return JobResult(run.info.run_id, metrics)


# the `embed` job as the job tables (``smp.catalog``) list it; run_embed's run description is its help
EMBED = Job("embed", "CLIP + handcrafted image features, cached by content", run_embed, EmbedJob)
