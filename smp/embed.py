"""Image features per post: CLIP image embeddings (open_clip) + handcrafted features.

``embed_images(pids, paths, cfg) -> EmbedResult`` streams the images once:

    file bytes -> sha256 -> cached?  yes: take the stored row
                                     no:  decode -> handcrafted features
                                          -> open_clip preprocess -> CLIP encode_image

Decoding and preprocessing run in DataLoader workers, the model in the main
process (channels_last, ``torch.inference_mode``; CUDA + fp16 autocast when a
GPU is there, fp32 on CPU; on CPU a frozen TorchScript graph). Results are cached by
image content in chunk files written atomically, so a rerun over the same
images computes nothing and an interrupted run resumes where it stopped: a chunk
is written every ``chunk_size`` images and at least every ``flush_seconds``, so
a kill loses at most that much work. A damaged chunk (unreadable, wrong shapes,
non-finite values) is renamed ``*.npz.damaged`` and its images are recomputed.

Bad images (no path, missing, zero-byte, truncated, not an image, unreadable
colour mode) never stop a run: their row is kept with ``has_image=0`` and NaN
features and they are listed in ``EmbedResult.bad`` with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import functools
import json
import logging
import os
import re
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import open_clip
import pandas as pd
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from smp.data import DataCfg
from smp.image_features import HANDCRAFTED, BadImage, decode_image, handcrafted_features

log = logging.getLogger("smp.embed")

PREPROCESS_VERSION = "1"  # bump when decoding, preprocessing or handcrafted definitions change
_RANDOM_SEED = 0  # seed of the random-weights model (clip_pretrained="none")
_NO_WEIGHTS = ("", "none")
_TORCHSCRIPT_KEYS_TO_DROP = ("input_resolution", "context_length", "vocab_size")  # as open_clip does
_FREEZE_MIN_IMAGES = 128  # compile="auto" on CPU traces+freezes the encoder from this many images


@dataclass(frozen=True)
class EmbedCfg:
    """How to embed images; defaults follow the paper (CLIP RN50, OpenAI weights)."""

    clip_model: str = "RN50"  # the paper's backbone; width comes from the model (RN50: 1024)
    clip_pretrained: str = "openai"  # open_clip tag; "none" = random weights (tests, offline demo)
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


@dataclass
class EmbedResult:
    """Output of :func:`embed_images`."""

    features: pd.DataFrame  # one row per input pid, in input order
    bad: pd.DataFrame  # Pid, path, reason for every post without a usable image
    stats: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # model/weights/device/cache description


# ----------------------------------------------------------------------------- model spec and loading


def _resolve_device(cfg: EmbedCfg) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _random_weights(cfg: EmbedCfg) -> bool:
    return not cfg.checkpoint and cfg.clip_pretrained.strip().lower() in _NO_WEIGHTS


def _spec(cfg: EmbedCfg) -> dict:
    """Everything that determines a cached vector, without building the model."""
    model_cfg = open_clip.get_model_config(cfg.clip_model)
    if model_cfg is None:
        raise ValueError(
            f"unknown open_clip model {cfg.clip_model!r}; see open_clip.list_models()"
        )
    device = _resolve_device(cfg)
    spec = {
        "model": cfg.clip_model,
        "pretrained": "",
        "checkpoint": "",
        "checkpoint_sha256": "",
        "random_weights": _random_weights(cfg),
        "force_quick_gelu": cfg.force_quick_gelu,
        "precision": "amp_fp16" if device.startswith("cuda") else "fp32",
        "preprocess_version": PREPROCESS_VERSION,
        "embedding_dim": int(model_cfg["embed_dim"]),
        "image_size": model_cfg["vision_cfg"]["image_size"],
    }
    if cfg.checkpoint:
        if not os.path.isfile(cfg.checkpoint):
            raise FileNotFoundError(f"checkpoint file not found: {cfg.checkpoint}")
        spec["checkpoint"] = os.path.abspath(cfg.checkpoint)
        spec["checkpoint_sha256"] = _sha256_file(cfg.checkpoint)
        spec["weights_id"] = f"ckpt-{spec['checkpoint_sha256'][:16]}"
    elif spec["random_weights"]:
        # random init depends on the seed and on the library versions that draw it
        spec["weights_id"] = (
            f"random-seed{_RANDOM_SEED}-torch{torch.__version__}-openclip{open_clip.__version__}"
        )
    else:
        spec["pretrained"] = cfg.clip_pretrained
        spec["weights_id"] = cfg.clip_pretrained
    return spec


def _preprocess_from_spec(cfg: EmbedCfg):
    """The eval transform open_clip would return, built without creating the model.

    Mirrors ``open_clip.factory.create_model`` (defaults <- pretrained-tag cfg, size from
    the vision cfg); :func:`load_clip` checks it equals the model's own transform.
    """
    pp = asdict(PreprocessCfg())
    if not cfg.checkpoint and not _random_weights(cfg):
        tag_cfg = open_clip.get_pretrained_cfg(cfg.clip_model, cfg.clip_pretrained)
        pp = merge_preprocess_dict(pp, tag_cfg or {})
    pp["size"] = open_clip.get_model_config(cfg.clip_model)["vision_cfg"]["image_size"]
    return image_transform_v2(PreprocessCfg(**pp), is_train=False)


def _is_torchscript_archive(path: str) -> bool:
    """True for TorchScript zip archives such as OpenAI's original CLIP ``.pt`` files."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def _offline_message(cfg: EmbedCfg, err: Exception) -> str:
    return (
        f"could not fetch CLIP weights for ({cfg.clip_model!r}, {cfg.clip_pretrained!r}) "
        f"(offline? {err}). Download them on a machine with network access and pass a local "
        f"file: EmbedCfg(checkpoint='/path/to/file', ...) (CLI: --checkpoint /path/to/file). "
        f"For OpenAI's original weights (e.g. RN50.pt) use clip_model='{cfg.clip_model}-quickgelu' "
        f"or force_quick_gelu=True; clip_pretrained='none' gives random weights for a dry run."
    )


