"""Image features at request time (``smp predict``, the served model): a few rows per call.

Used by ``smp.serving.with_image_features`` and by ``smp.models.ImageFeatureSource`` (imported when
images arrive: it loads torch and open_clip). The vectors are the training pipeline's (the same decoding,
handcrafted features, preprocessing and CLIP model as ``smp.embed.embed_images``); what a process keeps
between calls, per embedding setting:

* the CLIP model, loaded once (``shared_clip``): loading RN50 costs seconds, a request should not pay it;
* the embed job's persistent feature cache (``smp.embed``: chunk files by image content), **read, never
  written**: its index is read once, on the first request with an image (``request_features``), and an
  image embedded by ``smp embed`` is served from it. Chunks written after that are not seen until the
  process restarts. A client's image never reaches the disk (``image_b64`` is decoded in memory, no
  temporary file), so a read-only filesystem serves as a writable one;
* the features of request images, in memory: an LRU by content hash (sha256 of the image bytes) of at
  most ``MAX_CACHED_IMAGES`` images and ``MAX_CACHED_MB`` MiB of feature arrays, whichever is reached
  first (RN50: 4,136 bytes an image, so 4,096 images are 16 MiB); the environment variables
  ``SMP_REQUEST_CACHE_IMAGES`` and ``SMP_REQUEST_CACHE_MB`` change the bounds (0 keeps nothing).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from smp.clip import ClipCfg, Encoder, graph_mode, load_clip
from smp.embed import EmbedCfg
from smp.feature_cache import FeatureCache, feature_spec, features_root, spec_directory
from smp.image_features import HANDCRAFTED, BadImage, decode_image, handcrafted_features, path_problem

log = logging.getLogger("smp.image_requests")

MAX_CACHED_IMAGES = 4096  # request images whose features a process keeps in memory (per embedding setting)
MAX_CACHED_MB = 64  # ... and at most this many MiB of their feature arrays (binds first for models wider than 16k)
IMAGES_ENV, MB_ENV = "SMP_REQUEST_CACHE_IMAGES", "SMP_REQUEST_CACHE_MB"  # operators' overrides of the two bounds


def features_for_rows(posts: pd.DataFrame, cfg: EmbedCfg) -> pd.DataFrame:
    """Image features for raw post rows that carry ``image_b64`` (base64 bytes) or ``image_path``.

    Returns the features table (one row per input row, in order: Pid, has_image, the handcrafted features,
    ``clip_0..``; NaN and ``has_image=0`` where there is no usable image) with ``attrs["bad"]`` listing
    ``Pid, reason`` for every row whose image was given but unusable. ``image_b64`` wins over
    ``image_path`` where a row has both. Vectors come from memory or the embed job's cache when the same
    image was seen before with the same settings (module docstring); nothing is written to disk.
    """
    pids = posts["Pid"].astype(str).tolist()
    b64 = posts["image_b64"].tolist() if "image_b64" in posts.columns else [None] * len(posts)
    paths = posts["image_path"].tolist() if "image_path" in posts.columns else [None] * len(posts)
    store = request_features(ClipCfg.of(cfg), str(features_root(cfg.cache_dir).absolute().parent))
    hc, clip, bad = store.features(lambda i: _image_bytes(b64[i], paths[i]), len(pids), cfg)
    features = pd.concat([
        pd.DataFrame({"Pid": pd.Series(pids, dtype=object),
                      "has_image": np.isfinite(clip).all(axis=1).astype(np.int64)}),
        pd.DataFrame(hc, columns=list(HANDCRAFTED)),
        pd.DataFrame(clip, columns=[f"clip_{j}" for j in range(clip.shape[1])]),
    ], axis=1)
    features.attrs["bad"] = pd.DataFrame([(pids[i], reason) for i, reason in bad], columns=["Pid", "reason"])
    return features


def _image_bytes(data, path) -> bytes | str | None:
    """A row's image as bytes, the reason it cannot be read (str), or None where no image is given."""
    if isinstance(data, str) and data:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return "image_b64 is not valid base64"
    if not (isinstance(path, str) and path):
        return None
    if path_problem(path) is not None:
        return path_problem(path)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return "missing file"
    except OSError as e:
        return f"unreadable file ({type(e).__name__}: {e})"


