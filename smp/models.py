"""Stage 4: the models, chosen by name from ``MODELS``.

Every model follows scikit-learn conventions (``__init__`` stores parameters,
``fit`` returns ``self``, fitted attributes end in ``_``) and predicts from a
raw posts DataFrame (SMPD field names), so the logged MLflow model is the
whole chain: tabular transform -> booster (-> image features -> network).
"""

from __future__ import annotations

import json
import threading
import warnings
import weakref
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import xgboost as xgb

from smp.features import TabularCfg, TabularFeaturizer


@dataclass(frozen=True)
class XGBCfg:
    n_estimators: int = 2000         # paper's grid search (benchmark)
    max_depth: int = 18              # paper's grid search (benchmark)
    learning_rate: float = 0.01      # paper's grid search (benchmark)
    early_stopping_rounds: int = 100  # rounds without val improvement before stopping
    min_child_weight: float = 1.0    # XGBoost default
    subsample: float = 1.0           # XGBoost default
    colsample_bytree: float = 1.0    # XGBoost default
    reg_lambda: float = 1.0          # XGBoost default (L2)
    reg_alpha: float = 0.0           # XGBoost default (L1)
    max_bin: int = 256               # histogram bins (tree_method=hist)
    n_jobs: int = 0                  # 0 = all cores


# XGBoost keeps up to this many nodes' gradient histograms (features x bins x 16 bytes each) for its
# subtraction trick; the library default (65,536) lets deep trees over wide inputs hold gigabytes
# (pca_boost, depth 12 over 300 components: 4.4 GB at 64.8k rows; 1.7 GB with 1,024), and the trees
# grown are the same either way (an evicted histogram is rebuilt, not approximated).
HIST_CACHE_NODES = 1024


def make_booster(cfg: XGBCfg, seed: int, callbacks=None, early_stopping: bool = True) -> xgb.XGBRegressor:
    """An ``XGBRegressor`` (``tree_method=hist``) configured from ``cfg``."""
    params = asdict(cfg)
    rounds = params.pop("early_stopping_rounds")
    n_jobs = params.pop("n_jobs") or None
    return xgb.XGBRegressor(
        **params, tree_method="hist", objective="reg:squarederror", eval_metric="rmse",
        max_cached_hist_node=HIST_CACHE_NODES,
        early_stopping_rounds=rounds if early_stopping and rounds > 0 else None,
        random_state=seed, n_jobs=n_jobs, callbacks=callbacks,
    )


def fit_booster(booster: xgb.XGBRegressor, X, y, X_val, y_val) -> xgb.XGBRegressor:
    """Fit with the validation set as the (last) eval set; callbacks are dropped afterwards."""
    booster.fit(X, y, eval_set=[(X_val, y_val)], verbose=False)
    booster.set_params(callbacks=None)  # pruning callbacks hold an Optuna trial: never pickle them
    return booster


SMALL_PREDICT = 64  # rows up to which a fitted booster predicts on one thread
_PREDICT_LOCK = threading.Lock()
_NTHREAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Booster -> its own nthread setting


def _own_nthread(inner: xgb.Booster) -> int:
    """The booster's configured thread count, read once (parsing its config on every request costs)."""
    if inner not in _NTHREAD:
        _NTHREAD[inner] = int(json.loads(inner.save_config())["learner"]["generic_param"]["nthread"])
    return _NTHREAD[inner]


def predict_booster(booster: xgb.XGBRegressor, X) -> np.ndarray:
    """``booster.predict(X)`` as float64; a few rows (a served request) on one thread.

    Starting and synchronising OpenMP threads costs more than walking the trees for one post, and on a
    busy machine far more; large batches keep every thread. The thread count is the booster's own
    setting, so it is switched and restored under a lock.
    """
    if len(X) > SMALL_PREDICT:
        with _PREDICT_LOCK:
            return booster.predict(X).astype(float)
    inner = booster.get_booster()
    with _PREDICT_LOCK:
        nthread = _own_nthread(inner)
        inner.set_param({"nthread": 1})
        try:
            return booster.predict(X).astype(float)
        finally:
            inner.set_param({"nthread": nthread})


def best_iteration(booster: xgb.XGBRegressor) -> int:
    """Number of trees used for prediction (best iteration + 1 under early stopping)."""
    try:
        return int(booster.best_iteration) + 1
    except AttributeError:
        return int(booster.get_booster().num_boosted_rounds())


class BenchmarkModel:
    """The paper's benchmark: XGBoost on the tabular features only."""

    family = "benchmark"
    needs_images = False

    def __init__(self, cfg: XGBCfg = XGBCfg(), tabular: TabularCfg = TabularCfg(), seed: int = 0):
        self.cfg = cfg
        self.tabular = tabular
        self.seed = seed

    def fit(self, train: pd.DataFrame, y, val: pd.DataFrame, y_val, callbacks=None) -> "BenchmarkModel":
        self.featurizer_ = TabularFeaturizer(self.tabular).fit(train)
        X, X_val = self.featurizer_.transform(train), self.featurizer_.transform(val)
        self.booster_ = fit_booster(make_booster(self.cfg, self.seed, callbacks), X, y, X_val, y_val)
        self.best_iteration_ = best_iteration(self.booster_)
        return self

    def predict(self, posts: pd.DataFrame) -> np.ndarray:
        """Predicted popularity for raw posts."""
        return predict_booster(self.booster_, self.featurizer_.transform(posts))

    def importance(self) -> tuple[list[str], np.ndarray]:
        """Gain importance per tabular feature."""
        score = self.booster_.get_booster().get_score(importance_type="gain")
        names = self.featurizer_.feature_names_
        return names, np.array([score.get(f"f{i}", 0.0) for i in range(len(names))])

    @property
    def input_fields_(self) -> list[str]:
        return self.featurizer_.raw_fields_


