"""Stage 3a: posts -> tabular feature matrix.

The paper's features: ``photo_count`` as is; ``ispro``, ``Category``,
``Subcategory``, ``Concept``, weekday and month of ``Postdate`` one-hot.
Beyond the paper, whatever the data holds: tag count (``tag_count`` or the
words of ``Alltags``), title length, has-geo, hour, ``Postdate`` itself, the
user's account age and time-zone offset.

``derive_columns`` is a pure function; ``TabularFeaturizer`` is the fitted
transform (one-hot levels learnt on train only, rare levels grouped, unseen
levels tolerated) that every model saves with itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.preprocessing import OneHotEncoder

MISSING = "__missing__"
CATEGORICAL = ("Category", "Subcategory", "Concept", "ispro", "weekday", "month")
NUMERIC = (
    "photo_count", "tag_count", "title_len", "has_geo", "hour", "Postdate",
    "account_age_days", "timezone_offset",
)
# Raw SMPD fields that the derived columns read (the model's raw input schema).
RAW_FIELDS = (
    "Pid", "Category", "Subcategory", "Concept", "ispro", "Postdate", "photo_count",
    "tag_count", "Alltags", "Title", "Latitude", "Longitude", "photo_firstdate", "timezone_offset",
)


@dataclass(frozen=True)
class TabularCfg:
    min_frequency: int = 10   # one-hot levels seen fewer times in train are grouped as "infrequent"
    max_categories: int = 200  # at most this many one-hot columns per field (rest grouped)


def derive_columns(posts: pd.DataFrame) -> pd.DataFrame:
    """Return the model-facing columns derived from raw SMPD fields (NaN / MISSING where absent)."""
    n = len(posts)
    out = {}

    def num(col):
        if col in posts.columns:
            return pd.to_numeric(posts[col], errors="coerce").to_numpy(dtype=float)
        return np.full(n, np.nan)

    def cat(col):
        if col not in posts.columns:
            return np.full(n, MISSING, dtype=object)
        s = posts[col]
        return s.astype(object).where(s.notna() & (s.astype(str) != ""), MISSING).astype(str).to_numpy()

    date = num("Postdate")
    ts = pd.to_datetime(pd.Series(date), unit="s", errors="coerce")
    for name, values in (("weekday", ts.dt.weekday), ("month", ts.dt.month), ("hour", ts.dt.hour)):
        arr = values.to_numpy(dtype=float)
        out[name] = arr
    out["Category"] = cat("Category")
    out["Subcategory"] = cat("Subcategory")
    out["Concept"] = cat("Concept")
    ispro = num("ispro")
    out["ispro"] = np.where(np.isnan(ispro), MISSING, np.nan_to_num(ispro).astype(int).astype(str))
    for name in ("weekday", "month"):
        v = out[name]
        out[name] = np.where(np.isnan(v), MISSING, np.nan_to_num(v).astype(int).astype(str))
    out["photo_count"] = num("photo_count")
    if "tag_count" in posts.columns:
        out["tag_count"] = num("tag_count")
    elif "Alltags" in posts.columns:
        tags = posts["Alltags"]
        out["tag_count"] = np.where(tags.isna(), np.nan, tags.fillna("").astype(str).str.split().str.len())
    else:
        out["tag_count"] = np.full(n, np.nan)
    if "Title" in posts.columns:
        title = posts["Title"]
        out["title_len"] = np.where(title.isna(), np.nan, title.fillna("").astype(str).str.len())
    else:
        out["title_len"] = np.full(n, np.nan)
    lat, lon = num("Latitude"), num("Longitude")
    geo = ((np.nan_to_num(lat) != 0) | (np.nan_to_num(lon) != 0)).astype(float)
    out["has_geo"] = np.where(np.isnan(lat) & np.isnan(lon), np.nan, geo)
    out["Postdate"] = date
    out["account_age_days"] = (date - num("photo_firstdate")) / 86400.0
    out["timezone_offset"] = num("timezone_offset")
    frame = pd.DataFrame(out, index=posts.index)
    for col in NUMERIC:
        frame[col] = frame[col].astype(float)
    return frame


class TabularFeaturizer:
    """Fitted tabular transform: one-hot categoricals + numeric passthrough (NaN kept for XGBoost)."""

    def __init__(self, cfg: TabularCfg = TabularCfg()):
        self.cfg = cfg

    def fit(self, posts: pd.DataFrame) -> "TabularFeaturizer":
        derived = derive_columns(posts)
        self.categorical_ = [c for c in CATEGORICAL if (derived[c] != MISSING).any()]
        self.numeric_ = [c for c in NUMERIC if derived[c].notna().any()]
        if not self.categorical_ and not self.numeric_:
            raise ValueError("no usable tabular field in the data (need e.g. Category, Postdate, photo_count)")
        encoder = OneHotEncoder(
            handle_unknown="infrequent_if_exist", min_frequency=self.cfg.min_frequency,
            max_categories=self.cfg.max_categories, sparse_output=False, dtype=np.float32,
        )
        self.transformer_ = ColumnTransformer(
            [("onehot", encoder, self.categorical_), ("numeric", "passthrough", self.numeric_)],
            verbose_feature_names_out=False,
        )
        self.transformer_.fit(derived[self.categorical_ + self.numeric_])
        self.feature_names_ = [str(n) for n in self.transformer_.get_feature_names_out()]
        return self

    def transform(self, posts: pd.DataFrame) -> np.ndarray:
        """Return the float32 feature matrix for raw posts (columns as ``feature_names_``)."""
        derived = derive_columns(posts)
        return np.asarray(self.transformer_.transform(derived[self.categorical_ + self.numeric_]), dtype=np.float32)

    @property
    def raw_fields_(self) -> list[str]:
        """Raw SMPD fields this fitted transform reads."""
        needed = {"Pid"}
        sources = {
            "weekday": ["Postdate"], "month": ["Postdate"], "hour": ["Postdate"],
            "tag_count": ["tag_count", "Alltags"], "title_len": ["Title"],
            "has_geo": ["Latitude", "Longitude"], "account_age_days": ["Postdate", "photo_firstdate"],
        }
        for col in self.categorical_ + self.numeric_:
            needed.update(sources.get(col, [col]))
        return [f for f in RAW_FIELDS if f in needed]