def _no_download_error_log():
    """open_clip logs a failed weights download as an ERROR on the root logger, then raises (the raised
    error, reworded by ``_offline_message``, is what the caller reports or falls back on), and warns on
    random weights (``run_embed`` says so once, with the tag it sets)."""
    from smp.tracking import muted

    return muted("", "Failed to download weights for tag", "No pretrained weights loaded")


def load_clip(cfg: EmbedCfg):
    """Build the CLIP model; return ``(model, preprocess, info)``.

    ``model`` is in eval mode, channels_last, on the resolved device; ``preprocess``
    is open_clip's eval transform (PIL image -> normalised tensor). ``info`` holds
    model, pretrained, checkpoint, checkpoint_sha256, embedding_dim, image_size,
    device, precision, random_weights and the cache-relevant weights_id.

    Weights: ``checkpoint`` (a local file) wins; else ``clip_pretrained`` is an
    open_clip tag downloaded into ``clip_cache_dir``; "none"/"" gives random
    weights drawn with seed 0 (deterministic, global RNG state untouched).
    OpenAI's original ``.pt`` files are TorchScript archives that open_clip's
    ``torch.load(weights_only=True)`` refuses; their ``state_dict`` is then read
    with ``torch.jit.load`` (dropping input_resolution/context_length/vocab_size as
    ``open_clip.factory.load_state_dict`` does) and must match the model's keys.
    """
    spec = _spec(cfg)
    kw = dict(force_quick_gelu=cfg.force_quick_gelu, device="cpu")
    if cfg.clip_cache_dir:
        kw["cache_dir"] = cfg.clip_cache_dir
    if spec["random_weights"]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            with _no_download_error_log():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    cfg.clip_model, pretrained=None, **kw
                )
        log.info("CLIP %s has RANDOM weights (clip_pretrained=%r)", cfg.clip_model, cfg.clip_pretrained)
    elif cfg.checkpoint and _is_torchscript_archive(cfg.checkpoint):
        log.info(
            "%s is a TorchScript archive (OpenAI's format), which torch.load(weights_only=True) "
            "refuses; reading its state_dict with torch.jit.load",
            cfg.checkpoint,
        )
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.clip_model, pretrained=None, **kw
        )
        state = torch.jit.load(cfg.checkpoint, map_location="cpu").state_dict()
        for key in _TORCHSCRIPT_KEYS_TO_DROP:
            state.pop(key, None)
        result = model.load_state_dict(state, strict=False)
        # buffers open_clip keeps non-persistent (attn_mask) may be stored in an archive
        non_persistent = {k for k in result.unexpected_keys if k.rsplit(".", 1)[-1] == "attn_mask"}
        unexpected = sorted(set(result.unexpected_keys) - non_persistent)
        if result.missing_keys or unexpected:
            raise RuntimeError(
                f"checkpoint {cfg.checkpoint} does not fit open_clip model {cfg.clip_model!r}: "
                f"missing {result.missing_keys[:5]}..., unexpected {unexpected[:5]}... "
                f"(is clip_model the architecture the checkpoint was trained with?)"
            )
    elif cfg.checkpoint:
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.clip_model, pretrained=cfg.checkpoint, **kw
        )
    else:
        try:
            with _no_download_error_log():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    cfg.clip_model, pretrained=cfg.clip_pretrained, **kw
                )
        except RuntimeError as e:
            if "Failed to download" in str(e):
                raise RuntimeError(_offline_message(cfg, e)) from e
            raise

    if repr(preprocess) != repr(_preprocess_from_spec(cfg)):  # workers use the spec's transform
        raise RuntimeError(
            f"open_clip's preprocess differs from the one derived from its config:\n"
            f"{preprocess}\nvs\n{_preprocess_from_spec(cfg)}"
        )
    device = _resolve_device(cfg)
    model = model.eval().to(device=device, memory_format=torch.channels_last)
    visual = model.visual
    info = {
        **spec,
        "image_size": getattr(visual, "image_size", spec["image_size"]),
        "device": device,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    return model, preprocess, info


class _Encoder:
    """``model.encode_image`` on a batch -> float32 numpy, through a faster graph if asked.

    mode "freeze": ``torch.jit.trace`` + ``torch.jit.freeze`` (BatchNorm folded into the
    convolutions, weights constant; builds in seconds, needs no compiler); "inductor":
    ``torch.compile(..., options={"freezing": True})`` (a C++ compiler and minutes of
    compilation; the last batch is padded so it compiles once); "eager": the model as is.
    A fast graph is checked once against eager on the first batch; any failure or
    mismatch falls back to eager with a warning.
    """

    def __init__(self, model, device: str, batch_size: int, mode: str):
        self.model, self.device, self.batch_size, self.mode = model, device, batch_size, mode
        self.amp = device.startswith("cuda")
        self.fast = None

    def _build(self, x):
        module = _EncodeImage(self.model).eval()
        if self.mode == "inductor":
            return torch.compile(module, dynamic=False, options={"freezing": True})
        with warnings.catch_warnings():  # jit deprecation notices, tracer shape-assert notes
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, x[:2], check_trace=False)
            return torch.jit.freeze(traced)

    def _eager(self, x):
        return self.model.encode_image(x)

    def __call__(self, pixels) -> np.ndarray:
        n = pixels.shape[0]
        x = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        amp = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            if self.mode != "eager":
                try:
                    return self._fast(x, n).float().cpu().numpy()
                except Exception as e:  # noqa: BLE001 - any tracing/compiler failure -> eager
                    log.warning("%s graph failed (%s: %s); running eager", self.mode, type(e).__name__, e)
                    self.fast, self.mode = None, "eager"
            return self._eager(x).float().cpu().numpy()

    def _fast(self, x, n: int):
        first = self.fast is None
        if first:
            self.fast = self._build(x)
        if self.mode == "inductor" and n < self.batch_size:  # pad: no recompilation
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        out = self.fast(x)[:n]
        if first:  # one-off check of the graph against eager on the first and last image
            pick = [0, n - 1]
            ref = self._eager(x[pick]).float()
            err = (out[pick].float() - ref).abs().max().item()
            tol = 1e-3 * max(1.0, ref.abs().max().item()) * (50 if self.amp else 1)
            if not err <= tol:
                raise RuntimeError(f"output differs from eager by {err:.3g} (tolerance {tol:.3g})")
        return out


