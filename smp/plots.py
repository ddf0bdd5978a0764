"""Stage 5: figures (matplotlib, Agg backend); each function returns a Figure."""

from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def pred_vs_actual(y_true, y_pred, title: str = "Predicted vs actual"):
    """Scatter of predicted against actual popularity with the identity line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y_true, y_pred, s=4, alpha=0.3)
    lo = float(min(np.min(y_true), np.min(y_pred)))
    hi = float(max(np.max(y_true), np.max(y_pred)))
    ax.plot([lo, hi], [lo, hi], "r--", lw=1, label="identity")
    ax.set(xlabel="actual popularity", ylabel="predicted popularity", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def error_hist(y_true, y_pred, title: str = "Error distribution"):
    """Histogram of prediction errors (prediction minus truth)."""
    plt = _plt()
    err = np.asarray(y_pred, dtype=float) - np.asarray(y_true, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(err, bins=60, color="steelblue")
    ax.axvline(0, color="k", lw=1)
    ax.set(xlabel="prediction - actual", ylabel="posts",
           title=f"{title} (mean {err.mean():.3f}, var {err.var():.3f})")
    fig.tight_layout()
    return fig


def feature_importance(names, values, top: int = 30, title: str = "Feature importance (gain)"):
    """Horizontal bar chart of the ``top`` most important features."""
    plt = _plt()
    values = np.asarray(values, dtype=float)
    order = np.argsort(values)[::-1][:top][::-1]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.25 * len(order) + 1)))
    ax.barh([names[i] for i in order], values[order])
    ax.set(title=title, xlabel="importance")
    fig.tight_layout()
    return fig


def explained_variance(ratios, title: str = "PCA explained variance"):
    """Cumulative explained-variance curve of a fitted PCA."""
    plt = _plt()
    cum = np.cumsum(ratios)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(cum) + 1), cum)
    ax.set(xlabel="components", ylabel="cumulative explained variance", title=title, ylim=(0, 1.01))
    fig.tight_layout()
    return fig


def training_curve(history, title: str = "Training"):
    """Per-epoch train loss and validation RMSE."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [np.sqrt(h["train_loss"]) for h in history], label="sqrt(train loss)")
    ax.plot(ep, [h["val_rmse"] for h in history], label="val RMSE")
    ax.set(xlabel="epoch", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def compare_bars(table, metric: str = "test_rmse", title: str = "Test RMSE by model"):
    """Bar chart of one metric per model, with the paper's figure where known."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(table))
    ax.bar(x - 0.2, table[metric], width=0.4, label="this run")
    if "paper_rmse" in table.columns and metric == "test_rmse":
        ax.bar(x + 0.2, table["paper_rmse"].astype(float), width=0.4, label="paper")
    ax.set_xticks(x, table["model"], rotation=20)
    ax.set(ylabel=metric, title=title)
    ax.legend()
    fig.tight_layout()
    return fig
