"""Stage 4: the XGBoost settings every booster of smp is made with (the benchmark, its fold models, PCA-boost):
the config, how ``auto`` settings resolve from the data (tree method, bins, threads, device), and fitting and
predicting one booster. The model classes (``smp.models``) hold no booster settings of their own.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from dataclasses import asdict, dataclass

import numpy as np
import xgboost as xgb

from smp.config import above, at_least, check, device, one_of, zero_or_at_least


@dataclass(frozen=True)
class XGBCfg:
    n_estimators: int = 2000         # paper's grid search (benchmark)
    max_depth: int = 18              # paper's grid search (benchmark)
    learning_rate: float = 0.01      # paper's grid search (benchmark)
    early_stopping_rounds: int = 100  # rounds without val improvement before stopping (0 = none)
    min_child_weight: float = 1.0    # XGBoost default
    subsample: float = 1.0           # XGBoost default
    colsample_bytree: float = 1.0    # XGBoost default
    reg_lambda: float = 1.0          # XGBoost default (L2)
    reg_alpha: float = 0.0           # XGBoost default (L1)
    tree_method: str = "auto"        # auto = from the data (see tree_settings); or exact / hist / approx
    max_bin: int = 0                 # histogram bins (hist/approx); 0 = from the data (see tree_settings)
    device: str = "auto"             # auto = cuda when XGBoost and torch see a GPU, else cpu
    n_jobs: int = 0                  # 0 = from the data: 1 thread below SINGLE_THREAD_ROWS rows, else all cores

    def __post_init__(self) -> None:
        check(self, n_estimators=at_least(1), max_depth=at_least(1), learning_rate=above(0, 1),
              early_stopping_rounds=at_least(0), min_child_weight=at_least(0), subsample=above(0, 1),
              colsample_bytree=above(0, 1), reg_lambda=at_least(0), reg_alpha=at_least(0),
              tree_method=one_of("auto", "exact", "hist", "approx"),
              max_bin=zero_or_at_least(2, "from the data"), device=device(), n_jobs=at_least(0))


# XGBoost keeps up to this many nodes' gradient histograms (features x bins x 16 bytes each) for its
# subtraction trick; the library default (65,536) lets deep trees over wide inputs hold gigabytes, and the
# trees grown are the same either way (an evicted histogram is rebuilt, not approximated). Figures:
# docs/benchmarks.md.
HIST_CACHE_NODES = 1024
# tree_method=auto: below this many training rows the exact greedy method (every distinct value a split
# candidate, as XGBoost < 2.0 chose) is faster than histograms, whose cost per node (features x bins) does
# not shrink with the node's rows: deep trees on small data are mostly tiny nodes. Exact's cost grows with
# the rows instead (crossover measured in docs/benchmarks.md).
EXACT_MAX_ROWS = 5_000
# max_bin=0: XGBoost's 256 bins from this many training rows on, 64 below (with few rows per node the extra
# bins resolve nothing, and every node's split search costs features x bins).
FULL_BINS_ROWS = 16_384
# n_jobs=0: one thread below this many training rows. Small data means thousands of tiny nodes, each a
# parallel region whose synchronisation costs more than its work (worst on a loaded machine).
SINGLE_THREAD_ROWS = 10_000


@functools.cache
def _threadpools():
    """The process's thread pools, looked up once (a fresh lookup scans the loaded libraries: ~3 ms, too much
    for every prediction); made on first use, when numpy's and scipy's BLAS are loaded."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_blas_thread():
    """A context in which numpy's BLAS runs one thread. PCA's products then sum in one order whatever the
    machine's core count or affinity: otherwise the fitted components, and through early stopping the whole
    model, depend on the core count (docs/benchmarks.md, PCA-boost)."""
    return _threadpools().limit(limits=1, user_api="blas")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this XGBoost build has CUDA and a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    if not xgb.build_info().get("USE_CUDA"):
        return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


def tree_settings(cfg: XGBCfg, n_rows: int) -> dict:
    """The tree method, bins and device a fit on ``n_rows`` training rows uses (``auto`` / 0 resolved).

    On a GPU: ``hist`` (the only GPU method) with 256 bins. On CPU: ``exact`` below ``EXACT_MAX_ROWS``
    rows, else ``hist``; bins 256 from ``FULL_BINS_ROWS`` rows on, 64 below; one thread below
    ``SINGLE_THREAD_ROWS`` rows (``n_jobs`` 0 = all cores). Explicit settings are kept as given.
    """
    device = resolve_device(cfg.device)
    gpu = device.startswith("cuda")
    method = cfg.tree_method
    if method == "auto":
        method = "hist" if gpu or n_rows >= EXACT_MAX_ROWS else "exact"
    bins = cfg.max_bin or (256 if n_rows >= FULL_BINS_ROWS or gpu else 64)
    threads = cfg.n_jobs or (1 if n_rows < SINGLE_THREAD_ROWS and not gpu else 0)
    return {"tree_method": method, "max_bin": int(bins), "device": device, "n_jobs": threads}


def make_booster(cfg: XGBCfg, seed: int, callbacks=None, early_stopping: bool = True,
                 n_rows: int = EXACT_MAX_ROWS) -> xgb.XGBRegressor:
    """An ``XGBRegressor`` configured from ``cfg`` (tree method, bins, device as ``tree_settings`` says)."""
    params = asdict(cfg)
    rounds = params.pop("early_stopping_rounds")
    params.update(tree_settings(cfg, n_rows))
    n_jobs = params.pop("n_jobs") or None
    if params["tree_method"] == "hist":
        params["max_cached_hist_node"] = HIST_CACHE_NODES
    return xgb.XGBRegressor(
        **params, objective="reg:squarederror", eval_metric="rmse",
        early_stopping_rounds=rounds if early_stopping and rounds > 0 else None,
        random_state=seed, n_jobs=n_jobs, callbacks=callbacks,
    )


def fit_booster(booster: xgb.XGBRegressor, X, y, X_val, y_val) -> xgb.XGBRegressor:
    """Fit with the validation set as the (last) eval set; callbacks are dropped afterwards."""
    booster.fit(X, y, eval_set=[(X_val, y_val)], verbose=False)
    booster.set_params(callbacks=None)  # pruning callbacks hold an Optuna trial: never pickle them
    if booster.get_params().get("device", "cpu") != "cpu":
        booster.set_params(device="cpu")  # fitted on a GPU: predict (and serve) anywhere from host memory
    return booster


def step_callbacks(on_step) -> list | None:
    """``on_step(round, val_rmse)`` as an XGBoost callback (after every round; the last eval set is val)."""
    if on_step is None:
        return None

    class OnStep(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch: int, evals_log: dict) -> bool:
            metric = list(evals_log.values())[-1]  # {"rmse": [...]} of the validation set
            on_step(epoch, float(list(metric.values())[-1][-1]))
            return False

    return [OnStep()]


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
