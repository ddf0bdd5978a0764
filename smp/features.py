"""Stage 3: posts -> tabular feature matrix.

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

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.preprocessing import OneHotEncoder

from smp.config import at_least, check

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


SMALL_BATCH = 512  # rows up to which TabularFeaturizer.transform uses its lookup tables


def _onehot_tables(transformer: ColumnTransformer, categorical: list[str]) -> list:
    """Read the fitted one-hot encoder's mapping off the encoder itself: for each field, transform every
    training level (and one unseen level) with the others held fixed and note which column lights up.
    None when the layout is not the expected one (the caller then uses the transformer)."""
    if not categorical:
        return []
    enc = transformer.named_transformers_["onehot"]
    infrequent = getattr(enc, "infrequent_categories_", None) or [None] * len(categorical)
    widths = [len(c) - (len(i) if i is not None else 0) + (i is not None) for c, i in zip(enc.categories_, infrequent)]
    if sum(widths) != len(enc.get_feature_names_out()):
        return None
    base = {c: enc.categories_[k][0] for k, c in enumerate(categorical)}
    tables, offset = [], 0
    for k, col in enumerate(categorical):
        levels = [str(v) for v in enc.categories_[k]] + ["\0smp-unseen-level"]
        probe = pd.DataFrame({c: [levels[i] if c == col else base[c] for i in range(len(levels))] for c in categorical})
        with warnings.catch_warnings():  # the unseen level is the point of the probe
            warnings.simplefilter("ignore")
            block = np.asarray(enc.transform(probe))[:, offset:offset + widths[k]]
        cols = np.where(block.any(axis=1), block.argmax(axis=1) + offset, -1)
        tables.append(({lvl: int(c) for lvl, c in zip(levels[:-1], cols[:-1])}, int(cols[-1])))
        offset += widths[k]
    return tables


@dataclass(frozen=True)
class TabularCfg:
    min_frequency: int = 10   # one-hot levels seen fewer times in train are grouped as "infrequent"
    max_categories: int = 200  # at most this many one-hot columns per field (rest grouped)
    absolute_date: bool = True  # Postdate itself as a feature (trees cannot extrapolate it past train's dates)
    time_trend: bool = False    # the benchmark fits a linear label trend over Postdate on train, boosts the rest
    month: bool = True          # the calendar month as a feature (over a year of posts it stands for the date)

    def __post_init__(self) -> None:
        check(self, min_frequency=at_least(1), max_categories=at_least(1))


_DATETIME_SECONDS = 9.2e9  # |Unix seconds| beyond this is outside pandas' datetime range (NaT there)


def date_parts(seconds: np.ndarray) -> dict[str, np.ndarray]:
    """UTC weekday (Monday 0), month (1-12) and hour of Unix seconds; NaN where missing or out of range.

    Plain integer arithmetic (1970-01-01 was a Thursday), the same values as pandas' ``dt`` accessors
    without their per-call cost (a single served post pays for every column).
    """
    seconds = np.asarray(seconds, dtype=float)
    ok = np.isfinite(seconds) & (np.abs(seconds) < _DATETIME_SECONDS)
    secs = np.where(ok, seconds, 0.0)
    days = np.floor(secs / 86400.0).astype(np.int64)
    months = days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12 + 1
    parts = {"weekday": (days + 3) % 7, "month": months, "hour": np.floor((secs - days * 86400.0) / 3600.0)}
    return {k: np.where(ok, v.astype(float), np.nan) for k, v in parts.items()}


def derive_columns(posts: pd.DataFrame) -> pd.DataFrame:
    """Return the model-facing columns derived from raw SMPD fields (NaN / MISSING where absent)."""
    n = len(posts)
    out = {}

    def num(col):
        if col not in posts.columns:
            return np.full(n, np.nan)
        s = posts[col]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            return s.to_numpy(dtype=float, na_value=np.nan)
        return pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)

    def cat(col):
        if col not in posts.columns:
            return np.full(n, MISSING, dtype=object)
        values = posts[col].to_numpy(dtype=object)
        text = values.astype(str)  # str() of each value, as pandas' astype(str)
        return np.where(pd.isna(values) | (text == ""), MISSING, text).astype(object)

    date = num("Postdate")
    out.update(date_parts(date))
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
    for col in NUMERIC:
        out[col] = np.asarray(out[col], dtype=float)
    return pd.DataFrame(out, index=posts.index)


class TabularFeaturizer:
    """Fitted tabular transform: one-hot categoricals + numeric passthrough (NaN kept for XGBoost)."""

    def __init__(self, cfg: TabularCfg = TabularCfg()):
        self.cfg = cfg

    def fit(self, posts: pd.DataFrame) -> "TabularFeaturizer":
        derived = derive_columns(posts)
        self.categorical_ = [c for c in CATEGORICAL if (derived[c] != MISSING).any()
                             and (c != "month" or getattr(self.cfg, "month", True))]
        self.numeric_ = [c for c in NUMERIC if derived[c].notna().any()
                         and (c != "Postdate" or self.cfg.absolute_date)]
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
        """Return the float32 feature matrix for raw posts (columns as ``feature_names_``).

        Up to ``SMALL_BATCH`` rows (a served request) go through lookup tables read off the fitted
        encoder (same output, without scikit-learn's per-call dispatch); larger inputs through the
        fitted ``ColumnTransformer`` itself.
        """
        derived = derive_columns(posts)
        if len(derived) <= SMALL_BATCH:
            tables = self._lookup_tables()
            if tables is not None:
                return self._transform_small(derived, tables)
        return np.asarray(self.transformer_.transform(derived[self.categorical_ + self.numeric_]), dtype=np.float32)

    def _lookup_tables(self):
        """Per categorical field: ({level: one-hot column}, column for unseen levels or -1); built once."""
        if "_tables" not in self.__dict__:  # (models pickled before this existed build it on first use)
            self.__dict__["_tables"] = _onehot_tables(self.transformer_, self.categorical_)
        return self.__dict__["_tables"]

    def _transform_small(self, derived: pd.DataFrame, tables: list) -> np.ndarray:
        n = len(derived)
        X = np.zeros((n, len(self.feature_names_)), dtype=np.float32)
        rows = np.arange(n)
        for col, (table, unseen) in zip(self.categorical_, tables):
            idx = np.fromiter((table.get(v, unseen) for v in derived[col].to_numpy()), dtype=np.int64, count=n)
            hit = idx >= 0
            X[rows[hit], idx[hit]] = 1.0
        if self.numeric_:
            X[:, len(self.feature_names_) - len(self.numeric_):] = derived[self.numeric_].to_numpy(dtype=np.float32)
        return X

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