class FeatureLRU:
    """Features by image content hash, least recently used dropped first, bounded by entries and bytes.

    An entry's size is its arrays' bytes plus the key's 64; thread-safe (a scoring server answers
    requests from a thread pool)."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max(0, int(max_entries)), max(0, int(max_bytes))
        self._items: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def _size(hc: np.ndarray, clip: np.ndarray) -> int:
        return hc.nbytes + clip.nbytes + 64

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The (handcrafted, clip) rows stored for ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, hc: np.ndarray, clip: np.ndarray) -> None:
        """Store copies of the rows for ``key``, then drop the least recently used past either bound."""
        hc, clip = np.array(hc, copy=True), np.array(clip, copy=True)
        size = self._size(hc, clip)
        if size > self.max_bytes or self.max_entries == 0:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= self._size(*old)
            self._items[key] = (hc, clip)
            self.nbytes += size
            while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= self._size(*dropped)


class _ReadOnlyCache(FeatureCache):
    """The embed job's chunk cache, read only: a damaged chunk is left out of the index (its images are
    computed), never renamed -- serving changes nothing on disk."""

    def _set_aside(self, path: Path, seen, problem: str) -> None:
        self.damaged.append((path.name, problem))
        self.index = {k: v for k, v in self.index.items() if v[0] != path.name}
        log.warning("damaged cache chunk %s (%s): not used (left as it is)", path.name, problem)


class RequestFeatures:
    """One process's request-time features for one embedding setting (module docstring): the embed job's
    cache (index read on first use), an in-memory ``FeatureLRU``, and counts of where each image came from."""

    def __init__(self, clip: ClipCfg, cache_root: str, max_entries: int = MAX_CACHED_IMAGES,
                 max_bytes: int = MAX_CACHED_MB * 2**20):
        self.clip, self.spec = clip, feature_spec(clip)
        self.directory = spec_directory(cache_root, self.spec)
        self.memory = FeatureLRU(max_entries, max_bytes)
        self._disk: _ReadOnlyCache | None = None
        self._lock = threading.Lock()
        self.counts = {"memory_hits": 0, "disk_hits": 0, "computed": 0, "index_reads": 0}

    @property
    def disk(self) -> _ReadOnlyCache:
        """The persistent cache's index, read on first use and kept."""
        with self._lock:
            if self._disk is None:
                self._disk = _ReadOnlyCache(self.directory, widths={"hc": len(HANDCRAFTED),
                                                                   "clip": self.spec["embedding_dim"]})
                self.counts["index_reads"] += 1
                log.info("feature cache %s: %d images indexed (read only)", self.directory, len(self._disk.index))
            return self._disk

    def features(self, image: Callable[[int], bytes | str | None], n: int,
                 cfg: EmbedCfg) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """Handcrafted (float64) and CLIP (float32) rows for images ``0..n-1``, NaN where unusable, and
        ``(row, reason)`` for each image given that could not be used.

        ``image(i)`` gives row i's image bytes, the reason it cannot be read (str) or None (no image); it
        is called once per row, in order (and again for an image whose cached chunk cannot be read back),
        so a large batch streams: one image's bytes at a time, ``cfg.batch_size`` decoded ones.
        """
        d = self.spec["embedding_dim"]
        hc = np.full((n, len(HANDCRAFTED)), np.nan, dtype=np.float64)
        clip = np.full((n, d), np.nan, dtype=np.float32)
        bad: list[tuple[int, str]] = []
        rows: dict[str, list[int]] = {}  # image hash -> the rows that carry it (the first one is filled)
        on_disk: dict[str, list[int]] = {}
        batch = _Batch(self, cfg, hc, clip, bad)
        for i in range(n):
            data = image(i)
            if isinstance(data, str):
                bad.append((i, data))
                continue
            if data is None:
                continue
            key = hashlib.sha256(data).hexdigest()
            if key in rows:
                rows[key].append(i)
                continue
            rows[key] = [i]
            item = self.memory.get(key)
            if item is not None:
                hc[i], clip[i] = item
                self.counts["memory_hits"] += 1
            elif key in self.disk.index:
                on_disk[key] = [i]
            else:
                batch.add(key, i, data)
        if on_disk:
            lost = self.disk.read(on_disk, hc, clip)
            for key, (i,) in on_disk.items():
                if key in lost:  # its chunk became unreadable since the index was read: compute it
                    data = image(i)
                    if isinstance(data, bytes):
                        batch.add(key, i, data)
                else:
                    self.memory.put(key, hc[i], clip[i])
                    self.counts["disk_hits"] += 1
        batch.flush()
        reasons = dict(bad)
        for same in rows.values():
            if len(same) > 1:
                if same[0] in reasons:
                    bad += [(i, reasons[same[0]]) for i in same[1:]]
                else:
                    hc[same[1:]], clip[same[1:]] = hc[same[0]], clip[same[0]]
        return hc, clip, sorted(bad)


