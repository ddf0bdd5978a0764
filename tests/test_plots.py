"""Figures show what the run logs: the training curve's panels are the logged metrics, in their units."""

from __future__ import annotations

import numpy as np
import pytest

from smp.plots import training_curve

HISTORY = [{"epoch": 1, "train_loss": 4.0, "val_rmse": 1.9},
           {"epoch": 2, "train_loss": 2.25, "val_rmse": 1.7},
           {"epoch": 3, "train_loss": 1.44, "val_rmse": 1.8}]


def _lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_training_curve_plots_the_logged_mse_and_rmse_and_marks_the_best_epoch():
    fig = training_curve(HISTORY, "ensemble_mlp", best_epoch=2, input_rmse=1.75)
    loss_ax, rmse_ax = fig.axes
    # the train panel is train_loss as logged (MSE), not its square root; the val panel is val_rmse_epoch
    train = _lines(loss_ax)["train_loss"]
    assert list(train.get_xdata()) == [1, 2, 3]
    assert list(train.get_ydata()) == [4.0, 2.25, 1.44]
    assert list(_lines(rmse_ax)["val_rmse_epoch"].get_ydata()) == [1.9, 1.7, 1.8]
    # each axis says what it is and in which units
    assert loss_ax.get_xlabel() == rmse_ax.get_xlabel() == "epoch"
    assert "MSE" in loss_ax.get_ylabel() and "train_loss" in loss_ax.get_ylabel()
    assert "RMSE" in rmse_ax.get_ylabel() and "val_rmse_epoch" in rmse_ax.get_ylabel()
    # the best epoch is marked on both panels, with its val RMSE; the stacked input is the line to beat
    for ax in (loss_ax, rmse_ax):
        (best,) = [line for label, line in _lines(ax).items() if label.startswith("best epoch")]
        assert list(best.get_xdata()) == [2, 2]
    assert "best epoch 2 (val RMSE 1.7)" in _lines(rmse_ax)
    assert list(_lines(rmse_ax)["stacked input 1.75"].get_ydata()) == [1.75, 1.75]
    # epochs are whole numbers on the axis
    assert all(float(t).is_integer() for t in loss_ax.get_xticks())
    assert fig._suptitle.get_text() == "ensemble_mlp"


def test_training_curve_says_when_the_net_kept_its_input():
    fig = training_curve(HISTORY, best_epoch=0, input_rmse=1.5)
    labels = [line.get_label() for line in fig.axes[1].get_lines()]
    assert any(label.startswith("best epoch 0") and "input kept" in label for label in labels)


def test_training_curve_without_validation_draws_no_input_line():
    history = [{**h, "val_rmse": float("nan")} for h in HISTORY]
    fig = training_curve(history, best_epoch=3, input_rmse=float("nan"))
    assert not any(line.get_label().startswith("stacked input") for line in fig.axes[1].get_lines())
    assert np.isnan(_lines(fig.axes[1])["val_rmse_epoch"].get_ydata()).all()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
