"""The image-feature cache: rows of handcrafted + CLIP features stored by image content (sha256).

A separate module because two pipelines share it: the ``embed`` job (``smp.embed``) writes it and
request-time features (``smp.image_requests``) read it, so neither has to import the other's machinery.

Layout: ``<root>/features/<spec directory>/chunk-*.npz``. The root is ``EmbedCfg.cache_dir``, else
``$SMP_CACHE_DIR``, else ``./.smp_cache``; the spec directory is named after everything that changes a
vector (:func:`feature_spec`), so a changed model, weights, precision or preprocessing never reuses a row.
A chunk file holds ``keys`` (the images' sha256), ``hc`` and ``clip``, one row per image, and is written
atomically (temp file + ``os.replace``): a killed run leaves whole chunks or none, and another run sharing
the directory never reads half a file. A damaged chunk (unreadable, wrong shapes, non-finite values) is
renamed ``*.npz.damaged`` and its images are recomputed by the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from smp.clip import model_spec

log = logging.getLogger("smp.feature_cache")

PREPROCESS_VERSION = "1"  # bump when decoding, preprocessing or handcrafted definitions change


def feature_spec(cfg) -> dict:
    """Everything that determines a cached row, without building the model: the CLIP model's
    :func:`~smp.clip.model_spec` of ``cfg`` (an ``EmbedCfg`` or ``ClipCfg``) and the version of decoding,
    preprocessing and handcrafted features. Public: it names the cache directory (:func:`spec_directory`)
    and the embedding key a trained image model records."""
    return {**model_spec(cfg), "preprocess_version": PREPROCESS_VERSION}


def features_root(cache_dir: str = "") -> Path:
    """The ``features`` folder under ``cache_dir`` ("" -> $SMP_CACHE_DIR, else ./.smp_cache). Public: request-time
    features find the embed job's cache from the same setting."""
    root = cache_dir or os.environ.get("SMP_CACHE_DIR") or ".smp_cache"
    return Path(root) / "features"


