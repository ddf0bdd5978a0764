"""Stage 4: the models, one class per family (a family's ``smp.jobs.Family.model``), made from a job config by
``Family.build(job_cfg, **inputs)`` (each class's ``from_job``).

Every model follows scikit-learn conventions (``__init__`` stores parameters,
``fit`` returns ``self``, fitted attributes end in ``_``), fits the same way
(``fit(train: Part, val: Part, on_step=None)``: ``on_step(step, val_rmse)``
after every boosting round or epoch, where tuning reports and prunes) and
predicts from a raw posts DataFrame (SMPD field names), so the logged MLflow
model is the whole chain: tabular transform -> booster (-> image features ->
network).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from smp.boosters import (XGBCfg, best_iteration, fit_booster, make_booster, one_blas_thread, predict_booster,
                          step_callbacks, tree_settings)
from smp.config import at_least, check
from smp.features import TabularCfg
from smp.groups import FIELD_ORDER, FeaturesCfg, GroupSet
from smp.image_features import HANDCRAFTED


@dataclass(frozen=True)
class Part:
    """One split's inputs to a model: raw post rows and labels; for image models the image block (NaN = no
    usable image); for the ensembles the benchmark prediction they stack on."""

    rows: pd.DataFrame
    y: np.ndarray
    images: np.ndarray | None = None
    stacked: np.ndarray | None = None


class TimeTrend:
    """A linear trend of the label over ``Postdate`` (days), least squares on the training posts.

    Trees cannot extrapolate a date past the training range, so under a chronological protocol the
    benchmark can model ``label - trend(Postdate)`` and add the (extrapolated) trend back. A post without
    ``Postdate`` gets the trend at the training posts' mean date.
    """

    def fit(self, posts: pd.DataFrame, y) -> "TimeTrend":
        days = self._days(posts)
        ok = np.isfinite(days)
        if ok.sum() < 2 or np.ptp(days[ok]) == 0:
            raise ValueError("time_trend needs Postdate on at least two training posts with different dates")
        self.t0_ = float(days[ok].mean())
        self.slope_, self.intercept_ = (float(v) for v in np.polyfit(days[ok] - self.t0_, np.asarray(y)[ok], 1))
        return self

    def predict(self, posts: pd.DataFrame) -> np.ndarray:
        days = np.nan_to_num(self._days(posts) - self.t0_, nan=0.0)
        return self.intercept_ + self.slope_ * days

    @staticmethod
    def _days(posts: pd.DataFrame) -> np.ndarray:
        if "Postdate" not in posts.columns:
            return np.full(len(posts), np.nan)
        return pd.to_numeric(posts["Postdate"], errors="coerce").to_numpy(dtype=float) / 86400.0


def with_images(X: np.ndarray, img: np.ndarray | None) -> np.ndarray:
    """``X`` with the image block and a ``has_image`` column appended (``img`` None: ``X`` as it is)."""
    if img is None:
        return X
    out = np.empty((len(X), X.shape[1] + img.shape[1] + 1), dtype=np.float32)
    out[:, :X.shape[1]] = X
    out[:, X.shape[1]:-1] = img
    out[:, -1] = np.isfinite(img).all(axis=1)
    return out


class BenchmarkModel:
    """The paper's benchmark: XGBoost on the tabular features only (optionally over a linear time trend).

    ``features`` (``smp.groups.FeaturesCfg``) picks the feature groups its matrix is made of: ``tabular``
    alone (the default) is the paper's matrix, exactly; ``time``, ``user`` and ``text`` add their blocks
    (``smp.groups``), fitted on the training posts only (``user``: out-of-fold under ``split="random"``, from
    strictly earlier posts under ``"chrono"``, the prior under ``"user"``); ``image`` appends the embed run's
    image block and ``has_image`` (``images``: how new posts get it). The fitted groups are pickled with the
    model: a logged model scores raw posts, a new post of a known ``Uid`` from that user's training posts.
    """

    needs_images = False  # models pickled before the image group; an instance with ``images`` sets it

    def __init__(self, cfg: XGBCfg = XGBCfg(), tabular: TabularCfg = TabularCfg(), seed: int = 0,
                 features: FeaturesCfg = FeaturesCfg(), split: str = "random",
                 images: "ImageFeatureSource | None" = None):
        self.cfg = cfg
        self.tabular = tabular
        self.seed = seed
        self.features = features
        self.split = split
        self.images = images  # the image group's source (``features`` with ``image``), else None
        self.needs_images = images is not None

    @classmethod
    def from_job(cls, cfg, images: "ImageFeatureSource | None" = None, **_):
        return cls(cfg.xgb, cfg.tabular, cfg.splitting.seed, getattr(cfg, "feature_groups", FeaturesCfg()),
                   cfg.splitting.split, images)

    def fit(self, train: Part, val: Part, on_step=None) -> "BenchmarkModel":
        img, img_val = train.images, val.images
        train, y, val, y_val = train.rows, train.y, val.rows, val.y
        y, y_val = np.asarray(y, dtype=float), np.asarray(y_val, dtype=float)
        features = getattr(self, "features", FeaturesCfg())
        if features.image and (img is None or self.images is None):
            raise ValueError("features with image: the benchmark needs the image block and its source")
        self.groups_ = GroupSet(features, self.tabular, self.seed, getattr(self, "split", "random"))
        X = with_images(self.groups_.fit_transform(train, y), img if features.image else None)
        tab = self.groups_.group("tabular")
        self.featurizer_ = None if tab is None else tab.featurizer_
        X_val = self._matrix(val, img_val)
        self.trend_ = TimeTrend().fit(train, y) if self.tabular.time_trend else None
        if self.trend_ is not None:
            y, y_val = y - self.trend_.predict(train), y_val - self.trend_.predict(val)
        self.tree_settings_ = tree_settings(self.cfg, len(X))
        booster = make_booster(self.cfg, self.seed, step_callbacks(on_step), n_rows=len(X))
        self.booster_ = fit_booster(booster, X, y, X_val, y_val)
        self.best_iteration_ = best_iteration(self.booster_)
        return self

    def _matrix(self, posts: pd.DataFrame, img: np.ndarray | None = None) -> np.ndarray:
        groups = getattr(self, "groups_", None)  # models pickled before feature groups: the featurizer alone
        if groups is None:
            return self.featurizer_.transform(posts)
        if getattr(self, "images", None) is None:
            return groups.transform(posts)
        return with_images(groups.transform(posts), self.images.block(posts) if img is None else img)

    def predict(self, posts: pd.DataFrame, img: np.ndarray | None = None) -> np.ndarray:
        """Predicted popularity for raw posts (``img``: their image block, when already at hand)."""
        pred = predict_booster(self.booster_, self._matrix(posts, img))
        trend = getattr(self, "trend_", None)  # models pickled before the trend existed have none
        return pred if trend is None else pred + trend.predict(posts)

    @property
    def feature_names_(self) -> list[str]:
        """The matrix's columns, group by group (the image block's, then ``has_image``, last)."""
        groups = getattr(self, "groups_", None)
        if groups is None:
            return self.featurizer_.feature_names_
        images = getattr(self, "images", None)
        return groups.feature_names_ + ([] if images is None else [*images.columns, "has_image"])

    @property
    def groups_in_use(self) -> GroupSet | None:
        """The fitted feature groups (``smp.groups.GroupSet``); None for a model pickled before groups."""
        return getattr(self, "groups_", None)

    @property
    def facts_(self) -> dict[str, object]:
        """What the feature groups learnt, as run params (user table size, counts of missing / cut inputs);
        nothing for the default ``tabular``."""
        groups = getattr(self, "groups_", None)
        return {} if groups is None else groups.facts_

    def importance(self) -> tuple[list[str], np.ndarray]:
        """Gain importance per feature."""
        score = self.booster_.get_booster().get_score(importance_type="gain")
        names = self.feature_names_
        return names, np.array([score.get(f"f{i}", 0.0) for i in range(len(names))])

    @property
    def input_fields_(self) -> list[str]:
        groups = getattr(self, "groups_", None)
        fields = self.featurizer_.raw_fields_ if groups is None else groups.fields
        if getattr(self, "trend_", None) is not None and "Postdate" not in fields:
            fields = [f for f in FIELD_ORDER if f in {*fields, "Postdate"}]
        return fields


class CrossFitBenchmark:
    """K benchmark models fitted on the K-fold splits of train; predicts their average (cross-fitting).

    Each training row's out-of-fold prediction (``oof_``) comes from the one fold model that never saw it,
    and validation, test and new posts get the mean of the K models: the K fits that stacking needs anyway
    also serve prediction, so no (K+1)-th fit on all of train is needed.
    """

    needs_images = False

    def __init__(self, models: list[BenchmarkModel], oof: np.ndarray):
        self.models, self.oof_ = list(models), oof

    def predict(self, posts: pd.DataFrame) -> np.ndarray:
        return np.mean([m.predict(posts) for m in self.models], axis=0)

    @property
    def best_iteration_(self) -> float:
        return float(np.mean([m.best_iteration_ for m in self.models]))

    @property
    def input_fields_(self) -> list[str]:
        return self.models[0].input_fields_

    @property
    def groups_in_use(self) -> GroupSet | None:
        return self.models[0].groups_in_use


# --------------------------------------------------------------------------- image models


def image_columns(features: pd.DataFrame) -> list[str]:
    """The image feature columns of an embed features table: handcrafted then ``clip_*`` in order."""
    clip = sorted((c for c in features.columns if c.startswith("clip_")), key=lambda c: int(c[5:]))
    return [c for c in HANDCRAFTED if c in features.columns] + clip


class ImageFeatureSource:
    """Gives the image block (float32, NaN where a post has no usable image) for raw post rows.

    Rows may carry the features already (columns from the embed table), or the
    image itself as ``image_b64`` (base64 bytes) or ``image_path``; then the
    features are computed with the same embedding settings as in training
    (through the content-addressed cache).  Rows with neither get NaN (and so
    ``has_image = 0``).
    """

    def __init__(self, columns: list[str], embed_cfg=None):
        self.columns = list(columns)
        self.embed_cfg = embed_cfg

    def block(self, posts: pd.DataFrame) -> np.ndarray:
        if all(c in posts.columns for c in self.columns):
            return posts[self.columns].to_numpy(dtype=np.float32)
        out = np.full((len(posts), len(self.columns)), np.nan, dtype=np.float32)
        if self.embed_cfg is None or not ({"image_b64", "image_path"} & set(posts.columns)):
            return out
        from smp.image_requests import features_for_rows  # heavy (torch / open_clip): only when images arrive

        feats = features_for_rows(posts, self.embed_cfg)
        return feats[self.columns].to_numpy(dtype=np.float32)


def _has_image(block: np.ndarray) -> np.ndarray:
    return np.isfinite(block).all(axis=1)


@dataclass(frozen=True)
class PCACfg:
    n_components: int = 300  # paper: PCA to 300 dims before XGBoost

    def __post_init__(self) -> None:
        check(self, n_components=at_least(1))


class PCABoostModel:
    """The paper's second model: [CLIP, handcrafted, tabular] -> standardise -> PCA -> XGBoost."""

    needs_images = True

    def __init__(self, cfg: XGBCfg, pca: PCACfg, tabular: TabularCfg, images: ImageFeatureSource | None,
                 seed: int = 0, features: FeaturesCfg = FeaturesCfg("tabular,image"), split: str = "random"):
        self.cfg, self.pca, self.tabular, self.images, self.seed = cfg, pca, tabular, images, seed
        self.features, self.split = features, split
        self.needs_images = features.image

    def _table(self, posts) -> np.ndarray:
        groups = getattr(self, "groups_", None)  # models pickled before feature groups: the featurizer alone
        return self.featurizer_.transform(posts) if groups is None else groups.transform(posts)

    def _matrix(self, posts, img, standardise: bool = True, tab: np.ndarray | None = None) -> np.ndarray:
        """[image block, table groups, has_image] (``image`` not chosen: the table groups alone); ``tab``: the
        table groups' block when already made (the training rows' out-of-fold one)."""
        tab = self._table(posts) if tab is None else tab
        if not getattr(self, "features", FeaturesCfg("tabular,image")).image:
            X = np.array(tab, dtype=np.float32)
        else:
            X = np.empty((len(posts), img.shape[1] + tab.shape[1] + 1), dtype=np.float32)
            X[:, :img.shape[1]] = img
            X[:, img.shape[1]:-1] = tab
            X[:, -1] = _has_image(img)
        if standardise:
            X -= self.mean_
            X /= self.scale_
            np.nan_to_num(X, copy=False, nan=0.0)  # missing = the train mean after standardising
        return X

    @classmethod
    def from_job(cls, cfg, images: ImageFeatureSource | None = None, **_):
        return cls(cfg.xgb, cfg.pca, cfg.tabular, images, cfg.splitting.seed, cfg.feature_groups,
                   cfg.splitting.split)

    def fit(self, train: Part, val: Part, on_step=None) -> "PCABoostModel":
        from sklearn.decomposition import PCA

        train, img, y, val, img_val, y_val = train.rows, train.images, train.y, val.rows, val.images, val.y
        self.groups_ = GroupSet(self.features, self.tabular, self.seed, self.split)
        tab = self.groups_.fit_transform(train, np.asarray(y, dtype=float))
        found = self.groups_.group("tabular")
        self.featurizer_ = None if found is None else found.featurizer_
        X = self._matrix(train, img, standardise=False, tab=tab)
        del tab
        mean, std = np.zeros(X.shape[1], np.float32), np.zeros(X.shape[1], np.float32)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: mean 0, scale 1
            for j in range(0, X.shape[1], 128):  # column blocks: nanmean/nanstd temporaries stay small
                mean[j:j + 128] = np.nan_to_num(np.nanmean(X[:, j:j + 128], axis=0))
                std[j:j + 128] = np.nan_to_num(np.nanstd(X[:, j:j + 128], axis=0))
        self.mean_, self.scale_ = mean, np.where(std > 1e-12, std, 1.0).astype(np.float32)
        X -= self.mean_
        X /= self.scale_
        np.nan_to_num(X, copy=False, nan=0.0)
        n_comp = int(min(self.pca.n_components, X.shape[0] - 1, X.shape[1]))
        # copy=False: X is this method's own matrix, PCA centres it in place (so fit_transform, not transform(X))
        self.pca_ = PCA(n_components=n_comp, svd_solver="randomized", random_state=self.seed, copy=False)
        with one_blas_thread():
            Z = self.pca_.fit_transform(X)
            del X
            Z_val = self.pca_.transform(self._matrix(val, img_val))
        self.tree_settings_ = tree_settings(self.cfg, len(Z))
        booster = make_booster(self.cfg, self.seed, step_callbacks(on_step), n_rows=len(Z))
        self.booster_ = fit_booster(booster, Z, y, Z_val, y_val)
        self.best_iteration_ = best_iteration(self.booster_)
        return self

    def predict(self, posts: pd.DataFrame, img: np.ndarray | None = None) -> np.ndarray:
        if img is None and self.images is not None:
            img = self.images.block(posts)
        with one_blas_thread():
            Z = self.pca_.transform(self._matrix(posts, img))
        return predict_booster(self.booster_, Z)

    @property
    def input_fields_(self) -> list[str]:
        groups = getattr(self, "groups_", None)
        return self.featurizer_.raw_fields_ if groups is None else groups.fields

    @property
    def facts_(self) -> dict[str, object]:
        groups = getattr(self, "groups_", None)
        return {} if groups is None else groups.facts_

    @property
    def groups_in_use(self) -> GroupSet | None:
        return getattr(self, "groups_", None)


