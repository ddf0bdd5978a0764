"""Stage 4: the ``fusion`` family's network and model (``smp.fusion`` holds its job): one network that learns
from every chosen feature group at once, on top of the stacked benchmark's prediction.

* An encoder per group: ``tabular``, ``time`` and ``user`` each through a small MLP (``encoder_hidden``); ``user``
  also reads a learnt embedding of the user (``user_embedding_dim``) for users with at least
  ``user_embedding_min_posts`` training posts, every other user (rare, unseen, no ``Uid``) sharing row 0;
  ``text`` and ``image`` each through a projection (``projection_dim``).
* A fusion layer: ``fusion="concat"`` joins the encodings (and which groups are present) into an MLP
  (``fusion_hidden``); ``"gated"`` first weighs each group's projected encoding by a learnt, per-row softmax
  over the groups present.
* A residual head, as the stacking ensembles' (``smp.nets``): the output is the benchmark's out-of-fold
  prediction plus a learnt correction whose last layer starts at zero, so the untrained net *is* its stacked
  input, and an epoch is kept only if it beats that input on validation (else the net falls back to it).

Inputs: each group's block is standardised with the training posts' mean and scale; NaN becomes 0 (the train
mean) and each group gets a missing indicator (any value of the row missing). A row whose whole group is
missing (a post without an image, without title and tags) has that group's encoding zeroed, which is what
modality dropout trains for: in training each group's encoding is zeroed with probability
``modality_dropout`` per row, and the user's embedding replaced by the shared row with the same probability,
so a request missing a group, or from an unseen user, is scored as the net learnt to. Training is the
stacking nets' loop (``smp.nets._NetRegressor``: seeded and deterministic on CPU, early stopping on
validation, ``history_``, ``best_epoch_``, the ``on_epoch`` hook). No MLflow here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from smp.config import ConfigError, at_least, check, each, one_of
from smp.features import TabularCfg
from smp.groups import FIELD_ORDER, FeaturesCfg, GroupSet, user_ids
from smp.models import ImageFeatureSource, Part
from smp.nets import _chunks, _column_stats, _NetRegressor, _standardise_, _zero_

FUSIONS = ("concat", "gated")
PROJECTED = ("text", "image")  # wide embedding blocks: one projection each, not an MLP
USER_ID = "user_id"  # the layout's last entry when users are embedded: one column of embedding rows


@dataclass(frozen=True)
class FusionCfg:
    encoder_hidden: tuple[int, ...] = (64,)   # MLP widths encoding each of tabular, time and user
    projection_dim: int = 32                  # width the text and image blocks are projected to
    fusion: str = "concat"                    # concat = [encodings, groups present] -> MLP; gated = softmax-weighted sum
    fusion_hidden: tuple[int, ...] = (64, 32)  # the fusion MLP's widths, before the zero-started output
    modality_dropout: float = 0.1             # training: chance per row and group that its encoding is zeroed
    user_embedding_min_posts: int = 3         # users with this many training posts get their own embedding row
    user_embedding_dim: int = 8               # a frequent user's embedding width; 0 = none (the aggregates alone)
    dropout: float = 0.2                      # after each hidden layer of the encoders and the fusion MLP
    lr: float = 1e-3                          # Adam's learning rate
    weight_decay: float = 1e-4                # Adam's weight decay (L2)
    epochs: int = 40                          # at most (early stopping on val RMSE)
    batch_size: int = 64                      # rows per optimiser step
    patience: int = 8                         # epochs without val RMSE improvement before stopping
    seed: int = 0                             # weights, dropout (both kinds) and shuffling

    def __post_init__(self) -> None:
        check(self, encoder_hidden=each(at_least(1)), projection_dim=at_least(1), fusion=one_of(*FUSIONS),
              fusion_hidden=each(at_least(1)),
              modality_dropout=((lambda v: 0 <= v < 1), "a fraction in [0, 1)"),
              user_embedding_min_posts=at_least(1), user_embedding_dim=at_least(0),
              dropout=((lambda v: 0 <= v < 1), "a fraction in [0, 1)"), lr=at_least(0), weight_decay=at_least(0),
              epochs=at_least(1), batch_size=at_least(2, "a number >= 2 (the loop skips a batch of one)"),
              patience=at_least(0), seed=at_least(0))
        if not self.encoder_hidden:
            raise ConfigError(f"encoder_hidden={self.encoder_hidden!r}: expected at least one width")

    @property
    def head(self) -> str:
        """Always the residual head: the family's promise is never to lose to its own benchmark on validation."""
        return "residual"


