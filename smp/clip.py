"""The CLIP image encoder (open_clip): which model and weights, loading them, encoding pixel batches.

``model_spec(cfg)`` says what determines a vector without building the model (the part of the
feature cache's key that comes from CLIP); ``load_clip(cfg)`` builds the model and its eval
transform; ``Encoder`` runs ``encode_image`` on batches, through a frozen TorchScript graph or
``torch.compile`` when asked (``graph_mode``). ``cfg`` is anything with the :class:`ClipCfg` fields,
in practice an ``smp.embed.EmbedCfg``.

Besides open_clip's own architectures, smp registers ``smp-tiny`` (:data:`TINY_CLIP`): a CLIP of the
RN50 family small enough for the quick tests (64 px input, 32-d embeddings, random weights only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

log = logging.getLogger("smp.clip")

RANDOM_SEED = 0  # seed of the random-weights model (clip_pretrained="none")
_NO_WEIGHTS = ("", "none")
_TORCHSCRIPT_KEYS_TO_DROP = ("input_resolution", "context_length", "vocab_size")  # as open_clip does
FREEZE_MIN_IMAGES = 128  # compile="auto" on CPU traces+freezes the encoder from this many images

TINY_CLIP = "smp-tiny"
# RN50's layout (ModifiedResNet + text transformer) at toy widths: builds and encodes in milliseconds, so
# tests run the code path of the paper's model without its cost; no weights exist for it
_SMP_MODELS = {
    TINY_CLIP: {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
}


@dataclass(frozen=True)
class ClipCfg:
    """The settings that choose the CLIP model and its weights: the model part of ``smp.embed.EmbedCfg``
    (which holds the defaults, the paper's), and the key of a process's loaded model."""

    clip_model: str  # open_clip architecture name, or smp-tiny
    clip_pretrained: str  # open_clip tag; "none" or "" = random weights
    checkpoint: str  # local checkpoint file, "" = none; overrides clip_pretrained
    device: str  # "auto" -> cuda if available else cpu
    clip_cache_dir: str  # where open_clip downloads weights ("" = open_clip default)
    force_quick_gelu: bool  # for OpenAI's original checkpoints (RN50 needs QuickGELU)

    @classmethod
    def of(cls, cfg) -> ClipCfg:
        """The :class:`ClipCfg` fields of ``cfg`` (an ``EmbedCfg``, or a ``ClipCfg``)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


def resolve_device(cfg) -> str:
    """The torch device ``cfg.device`` names ("auto": cuda if available, else cpu)."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def random_weights(cfg) -> bool:
    """True when ``cfg`` asks for no weights (no checkpoint, clip_pretrained "none" or "")."""
    return not cfg.checkpoint and cfg.clip_pretrained.strip().lower() in _NO_WEIGHTS


def model_config(name: str) -> dict:
    """open_clip's architecture config for ``name``; smp's own models are registered on first use."""
    if name in _SMP_MODELS and open_clip.get_model_config(name) is None:
        _register(name, _SMP_MODELS[name])
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    return model_cfg


def _register(name: str, model_cfg: dict) -> None:
    # open_clip reads configs from files only; it keeps what it read when the file is gone
    with tempfile.TemporaryDirectory(prefix="smp-clip-") as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_spec(cfg) -> dict:
    """What determines the model's vectors, without building it: model, pretrained, checkpoint,
    checkpoint_sha256, random_weights, force_quick_gelu, precision, embedding_dim, image_size, weights_id."""
    model_cfg = model_config(cfg.clip_model)
    device = resolve_device(cfg)
    spec = {
        "model": cfg.clip_model,
        "pretrained": "",
        "checkpoint": "",
        "checkpoint_sha256": "",
        "random_weights": random_weights(cfg),
        "force_quick_gelu": cfg.force_quick_gelu,
        "precision": "amp_fp16" if device.startswith("cuda") else "fp32",
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
            f"random-seed{RANDOM_SEED}-torch{torch.__version__}-openclip{open_clip.__version__}"
        )
    else:
        spec["pretrained"] = cfg.clip_pretrained
        spec["weights_id"] = cfg.clip_pretrained
    return spec


def preprocess_for(cfg):
    """The eval transform open_clip would return (PIL image -> normalised tensor), built without the model.

    Mirrors ``open_clip.factory.create_model`` (defaults <- pretrained-tag cfg, size from
    the vision cfg); :func:`load_clip` checks it equals the model's own transform.
    """
    pp = asdict(PreprocessCfg())
    if not cfg.checkpoint and not random_weights(cfg):
        tag_cfg = open_clip.get_pretrained_cfg(cfg.clip_model, cfg.clip_pretrained)
        pp = merge_preprocess_dict(pp, tag_cfg or {})
    pp["size"] = model_config(cfg.clip_model)["vision_cfg"]["image_size"]
    return image_transform_v2(PreprocessCfg(**pp), is_train=False)


def _is_torchscript_archive(path: str) -> bool:
    """True for TorchScript zip archives such as OpenAI's original CLIP ``.pt`` files."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def _offline_message(cfg, err: Exception) -> str:
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


def _load_torchscript_state(model, cfg) -> None:
    """Load an OpenAI-style TorchScript archive's ``state_dict`` into ``model``; raise if the keys differ."""
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


def _create(cfg, random: bool):
    """``open_clip.create_model_and_transforms`` for ``cfg``'s weights, on the CPU: ``(model, preprocess)``."""
    kw = dict(force_quick_gelu=cfg.force_quick_gelu, device="cpu")
    if cfg.clip_cache_dir:
        kw["cache_dir"] = cfg.clip_cache_dir
    if random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
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
        _load_torchscript_state(model, cfg)
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
    return model, preprocess


def load_clip(cfg):
    """Build the CLIP model; return ``(model, preprocess, info)``.

    ``model`` is in eval mode, channels_last, on the resolved device; ``preprocess``
    is open_clip's eval transform (PIL image -> normalised tensor). ``info`` is
    :func:`model_spec` (model, pretrained, checkpoint, checkpoint_sha256, embedding_dim,
    image_size, precision, random_weights and the cache-relevant weights_id) plus
    device and the torch / open_clip versions.

    Weights: ``checkpoint`` (a local file) wins; else ``clip_pretrained`` is an
    open_clip tag downloaded into ``clip_cache_dir``; "none"/"" gives random
    weights drawn with seed 0 (deterministic, global RNG state untouched).
    OpenAI's original ``.pt`` files are TorchScript archives that open_clip's
    ``torch.load(weights_only=True)`` refuses; their ``state_dict`` is then read
    with ``torch.jit.load`` (dropping input_resolution/context_length/vocab_size as
    ``open_clip.factory.load_state_dict`` does) and must match the model's keys.
    """
    spec = model_spec(cfg)
    model, preprocess = _create(cfg, spec["random_weights"])
    if repr(preprocess) != repr(preprocess_for(cfg)):  # workers use the spec's transform
        raise RuntimeError(
            f"open_clip's preprocess differs from the one derived from its config:\n"
            f"{preprocess}\nvs\n{preprocess_for(cfg)}"
        )
    device = resolve_device(cfg)
    model = model.eval().to(device=device, memory_format=torch.channels_last)
    info = {
        **spec,
        "image_size": getattr(model.visual, "image_size", spec["image_size"]),
        "device": device,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    return model, preprocess, info


# ----------------------------------------------------------------------------- encoding


def graph_mode(compile: str, device: str, n_images: int) -> str:
    """The :class:`Encoder` mode for ``compile`` (auto, none, freeze, inductor) on a run of ``n_images``."""
    modes = {"none": "eager", "eager": "eager", "freeze": "freeze", "inductor": "inductor"}
    if compile == "auto":
        # CPU: freezing's few seconds of tracing pay off from about 100 images (docs/benchmarks_embed.md,
        # "What was tried toward the compute bound");
        # CUDA stays eager (not measured)
        if device.startswith("cuda") or n_images < FREEZE_MIN_IMAGES:
            return "eager"
        return "freeze"
    if compile not in modes:
        raise ValueError(f"compile must be auto, none, freeze or inductor, not {compile!r}")
    return modes[compile]


class Encoder:
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