class EnsembleModel:
    """The paper's stacking ensembles: [benchmark prediction, image features] -> neural net.

    ``benchmark`` is the booster fitted on all of train; the net is trained on
    out-of-fold (or, to measure the paper's leak, in-sample) benchmark
    predictions for the training rows.
    """

    needs_images = True

    def __init__(self, family: str, net, benchmark: BenchmarkModel, images: ImageFeatureSource | None):
        self.family, self.net, self.benchmark, self.images = family, net, benchmark, images
        self.needs_images = images is not None  # None: ``features`` without image (the net reads the stack alone)

    def image_block(self, posts: pd.DataFrame) -> np.ndarray:
        """The image block of ``posts`` (no columns when the model reads no image)."""
        if self.images is None:
            return np.empty((len(posts), 0), dtype=np.float32)
        return self.images.block(posts)

    @staticmethod
    def stack(bench_pred: np.ndarray, img: np.ndarray) -> np.ndarray:
        """Column 0 = benchmark prediction, then the image block (NaN kept; the net imputes)."""
        X = np.empty((len(bench_pred), 1 + img.shape[1]), dtype=np.float32)
        X[:, 0] = bench_pred
        X[:, 1:] = img
        return X

    @classmethod
    def from_job(cls, cfg, family: str, net: type, images: ImageFeatureSource | None, benchmark, **_):
        """``net``: the family's regressor class (``smp.nets``), built from ``cfg.net`` with the split's seed."""
        return cls(family, net.from_settings(**asdict(replace(cfg.net, seed=cfg.splitting.seed))), benchmark, images)

    def fit(self, train: Part, val: Part, on_step=None) -> "EnsembleModel":
        """Train the net on [stacked benchmark prediction, image block]; ``on_step(epoch, val_rmse)``."""
        hook = None if on_step is None else (lambda epoch, train_loss, val_rmse: on_step(epoch, val_rmse))
        self.net.fit(self.stack(train.stacked, train.images), train.y, self.stack(val.stacked, val.images), val.y,
                     on_epoch=hook)
        return self

    def predict_stacked(self, posts: pd.DataFrame, stacked, img: np.ndarray | None = None) -> np.ndarray:
        """Predictions for ``posts`` given the benchmark's prediction for them (``stacked``) and their image
        block (``img``; computed from the posts when None)."""
        img = self.image_block(posts) if img is None else img
        return np.asarray(self.net.predict(self.stack(stacked, img)), dtype=float)

    def predict(self, posts: pd.DataFrame, img: np.ndarray | None = None) -> np.ndarray:
        return self.predict_stacked(posts, self.benchmark.predict(posts), img)

    @property
    def facts_(self) -> dict[str, object]:
        """What the model learnt beyond its benchmark, as run params: nothing (the net's figures are metrics)."""
        return {}

    @property
    def input_fields_(self) -> list[str]:
        return self.benchmark.input_fields_

    def benchmark_facts(self) -> dict[str, object]:
        """What the stacked benchmark's feature groups learnt (its run logs them too)."""
        return dict(getattr(self.benchmark, "facts_", None) or {})

    @property
    def groups_in_use(self) -> GroupSet | None:
        """The feature groups of the benchmark it stacks on."""
        return getattr(self.benchmark, "groups_in_use", None)