def fusion_space(trial) -> dict:
    """The Optuna search space of ``fusion`` (``smp.spaces``' convention: ``{leaf: value}``). A name shared with
    ``smp.spaces.mlp_space`` (``hidden_1``, ``batch_size``) keeps its choices, so one trial can feed both."""
    return {
        "encoder_hidden": (trial.suggest_categorical("hidden_1", [64, 128, 256, 512]),),
        "fusion_hidden": (trial.suggest_categorical("hidden_2", [16, 32, 64, 128]),),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "lr": trial.suggest_float("lr", 3e-4, 3e-3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128, 256]),
        "epochs": trial.suggest_int("epochs", 10, 60),
        # fusion's own: how often a group is hidden in training, how wide a frequent user's embedding is, and
        # the fusion layer (which one wins depends on the data's size: docs/benchmarks.md, Fusion)
        "modality_dropout": trial.suggest_float("modality_dropout", 0.0, 0.3),
        "user_embedding_dim": trial.suggest_categorical("user_embedding_dim", [0, 8, 16]),
        "fusion": trial.suggest_categorical("fusion", list(FUSIONS)),
    }


# --------------------------------------------------------------------------- the network
def _mlp(width: int, hidden: tuple[int, ...], dropout: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    return nn.Sequential(*layers), width


class FusionNet(nn.Module):
    """Encoders per group -> fusion -> benchmark + correction (module docstring).

    ``layout``: ``((group, width), ...)`` of the blocks in input order (each arrives with its missing indicator
    appended: ``width + 1`` columns); ``n_users``: embedding rows (0 = none; row 0 = rare/unseen users).
    ``forward(bench (B, 1), present (B, G), *blocks, [user rows (B,) long])`` returns ``(B,)``.
    """

    def __init__(self, layout: tuple[tuple[str, int], ...], n_users: int, cfg: FusionCfg):
        super().__init__()
        self.names = [g for g, _ in layout]
        self.p = float(cfg.modality_dropout)
        self.users = nn.Embedding(n_users, cfg.user_embedding_dim) if n_users and cfg.user_embedding_dim else None
        self.encoders = nn.ModuleDict()
        widths = []
        for g, w in layout:
            w_in = w + 1 + (cfg.user_embedding_dim if g == "user" and self.users is not None else 0)
            if g in PROJECTED:
                self.encoders[g], out = nn.Sequential(nn.Linear(w_in, cfg.projection_dim), nn.ReLU()), cfg.projection_dim
            else:
                self.encoders[g], out = _mlp(w_in, cfg.encoder_hidden, cfg.dropout)
            widths.append(out)
        self.gated = cfg.fusion == "gated"
        if self.gated:  # each encoding to one width, and a score per group for the softmax over the groups present
            self.to_common = nn.ModuleList(nn.Linear(w, cfg.projection_dim) for w in widths)
            self.score = nn.ModuleList(nn.Linear(cfg.projection_dim, 1) for _ in widths)
            fused = cfg.projection_dim
        else:
            fused = sum(widths)
        # the benchmark prediction and which groups are present join the encodings: an absent group's zeros are
        # then told apart from a present group that encodes to zero
        self.head, width = _mlp(1 + len(layout) + fused, cfg.fusion_hidden, cfg.dropout)
        self.out = nn.Linear(width, 1)
        _zero_(self.out)  # the untrained net predicts exactly its stacked input

    def forward(self, bench: torch.Tensor, present: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        blocks, rows = (rest[:-1], rest[-1]) if self.users is not None else (rest, None)
        keep = present
        if self.training and self.p > 0:
            keep = keep * (torch.rand(keep.shape, device=keep.device) >= self.p)
            if rows is not None:  # the shared row learns from every kind of user, as an unseen one will need
                rows = torch.where(torch.rand(rows.shape, device=rows.device) < self.p, torch.zeros_like(rows), rows)
        encodings = []
        for j, (g, x) in enumerate(zip(self.names, blocks)):
            if g == "user" and self.users is not None:
                x = torch.cat([x, self.users(rows)], dim=1)
            encodings.append(self.encoders[g](x) * keep[:, j:j + 1])
        if self.gated:
            common = torch.stack([f(h) for f, h in zip(self.to_common, encodings)], dim=1)  # (B, G, d)
            scores = torch.cat([s(common[:, j]) for j, s in enumerate(self.score)], dim=1)  # (B, G)
            weights = torch.softmax(scores.masked_fill(keep == 0, -1e9), dim=1) * keep  # a row with none: all 0
            fused = (weights.unsqueeze(-1) * common).sum(dim=1)
        else:
            fused = torch.cat(encodings, dim=1)
        correction = self.out(self.head(torch.cat([bench, keep, fused], dim=1))).squeeze(-1)
        return correction + bench[:, 0]


class FusionRegressor(_NetRegressor):
    """The fusion net as a regressor on ``X = [stacked prediction, block per group of layout, (user rows)]``.

    ``layout`` / ``n_users`` (``FusionNet``) are set by the model once its groups are fitted (``set_params``).
    Fitted attributes: ``mean_`` / ``scale_`` (per block column, over the training rows, NaN ignored),
    ``y_mean_`` / ``y_scale_``, ``net_``, ``history_``, ``best_epoch_``, ``input_val_rmse_``, ``best_val_rmse_``.
    """

    _cfg_cls = FusionCfg

    def __init__(self, cfg: FusionCfg = FusionCfg(), layout: tuple = (), n_users: int = 0, device: str = "cpu",
                 progress: bool = True, n_threads: int | None = 1):
        super().__init__(cfg, device, progress, n_threads)
        self.layout = layout
        self.n_users = n_users

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)  # no pickles from before heads: the base class's shim does not apply

    def _width(self) -> int:
        return sum(w for g, w in self.layout if g != USER_ID)

    def _fit_inputs(self, X, has_image):
        if not self.layout or X.shape[1] != 1 + sum(w for _, w in self.layout):
            raise ValueError(f"X has {X.shape[1]} columns; layout {self.layout!r} needs 1 + its widths "
                             "(set layout before fitting)")
        self.bench_mean_, self.bench_scale_ = self._bench_stats(X)
        self.mean_, self.scale_ = _column_stats(X[:, 1:1 + self._width()])
        return self._inputs(X, has_image)

    def _inputs(self, X, has_image):
        n = len(X)
        bench = X[:, :1].copy()
        _standardise_(bench, self.bench_mean_, self.bench_scale_)
        groups = [(g, w) for g, w in self.layout if g != USER_ID]
        present = np.empty((n, len(groups)), dtype=np.float32)
        tensors, col, off = [], 1, 0
        for j, (g, w) in enumerate(groups):
            block = np.empty((n, w + 1), dtype=np.float32)
            for s in _chunks(n):
                raw = X[s, col:col + w]
                finite = np.isfinite(raw)
                present[s, j] = finite.any(axis=1)
                block[s, w] = ~finite.all(axis=1)  # the group's missing indicator
                block[s, :w] = raw
                _standardise_(block[s, :w], self.mean_[off:off + w], self.scale_[off:off + w])
            tensors.append(torch.from_numpy(block))
            col, off = col + w, off + w
        if any(g == USER_ID for g, _ in self.layout):
            rows = np.nan_to_num(X[:, col], nan=0.0).astype(np.int64)
            rows[(rows < 0) | (rows >= max(self.n_users, 1))] = 0  # out of the table: the shared row
            tensors.append(torch.from_numpy(rows))
        return (torch.from_numpy(bench), torch.from_numpy(present), *tensors)

    def _build_net(self):
        return FusionNet(tuple((g, w) for g, w in self.layout if g != USER_ID), self.n_users, self.cfg)


# --------------------------------------------------------------------------- the model
class FusionModel:
    """The ``fusion`` family's logged model: raw posts -> the stacked benchmark's prediction, each feature
    group's block (its own ``GroupSet``, fitted on the training posts, and the image block) and the user's
    embedding row -> ``FusionRegressor``.

    ``benchmark``: the predictor the model stacks on for new posts (the benchmark run's model, or the fold
    models' mean); the net is trained on the benchmark's out-of-fold predictions (``Part.stacked``).
    """

    needs_images = True

    def __init__(self, family: str, net: FusionRegressor, benchmark, images: ImageFeatureSource | None,
                 features: FeaturesCfg, tabular: TabularCfg = TabularCfg(), seed: int = 0, split: str = "random"):
        self.family, self.net, self.benchmark = family, net, benchmark
        self.features, self.tabular, self.seed, self.split = features, tabular, seed, split
        self.images = images if features.image else None
        self.needs_images = self.images is not None

    @classmethod
    def from_job(cls, cfg, family: str, net: type | None = None, images: ImageFeatureSource | None = None,
                 benchmark=None, **_):
        """``net``: the regressor class (None: ``FusionRegressor``; the family names none, as its regressor does not
        read the ``smp.nets`` input the net families share), built from ``cfg.net`` with the split's seed."""
        return cls(family, (net or FusionRegressor)(replace(cfg.net, seed=cfg.splitting.seed)), benchmark, images,
                   cfg.feature_groups, cfg.tabular, cfg.splitting.seed, cfg.splitting.split)

    def fit(self, train: Part, val: Part, on_step=None) -> "FusionModel":
        """Fit the groups on the training posts, then the net on them and the stacked out-of-fold predictions;
        ``on_step(epoch, val_rmse)`` after every epoch."""
        if train.stacked is None or val.stacked is None:
            raise ValueError("fusion stacks on the benchmark: train and val need their stacked predictions")
        if self.images is not None and (train.images is None or val.images is None):
            raise ValueError("features with image: fusion needs the image block of train and val")
        y = np.asarray(train.y, dtype=float)
        self.groups_ = GroupSet(self.features.without_image(), self.tabular, self.seed, self.split)
        table = self.groups_.fit_transform(train.rows, y)  # user: out-of-fold on the training posts
        self.users_ = self._frequent_users(train.rows)
        layout = [(g.name, len(g.feature_names_)) for g in self.groups_.groups_]
        if self.images is not None:
            layout.append(("image", train.images.shape[1]))
        if self.users_ is not None:
            layout.append((USER_ID, 1))
        self.net.set_params(layout=tuple(layout), n_users=0 if self.users_ is None else len(self.users_) + 1)
        X = self._matrix(train.rows, train.stacked, table, train.images)
        del table
        X_val = self._matrix(val.rows, val.stacked, self.groups_.transform(val.rows), val.images)
        hook = None if on_step is None else (lambda epoch, train_loss, val_rmse: on_step(epoch, val_rmse))
        self.net.fit(X, y, X_val, val.y, on_epoch=hook)
        return self

    def _frequent_users(self, posts: pd.DataFrame) -> dict[str, int] | None:
        """``{Uid: embedding row}`` (from 1) of the users with ``user_embedding_min_posts`` training posts; None
        without the user group or the embedding."""
        cfg = self.net.cfg
        if "user" not in self.features.groups or not cfg.user_embedding_dim:
            return None
        counts = pd.Series([u for u in user_ids(posts) if u is not None], dtype=object).value_counts()
        frequent = sorted(counts.index[counts >= cfg.user_embedding_min_posts])
        return {u: i + 1 for i, u in enumerate(frequent)}

    def _matrix(self, posts: pd.DataFrame, stacked, table: np.ndarray, img: np.ndarray | None) -> np.ndarray:
        """``[stacked, table groups, image block, user row]`` as the regressor reads it."""
        parts = [np.asarray(stacked, dtype=np.float32).reshape(-1, 1), np.asarray(table, dtype=np.float32)]
        if self.images is not None:
            parts.append(np.asarray(img, dtype=np.float32))
        if getattr(self, "users_", None) is not None:
            rows = [self.users_.get(u, 0) if u is not None else 0 for u in user_ids(posts)]
            parts.append(np.asarray(rows, dtype=np.float32).reshape(-1, 1))
        return np.hstack(parts)

    def predict_stacked(self, posts: pd.DataFrame, stacked, img: np.ndarray | None = None) -> np.ndarray:
        """Predictions for ``posts`` given the benchmark's prediction for them (``stacked``) and their image
        block (``img``; computed from the posts when None and the model reads images)."""
        if self.images is not None and img is None:
            img = self.images.block(posts)
        X = self._matrix(posts, stacked, self.groups_.transform(posts), img)
        return np.asarray(self.net.predict(X), dtype=float)

    def predict(self, posts: pd.DataFrame, img: np.ndarray | None = None) -> np.ndarray:
        """Predicted popularity for raw posts (``img``: their image block, when already at hand)."""
        return self.predict_stacked(posts, self.benchmark.predict(posts), img)

    @property
    def input_fields_(self) -> list[str]:
        fields = {*self.groups_.fields, *self.benchmark.input_fields_}
        return [f for f in FIELD_ORDER if f in fields]

    @property
    def groups_in_use(self) -> GroupSet | None:
        """The model's own fitted feature groups (the benchmark it stacks on reads the same ones)."""
        return getattr(self, "groups_", None)

    @property
    def facts_(self) -> dict[str, object]:
        """What the groups learnt (as run params) and how many users have an embedding row of their own."""
        users = getattr(self, "users_", None)
        return {**self.groups_.facts_, "fusion/users_embedded": 0 if users is None else len(users)}

    @property
    def tables_(self) -> dict[str, dict]:
        """Artifacts for the run: each group's input width (``fusion_inputs.json``)."""
        return {"fusion_inputs.json": {g: w for g, w in self.net.layout}}

    def benchmark_facts(self) -> dict[str, object]:
        """What the stacked benchmark's feature groups learnt (its run logs them too)."""
        return dict(getattr(self.benchmark, "facts_", None) or {})
