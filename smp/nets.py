"""The paper's two neural stacking ensembles (models 3 and 4) as regressors.

Input convention, shared by both: ``X`` is a float array ``(n, 1 + k)`` whose
column 0 is the benchmark XGBoost prediction for the row (use out-of-fold
predictions on the training rows, or the labels leak) and whose columns 1..k are
the image features (CLIP vector, handcrafted features, ...), NaN for rows
without an image.  ``has_image`` may be passed as a separate boolean array;
otherwise a row has an image when all its image columns are finite.

The network never sees a NaN: image columns are standardised with the mean and
scale of the *training rows that have an image*, rows without an image get the
train mean (0 after standardisation; a stray NaN in a row with an image gets it
too) and the network gets a ``has_image`` indicator as an extra input.  A row
without an image therefore still gets a finite prediction, driven by the
benchmark prediction and the indicator.  The target is standardised for
training; ``train_loss`` and ``val_rmse`` are reported in the label's units.

Heads: ``head="residual"`` (default) predicts the benchmark prediction plus a
learnt correction whose output layer starts at zero, so the untrained net *is*
its stacked input; ``head="paper"`` is the paper's plain output.  Training is
seeded and deterministic on CPU (two fits with the same config give identical
predictions), keeps the epoch with the lowest validation RMSE and stops early
after ``patience`` epochs without improvement.  Epochs count from 1 in
``history_``, ``best_epoch_`` and the ``on_epoch`` callback; with the residual
head epoch 0 (the stacked input itself) competes too, so a net that never beats
its input on validation falls back to it (``best_epoch_ == 0``).
``input_val_rmse_`` (the stacked input's validation RMSE), ``best_val_rmse_``
and ``beats_input_`` report the check for either head.

Both regressors pickle (cloudpickle too): the logged model is the pickled ensemble.
A regressor is made from settings with ``Regressor.from_settings(**values)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.decomposition import PCA
from torch import nn
from tqdm.auto import tqdm

from smp.config import ConfigError, at_least, check, each, one_of, parse_tuple

OnEpoch = Callable[[int, float, float], None]  # (epoch, train_loss, val_rmse) -> None

_CHUNK = 8192  # rows per chunk for statistics, transforms and inference


@dataclass(frozen=True)
class MLPCfg:
    hidden: tuple[int, ...] = (128, 64)  # paper: FC 128 -> FC 64 (grid search)
    dropout: float = 0.5                 # paper: dropout 0.5 after each hidden layer
    lr: float = 5e-4                     # paper: Adam, fixed learning rate
    weight_decay: float = 0.0            # paper: none
    epochs: int = 30                     # paper: 30 epochs
    batch_size: int = 32                 # paper: batch size 32
    patience: int = 10                   # epochs without val RMSE improvement before stopping
    head: str = "residual"               # residual = benchmark + learnt correction (starts at 0); paper = plain
    seed: int = 0                        # weights, dropout and shuffling

    def __post_init__(self) -> None:
        check(self, hidden=each(at_least(1)), dropout=((lambda v: 0 <= v < 1), "a fraction in [0, 1)"), lr=at_least(0),
              weight_decay=at_least(0), epochs=at_least(1), batch_size=at_least(1), patience=at_least(0),
              head=one_of("residual", "paper"), seed=at_least(0))


@dataclass(frozen=True)
class Conv1DCfg:
    n_pca: int = 20                          # paper: image features -> PCA 20 dims
    channels: tuple[int, ...] = (16, 32)     # Conv1d output channels, one per layer
    kernel_sizes: tuple[int, ...] = (3, 3)   # one per conv layer, odd ("same" padding)
    dropout: float = 0.75                    # paper: dropout 0.75 after the conv stack
    head_hidden: tuple[int, ...] = (32,)     # MLP head after concatenating the benchmark prediction
    lr: float = 1e-4                         # paper: Adam, learning rate 1e-4
    weight_decay: float = 1e-4               # paper: "with weight decay"
    epochs: int = 20                         # paper: 20 epochs
    batch_size: int = 32                     # paper: batch size 32
    patience: int = 10                       # epochs without val RMSE improvement before stopping
    head: str = "residual"                   # residual = benchmark + learnt correction (starts at 0); paper = plain
    seed: int = 0                            # weights, dropout, shuffling and PCA

    def __post_init__(self) -> None:
        check(self, n_pca=at_least(1), channels=each(at_least(1)), head_hidden=each(at_least(1)),
              kernel_sizes=each(((lambda k: k >= 1 and k % 2 == 1), "odd and >= 1")), dropout=((lambda v: 0 <= v < 1), "a fraction in [0, 1)"), lr=at_least(0),
              weight_decay=at_least(0), epochs=at_least(1), batch_size=at_least(1), patience=at_least(0),
              head=one_of("residual", "paper"), seed=at_least(0))
        if not self.channels or len(self.kernel_sizes) != len(self.channels):
            raise ConfigError(f"channels={self.channels!r}, kernel_sizes={self.kernel_sizes!r}: expected one odd "
                              "kernel size per conv layer (at least one layer)")


# ---------------------------------------------------------------- networks

HEADS = ("residual", "paper")


def _zero_(layer: nn.Linear) -> None:
    """Start a residual head's output layer at zero (the net's first prediction is its input)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)



