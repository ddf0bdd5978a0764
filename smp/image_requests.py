"""A request's images (``smp predict``, the served model): per post, what was sent, whether it can be used,
and its features -- a few rows per call.

Each post's image is read by one rule (``request_images``): ``image_b64`` when given, decoded once (a
``DecodedImage`` travels on in the frame, so no later step decodes it again), else ``image_path``, else none.
Before anything is embedded an image is checked per post (``file_problem`` / ``image_problem``: its size, and
its pixel count from the header, so a decompression bomb is never decoded); an unusable one costs only its
own post its image features, with the reason (``with_image_features``). What refuses a whole request
(``image_b64`` that is not base64 text, an ``image_path`` out of the server's image root) is raised as
``ImageColumnError`` for ``smp.serving`` to answer.

Importing this module loads no torch: a tabular model checks the images of a request too, and its
environment has no torch (``smp.packaging.IMAGE_ONLY``). CLIP, torch and the feature cache are imported
when the first image is embedded.

The vectors are the training pipeline's (the same decoding, handcrafted features, preprocessing and CLIP
model as ``smp.embed.embed_images``); what a process keeps between calls, per embedding setting:

* the CLIP model, loaded once (``shared_clip``): loading RN50 costs seconds, a request should not pay it;
* the embed job's persistent feature cache (``smp.feature_cache``: chunk files by image content), **read,
  never written**: its index is read once, on the first request with an image (``request_features``), and
  an image embedded by ``smp embed`` is served from it. Chunks written after that are not seen until the
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
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from smp.image_features import (HANDCRAFTED, BadImage, bytes_problem, decode_image, handcrafted_features,
                                image_problem, path_problem)

if TYPE_CHECKING:  # annotations only: these modules load torch
    from smp.clip import ClipCfg, Encoder
    from smp.embed import EmbedCfg
    from smp.feature_cache import FeatureCache

log = logging.getLogger("smp.image_requests")

IMAGE_INPUTS = ("image_b64", "image_path")  # where a post's image may come; image_b64 wins where both are given
IMAGE_ROOT_ENV = "SMP_SERVE_IMAGE_ROOT"  # a scoring server reads image_path only under this directory
NO_IMAGE = "no image given; scored without image features"
MAX_CACHED_IMAGES = 4096  # request images whose features a process keeps in memory (per embedding setting)
MAX_CACHED_MB = 64  # ... and at most this many MiB of their feature arrays (binds first for models wider than 16k)
IMAGES_ENV, MB_ENV = "SMP_REQUEST_CACHE_IMAGES", "SMP_REQUEST_CACHE_MB"  # operators' overrides of the two bounds


# --------------------------------------------------------------------------- what a request sent, per post
class ImageColumnError(ValueError):
    """An image column that refuses the whole request (the request is garbled, not an image); ``row`` is the
    post it was found in (None: the column as a whole), for the caller to name."""

    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row


class DecodedImage(bytes):
    """An ``image_b64`` value decoded (``decode_b64``). It stays in the frame in place of the text, so each
    step after the first takes the bytes as they are; a type of its own because a caller's plain ``bytes``
    in ``image_b64`` is not base64 text and is refused as before."""


def decode_b64(text: str) -> DecodedImage:
    """``image_b64`` text as image bytes; ``binascii.Error`` / ``ValueError`` when it is not base64."""
    return DecodedImage(base64.b64decode(text, validate=True))


def _given(value) -> bool:
    return isinstance(value, str) and value != ""


def decoded_b64(values) -> list:
    """An ``image_b64`` column with each given value decoded once (``DecodedImage``); missing and ``""`` (no
    image) as they are. ``ImageColumnError`` for a value that is not base64 text; what the bytes are is
    judged per post, later (``with_image_features``)."""
    out = []
    for i, value in enumerate(values):
        if isinstance(value, DecodedImage) or value is None or (isinstance(value, float) and np.isnan(value)) \
                or value == "":
            out.append(value)
            continue
        if not isinstance(value, str):
            raise ImageColumnError(f"column 'image_b64': expected a base64 string, got {type(value).__name__}", i)
        try:
            out.append(decode_b64(value))
        except (binascii.Error, ValueError):
            raise ImageColumnError("column 'image_b64': not valid base64", i) from None
    return out


def confined_paths(paths, root: str, in_server: bool) -> list:
    """``image_path`` values resolved under ``root`` (the server's ``SMP_SERVE_IMAGE_ROOT``); with no root, as
    given, but refused in a scoring server (``in_server``), which then reads no server-side file at all.

    In-process use (``smp predict``, a notebook) reads any path the caller can; a scoring server reads
    only below its root and never follows ``../`` or absolute paths out of it.
    """
    from smp.data import DataError, resolve_image_path

    paths = pd.Series(paths)
    given = paths.notna() & (paths.astype(str).str.strip() != "")
    if not root:
        if given.any() and in_server:
            raise ImageColumnError(f"column 'image_path': this server reads no server-side files (set "
                                   f"{IMAGE_ROOT_ENV} to allow paths below a directory); send the image bytes as "
                                   "'image_b64'")
        return list(paths)
    out = []
    for i, p in enumerate(paths):
        if isinstance(p, str) and path_problem(p) is not None:
            out.append(p)  # names no file, in the root or out of it: that post's status says why (file_problem)
            continue
        try:
            out.append(resolve_image_path(p, root))
        except DataError:
            raise ImageColumnError(f"column 'image_path': {p!r} is outside the image root", i) from None
    return out


def request_images(posts: pd.DataFrame) -> list:
    """Each row's image by the one rule: ``image_b64`` when given (a ``DecodedImage``, decoded here unless a
    request check did it, or the reason it is not base64), else ``image_path`` (a ``Path``, read when
    embedded), else None (no image)."""
    n = len(posts)
    b64 = posts["image_b64"].tolist() if "image_b64" in posts.columns else [None] * n
    paths = posts["image_path"].tolist() if "image_path" in posts.columns else [None] * n
    out: list = []
    for data, path in zip(b64, paths):
        if isinstance(data, DecodedImage):
            out.append(data)
        elif _given(data):
            try:
                out.append(decode_b64(data))
            except (binascii.Error, ValueError):
                out.append("image_b64 is not valid base64")
        elif _given(path):
            out.append(Path(path))
        else:
            out.append(None)
    return out


def file_problem(path) -> str | None:
    """Why the file at ``path`` cannot be an image (without reading more than its header), or None.

    Checked before the embedding reads it: a directory, a device (``/dev/zero`` would be read forever) or
    a huge file never reaches ``read_bytes``, and the reasons name no path.
    """
    if path_problem(str(path)) is not None:  # os.stat would raise ValueError, not OSError
        return path_problem(str(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing file"
    except OSError as exc:
        return f"unreadable file ({type(exc).__name__})"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if bytes_problem(st.st_size) is not None:
        return bytes_problem(st.st_size)
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)  # enough for any header Pillow reads to learn the size
    except OSError as exc:
        return f"unreadable file ({type(exc).__name__})"
    return image_problem(head, complete=False)


def _problem(image) -> str | None:
    """Why a ``request_images`` item cannot be used, judged without decoding the image (None: usable)."""
    if isinstance(image, str):
        return image
    return image_problem(image) if isinstance(image, bytes) else file_problem(image)


def _image_bytes(image) -> bytes | str | None:
    """A ``request_images`` item as the embedding takes it: bytes, the reason it cannot be read, or None."""
    if not isinstance(image, Path):
        return image
    if path_problem(str(image)) is not None:
        return path_problem(str(image))
    try:
        return image.read_bytes()
    except FileNotFoundError:
        return "missing file"
    except OSError as e:
        return f"unreadable file ({type(e).__name__}: {e})"


# an absolute POSIX path of two or more parts (/srv/images/a.jpg, /usr/lib/python3/x.py) or a Windows one
_PATH = re.compile(r"(?<![\w/.])/(?:[\w.@+~-]+/)+[\w.@+~-]*|[A-Za-z]:\\[^\s'\"]+")


def scrub_paths(text: str) -> str:
    """``text`` with absolute file paths replaced by ``<path>``: what a client reads (an image's reason, an
    error body) must not show the server's layout (image roots, temp files, the package's module files)."""
    return _PATH.sub("<path>", str(text))


def image_note(reason: str) -> str:
    """The per-post note for an image that cannot be used."""
    return f"image unusable ({scrub_paths(reason)}); scored without image features"


def with_image_features(model, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """For an smp image model (one with an ``images`` ``ImageFeatureSource``): ``frame`` with its image
    feature columns, computed once, and notes (Pid -> notes) for each post scored without image features.
    Other models, or a frame that already has the feature columns: ``frame`` as given and no notes.

    An image is checked before it is embedded (``_problem``); one that fails is left out, with its reason.
    The image columns stay, ``image_b64`` decoded: the model reads the feature columns, and a caller that
    checks the request after this (``smp predict``, through the pyfunc) takes the decoded bytes as they are
    and still refuses a garbled ``image_b64`` as it would unembedded.
    """
    source = getattr(model, "images", None)
    if source is None or set(source.columns) <= set(frame.columns):
        return frame, {}
    frame = frame.reset_index(drop=True)
    n = len(frame)
    pids = frame["Pid"].astype(str).tolist()
    images = request_images(frame)
    if "image_b64" in frame.columns:
        frame["image_b64"] = [image if isinstance(image, DecodedImage) else value
                              for image, value in zip(images, frame["image_b64"])]
    notes: dict[str, list[str]] = {}
    usable = []
    for i, image in enumerate(images):
        problem = NO_IMAGE if image is None else _problem(image)
        if problem is None:
            usable.append(i)
        else:
            notes[pids[i]] = [NO_IMAGE if image is None else image_note(problem)]
    rest = frame.drop(columns=[c for c in source.columns if c in frame.columns])
    feats = pd.DataFrame(np.nan, index=range(n), columns=list(source.columns), dtype=np.float32)
    if usable and source.embed_cfg is None:
        for i in usable:  # a model without embedding settings cannot use an image
            notes[pids[i]] = [image_note("this model cannot embed images")]
    elif usable:
        got = features_for_images([pids[i] for i in usable], [images[i] for i in usable], source.embed_cfg)
        for pid, reason in got.attrs["bad"][["Pid", "reason"]].itertuples(index=False):
            notes[str(pid)] = [image_note(reason)]
        feats.iloc[usable] = got[list(source.columns)].to_numpy(dtype=np.float32)
    out = pd.concat([rest.reset_index(drop=True), feats], axis=1)
    out.attrs = dict(frame.attrs)
    return out, notes


# --------------------------------------------------------------------------- their features
def features_for_rows(posts: pd.DataFrame, cfg: EmbedCfg) -> pd.DataFrame:
    """Image features for raw post rows that carry ``image_b64`` (base64 bytes) or ``image_path``
    (``request_images``: ``image_b64`` wins where a row has both); ``features_for_images``' table."""
    return features_for_images(posts["Pid"].astype(str).tolist(), request_images(posts), cfg)


