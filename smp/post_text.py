"""Stage 3: the bounds every text encoder reads a post's title and tags within, and the check that a feature
group's fields are there (shared by ``smp.groups``, its encoders in ``smp.text_clip`` and request-time notes in
``smp.serving``, so the rule is written once)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from smp.data import DataError

MAX_TITLE_CHARS = 2_000   # characters of a title encoded (the rest is cut, counted)
MAX_TAGS = 200            # tags of a post encoded
MAX_TAG_CHARS = 4_000     # characters of Alltags read before splitting it into tags


def bounded_text(value, limit: int) -> tuple[str, bool]:
    """A text cell as bounded text: ``""`` where missing, NUL bytes dropped, at most ``limit`` characters;
    (text, whether it was cut)."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "", False
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    return text[:limit].replace("\x00", " "), cut


def cut_by_bounds(posts: pd.DataFrame) -> np.ndarray:
    """True for each post whose title or tags the bounds cut (over ``MAX_TITLE_CHARS`` of title, over
    ``MAX_TAG_CHARS`` of tags, or over ``MAX_TAGS`` tags)."""
    n = len(posts)
    titles = posts["Title"].to_numpy(dtype=object) if "Title" in posts.columns else np.full(n, None)
    tags = posts["Alltags"].to_numpy(dtype=object) if "Alltags" in posts.columns else np.full(n, None)
    out = np.zeros(n, dtype=bool)
    for i, (t, a) in enumerate(zip(titles, tags)):
        alltags, tags_cut = bounded_text(a, MAX_TAG_CHARS)
        out[i] = bounded_text(t, MAX_TITLE_CHARS)[1] or tags_cut or len(alltags.split()) > MAX_TAGS
    return out


def present(posts: pd.DataFrame, col: str) -> bool:
    """Whether ``col`` holds a value on at least one post (not absent, not all NaN / empty text)."""
    if col not in posts.columns:
        return False
    values = posts[col]
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        return bool((values.notna() & (values.astype(str).str.strip() != "")).any())
    return bool(values.notna().any())


def refuse_missing(group: str, posts: pd.DataFrame, required: tuple[str, ...], any_of: bool = False) -> None:
    found = [c for c in required if present(posts, c)]
    if (any_of and found) or (not any_of and len(found) == len(required)):
        return
    missing = [c for c in required if c not in found]
    source = posts.attrs.get("source", "the data")
    need = (" or ".join(required)) if any_of else ", ".join(missing)
    raise DataError(f"features: group {group!r} reads {need}, which {source} lacks (missing or empty: "
                    f"{', '.join(missing)}); leave {group!r} out of features")