class EnsembleMLP(nn.Module):
    """Paper model 3: [FC -> BatchNorm -> ReLU -> Dropout] per hidden width -> FC 1.

    Input ``(B, n_in)``: standardised benchmark prediction, image features and
    the has_image indicator.  Returns ``(B,)``.  ``residual=True`` (not the
    paper's) adds input column 0 (the benchmark prediction, in the target's
    standardised units) to the output, whose last layer starts at zero: the
    untrained net predicts exactly the benchmark and learns a correction.
    """

    def __init__(self, n_in: int, hidden: tuple[int, ...] = (128, 64), dropout: float = 0.5,
                 residual: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)
        self.residual = residual
        if residual:
            _zero_(layers[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x).squeeze(-1)
        return out + x[:, 0] if self.residual else out


class EnsembleConv1D(nn.Module):
    """Paper model 4: the image PCA vector as a 1-channel sequence through a Conv1d stack.

    Each conv ("same" padding) -> BatchNorm1d -> ReLU; then flatten -> Dropout,
    concatenate the side inputs (standardised benchmark prediction, has_image)
    and an MLP head (Linear -> ReLU per ``head_hidden``) -> 1.
    ``forward(z (B, n_pca), side (B, n_side))`` returns ``(B,)``.  ``residual``
    as in :class:`EnsembleMLP` (side column 0 is the benchmark prediction).
    """

    def __init__(self, n_pca: int = 20, n_side: int = 2, channels: tuple[int, ...] = (16, 32),
                 kernel_sizes: tuple[int, ...] = (3, 3), dropout: float = 0.75,
                 head_hidden: tuple[int, ...] = (32,), residual: bool = False):
        super().__init__()
        if len(channels) != len(kernel_sizes):
            raise ValueError(f"channels {channels} and kernel_sizes {kernel_sizes} differ in length")
        convs: list[nn.Module] = []
        c_in = 1
        for c_out, k in zip(channels, kernel_sizes):
            convs += [nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.BatchNorm1d(c_out), nn.ReLU()]
            c_in = c_out
        self.convs = nn.Sequential(*convs, nn.Flatten(), nn.Dropout(dropout))
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(2, 1, n_pca)).shape[1]
        head: list[nn.Module] = []
        width = n_flat + n_side
        for h in head_hidden:
            head += [nn.Linear(width, h), nn.ReLU()]
            width = h
        head.append(nn.Linear(width, 1))
        self.head = nn.Sequential(*head)
        self.residual = residual
        if residual:
            _zero_(head[-1])

    def forward(self, z: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        feats = self.convs(z.unsqueeze(1))
        out = self.head(torch.cat([feats, side], dim=1)).squeeze(-1)
        return out + side[:, 0] if self.residual else out


# ---------------------------------------------------------------- input handling


def _chunks(n: int, size: int = _CHUNK) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def split_inputs(X, has_image=None) -> tuple[np.ndarray, np.ndarray]:
    """``X`` as a 2-D float32 array (no copy when it already is one) and the boolean has_image mask."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] < 1:
        raise ValueError(f"X must be 2-D (n, 1 + k) with the benchmark prediction in column 0, got {X.shape}")
    if has_image is None:
        mask = np.empty(len(X), dtype=bool)
        for s in _chunks(len(X)):
            mask[s] = np.isfinite(X[s, 1:]).all(axis=1)
    else:
        mask = np.asarray(has_image, dtype=bool).ravel()
        if len(mask) != len(X):
            raise ValueError(f"has_image has {len(mask)} rows, X has {len(X)}")
    return X, mask


def _column_stats(X: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NaN-ignoring column mean and standard deviation (float64 accumulation, two passes, chunked).

    ``rows`` (boolean) restricts the statistics to some rows.  A column without
    finite values gets mean 0; a constant or empty column gets scale 1.
    """
    d = X.shape[1]
    total, count = np.zeros(d), np.zeros(d)
    for s in _chunks(len(X)):
        block = X[s] if rows is None else X[s][rows[s]]
        finite = np.isfinite(block)
        total += np.where(finite, block, 0).sum(axis=0, dtype=np.float64)
        count += finite.sum(axis=0)
    mean = np.divide(total, count, out=np.zeros(d), where=count > 0)
    sq = np.zeros(d)
    for s in _chunks(len(X)):
        block = X[s] if rows is None else X[s][rows[s]]
        dev = block.astype(np.float64) - mean
        sq += np.where(np.isfinite(dev), dev * dev, 0).sum(axis=0)
    std = np.sqrt(np.divide(sq, count, out=np.zeros(d), where=count > 0))
    scale = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


def _standardise_(block: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """In place: ``(block - mean) / scale``, NaN/inf -> 0 (the train mean)."""
    block -= mean
    block /= scale
    np.copyto(block, 0.0, where=~np.isfinite(block))
    return block


# ---------------------------------------------------------------- training machinery


@contextlib.contextmanager
def _torch_scope(seed: int | None, n_threads: int | None, device: str):
    """Seeded, deterministic torch for the duration of a fit/predict; global state restored after.

    The global RNG is forked (so the caller's random stream is untouched), the
    deterministic-algorithms flag and the intra-op thread count are put back.
    """
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    with torch.random.fork_rng(devices=[dev.index or 0] if cuda else []):
        try:
            if seed is not None:
                torch.manual_seed(seed)
            torch.use_deterministic_algorithms(True, warn_only=cuda)
            if n_threads:
                torch.set_num_threads(n_threads)
            yield
        finally:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            torch.set_num_threads(threads)


def _make_cfg(cfg_cls, values: dict):
    tuples = {f.name for f in fields(cfg_cls) if "tuple" in str(f.type)}
    return cfg_cls(**{k: parse_tuple(v) if k in tuples else v for k, v in values.items()})


class _NetRegressor(RegressorMixin, BaseEstimator):
    """Shared fit/predict loop; subclasses supply preprocessing and the network."""

    _cfg_cls: type

    def __init__(self, cfg, device: str = "cpu", progress: bool = True, n_threads: int | None = 1):
        self.cfg = cfg
        self.device = device
        self.progress = progress
        self.n_threads = n_threads  # intra-op threads while fitting/predicting; None = leave torch's setting

    @classmethod
    def from_settings(cls, **values) -> "_NetRegressor":
        """An unfitted regressor: values naming a field of its config go to the config (tuple fields also
        accept lists or "128,64" strings); ``device``, ``progress`` and ``n_threads`` go to the regressor."""
        init_keys = {"device", "progress", "n_threads"}
        cfg_values = {k: v for k, v in values.items() if k not in init_keys}
        unknown = set(cfg_values) - {f.name for f in fields(cls._cfg_cls)}
        if unknown:
            raise TypeError(f"unknown {cls._cfg_cls.__name__} fields: {sorted(unknown)}")
        return cls(_make_cfg(cls._cfg_cls, cfg_values), **{k: v for k, v in values.items() if k in init_keys})

    # subclass hooks -------------------------------------------------------
    def _fit_inputs(self, X: np.ndarray, has_image: np.ndarray) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _inputs(self, X: np.ndarray, has_image: np.ndarray) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _build_net(self) -> nn.Module:
        raise NotImplementedError

    # public API -----------------------------------------------------------
    def fit(self, X, y, X_val=None, y_val=None, on_epoch: OnEpoch | None = None, *,
            has_image=None, has_image_val=None):
        """Train on (X, y), early-stop on (X_val, y_val); returns ``self``.

        ``train_loss`` is the epoch's mean training MSE (dropout on) and
        ``val_rmse`` the validation RMSE, both in the label's units.
        ``on_epoch(epoch, train_loss, val_rmse)`` runs after every epoch, once
        the epoch is recorded in ``history_``; an exception it raises (e.g.
        ``optuna.TrialPruned``) propagates, leaving a usable model with the
        best weights so far.  Without a validation set all epochs run,
        ``val_rmse`` is NaN and the last epoch is kept.
        """
        cfg = self.cfg
        X, has_image = split_inputs(X, has_image)
        y = np.asarray(y, dtype=np.float64).ravel()
        if len(y) != len(X):
            raise ValueError(f"y has {len(y)} rows, X has {len(X)}")
        if cfg.head not in HEADS:
            raise ValueError(f"head={cfg.head!r}: expected one of {HEADS}")
        self.n_features_in_ = X.shape[1]
        self.y_mean_ = float(y.mean())
        self.y_scale_ = float(y.std()) if y.std() > 1e-12 else 1.0
        device = torch.device(self.device)
        self.history_: list[dict] = []
        self.best_epoch_ = 0
        self.input_val_rmse_ = math.nan  # val RMSE of the stacked input (column 0) alone

        with _torch_scope(cfg.seed, self.n_threads, self.device):
            train = tuple(t.to(device) for t in self._fit_inputs(X, has_image))
            y_t = torch.from_numpy(((y - self.y_mean_) / self.y_scale_).astype(np.float32)).to(device)
            val = None
            if X_val is not None:
                X_val, mask_val = split_inputs(X_val, has_image_val)
                val = tuple(t.to(device) for t in self._inputs(X_val, mask_val))
                y_val = np.asarray(y_val, dtype=np.float64).ravel()
                self.input_val_rmse_ = float(np.sqrt(np.mean((X_val[:, 0].astype(np.float64) - y_val) ** 2)))
            self.net_ = net = self._build_net().to(device)
            opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   **({"fused": True} if device.type == "cpu" else {}))
            gen = torch.Generator().manual_seed(cfg.seed)
            n, bs = len(y_t), cfg.batch_size
            best_rmse, best_state = math.inf, None
            if val is not None and cfg.head == "residual":
                # epoch 0 = the untrained residual net = the stacked input itself: an epoch is kept only if it
                # beats that on validation, so the net falls back to its input rather than doing worse
                best_rmse = float(np.sqrt(np.mean((self._predict_inputs(val) - y_val) ** 2)))
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            bar = tqdm(range(1, cfg.epochs + 1), desc=type(self).__name__, unit="epoch", disable=not self.progress)
            try:
                for epoch in bar:
                    net.train()
                    perm = torch.randperm(n, generator=gen).to(device)
                    loss_sum, seen = torch.zeros((), device=device), 0
                    for start in range(0, n, bs):
                        idx = perm[start:start + bs]
                        if len(idx) < 2:  # BatchNorm cannot train on a single row
                            continue
                        loss = nn.functional.mse_loss(net(*(t[idx] for t in train)), y_t[idx])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        loss_sum += loss.detach() * len(idx)
                        seen += len(idx)
                    train_loss = float(loss_sum) / max(seen, 1) * self.y_scale_ ** 2
                    val_rmse = math.nan
                    if val is not None:
                        val_rmse = float(np.sqrt(np.mean((self._predict_inputs(val) - y_val) ** 2)))
                    self.history_.append({"epoch": epoch, "train_loss": train_loss, "val_rmse": val_rmse})
                    if val is None or val_rmse < best_rmse:
                        best_rmse, self.best_epoch_ = val_rmse, epoch
                        best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                    bar.set_postfix(train_loss=f"{train_loss:.4f}", val_rmse=f"{val_rmse:.4f}")
                    if on_epoch is not None:
                        on_epoch(epoch, train_loss, val_rmse)
                    if val is not None and epoch - self.best_epoch_ >= cfg.patience:
                        break
            finally:
                bar.close()
                if best_state is not None:
                    net.load_state_dict(best_state)
                net.eval()
        self.best_val_rmse_ = best_rmse if val is not None else math.nan
        return self

    @property
    def beats_input_(self) -> bool | None:
        """Whether the kept epoch's val RMSE is below the stacked input's (None without a validation set).

        With ``head="residual"``, False means ``best_epoch_ == 0``: the net fell back to its input.
        """
        if not math.isfinite(getattr(self, "best_val_rmse_", math.nan)):
            return None
        return bool(self.best_val_rmse_ < self.input_val_rmse_)

    def __setstate__(self, state: dict) -> None:
        cfg = state.get("cfg")
        if cfg is not None and "head" not in vars(cfg):  # pickled before heads existed: the paper's
            object.__setattr__(cfg, "head", "paper")
        self.__dict__.update(state)

    def predict(self, X, has_image=None) -> np.ndarray:
        """Predicted labels, float64 ``(n,)``; finite for every row with a finite benchmark prediction."""
        self._check_fitted()
        X, mask = split_inputs(X, has_image)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} columns, the model was fitted on {self.n_features_in_}")
        with _torch_scope(None, self.n_threads, self.device):
            inputs = tuple(t.to(torch.device(self.device)) for t in self._inputs(X, mask))
            return self._predict_inputs(inputs)

    # internals ------------------------------------------------------------
    def _bench_stats(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """How column 0 (the benchmark prediction) is standardised: with the target's mean and scale for a
        residual head (so the net's input is the benchmark in the units it predicts), else its own."""
        if self.cfg.head == "residual":
            return np.array([self.y_mean_], np.float32), np.array([self.y_scale_], np.float32)
        return _column_stats(X[:, :1])

    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted yet; call fit() first")

    def _predict_inputs(self, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        net = self.net_
        was_training = net.training
        net.eval()
        out = []
        with torch.inference_mode():
            for s in _chunks(len(inputs[0])):
                out.append(net(*(t[s] for t in inputs)).double().cpu().numpy())
        net.train(was_training)
        pred = np.concatenate(out) if out else np.empty(0)
        return pred * self.y_scale_ + self.y_mean_


class MLPRegressor(_NetRegressor):
    """Paper model 3, the ensemble MLP on [benchmark prediction, image features, has_image].

    Fitted attributes: ``mean_`` / ``scale_`` (per column of X; image columns
    over train rows with an image), ``y_mean_`` / ``y_scale_``, ``net_``
    (:class:`EnsembleMLP`), ``history_``, ``best_epoch_``.
    """

    _cfg_cls = MLPCfg

    def __init__(self, cfg: MLPCfg = MLPCfg(), device: str = "cpu", progress: bool = True,
                 n_threads: int | None = 1):
        super().__init__(cfg, device, progress, n_threads)

    def _fit_inputs(self, X, has_image):
        bench_mean, bench_scale = self._bench_stats(X)
        img_mean, img_scale = _column_stats(X[:, 1:], has_image)
        self.mean_ = np.concatenate([bench_mean, img_mean])
        self.scale_ = np.concatenate([bench_scale, img_scale])
        return self._inputs(X, has_image)

    def _inputs(self, X, has_image):
        n, d = X.shape
        out = np.empty((n, d + 1), dtype=np.float32)  # the one copy of the wide block
        for s in _chunks(n):
            out[s, :d] = X[s]
            _standardise_(out[s, :d], self.mean_, self.scale_)
        out[~has_image, 1:d] = 0.0
        out[:, d] = has_image
        return (torch.from_numpy(out),)

    def _build_net(self):
        return EnsembleMLP(self.n_features_in_ + 1, self.cfg.hidden, self.cfg.dropout, self.cfg.head == "residual")


class Conv1DRegressor(_NetRegressor):
    """Paper model 4, the ensemble Conv1D: image features -> PCA(n_pca) -> Conv1d stack, + benchmark.

    ``fit`` standardises the image columns and fits ``pca_`` (sklearn PCA) on
    the train rows with an image; rows without one get the zero PCA vector.
    The standardised benchmark prediction and has_image join after the conv
    stack.  Fitted attributes: ``mean_`` / ``scale_`` (per column of X),
    ``pca_``, ``y_mean_`` / ``y_scale_``, ``net_`` (:class:`EnsembleConv1D`),
    ``history_``, ``best_epoch_``.
    """

    _cfg_cls = Conv1DCfg
    def __init__(self, cfg: Conv1DCfg = Conv1DCfg(), device: str = "cpu", progress: bool = True,
                 n_threads: int | None = 1):
        super().__init__(cfg, device, progress, n_threads)

    def _fit_inputs(self, X, has_image):
        n_pca, n_img = self.cfg.n_pca, int(has_image.sum())
        if n_pca > min(n_img, X.shape[1] - 1):
            raise ValueError(f"n_pca={n_pca} needs at least that many image columns ({X.shape[1] - 1}) "
                             f"and training rows with an image ({n_img})")
        bench_mean, bench_scale = self._bench_stats(X)
        img_mean, img_scale = _column_stats(X[:, 1:], has_image)
        self.mean_ = np.concatenate([bench_mean, img_mean])
        self.scale_ = np.concatenate([bench_scale, img_scale])
        Z = _standardise_(X[has_image, 1:], img_mean, img_scale)  # fancy indexing: one copy
        self.pca_ = PCA(n_components=n_pca, random_state=self.cfg.seed).fit(Z)
        self.pca_components_ = self.pca_.components_.astype(np.float32)  # float32 copies for the projection
        self.pca_mean_ = self.pca_.mean_.astype(np.float32)
        del Z
        return self._inputs(X, has_image)

    def _inputs(self, X, has_image):
        n = len(X)
        z = np.zeros((n, self.cfg.n_pca), dtype=np.float32)
        rows = np.flatnonzero(has_image)
        img_mean, img_scale = self.mean_[1:], self.scale_[1:]
        for s in _chunks(len(rows)):
            block = _standardise_(X[rows[s], 1:], img_mean, img_scale)
            block -= self.pca_mean_
            z[rows[s]] = block @ self.pca_components_.T
        side = np.empty((n, 2), dtype=np.float32)
        side[:, 0] = X[:, 0]
        _standardise_(side[:, :1], self.mean_[:1], self.scale_[:1])
        side[:, 1] = has_image
        return torch.from_numpy(z), torch.from_numpy(side)

    def _build_net(self):
        c = self.cfg
        return EnsembleConv1D(c.n_pca, 2, c.channels, c.kernel_sizes, c.dropout, c.head_hidden, c.head == "residual")
