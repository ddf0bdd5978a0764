"""Stage 3: feature groups, the switchable inputs of a model (``features=tabular,user,text,time``).

Each group is a named, documented, pure transform of raw posts, fitted on the training posts only, that
declares the raw fields it reads (``fields``) and those the data must hold for it to mean anything
(``required``). A group whose required fields the data lacks (absent, or empty on every training post) is
refused with a ``DataError`` naming the group and the fields: never zero-filled silently (the real posts in
``../shared`` have no ``Uid``, ``Title`` or ``Alltags``, so ``user`` and ``text`` are refused there).

Groups (``GROUPS``):

* ``tabular``: the paper's features and today's extras (``smp.features.TabularFeaturizer``); the default, and
  on its own the exact matrix the benchmark has always used.
* ``time``: ``time_hour``, ``time_weekday``, ``time_month`` (numbers, UTC) and the date trend ``time_days``
  (days since the first training post) from ``Postdate``; the month and the trend follow the tabular
  settings ``month`` / ``absolute_date`` (off under ``split=chrono``'s tuned settings: a tree cannot
  extrapolate a date, and the month stands for the date over one year of posts).
* ``user``: what the user's *other* posts say (``UserHistory``): ``user_posts`` (how many), ``user_mean``,
  ``user_median``, ``user_std`` of their labels, ``user_tag_share`` (share of them with tags),
  ``user_days_since_first`` (this post's date minus the user's first post's) and ``user_unseen`` (1: no
  history, the prior was used). Leak-free by construction:

  - training rows under ``split=random``: out-of-fold, K folds (``USER_FOLDS``) shuffled by the split seed:
    a post's features come from its user's training posts in the *other* folds, so neither its own label nor
    its fold-mates' enter them;
  - training rows under ``split=user``: the prior, as every validation and test post gets (the protocol
    holds whole users out, so no scored post has a history; out-of-fold histories on the training rows
    taught the booster a signal the test posts never carry: test RMSE 2.57 against 2.47 without ``user`` on
    2,000 synthetic posts). The user group then carries nothing under this protocol, by design;
  - training rows under ``split=chrono``: only the user's strictly earlier training posts (``Postdate``
    strictly before the post's own; posts of the same second do not see each other);
  - validation, test and new posts: the user's training posts (the per-user table the model carries); under
    ``split=chrono`` only those strictly before the post's own date, so a fold model's held-out training
    post (the stacked nets' out-of-fold input) sees no later post of its user, as the test posts cannot;
  - no history (a user absent from training -- every test user under ``split=user`` --, a training post
    whose user has no post in the other folds or before it, a missing / empty / NaN ``Uid``): the prior,
    i.e. the training posts' global statistics, with ``user_unseen = 1``; missing ``Uid`` values are counted
    (``facts_``). The prior is one constant for every post it fills, training or not: it tells no post from
    another, so it carries no label (a prior per fold would: each mirrors the mean of its fold's labels).

  The fitted group keeps the per-user table (``Uid`` -> count, mean, median, std, tag share, first date),
  so a logged model scores a new post with a known ``Uid`` from that user's training posts; its size is a
  fact (``features/user_table_users``, a run param).
* ``text``: the title and the tags (``HashedText``): hashed word uni- and bigrams of the title and the tags
  (tags as tokens of their own), reduced by a truncated SVD fitted on the training posts
  (``text_0`` .. ``text_{k-1}``); no weights needed. Inputs are bounded before encoding (``MAX_TITLE_CHARS``,
  ``MAX_TAGS``, ``MAX_TAG_CHARS``: ``smp.post_text``; NUL bytes dropped), counted in ``facts_`` at fit.
  ``text_encoder=clip``: the text tower of the images' CLIP model instead (``smp.text_clip.ClipText``: the
  same bounds, then CLIP's 77-token context; embeddings cached by text; PCA to ``text_dim``); which encoder
  and weights were used is a run param (``text_encoder``, ``features/text_encoder``).

* ``image``: the CLIP + handcrafted image block of the embed run, as the image families have always read it;
  not fitted here (the models add the block; ``FeaturesCfg.table`` lists the others). The ``benchmark`` reads
  it too when asked (then it resolves the embed run as ``pca_boost`` does); the stacking ensembles read it in
  their net and stack on a benchmark of the other groups.

Each family's default is the paper's inputs: ``tabular`` for ``benchmark``, ``tabular,image`` for the image
families, so every earlier figure stays as it was.

``FeaturesCfg`` is the job setting; ``GroupSet`` fits the chosen groups and stacks their blocks
(``fit_transform`` gives the training matrix -- out-of-fold for ``user`` --, ``transform`` any other posts).
No MLflow here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from smp.config import ConfigError, at_least, check, one_of
from smp.data import DataError
from smp.features import RAW_FIELDS, TabularCfg, TabularFeaturizer, date_parts
from smp.image_features import PAPER_CLIP_MODEL, PAPER_CLIP_PRETRAINED
from smp.post_text import MAX_TAG_CHARS, MAX_TAGS, MAX_TITLE_CHARS, cut_by_bounds
from smp.post_text import bounded_text as _text
from smp.post_text import refuse_missing as _refuse_missing

GROUPS = ("tabular", "time", "user", "text", "image")
TABLE_GROUPS = GROUPS[:-1]  # the groups fitted here (``GroupSet``); ``image`` is the embed run's block
DEFAULT_FEATURES = "tabular"  # the benchmark's; the image families default to "tabular,image" (the paper's)
USER_FOLDS = 5
TEXT_ENCODERS = ("hashing", "clip")  # hashed n-grams + SVD (no weights); the images' CLIP text tower (smp.text_clip)
# Raw fields in the order a model lists them (``input_fields_``): the tabular ones, then the user id.
FIELD_ORDER = (*RAW_FIELDS, "Uid")


def parse_features(text: str) -> tuple[str, ...]:
    """``"tabular, user"`` -> ``("tabular", "user")`` in ``GROUPS`` order, duplicates dropped; ``ConfigError``
    naming an unknown group or an empty list."""
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ConfigError(f"features={text!r}: unknown group(s) {unknown}; expected a comma list of "
                          + ", ".join(GROUPS))
    if not names:
        raise ConfigError(f"features={text!r}: expected at least one of {', '.join(GROUPS)}")
    return tuple(g for g in GROUPS if g in names)


@dataclass(frozen=True)
class FeaturesCfg:
    features: str = DEFAULT_FEATURES  # comma list of feature groups: tabular, time, user, text, image (smp.groups)
    text_encoder: str = "hashing"     # the text group's encoder: hashing = hashed n-grams + SVD (no weights);
    #                                   clip = the text tower of the images' CLIP model (clip_model, below)
    text_dim: int = 32                # the text group's components (SVD / PCA)
    # the CLIP model the clip text encoder uses: one parameter with the image side's (same leaf names)
    clip_model: str = PAPER_CLIP_MODEL
    clip_pretrained: str = PAPER_CLIP_PRETRAINED
    checkpoint: str = ""

    def __post_init__(self) -> None:
        parse_features(self.features)
        check(self, text_encoder=one_of(*TEXT_ENCODERS), text_dim=at_least(1))

    @property
    def groups(self) -> tuple[str, ...]:
        return parse_features(self.features)

    @property
    def table(self) -> tuple[str, ...]:
        """The chosen groups made from the posts table (all but ``image``)."""
        return tuple(g for g in self.groups if g != "image")

    @property
    def image(self) -> bool:
        """Whether the image block (CLIP + handcrafted, from the embed run) is an input."""
        return "image" in self.groups

    def without_image(self) -> "FeaturesCfg":
        """These settings with ``image`` left out (what a stacked benchmark reads)."""
        return replace(self, features=",".join(self.table))


def _num(posts: pd.DataFrame, col: str) -> np.ndarray:
    if col not in posts.columns:
        return np.full(len(posts), np.nan)
    return pd.to_numeric(posts[col], errors="coerce").to_numpy(dtype=float)


# --------------------------------------------------------------------------- tabular
class TabularGroup:
    """The paper's tabular features (``smp.features.TabularFeaturizer``), as a group."""

    name = "tabular"

    def __init__(self, cfg: TabularCfg = TabularCfg()):
        self.cfg = cfg

    def check(self, posts: pd.DataFrame) -> None:
        pass  # TabularFeaturizer refuses data with no usable field itself

    def fit_transform(self, posts, y, seed: int = 0, split: str = "random") -> np.ndarray:
        self.featurizer_ = TabularFeaturizer(self.cfg).fit(posts)
        self.feature_names_ = self.featurizer_.feature_names_
        self.facts_ = {}
        return self.featurizer_.transform(posts)

    def transform(self, posts) -> np.ndarray:
        return self.featurizer_.transform(posts)

    @property
    def fields(self) -> list[str]:
        return self.featurizer_.raw_fields_


