"""Image features at request time (``smp predict``, the served model): a few rows per call.

Used by ``smp.serving.with_image_features`` and by ``smp.models.ImageFeatureSource`` (imported when
images arrive: it loads torch and open_clip). The model is loaded once per process and setting and
kept: loading RN50 costs seconds, a request should not pay it. The vectors are the training pipeline's
(``smp.embed.embed_images``, through the same content-addressed cache).
"""

from __future__ import annotations

import base64
import binascii
import functools
import tempfile
from dataclasses import replace
from pathlib import Path

import pandas as pd

from smp.clip import ClipCfg, load_clip
from smp.embed import EmbedCfg, embed_images


def features_for_rows(posts: pd.DataFrame, cfg: EmbedCfg) -> pd.DataFrame:
    """Image features for raw post rows that carry ``image_b64`` (base64 bytes) or ``image_path``.

    Returns the features table (one row per input row, in order; NaN and
    ``has_image=0`` where there is no usable image) with ``attrs["bad"]``
    listing ``Pid, reason`` for every row whose image was given but unusable.
    Vectors come from the content-addressed cache when the same image was
    embedded before with the same settings.
    """
    pids = posts["Pid"].astype(str).tolist()
    b64 = posts["image_b64"].tolist() if "image_b64" in posts.columns else [None] * len(posts)
    paths_in = posts["image_path"].tolist() if "image_path" in posts.columns else [None] * len(posts)
    with tempfile.TemporaryDirectory() as tmp:
        paths, undecodable = _image_files(pids, b64, paths_in, Path(tmp))
        cfg = replace(cfg, progress=False, num_workers=0)
        loaded = shared_clip(ClipCfg.of(cfg)) if any(p is not None for p in paths) else None
        result = embed_images(pids, paths, cfg, loaded=loaded)
    features = result.features
    given = {p for p, d, q in zip(pids, b64, paths_in) if (isinstance(d, str) and d) or (isinstance(q, str) and q)}
    bad = [(p, r) for p, r in zip(result.bad["Pid"].astype(str), result.bad["reason"]) if p in given]
    features.attrs["bad"] = pd.DataFrame(undecodable + [b for b in bad if b[0] not in dict(undecodable)],
                                         columns=["Pid", "reason"])
    return features


def _image_files(pids: list[str], b64: list, paths_in: list, tmp: Path) -> tuple[list[str | None], list]:
    """One image file per row (``image_b64`` written under ``tmp``; it wins over ``image_path``; None where
    neither is given) and ``(Pid, reason)`` for each ``image_b64`` that is not base64."""
    paths: list[str | None] = []
    undecodable = []
    for i, (data, path) in enumerate(zip(b64, paths_in)):
        if isinstance(data, str) and data:
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                undecodable.append((pids[i], "image_b64 is not valid base64"))
                paths.append(None)
                continue
            file = tmp / f"{i}.img"
            file.write_bytes(raw)
            paths.append(str(file))
        elif isinstance(path, str) and path:
            paths.append(path)
        else:
            paths.append(None)
    return paths, undecodable


@functools.lru_cache(maxsize=2)
def shared_clip(cfg: ClipCfg):
    """``load_clip(cfg)``, once per process and setting (the process's one copy of that model)."""
    return load_clip(cfg)
