"""Stage 5: figures (matplotlib, Agg backend); each function returns a Figure."""

from __future__ import annotations

import numpy as np

from smp.config import sig


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


def training_curve(history, title: str = "Training", best_epoch: int | None = None,
                   input_rmse: float | None = None):
    """Per-epoch curves as logged: ``train_loss`` (MSE) above ``val_rmse_epoch`` (RMSE), one panel each.

    The panels plot the same numbers as the run's metric charts (no square root), each axis in its own
    units; ``best_epoch`` (the kept weights) is marked on both, and ``input_rmse`` (the stacked
    benchmark's val RMSE, what the net must beat) is drawn on the RMSE panel.  ``best_epoch=0`` means no
    epoch beat the input and the net kept it (residual head).
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig, (loss_ax, rmse_ax) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)  # epochs line up
    loss_ax.plot(ep, [h["train_loss"] for h in history], "o-", ms=3, color="tab:blue", label="train_loss")
    loss_ax.set(xlabel="epoch", ylabel="train_loss: MSE (popularity score²)", title="train_loss (MSE, dropout on)")
    rmse_ax.plot(ep, [h["val_rmse"] for h in history], "o-", ms=3, color="tab:orange", label="val_rmse_epoch")
    rmse_ax.set(xlabel="epoch", ylabel="val_rmse_epoch: RMSE (popularity score)", title="val_rmse_epoch (RMSE)")
    if input_rmse is not None and np.isfinite(input_rmse):
        rmse_ax.axhline(input_rmse, color="grey", ls=":", lw=1, label=f"stacked input {sig(input_rmse)}")
    if best_epoch is not None:
        kept = next((h for h in history if h["epoch"] == best_epoch), None)
        label = (f"best epoch {best_epoch}" + (f" (val RMSE {sig(kept['val_rmse'])})" if kept else "")
                 if best_epoch > 0 else "best epoch 0: no epoch beat the input, input kept")
        for ax in (loss_ax, rmse_ax):
            ax.axvline(best_epoch, color="green", ls="--", lw=1, label=label)
    for ax in (loss_ax, rmse_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelbottom=True)  # epoch numbers under both panels
        ax.legend(fontsize="small")
    fig.suptitle(title)
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