# --------------------------------------------------------------------------- image models
HANDCRAFTED = ("clarity_contrast", "hue_count", "brightness_contrast", "color_entropy", "composition_geometry")


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
        from smp.embed import features_for_rows  # heavy (torch / open_clip): only when images arrive

        feats = features_for_rows(posts, self.embed_cfg)
        return feats[self.columns].to_numpy(dtype=np.float32)


def _has_image(block: np.ndarray) -> np.ndarray:
    return np.isfinite(block).all(axis=1)


@dataclass(frozen=True)
class PCACfg:
    n_components: int = 300  # paper: PCA to 300 dims before XGBoost


class PCABoostModel:
    """The paper's second model: [CLIP, handcrafted, tabular] -> standardise -> PCA -> XGBoost."""

    family = "pca_boost"
    needs_images = True

    def __init__(self, cfg: XGBCfg, pca: PCACfg, tabular: TabularCfg, images: ImageFeatureSource, seed: int = 0):
        self.cfg, self.pca, self.tabular, self.images, self.seed = cfg, pca, tabular, images, seed

    def _matrix(self, posts, img, standardise: bool = True) -> np.ndarray:
        tab = self.featurizer_.transform(posts)
        X = np.empty((len(posts), img.shape[1] + tab.shape[1] + 1), dtype=np.float32)
        X[:, :img.shape[1]] = img
        X[:, img.shape[1]:-1] = tab
        X[:, -1] = _has_image(img)
        if standardise:
            X -= self.mean_
            X /= self.scale_
            np.nan_to_num(X, copy=False, nan=0.0)  # missing = the train mean after standardising
        return X

    def fit(self, train, img, y, val, img_val, y_val, callbacks=None) -> "PCABoostModel":
        from sklearn.decomposition import PCA

        self.featurizer_ = TabularFeaturizer(self.tabular).fit(train)
        X = self._matrix(train, img, standardise=False)
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
        Z = self.pca_.fit_transform(X)
        del X
        Z_val = self.pca_.transform(self._matrix(val, img_val))
        self.booster_ = fit_booster(make_booster(self.cfg, self.seed, callbacks), Z, y, Z_val, y_val)
        self.best_iteration_ = best_iteration(self.booster_)
        return self

    def predict(self, posts: pd.DataFrame, img: np.ndarray | None = None) -> np.ndarray:
        img = self.images.block(posts) if img is None else img
        return predict_booster(self.booster_, self.pca_.transform(self._matrix(posts, img)))

    @property
    def input_fields_(self) -> list[str]:
        return self.featurizer_.raw_fields_


class EnsembleModel:
    """The paper's stacking ensembles: [benchmark prediction, image features] -> neural net.

    ``benchmark`` is the booster fitted on all of train; the net is trained on
    out-of-fold (or, to measure the paper's leak, in-sample) benchmark
    predictions for the training rows.
    """

    needs_images = True

    def __init__(self, family: str, net, benchmark: BenchmarkModel, images: ImageFeatureSource):
        self.family, self.net, self.benchmark, self.images = family, net, benchmark, images

    @staticmethod
    def stack(bench_pred: np.ndarray, img: np.ndarray) -> np.ndarray:
        """Column 0 = benchmark prediction, then the image block (NaN kept; the net imputes)."""
        X = np.empty((len(bench_pred), 1 + img.shape[1]), dtype=np.float32)
        X[:, 0] = bench_pred
        X[:, 1:] = img
        return X

    def fit(self, stack_train, img, y, stack_val, img_val, y_val, on_epoch=None) -> "EnsembleModel":
        self.net.fit(self.stack(stack_train, img), y, self.stack(stack_val, img_val), y_val, on_epoch=on_epoch)
        return self

    def predict(self, posts: pd.DataFrame, img: np.ndarray | None = None) -> np.ndarray:
        img = self.images.block(posts) if img is None else img
        return np.asarray(self.net.predict(self.stack(self.benchmark.predict(posts), img)), dtype=float)

    @property
    def input_fields_(self) -> list[str]:
        return self.benchmark.input_fields_


def out_of_fold(posts: pd.DataFrame, y: np.ndarray, val: pd.DataFrame, y_val: np.ndarray, cfg: XGBCfg,
                tabular: TabularCfg, seed: int, folds: int = 5) -> np.ndarray:
    """Benchmark predictions for every training row from a model that never saw that row's label."""
    from sklearn.model_selection import KFold

    if folds < 2:
        raise ValueError(f"stacking_folds={folds}: out-of-fold stacking needs at least 2 folds")
    oof = np.full(len(posts), np.nan)
    for fit_idx, hold_idx in KFold(folds, shuffle=True, random_state=seed).split(np.arange(len(posts))):
        fold_posts = posts.iloc[fit_idx].reset_index(drop=True)
        model = BenchmarkModel(cfg, tabular, seed).fit(fold_posts, y[fit_idx], val, y_val)
        oof[hold_idx] = model.predict(posts.iloc[hold_idx].reset_index(drop=True))
    return oof