def features_for_images(pids: list[str], images: list, cfg: EmbedCfg) -> pd.DataFrame:
    """Image features for ``request_images`` items, one row per item, in order: Pid, has_image, the
    handcrafted features, ``clip_0..``; NaN and ``has_image=0`` where there is no usable image, with
    ``attrs["bad"]`` listing ``Pid, reason`` for every image given but unusable. Vectors come from memory
    or the embed job's cache when the same image was seen before with the same settings (module
    docstring); nothing is written to disk."""
    from smp.clip import ClipCfg
    from smp.feature_cache import features_root

    store = request_features(ClipCfg.of(cfg), str(features_root(cfg.cache_dir).absolute().parent))
    hc, clip, bad = store.features(lambda i: _image_bytes(images[i]), len(pids), cfg)
    features = pd.concat([
        pd.DataFrame({"Pid": pd.Series(pids, dtype=object),
                      "has_image": np.isfinite(clip).all(axis=1).astype(np.int64)}),
        pd.DataFrame(hc, columns=list(HANDCRAFTED)),
        pd.DataFrame(clip, columns=[f"clip_{j}" for j in range(clip.shape[1])]),
    ], axis=1)
    features.attrs["bad"] = pd.DataFrame([(pids[i], reason) for i, reason in bad], columns=["Pid", "reason"])
    return features


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