# --------------------------------------------------------------------------- time
class TimeGroup:
    """Hour, weekday, month and the date trend of ``Postdate``, as numbers (UTC)."""

    name = "time"
    required = ("Postdate",)

    def __init__(self, cfg: TabularCfg = TabularCfg()):
        self.cfg = cfg

    def check(self, posts: pd.DataFrame) -> None:
        _refuse_missing(self.name, posts, self.required)

    def fit_transform(self, posts, y, seed: int = 0, split: str = "random") -> np.ndarray:
        self.check(posts)
        date = _num(posts, "Postdate")
        self.t0_ = float(np.nanmin(date))
        self.feature_names_ = ["time_hour", "time_weekday"] + (["time_month"] if self.cfg.month else []) \
            + (["time_days"] if self.cfg.absolute_date else [])
        self.facts_ = {}
        return self.transform(posts)

    def transform(self, posts) -> np.ndarray:
        date = _num(posts, "Postdate")
        parts = date_parts(date)
        cols = {"time_hour": parts["hour"], "time_weekday": parts["weekday"], "time_month": parts["month"],
                "time_days": (date - self.t0_) / 86400.0}
        return np.column_stack([cols[c] for c in self.feature_names_]).astype(np.float32)

    @property
    def fields(self) -> list[str]:
        return ["Postdate"]


