"""Stage 2: posts -> labelled rows -> seeded subsample -> train / val / test row positions (``prepare``).

``prepare`` refuses data a model cannot honestly be trained and scored on: invalid labels
(``data.labelled``), a split under ``MIN_SPLIT_ROWS`` rows, a constant training label.

Protocols:

* ``random`` (the paper's): shuffled, 81% / 9% / 10% (64.8k / 7.2k / 8k of 80k);
* ``chrono`` (the SMP challenge's): ordered by ``Postdate``, the last 10% of
  posts are test and the 9% before them validation; the jobs then use settings
  measured to hold on later posts (``chrono_tuned``, see ``train.CHRONO_XGB``);
* ``user``: grouped by ``Uid`` so that no user is on two sides.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from smp.config import ConfigError, at_least, check, fraction, one_of, zero_or_at_least
from smp.data import DataCfg, DataError, data_hash, labelled, load_data

log = logging.getLogger("smp.splits")

SPLITS = ("random", "chrono", "user")
# Fewest rows a split may hold: below this a metric (and early stopping on val) says nothing, and a
# near-perfect score on a handful of test posts would look like the best model to the registry.
MIN_SPLIT_ROWS = 10


@dataclass(frozen=True)
class SplitCfg:
    sample_size: int = 80000  # the paper's subsample; 0 = all posts
    split: str = "random"     # random | chrono | user
    seed: int = 0             # seeds the subsample and the split
    val_frac: float = 0.09    # 7.2k of 80k
    test_frac: float = 0.10   # 8k of 80k
    chrono_tuned: bool = True  # split=chrono: booster/feature settings that hold on later posts (train.CHRONO_*)

    def __post_init__(self) -> None:
        check(self, sample_size=zero_or_at_least(1, "all posts"), split=one_of(*SPLITS), seed=at_least(0),
              val_frac=fraction(), test_frac=fraction())
        if self.val_frac + self.test_frac >= 1:
            raise ConfigError(f"val_frac={self.val_frac} + test_frac={self.test_frac}: expected a sum below 1 "
                              "(the rest of the posts train the model)")


def subsample(posts: pd.DataFrame, sample_size: int, seed: int) -> pd.DataFrame:
    """Return a seeded random subsample of ``sample_size`` rows (all rows if 0 or larger), order kept."""
    if sample_size <= 0 or sample_size >= len(posts):
        return posts
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(posts), size=sample_size, replace=False))
    out = posts.iloc[keep].reset_index(drop=True)
    out.attrs.update(posts.attrs)
    return out


def split_indices(posts: pd.DataFrame, cfg: SplitCfg) -> dict[str, np.ndarray]:
    """Return ``{"train", "val", "test"}`` -> sorted row positions into ``posts``."""
    n = len(posts)
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r}: unknown protocol; expected one of {SPLITS}")
    if n < 3:
        raise DataError(f"{n} labelled posts: too few to split into train/val/test")
    n_test = max(1, int(round(cfg.test_frac * n)))
    n_val = max(1, int(round(cfg.val_frac * n)))
    rng = np.random.default_rng(cfg.seed)
    if cfg.split == "random":
        order = rng.permutation(n)
        parts = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
        test, val, train = parts
    elif cfg.split == "chrono":
        if "Postdate" not in posts.columns or posts["Postdate"].isna().all():
            raise DataError("split=chrono needs the Postdate field, which this data lacks")
        dates = posts["Postdate"].to_numpy(dtype=float)
        if np.isnan(dates).any():
            raise DataError(f"split=chrono: {int(np.isnan(dates).sum())} posts have no Postdate")
        order = np.argsort(dates, kind="stable")
        test, val, train = order[n - n_test:], order[n - n_test - n_val:n - n_test], order[:n - n_test - n_val]
    else:
        train, val, test = _user_split(posts, n_val, n_test, rng)
    if len(train) == 0:
        raise DataError(f"split={cfg.split}: no rows left for training ({n} posts)")
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _user_split(posts, n_val, n_test, rng):
    if "Uid" not in posts.columns:
        raise DataError("split=user needs the Uid field, which this data lacks (e.g. the real posts.csv)")
    uid = posts["Uid"]
    if uid.isna().any():
        raise DataError(f"split=user: {int(uid.isna().sum())} posts have no Uid")
    codes, uniques = pd.factorize(uid)
    if len(uniques) < 3:
        raise DataError(f"split=user: only {len(uniques)} distinct users; need at least 3")
    counts = np.bincount(codes)
    users = rng.permutation(len(uniques))
    cum = np.cumsum(counts[users])
    # users are taken in shuffled order: first the test users, then validation
    n_test_users = max(1, int(np.searchsorted(cum, n_test)) + 1)
    n_val_users = max(1, int(np.searchsorted(cum, n_test + n_val)) + 1 - n_test_users)
    n_test_users = min(n_test_users, len(uniques) - 2)
    n_val_users = min(n_val_users, len(uniques) - 1 - n_test_users)
    group = np.full(len(uniques), 0)  # 0 train, 1 val, 2 test
    group[users[:n_test_users]] = 2
    group[users[n_test_users:n_test_users + n_val_users]] = 1
    side = group[codes]
    return np.flatnonzero(side == 0), np.flatnonzero(side == 1), np.flatnonzero(side == 2)


def check_trainable(posts: pd.DataFrame, parts: dict[str, np.ndarray], cfg: SplitCfg) -> None:
    """Refuse a split a model cannot meaningfully be trained and scored on (``DataError`` naming the data):
    a part with fewer than ``MIN_SPLIT_ROWS`` rows, or training labels that are all the same value."""
    source = posts.attrs.get("source", "data")
    small = {part: len(idx) for part, idx in parts.items() if len(idx) < MIN_SPLIT_ROWS}
    if small:
        sizes = ", ".join(f"{part} {n}" for part, n in small.items())
        raise DataError(f"{source}: split={cfg.split} of {len(posts)} labelled posts leaves too few rows ({sizes}); "
                        f"every split needs at least {MIN_SPLIT_ROWS} (use more posts, sample_size=0, or larger "
                        "val_frac/test_frac)")
    y = posts["label"].to_numpy(dtype=float)[parts["train"]]
    if np.ptp(y) == 0:
        raise DataError(f"{source}: every training label is {y[0]:g} (a constant label): there is nothing to learn")


@dataclass
class Prepared:
    """Labelled, subsampled posts and their split, ready for any model."""

    posts: pd.DataFrame
    parts: dict[str, np.ndarray]
    digest: str
    n_missing_label: int
    datasets: dict = field(default_factory=dict)  # split -> the MLflow dataset logged for it (train.log_prepared)

    def rows(self, part: str) -> pd.DataFrame:
        return self.posts.iloc[self.parts[part]].reset_index(drop=True)

    def y(self, part: str) -> np.ndarray:
        return self.posts["label"].to_numpy(dtype=float)[self.parts[part]]


def prepare(source: DataCfg, splitting: SplitCfg) -> Prepared:
    """Load, drop unlabelled rows (refusing invalid labels), subsample, split and check the split is trainable."""
    t0 = time.perf_counter()
    posts = load_data(source.data, images_root=source.images or None)
    digest = data_hash(posts)
    posts, n_missing = labelled(posts)
    posts = subsample(posts, splitting.sample_size, splitting.seed)
    parts = split_indices(posts, splitting)
    check_trainable(posts, parts, splitting)
    log.info("data %s: %d labelled posts (%d without label excluded), split %s -> %s in %.1fs",
             posts.attrs.get("source"), len(posts), n_missing, splitting.split,
             {k: len(v) for k, v in parts.items()}, time.perf_counter() - t0)
    return Prepared(posts, parts, digest, n_missing)