# stacking_folds=0: K=2 from this many training rows on, else 3. The K fold fits cost about K x (K-1)/K benchmark
# fits of work, more on big data, where a round's cost per node (features x 256 bins) does not shrink with the
# fold's rows; with two folds a fold still trains on over 25,000 rows (docs/benchmarks.md, Stacking).
TWO_FOLDS_ROWS = 50_000


def fold_count(folds: int, n_rows: int) -> int:
    """K of the out-of-fold stacking: ``folds`` when set, else from the training rows (``TWO_FOLDS_ROWS``)."""
    if folds:
        return int(folds)
    return 2 if n_rows >= TWO_FOLDS_ROWS else 3


def _folds(n: int, folds: int, seed: int):
    from sklearn.model_selection import KFold

    if folds < 2:
        raise ValueError(f"stacking_folds={folds}: out-of-fold stacking needs at least 2 folds")
    return KFold(folds, shuffle=True, random_state=seed).split(np.arange(n))


def cross_fit(posts: pd.DataFrame, y: np.ndarray, val: pd.DataFrame, y_val: np.ndarray, cfg: XGBCfg,
              tabular: TabularCfg, seed: int, folds: int = 3, rounds: int | None = None,
              features: FeaturesCfg = FeaturesCfg(), split: str = "random") -> CrossFitBenchmark:
    """K fold models, their out-of-fold predictions for every training row.

    ``rounds``: every fold model grows exactly that many trees (no early stopping), e.g. as many as the
    benchmark fitted on all of train whose predictions the out-of-fold ones stand in for; ``None``: each
    fold early-stops on ``val``. The fold models use the tree method, bins and threads of a fit on all of
    ``posts`` (what that benchmark uses): resolved from the smaller fold size they could switch method,
    e.g. to ``exact``, several times slower per round there (docs/benchmarks.md). ``features`` / ``split``:
    the benchmark's feature groups (no ``image``), each fitted on the fold's posts only."""
    full = tree_settings(cfg, len(posts))
    fold_cfg = replace(cfg, tree_method=full["tree_method"], max_bin=full["max_bin"], n_jobs=full["n_jobs"])
    if rounds is not None:
        if rounds < 1:
            raise ValueError(f"cross_fit: rounds={rounds}: a fold model needs at least one tree")
        fold_cfg = replace(fold_cfg, n_estimators=int(rounds), early_stopping_rounds=0)
    oof = np.full(len(posts), np.nan)
    models = []
    for fit_idx, hold_idx in _folds(len(posts), folds, seed):
        fold_posts = posts.iloc[fit_idx].reset_index(drop=True)
        model = BenchmarkModel(fold_cfg, tabular, seed, features, split).fit(Part(fold_posts, y[fit_idx]),
                                                                             Part(val, y_val))
        oof[hold_idx] = model.predict(posts.iloc[hold_idx].reset_index(drop=True))
        models.append(model)
    return CrossFitBenchmark(models, oof)


def out_of_fold(posts: pd.DataFrame, y: np.ndarray, val: pd.DataFrame, y_val: np.ndarray, cfg: XGBCfg,
                tabular: TabularCfg, seed: int, folds: int = 5) -> np.ndarray:
    """Benchmark predictions for every training row from a model that never saw that row's label."""
    return cross_fit(posts, y, val, y_val, cfg, tabular, seed, folds).oof_