def _read_only_cache(directory: Path, widths: dict[str, int]) -> FeatureCache:
    """The embed job's chunk cache, read only: a damaged chunk is left out of the index (its images are
    computed), never renamed -- serving changes nothing on disk. (A class made here, not at import: the
    feature cache module loads torch.)"""
    from smp.feature_cache import FeatureCache

    class ReadOnlyCache(FeatureCache):
        def _set_aside(self, path: Path, seen, problem: str) -> None:
            self.damaged.append((path.name, problem))
            self.index = {k: v for k, v in self.index.items() if v[0] != path.name}
            log.warning("damaged cache chunk %s (%s): not used (left as it is)", path.name, problem)

    return ReadOnlyCache(directory, widths=widths)


class RequestFeatures:
    """One process's request-time features for one embedding setting (module docstring): the embed job's
    cache (index read on first use), an in-memory ``FeatureLRU``, and counts of where each image came from."""

    def __init__(self, clip: ClipCfg, cache_root: str, max_entries: int = MAX_CACHED_IMAGES,
                 max_bytes: int = MAX_CACHED_MB * 2**20):
        from smp.feature_cache import feature_spec, spec_directory

        self.clip, self.spec = clip, feature_spec(clip)
        self.directory = spec_directory(cache_root, self.spec)
        self.memory = FeatureLRU(max_entries, max_bytes)
        self._disk: FeatureCache | None = None
        self._lock = threading.Lock()
        self.counts = {"memory_hits": 0, "disk_hits": 0, "computed": 0, "index_reads": 0}

    @property
    def disk(self) -> FeatureCache:
        """The persistent cache's index, read on first use and kept."""
        with self._lock:
            if self._disk is None:
                self._disk = _read_only_cache(self.directory, {"hc": len(HANDCRAFTED),
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

        from smp.clip import Encoder, graph_mode

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


def load_clip(cfg: ClipCfg):
    """``smp.clip.load_clip`` (imported on the first image to embed: it loads torch and open_clip)."""
    from smp.clip import load_clip as load

    return load(cfg)