# --------------------------------------------------------------------------- user
USER_COLUMNS = ("user_posts", "user_mean", "user_median", "user_std", "user_tag_share", "user_days_since_first",
                "user_unseen")


def user_ids(posts: pd.DataFrame) -> np.ndarray:
    """``Uid`` as text, ``None`` where missing (absent column, NaN, empty or blank); ``12`` / ``12.0`` / ``"12"``
    are one user."""
    if "Uid" not in posts.columns:
        return np.full(len(posts), None, dtype=object)
    out = np.empty(len(posts), dtype=object)
    for i, v in enumerate(posts["Uid"].to_numpy(dtype=object)):
        if v is None or v is pd.NA or (isinstance(v, float) and not np.isfinite(v)):
            out[i] = None
        elif isinstance(v, (float, np.floating)) and float(v) == int(v):
            out[i] = str(int(v))
        else:
            text = str(v).strip()
            out[i] = text if text and text.lower() not in ("nan", "none", "null") else None
    return out


def _has_tags(posts: pd.DataFrame) -> np.ndarray:
    """1 where the post has tags, 0 where it has none, NaN where unknown (``tag_count``, else ``Alltags``)."""
    if "tag_count" in posts.columns:
        t = _num(posts, "tag_count")
        return np.where(np.isnan(t), np.nan, (t > 0).astype(float))
    if "Alltags" in posts.columns:
        tags = posts["Alltags"]
        return np.where(tags.isna(), np.nan, (tags.fillna("").astype(str).str.strip() != "").astype(float))
    return np.full(len(posts), np.nan)


def _stats(labels: np.ndarray, tags: np.ndarray, dates: np.ndarray) -> tuple:
    """(count, mean, median, std, tag share, first date) of one history."""
    n = len(labels)
    known = tags[np.isfinite(tags)]
    finite_dates = dates[np.isfinite(dates)]
    return (float(n), float(labels.mean()), float(np.median(labels)), float(labels.std()),
            float(known.mean()) if len(known) else np.nan,
            float(finite_dates.min()) if len(finite_dates) else np.nan)