class _Batch:
    """Images waiting to be embedded together (``cfg.batch_size`` at a time): decoded and preprocessed when
    added, encoded by the process's CLIP model when full or flushed; their rows filled and remembered."""

    def __init__(self, store: RequestFeatures, cfg: EmbedCfg, hc: np.ndarray, clip: np.ndarray, bad: list):
        self.store, self.cfg, self.hc, self.clip, self.bad = store, cfg, hc, clip, bad
        self.items: list[tuple[str, int, np.ndarray, object]] = []
        self.encoder: Encoder | None = None
        self.preprocess = None

    def add(self, key: str, row: int, data: bytes) -> None:
        from PIL import Image

        if self.encoder is None:  # the model is loaded on the first image to compute, never for cached ones
            model, self.preprocess, info = shared_clip(self.store.clip)
            self.encoder = Encoder(model, info["device"], self.cfg.batch_size,
                                   graph_mode(self.cfg.compile, info["device"], len(self.hc)))
        try:
            rgb = decode_image(data)
            features = handcrafted_features(rgb)
            pixels = self.preprocess(Image.fromarray(rgb))
        except BadImage as e:
            self.bad.append((row, str(e)))
            return
        except Exception as e:  # noqa: BLE001 - one odd image must not cost the other posts their features
            self.bad.append((row, f"cannot process image ({type(e).__name__}: {e})"))
            return
        self.items.append((key, row, np.array([features[k] for k in HANDCRAFTED]), pixels))
        if len(self.items) >= self.cfg.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        import torch

        vectors = self.encoder(torch.stack([pixels for *_, pixels in self.items]))
        for (key, row, row_hc, _), vector in zip(self.items, vectors):
            self.hc[row], self.clip[row] = row_hc, vector
            self.store.memory.put(key, row_hc, vector)
        self.store.counts["computed"] += len(self.items)
        self.items.clear()


def _bound(env: str, default: int, scale: int = 1) -> int:
    value = os.environ.get(env, "").strip()
    if not value:
        return default * scale
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{env}={value!r}: expected a whole number (0 keeps nothing in memory)") from None
    return max(0, number) * scale


@functools.lru_cache(maxsize=4)
def request_features(clip: ClipCfg, cache_root: str) -> RequestFeatures:
    """The process's ``RequestFeatures`` for one CLIP setting and cache root (created once; bounds from
    ``SMP_REQUEST_CACHE_IMAGES`` / ``SMP_REQUEST_CACHE_MB`` as they are then, else the module's)."""
    return RequestFeatures(clip, cache_root, _bound(IMAGES_ENV, MAX_CACHED_IMAGES), _bound(MB_ENV, MAX_CACHED_MB, 2**20))


@functools.lru_cache(maxsize=2)
def shared_clip(cfg: ClipCfg):
    """``load_clip(cfg)``, once per process and setting (the process's one copy of that model)."""
    return load_clip(cfg)