def spec_directory(cache_dir: str, spec: dict) -> Path:
    """The folder of one :func:`feature_spec` under :func:`features_root` (``cache_dir``): named after model,
    weights, precision, preprocess version and quick_gelu, so rows of another setting are never read."""
    name = "__".join(
        [spec["model"], spec["weights_id"], spec["precision"], f"p{spec['preprocess_version']}"]
        + (["quickgelu"] if spec["force_quick_gelu"] else [])
    )
    return features_root(cache_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


_CHUNK_ARRAYS = ("keys", "hc", "clip")  # what every chunk file holds, one row per image
_KEY_LENGTH = 64  # a key is the image's sha256 in hex


class DamagedChunk(Exception):
    """A cache chunk that cannot be used; the message says what is wrong with it (raised by :func:`read_chunk`)."""


def _chunk_problem(arrays: dict[str, np.ndarray], widths: dict[str, int]) -> str | None:
    """What is wrong with a chunk's arrays, or None: names, dtypes, row counts, ``widths`` (array name ->
    columns, where known) and finiteness (every row written was a finite, computed vector)."""
    missing = [name for name in _CHUNK_ARRAYS if name not in arrays]
    if missing:
        return f"missing arrays {missing}"
    for name in _CHUNK_ARRAYS:
        if not isinstance(arrays[name], np.ndarray):  # np.load returns a member that is not .npy as bytes
            return f"{name} is not an .npy array"
    keys = arrays["keys"]
    if keys.dtype.kind != "U" or keys.ndim != 1:
        return f"keys are {keys.dtype} of shape {keys.shape}, not a 1-D string array"
    if not np.all(np.char.str_len(keys) == _KEY_LENGTH):
        return "keys are not sha256 hex digests"
    for name in ("hc", "clip"):
        a = arrays[name]
        if a.dtype.kind != "f" or a.ndim != 2:
            return f"{name} is {a.dtype} of shape {a.shape}, not a 2-D float array"
        if a.shape[0] != len(keys):
            return f"{name} has {a.shape[0]} rows for {len(keys)} keys"
        if name in widths and a.shape[1] != widths[name]:
            return f"{name} has {a.shape[1]} columns, expected {widths[name]}"
        if not np.isfinite(a).all():
            return f"{name} has non-finite values"
    return None


def read_chunk(path: Path, widths: dict[str, int]) -> dict[str, np.ndarray]:
    """Every array of a chunk file, read in full and checked; raises :class:`DamagedChunk`. The one way a chunk
    is read, index and rows alike (tests count disk reads through it).

    In full: ``np.load`` opens a zip whose members are damaged, the error (BadZipFile on a bad CRC,
    ValueError on a bad array header, ...) only comes when a member is read.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except Exception as e:  # noqa: BLE001 - zip, zlib, npy-header and OS errors all mean "cannot use it"
        raise DamagedChunk(f"{type(e).__name__}: {e}") from e
    problem = _chunk_problem(arrays, widths)
    if problem is not None:
        raise DamagedChunk(problem)
    return arrays


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """Inode, size and mtime of ``path`` (None if it is gone): tells a rewritten file from the one read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class FeatureCache:
    """Chunk files ``chunk-*.npz`` (keys, handcrafted, clip) in one spec directory.

    Every chunk is read and checked when the index is built; a damaged one is left out of the index (its
    images are recomputed and written to a new chunk), renamed ``*.npz.damaged`` so later runs do not
    read it again, and listed in ``damaged`` as (file name, problem). Public: the embed job reads and writes
    through it; request-time features use a read-only subclass that overrides ``_set_aside`` (changes nothing
    on disk).
    """

    def __init__(self, directory: Path, widths: dict[str, int] | None = None):
        self.dir = directory
        self.widths = dict(widths or {})  # array name -> expected columns (hc, clip)
        self.index: dict[str, tuple[str, int]] = {}  # image sha256 -> (chunk file, row)
        self.damaged: list[tuple[str, str]] = []  # (chunk file, problem), in the order found
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("chunk-*.npz")):
            seen = _file_id(path)
            try:
                keys = read_chunk(path, self.widths)["keys"]
            except DamagedChunk as e:
                self._set_aside(path, seen, str(e))
                continue
            for row, key in enumerate(keys):
                self.index.setdefault(str(key), (path.name, row))

    def _set_aside(self, path: Path, seen: tuple | None, problem: str) -> None:
        """Record a damaged chunk, drop it from the index and rename it ``*.npz.damaged``."""
        self.damaged.append((path.name, problem))
        self.index = {k: v for k, v in self.index.items() if v[0] != path.name}
        aside = path.with_name(path.name + ".damaged")
        # another run sharing the cache may have set it aside and written a good chunk of the same name
        # since we read it: rename only the file we read
        if seen is None or _file_id(path) != seen:
            log.warning("damaged cache chunk %s (%s); its images are recomputed", path, problem)
            return
        try:
            os.replace(path, aside)
        except OSError as e:
            log.warning("damaged cache chunk %s (%s); its images are recomputed (could not rename it: %s)",
                        path, problem, e)
            return
        log.warning("damaged cache chunk %s (%s): renamed %s, its images are recomputed", path, problem,
                    aside.name)

    def write(self, keys: list[str], hc: np.ndarray, clip: np.ndarray, spec: dict) -> Path:
        """Write one chunk atomically (temp file + os.replace); return its path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "spec.json"
        if not meta.exists():
            _atomic_write_bytes(meta, json.dumps(spec, indent=1, sort_keys=True).encode())
        digest = hashlib.sha256("".join(keys).encode()).hexdigest()[:20]
        path = self.dir / f"chunk-{digest}.npz"
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, keys=np.array(keys, dtype="U64"), hc=hc, clip=clip)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        for row, key in enumerate(keys):
            self.index.setdefault(key, (path.name, row))
        return path

    def read(self, wanted: dict[str, list[int]], hc_out: np.ndarray, clip_out: np.ndarray) -> set[str]:
        """Fill output rows from the cache: ``wanted`` maps key -> output row indices.

        Returns the keys that could not be served because their chunk became unreadable (or changed)
        since the index was built; that chunk is set aside like a damaged one and the caller recomputes.
        """
        by_chunk: dict[str, list[tuple[str, int, list[int]]]] = {}
        for key, rows in wanted.items():
            name, row = self.index[key]
            by_chunk.setdefault(name, []).append((key, row, rows))
        lost: set[str] = set()
        for name, items in by_chunk.items():
            path = self.dir / name
            seen = _file_id(path)
            try:
                arrays = read_chunk(path, self.widths)
                keys = arrays["keys"]
                if any(row >= len(keys) or str(keys[row]) != key for key, row, _ in items):
                    raise DamagedChunk("its keys differ from the ones indexed (rewritten meanwhile?)")
            except DamagedChunk as e:
                self._set_aside(path, seen, f"{e}, when reading")
                lost.update(key for key, _, _ in items)
                continue
            hc, clip = arrays["hc"], arrays["clip"]
            for _, row, out_rows in items:
                hc_out[out_rows] = hc[row]
                clip_out[out_rows] = clip[row]
        return lost


class ChunkWriter:
    """Computed rows waiting to be written to the cache, and when to write them.

    A chunk is written when ``chunk_size`` rows are pending, when ``flush_seconds`` (0 = never) have
    passed on ``clock`` since the last write -- on a slow machine 256 images can be many minutes of
    work, and a kill loses what is pending -- and at the end (``flush(final=True)``).
    ``on_chunk(info)`` is called after each write (info: path, rows, chunks_written, computed).
    Public: the embed pipeline queues its computed rows here; when to write is the cache's promise of how
    much work a kill can lose, so it lives beside the cache.
    """

    def __init__(self, cache: FeatureCache, spec: dict, chunk_size: int, flush_seconds: float,
                 on_chunk: Callable[[dict], None] | None = None, clock: Callable[[], float] = time.monotonic):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
        if not flush_seconds >= 0:
            raise ValueError(f"flush_seconds must be >= 0 (0 = by count only), not {flush_seconds}")
        self.cache, self.spec, self.on_chunk, self.clock = cache, spec, on_chunk, clock
        self.chunk_size, self.flush_seconds = chunk_size, flush_seconds
        self.keys: list[str] = []
        self.hc: list[np.ndarray] = []
        self.clip: list[np.ndarray] = []
        self.added = self.chunks = 0
        self.last_write = clock()

    def add(self, keys: list[str], hc: np.ndarray, clip: np.ndarray) -> None:
        """Queue computed rows (one key per row) and write what is due."""
        self.keys += keys
        self.hc += list(hc)
        self.clip += list(clip)
        self.added += len(keys)
        self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Write every full chunk; the rest too when ``final`` or when the time since the last write is up."""
        while self.keys and (len(self.keys) >= self.chunk_size or final or self._due()):
            m = min(self.chunk_size, len(self.keys))
            path = self.cache.write(self.keys[:m], np.stack(self.hc[:m]), np.stack(self.clip[:m]), self.spec)
            del self.keys[:m], self.hc[:m], self.clip[:m]
            self.chunks += 1
            self.last_write = self.clock()
            if self.on_chunk is not None:
                self.on_chunk({"path": str(path), "rows": m, "chunks_written": self.chunks, "computed": self.added})

    def _due(self) -> bool:
        return self.flush_seconds > 0 and self.clock() - self.last_write >= self.flush_seconds


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` through a temp file + ``os.replace``: a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