class UserHistory:
    """The user's history from their other training posts (module docstring: leak-free per split)."""

    name = "user"
    required = ("Uid",)

    def __init__(self, folds: int = USER_FOLDS):
        self.folds = folds

    def check(self, posts: pd.DataFrame) -> None:
        _refuse_missing(self.name, posts, self.required)

    def fit_transform(self, posts, y, seed: int = 0, split: str = "random") -> np.ndarray:
        self.check(posts)
        y = np.asarray(y, dtype=float)
        uid, tags, dates = user_ids(posts), _has_tags(posts), _num(posts, "Postdate")
        known = tags[np.isfinite(tags)]
        self.prior_ = (0.0, float(y.mean()), float(np.median(y)), float(y.std()),
                       float(known.mean()) if len(known) else np.nan, np.nan)
        self.table_ = self._table(uid, y, tags, dates)
        self.as_of_ = self._by_date(uid, y, tags, dates) if split == "chrono" else None
        self.feature_names_ = list(USER_COLUMNS)
        stats = np.tile(np.asarray(self.prior_, dtype=float), (len(posts), 1))
        seen = np.zeros(len(posts), dtype=bool)
        if split == "chrono":
            self._earlier(uid, dates, stats, seen)
        elif split == "user":
            pass  # every val/test user is new: training rows get what they get, the prior (no user history)
        else:
            self._out_of_fold(uid, y, tags, dates, stats, seen, seed)
        self.facts_ = {"features/user_table_users": len(self.table_),
                       "features/user_missing_uid_train": int(sum(u is None for u in uid)),
                       "features/user_no_history_train": int((~seen).sum())}
        return self._block(stats, seen, dates)

    def _table(self, uid, y, tags, dates) -> dict:
        groups: dict[str, list[int]] = {}
        for i, u in enumerate(uid):
            if u is not None:
                groups.setdefault(u, []).append(i)
        return {u: _stats(y[idx], tags[idx], dates[idx]) for u, idx in
                ((u, np.asarray(ix)) for u, ix in groups.items())}

    def _out_of_fold(self, uid, y, tags, dates, stats, seen, seed) -> None:
        from sklearn.model_selection import KFold

        n = len(uid)
        folds = min(self.folds, n)
        if folds < 2:
            return
        for fit_idx, hold_idx in KFold(folds, shuffle=True, random_state=seed).split(np.arange(n)):
            table = self._table(uid[fit_idx], y[fit_idx], tags[fit_idx], dates[fit_idx])
            for i in hold_idx:
                row = table.get(uid[i]) if uid[i] is not None else None
                if row is not None:
                    stats[i], seen[i] = row, True

    @staticmethod
    def _by_date(uid, y, tags, dates) -> dict:
        """``Uid`` -> its dated training posts' (dates, labels, tag flags), by date: a history as of any date."""
        groups: dict[str, list[int]] = {}
        for i, u in enumerate(uid):
            if u is not None and np.isfinite(dates[i]):
                groups.setdefault(u, []).append(i)
        out = {}
        for u, idx in groups.items():
            idx = np.asarray(idx)
            idx = idx[np.argsort(dates[idx], kind="stable")]
            out[u] = (dates[idx], y[idx], tags[idx])
        return out

    def _earlier(self, uid, dates, stats, seen) -> None:
        """Each training post's stats from its user's training posts strictly before it (``Postdate``): the
        rule ``_history`` scores any later post by (``_as_of``)."""
        for i, u in enumerate(uid):
            if u in self.as_of_ and np.isfinite(dates[i]):
                row = self._as_of(u, dates[i])
                if row is not None:
                    stats[i], seen[i] = row, True

    def _as_of(self, u: str, date: float) -> tuple | None:
        """User ``u``'s stats from its dated training posts strictly before ``date`` (posts of the same second
        do not see each other); the whole table row when all of them are; None when none is."""
        d, labels, tags = self.as_of_[u]
        k = int(np.searchsorted(d, date, side="left"))
        if k == 0:
            return None
        return _stats(labels[:k], tags[:k], d[:k]) if k < len(d) else self.table_[u]

    def _block(self, stats: np.ndarray, seen: np.ndarray, dates: np.ndarray) -> np.ndarray:
        X = np.empty((len(stats), len(USER_COLUMNS)), dtype=np.float32)
        X[:, :5] = stats[:, :5]
        X[:, 5] = (dates - stats[:, 5]) / 86400.0
        X[:, 6] = (~seen).astype(np.float32)
        return X

    def _history(self, posts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each post's user stats (the prior where it has none), whether it has a history, and its dates.

        The user's training posts; under ``split=chrono`` (``as_of_``) only those strictly before the post's
        own date, as the training rows got them. A post later than all of them (every test post) gets the
        whole table row; one earlier than some -- a fold model's held-out training post -- gets no history
        from the future."""
        uid, dates = user_ids(posts), _num(posts, "Postdate")
        stats = np.tile(np.asarray(self.prior_, dtype=float), (len(posts), 1))
        seen = np.zeros(len(posts), dtype=bool)
        as_of = getattr(self, "as_of_", None)  # models pickled before it: the whole table
        for i, u in enumerate(uid):
            row = self.table_.get(u) if u is not None else None
            if row is None:
                continue
            if as_of is not None and u in as_of and np.isfinite(dates[i]):
                row = self._as_of(u, dates[i])
                if row is None:
                    continue  # no earlier post: the prior, as a training post without one
            stats[i], seen[i] = row, True
        return stats, seen, dates

    def unseen(self, posts: pd.DataFrame) -> np.ndarray:
        """True for each post scored with the prior: its user has no training post (under ``split=chrono``:
        none before the post's date), or it has no ``Uid``."""
        return ~self._history(posts)[1]

    def transform(self, posts) -> np.ndarray:
        return self._block(*self._history(posts))

    @property
    def fields(self) -> list[str]:
        return ["Uid", "Postdate"]


# --------------------------------------------------------------------------- text
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def text_tokens(title: str, tags: str) -> list[str]:
    """Title words (lower case) with their bigrams, and each tag as a token of its own (``#tag``)."""
    words = [w.lower() for w in _WORD.findall(title)]
    tokens = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    tokens += ["#" + t.lower() for t in tags.split()[:MAX_TAGS]]
    return tokens


class HashedText:
    """The ``hashing`` text encoder: hashed title n-grams and tags (``HashingVectorizer``, 2**18 buckets)
    -> ``TruncatedSVD`` fitted on the training posts (``dim`` components).

    The other encoder, ``clip`` (``smp.text_clip.ClipText``), has the same interface.
    """

    name = "text"
    required = ("Title", "Alltags")

    def __init__(self, dim: int = 32):
        self.dim = dim

    def check(self, posts: pd.DataFrame) -> None:
        _refuse_missing(self.name, posts, self.required, any_of=True)

    def _docs(self, posts: pd.DataFrame) -> tuple[list[list[str]], np.ndarray, int]:
        n = len(posts)
        titles = posts["Title"].to_numpy(dtype=object) if "Title" in posts.columns else np.full(n, None)
        tags = posts["Alltags"].to_numpy(dtype=object) if "Alltags" in posts.columns else np.full(n, None)
        docs, empty, cut = [], np.zeros(n, dtype=bool), 0
        for i, (t, a) in enumerate(zip(titles, tags)):
            title, c1 = _text(t, MAX_TITLE_CHARS)
            alltags, c2 = _text(a, MAX_TAG_CHARS)
            many = len(alltags.split()) > MAX_TAGS if alltags else False
            cut += int(c1 or c2 or many)
            docs.append(text_tokens(title, alltags))
            empty[i] = not docs[-1]
        return docs, empty, cut

    def _vectorizer(self):
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(analyzer=_identity, n_features=2 ** 18, alternate_sign=False, norm="l2")

    def fit_transform(self, posts, y, seed: int = 0, split: str = "random") -> np.ndarray:
        from sklearn.decomposition import TruncatedSVD

        self.check(posts)
        docs, empty, cut = self._docs(posts)
        H = self._vectorizer().transform(docs).tocsc()
        # only the hashed columns some training post uses (an SVD component is zero on every other one)
        self.columns_ = np.flatnonzero(H.getnnz(axis=0) > 0)
        H = H[:, self.columns_].tocsr()
        k = int(max(1, min(self.dim, H.shape[0] - 1, H.shape[1] - 1)))
        self.svd_ = TruncatedSVD(n_components=k, random_state=seed, algorithm="randomized", n_iter=5).fit(H)
        self.feature_names_ = [f"text_{i}" for i in range(k)]
        self.facts_ = {"features/text_truncated_train": cut, "features/text_empty_train": int(empty.sum())}
        return self._encode(H, empty)

    def _encode(self, H, empty) -> np.ndarray:
        Z = np.asarray(self.svd_.transform(H), dtype=np.float32)
        Z[empty] = np.nan  # no title and no tags: missing, not a zero vector
        return Z

    def truncated(self, posts) -> np.ndarray:
        """True for each post whose title or tags the bounds cut (a served post's ``partial: text truncated``)."""
        return cut_by_bounds(posts)

    def transform(self, posts) -> np.ndarray:
        docs, empty, cut = self._docs(posts)
        self.last_truncated_ = cut
        return self._encode(self._vectorizer().transform(docs).tocsc()[:, self.columns_].tocsr(), empty)

    @property
    def fields(self) -> list[str]:
        return ["Title", "Alltags"]


def _identity(tokens):
    return tokens


# --------------------------------------------------------------------------- the set
def check_groups(cfg: FeaturesCfg, posts: pd.DataFrame) -> None:
    """Refuse (``DataError`` naming the group and the fields) a chosen group whose fields ``posts`` lacks."""
    GroupSet(cfg).check(posts)


class GroupSet:
    """The chosen groups, fitted on training posts; their blocks side by side (in ``GROUPS`` order)."""

    def __init__(self, cfg: FeaturesCfg = FeaturesCfg(), tabular: TabularCfg = TabularCfg(), seed: int = 0,
                 split: str = "random"):
        self.cfg, self.tabular, self.seed, self.split = cfg, tabular, seed, split

    def _make(self, name: str):
        if name == "tabular":
            return TabularGroup(self.tabular)
        if name == "time":
            return TimeGroup(self.tabular)
        if name == "user":
            return UserHistory()
        if self.cfg.text_encoder == "clip":
            from smp.text_clip import ClipText  # torch and open_clip: only for a model that reads text by CLIP

            return ClipText(self.cfg.text_dim, self.cfg.clip_model, self.cfg.clip_pretrained, self.cfg.checkpoint)
        return HashedText(self.cfg.text_dim)

    def check(self, posts: pd.DataFrame) -> None:
        """Refuse (``DataError``) a chosen group whose fields ``posts`` lacks, before any fitting."""
        for name in self.cfg.table:
            self._make(name).check(posts)

    def fit_transform(self, posts: pd.DataFrame, y) -> np.ndarray:
        """The training matrix (``user``: out-of-fold / strictly earlier; module docstring); no columns when
        only ``image`` was chosen (the image models add that block themselves)."""
        self.check(posts)
        self.groups_ = [self._make(name) for name in self.cfg.table]
        return self._stack([g.fit_transform(posts, y, self.seed, self.split) for g in self.groups_], len(posts))

    def transform(self, posts: pd.DataFrame) -> np.ndarray:
        return self._stack([g.transform(posts) for g in self.groups_], len(posts))

    @staticmethod
    def _stack(blocks: list[np.ndarray], n: int) -> np.ndarray:
        if len(blocks) == 1:
            return blocks[0]
        if not blocks:
            return np.empty((n, 0), dtype=np.float32)
        return np.hstack([np.asarray(b, dtype=np.float32) for b in blocks])

    def group(self, name: str):
        return next((g for g in self.groups_ if g.name == name), None)

    @property
    def feature_names_(self) -> list[str]:
        return [n for g in self.groups_ for n in g.feature_names_]

    @property
    def facts_(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for g in self.groups_:
            out.update(g.facts_)
        return out

    @property
    def fields(self) -> list[str]:
        needed = {f for g in self.groups_ for f in g.fields} | {"Pid"}
        return [f for f in FIELD_ORDER if f in needed]