class _EncodeImage(torch.nn.Module):
    """``model.encode_image`` as a module, so the graph can freeze its parameters."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.encode_image(x)


def _graph_mode(cfg: EmbedCfg, device: str, n_images: int) -> str:
    """The encoder mode for a run of `n_images` posts with an image path."""
    modes = {"none": "eager", "eager": "eager", "freeze": "freeze", "inductor": "inductor"}
    if cfg.compile == "auto":
        # CPU: freeze measured ~1.4x eager, and its few seconds of tracing pay off from
        # about 100 images; CUDA stays eager (not measured here)
        if device.startswith("cuda") or n_images < _FREEZE_MIN_IMAGES:
            return "eager"
        return "freeze"
    if cfg.compile not in modes:
        raise ValueError(f"compile must be auto, none, freeze or inductor, not {cfg.compile!r}")
    return modes[cfg.compile]


# ----------------------------------------------------------------------------- content cache


def _cache_root(cfg: EmbedCfg) -> Path:
    root = cfg.cache_dir or os.environ.get("SMP_CACHE_DIR") or ".smp_cache"
    return Path(root) / "features"


def _cache_dir(cfg: EmbedCfg, spec: dict) -> Path:
    """Directory specific to (model, weights, precision, preprocess version, quick_gelu)."""
    name = "__".join(
        [spec["model"], spec["weights_id"], spec["precision"], f"p{spec['preprocess_version']}"]
        + (["quickgelu"] if spec["force_quick_gelu"] else [])
    )
    return _cache_root(cfg) / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


_CHUNK_ARRAYS = ("keys", "hc", "clip")  # what every chunk file holds, one row per image
_KEY_LENGTH = 64  # a key is the image's sha256 in hex


class _DamagedChunk(Exception):
    """A cache chunk that cannot be used; the message says what is wrong with it."""


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


def _read_chunk(path: Path, widths: dict[str, int]) -> dict[str, np.ndarray]:
    """Every array of a chunk file, read in full and checked; raises :class:`_DamagedChunk`.

    In full: ``np.load`` opens a zip whose members are damaged, the error (BadZipFile on a bad CRC,
    ValueError on a bad array header, ...) only comes when a member is read.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except Exception as e:  # noqa: BLE001 - zip, zlib, npy-header and OS errors all mean "cannot use it"
        raise _DamagedChunk(f"{type(e).__name__}: {e}") from e
    problem = _chunk_problem(arrays, widths)
    if problem is not None:
        raise _DamagedChunk(problem)
    return arrays


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """Inode, size and mtime of ``path`` (None if it is gone): tells a rewritten file from the one read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class _Cache:
    """Chunk files ``chunk-*.npz`` (keys, handcrafted, clip) in one spec directory.

    Every chunk is read and checked when the index is built; a damaged one is left out of the index (its
    images are recomputed and written to a new chunk), renamed ``*.npz.damaged`` so later runs do not
    read it again, and listed in ``damaged`` as (file name, problem).
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
                keys = _read_chunk(path, self.widths)["keys"]
            except _DamagedChunk as e:
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
                arrays = _read_chunk(path, self.widths)
                keys = arrays["keys"]
                if any(row >= len(keys) or str(keys[row]) != key for key, row, _ in items):
                    raise _DamagedChunk("its keys differ from the ones indexed (rewritten meanwhile?)")
            except _DamagedChunk as e:
                self._set_aside(path, seen, f"{e}, when reading")
                lost.update(key for key, _, _ in items)
                continue
            hc, clip = arrays["hc"], arrays["clip"]
            for _, row, out_rows in items:
                hc_out[out_rows] = hc[row]
                clip_out[out_rows] = clip[row]
        return lost


