"""Stage 4: the Optuna search space of each model family (``Family.space``): ``space(trial) -> {leaf: value}``,
where a leaf names a field of the family's job config (``smp.config.leaves``). Plain functions of a trial: this
module imports nothing.
"""

from __future__ import annotations


def xgb_space(trial) -> dict:
    return {
        "max_depth": trial.suggest_int("max_depth", 3, 18),
        "learning_rate": trial.suggest_float("learning_rate", 0.005, 0.3, log=True),
        "n_estimators": trial.suggest_int("n_estimators", 200, 3000, step=100),
        "min_child_weight": trial.suggest_float("min_child_weight", 1.0, 50.0, log=True),
        "subsample": trial.suggest_float("subsample", 0.5, 1.0),
        "colsample_bytree": trial.suggest_float("colsample_bytree", 0.3, 1.0),
        "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 10.0, log=True),
        "reg_alpha": trial.suggest_float("reg_alpha", 1e-3, 10.0, log=True),
    }


def pca_boost_space(trial) -> dict:
    return {**xgb_space(trial), "n_components": trial.suggest_int("n_components", 20, 400, log=True)}


def mlp_space(trial) -> dict:
    return {
        "hidden": (trial.suggest_categorical("hidden_1", [64, 128, 256, 512]),
                   trial.suggest_categorical("hidden_2", [16, 32, 64, 128])),
        "dropout": trial.suggest_float("dropout", 0.0, 0.7),
        "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128, 256]),
        "epochs": trial.suggest_int("epochs", 10, 50),
    }


def conv1d_space(trial) -> dict:
    return {
        "n_pca": trial.suggest_int("n_pca", 8, 40),
        "channels": (trial.suggest_categorical("channels_1", [8, 16, 32]),
                     trial.suggest_categorical("channels_2", [16, 32, 64])),
        "kernel_sizes": (trial.suggest_categorical("kernel_1", [3, 5]),) * 2,
        "dropout": trial.suggest_float("dropout", 0.3, 0.85),
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128, 256]),
        "epochs": trial.suggest_int("epochs", 10, 40),
    }