class _ChunkWriter:
    """Computed rows waiting to be written to the cache, and when to write them.

    A chunk is written when ``chunk_size`` rows are pending, when ``flush_seconds`` (0 = never) have
    passed on ``clock`` since the last write -- on a slow machine 256 images can be many minutes of
    work, and a kill loses what is pending -- and at the end (``flush(final=True)``).
    ``on_chunk(info)`` is called after each write (info: path, rows, chunks_written, computed).
    """

    def __init__(self, cache: _Cache, spec: dict, chunk_size: int, flush_seconds: float,
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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
    spec = _spec(cfg)
    d = spec["embedding_dim"]
    if loaded is not None:
        same = ("model", "weights_id", "precision", "force_quick_gelu", "preprocess_version")
        if any(loaded[2].get(k) != spec[k] for k in same):
            raise ValueError(f"`loaded` was built for {[loaded[2].get(k) for k in same]}, "
                             f"cfg asks for {[spec[k] for k in same]}")
    cache = _Cache(_cache_dir(cfg, spec), widths={"hc": len(HANDCRAFTED), "clip": d})
    log.info("feature cache %s: %d images indexed%s", cache.dir, len(cache.index),
             f", {len(cache.damaged)} damaged chunks set aside" if cache.damaged else "")

    hc_out = np.full((n, len(HANDCRAFTED)), np.nan, dtype=np.float64)
    clip_out = np.full((n, d), np.nan, dtype=np.float32)
    has_image = np.zeros(n, dtype=np.int64)
    bad_rows: list[tuple[int, str]] = []
    n_hits = 0
    encoder: _Encoder | None = None
    info = dict(spec, cache_dir=str(cache.dir), device=_resolve_device(cfg))
    computed = 0
    t_first_done = None
    computed_after_first = 0
    read_s = 0.0  # time spent reading cached rows (not computing)

    graph_mode = _graph_mode(cfg, info["device"], sum(not _no_path(p) for p in paths))
    writer = _ChunkWriter(cache, spec, cfg.chunk_size, cfg.flush_seconds, on_chunk, clock)
    preprocess = _preprocess_from_spec(cfg)
    bar = tqdm(total=n, unit="img", desc="embed", disable=not cfg.progress, smoothing=0.1)
    t_loop = time.perf_counter()
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallelism is across images (workers), not inside OpenCV calls
    visit: Sequence[int] = range(n)  # rows to go through: all, then those whose cached chunk failed to read
    try:
        while visit:
            hits: dict[str, list[int]] = {}  # cached image key -> output rows
            for batch in _loader(_Images(list(paths), frozenset(cache.index), preprocess, visit), cfg,
                                 info["device"]):
                for i, reason in batch["bad"]:
                    bad_rows.append((i, reason))
                for i, key in batch["cached"]:
                    hits.setdefault(key, []).append(i)
                n_hits += len(batch["cached"])
                if batch["todo"]:
                    t_b = time.perf_counter()
                    if encoder is None:
                        model, _, model_info = loaded if loaded is not None else load_clip(cfg)
                        info.update(model_info)
                        encoder = _Encoder(model, info["device"], cfg.batch_size, graph_mode)
                    emb = encoder(batch["pixels"])
                    rows = [i for i, _ in batch["todo"]]
                    hc_out[rows], clip_out[rows], has_image[rows] = batch["hc"], emb, 1
                    computed += len(rows)
                    if t_first_done is None:
                        t_first_done = time.perf_counter()
                        log.info("first batch of %d took %.1fs (model load%s)", len(rows), t_first_done - t_b,
                                 f" + {encoder.mode} graph" if encoder.mode != "eager" else "")
                    else:
                        computed_after_first += len(rows)
                    writer.add([k for _, k in batch["todo"]], batch["hc"], emb)
                    bar.set_postfix(computed=computed, cached=n_hits)
                else:
                    writer.flush(final=False)  # rows computed before a run of cached batches wait no longer
                bar.update(batch["n"])
            writer.flush(final=True)
            t_read = time.perf_counter()
            lost = cache.read(hits, hc_out, clip_out) if hits else set()
            read_s += time.perf_counter() - t_read
            for key, rows in hits.items():
                if key not in lost:
                    has_image[rows] = 1
            visit = sorted(i for key in lost for i in hits[key])
            if visit:
                log.warning("%d cached images could not be read back; computing them again", len(visit))
                n_hits -= len(visit)
                bar.total += len(visit)
    finally:
        cv2.setNumThreads(cv2_threads)
        bar.close()
    t_end = time.perf_counter()

    if computed == 0 and n_hits:
        log.info("all %d images served from cache (%s)", n_hits, cache.dir)
    elif n_hits:
        log.info("%d images served from cache, %d computed", n_hits, computed)
    if bad_rows:
        log.warning("%d of %d posts have no usable image (kept with NaN features)", len(bad_rows), n)

    pid_col = pd.Series([str(p) for p in pids], name="Pid", dtype=object)
    features = pd.concat(
        [
            pid_col.to_frame(),
            pd.DataFrame({"has_image": has_image}),
            pd.DataFrame(hc_out, columns=list(HANDCRAFTED)),
            pd.DataFrame(clip_out, columns=[f"clip_{j}" for j in range(d)]),
        ],
        axis=1,
    )
    bad_rows.sort()
    bad = pd.DataFrame(
        {
            "Pid": pd.Series([str(pids[i]) for i, _ in bad_rows], dtype=object),
            "path": pd.Series([None if _no_path(paths[i]) else str(paths[i]) for i, _ in bad_rows], dtype=object),
            "reason": pd.Series([r for _, r in bad_rows], dtype=object),
        }
    )
    loop_s = t_end - t_loop - read_s
    steady_s = t_end - t_first_done if t_first_done is not None else 0.0
    stats = {
        "images": float(n),
        "bad_images": float(len(bad_rows)),
        "cache_hits": float(n_hits),
        "computed": float(computed),
        "damaged_chunks": float(len(cache.damaged)),
        "seconds": time.perf_counter() - t_start,
        "images_per_s": computed / loop_s if computed and loop_s > 0 else 0.0,
        "steady_images_per_s": computed_after_first / steady_s if computed_after_first and steady_s > 0 else 0.0,
        "embedding_dim": float(d),
    }
    info["compile"] = encoder.mode if encoder is not None else "not loaded (nothing to compute)"
    info["damaged_chunks"] = list(cache.damaged)
    return EmbedResult(features=features, bad=bad, stats=stats, info=info)


# --------------------------------------------------------------------------- the `embed` job
@dataclass(frozen=True)
class EmbedJob:
    """The `embed` entry point's parameters."""

    source: DataCfg = field(default_factory=DataCfg)
    embed: EmbedCfg = field(default_factory=EmbedCfg)
    experiment: str = ""  # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)


def embedding_key(cfg: EmbedCfg) -> str:
    """Hash of the settings that change the vectors (model, weights, preprocessing)."""
    from smp.tracking import params_hash

    spec = _spec(cfg)  # weights by content (a checkpoint's sha256), precision by device (fp32 / CUDA amp)
    return params_hash({k: spec[k] for k in ("model", "weights_id", "precision", "force_quick_gelu",
                                             "preprocess_version")})


def run_embed(cfg: EmbedJob = EmbedJob()) -> dict[str, float]:
    """Compute image features for every post of ``cfg.source`` and log them as ``features.parquet``."""
    import mlflow

    from smp.data import DataError, data_hash, load_data
    from smp.tracking import dataset_source, flat_params, job_run, log_params

    posts = load_data(cfg.source.data, images_root=cfg.source.images or None)
    if "image_path" not in posts.columns:
        raise DataError(f"{posts.attrs.get('source')}: has no images (no train_img_filepath.txt / image_path "
                        "column); image features cannot be computed. The tabular benchmark is the model for it.")
    digest = data_hash(posts)
    embed_cfg = cfg.embed
    tags = {"smp.data_hash": digest, "smp.reuse_key": embedding_key(cfg.embed), "smp.model": "embed"}
    with job_run("embed", cfg.experiment, flat_params(cfg), tags):
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
        log_params({"clip/effective_pretrained": embed_cfg.clip_pretrained, "clip/device_used": info.get("device"),
                    "clip/image_size": info.get("image_size"), "clip/embedding_dim": int(stats["embedding_dim"]),
                    "data/images": int(stats["images"]), "data/bad_images": int(stats["bad_images"]),
                    "cache/hits": int(stats["cache_hits"]), "cache/computed": int(stats["computed"]),
                    "cache/damaged_chunks": int(stats["damaged_chunks"])})
        mlflow.log_metrics({"time/embed_s": stats["seconds"], "time/images_per_s": stats["images_per_s"],
                            "time/steady_images_per_s": stats["steady_images_per_s"]})
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
    log.info("embed: %d images (%d bad, %d from cache)", metrics.get("images", 0), metrics.get("bad_images", 0),
             metrics.get("cache_hits", 0))
    return metrics


def features_for_rows(posts, cfg: EmbedCfg):
    """Image features for raw post rows that carry ``image_b64`` (base64 bytes) or ``image_path``.

    Returns the features table (one row per input row, in order; NaN and
    ``has_image=0`` where there is no usable image) with ``attrs["bad"]``
    listing ``Pid, reason`` for every row whose image was given but unusable.
    Vectors come from the content-addressed cache when the same image was
    embedded before with the same settings.
    """
    import base64
    import binascii

    pids = posts["Pid"].astype(str).tolist()
    b64 = posts["image_b64"].tolist() if "image_b64" in posts.columns else [None] * len(posts)
    paths_in = posts["image_path"].tolist() if "image_path" in posts.columns else [None] * len(posts)
    undecodable = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (data, path) in enumerate(zip(b64, paths_in)):
            if isinstance(data, str) and data:
                try:
                    raw = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError):
                    undecodable.append((pids[i], "image_b64 is not valid base64"))
                    paths.append(None)
                    continue
                file = Path(tmp) / f"{i}.img"
                file.write_bytes(raw)
                paths.append(str(file))
            elif isinstance(path, str) and path:
                paths.append(path)
            else:
                paths.append(None)
        cfg = replace(cfg, progress=False, num_workers=0)
        loaded = _shared_clip(_model_cfg(cfg)) if any(p is not None for p in paths) else None
        result = embed_images(pids, paths, cfg, loaded=loaded)
    features = result.features
    given = {p for p, d, q in zip(pids, b64, paths_in) if (isinstance(d, str) and d) or (isinstance(q, str) and q)}
    bad = [(p, r) for p, r in zip(result.bad["Pid"].astype(str), result.bad["reason"]) if p in given]
    features.attrs["bad"] = pd.DataFrame(undecodable + [b for b in bad if b[0] not in dict(undecodable)],
                                         columns=["Pid", "reason"])
    return features


def _model_cfg(cfg: EmbedCfg) -> EmbedCfg:
    """``cfg`` reduced to the fields that choose the model (the key of :func:`_shared_clip`)."""
    return EmbedCfg(clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained, checkpoint=cfg.checkpoint,
                    device=cfg.device, clip_cache_dir=cfg.clip_cache_dir, force_quick_gelu=cfg.force_quick_gelu)


@functools.lru_cache(maxsize=2)
def _shared_clip(cfg: EmbedCfg):
    """One loaded CLIP model per process and setting, for callers that embed a few rows per call
    (``smp predict``, the served model): loading RN50 costs seconds, a request should not pay it."""
    return load_clip(cfg)
