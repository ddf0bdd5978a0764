"""Settings that cannot mean anything are refused before any data loads or any run starts (issue 26, "Jobs and
bad settings"), naming the parameter, the value and what is allowed; a model that learnt nothing says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from smp.boosters import XGBCfg
from smp.cli import main
from smp.config import ConfigError
from smp.data import DataCfg
from smp.splits import SplitCfg
from smp.train import BenchmarkJob, run_benchmark

ROOT = Path(__file__).resolve().parents[1]

# flag, value, the message's tail (what is allowed)
REFUSED = [
    ("--sample-size", "-5", "sample_size=-5: expected 0 (all posts) or a number >= 1"),
    ("--n-estimators", "0", "n_estimators=0: expected a number >= 1"),
    ("--learning-rate", "0", "learning_rate=0.0: expected a number in (0, 1]"),
    ("--learning-rate", "-0.1", "learning_rate=-0.1: expected a number in (0, 1]"),
    ("--val-frac", "1.5", "val_frac=1.5: expected a fraction strictly between 0 and 1"),
    ("--test-frac", "0", "test_frac=0.0: expected a fraction strictly between 0 and 1"),
    ("--split", "weekly", "split='weekly': expected one of random, chrono, user"),
    ("--subsample", "0", "subsample=0.0: expected a number in (0, 1]"),
    ("--tree-method", "fast", "tree_method='fast': expected one of auto, exact, hist, approx"),
    ("--max-bin", "1", "max_bin=1: expected 0 (from the data) or a number >= 2"),
    ("--seed", "-1", "seed=-1: expected a number >= 0"),
]


@pytest.mark.parametrize("flag,value,message", REFUSED, ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_cli_refuses_before_data_or_run(flag, value, message, tmp_path, caplog):
    # the data path does not exist: had the job loaded data, the message would be about the data
    code = main(["benchmark", "--data", str(tmp_path / "absent.csv"), flag, value])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"bad parameter: {message}"], errors
    assert not (tmp_path / "mlflow.db").exists() or mlflow.search_runs(search_all_experiments=True).empty


def test_the_sum_of_the_held_out_fractions_is_checked():
    with pytest.raises(ConfigError, match=r"val_frac=0.5 \+ test_frac=0.5: expected a sum below 1"):
        SplitCfg(val_frac=0.5, test_frac=0.5)


@pytest.mark.parametrize("build,message", [
    (lambda: XGBCfg(max_depth=0), "max_depth=0: expected a number >= 1"),
    (lambda: XGBCfg(device="gpu"), "device='gpu': expected auto, cpu, cuda or cuda:N"),
    (lambda: XGBCfg(learning_rate=float("nan")), "learning_rate=nan"),
], ids=["depth", "device", "nan"])
def test_python_callers_get_the_same_refusal(build, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_net_and_stacking_settings_are_checked():
    from smp.nets import Conv1DCfg, MLPCfg
    from smp.train import StackingCfg

    with pytest.raises(ConfigError, match=r"dropout=1.0: expected a fraction in \[0, 1\)"):
        MLPCfg(dropout=1.0)
    with pytest.raises(ConfigError, match="kernel_sizes=\\(2,\\): expected items each odd and >= 1"):
        Conv1DCfg(channels=(16,), kernel_sizes=(2,))
    with pytest.raises(ConfigError, match="expected one odd kernel size per conv layer"):
        Conv1DCfg(channels=(16, 32), kernel_sizes=(3,))
    with pytest.raises(ConfigError, match=r"stacking_folds=1: expected 0 \(from the data\) or a number >= 2"):
        StackingCfg(stacking_folds=1)
    assert MLPCfg(lr=0.0).lr == 0.0  # frozen weights: meaningful (the tests' untrained net)


@pytest.mark.slow
def test_launched_run_refused_by_a_bad_parameter_is_named_and_says_why(tmp_path, smpd_dir):
    uri = f"sqlite:///{tmp_path}/launch.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_RUN_ID", None)
    out = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "benchmark", "--env-manager",
                          "local", "--experiment-name", "bad", "-P", f"data={smpd_dir}", "-P", "learning_rate=-1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "bad parameter: learning_rate=-1.0: expected a number in (0, 1]" in out.stderr
    assert "Traceback" not in out.stderr.split("bad parameter")[0][-2000:]  # smp's own refusal, not XGBoost's
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["bad"], output_format="list")
    assert run.info.status == "FAILED"
    assert run.info.run_name.startswith("benchmark · ")
    assert run.data.tags["smp.end_reason"].startswith("bad parameter: learning_rate=-1.0")
    assert "refused before it started" in run.data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_a_model_that_learnt_nothing_is_tagged_and_warned(smpd_dir, caplog):
    # one full-step tree grown to single posts (no regularisation): it memorises the ~130 training labels and
    # predicts noise on the test posts, worse than their mean
    result = run_benchmark(BenchmarkJob(source=DataCfg(data=str(smpd_dir)), splitting=SplitCfg(sample_size=0),
                                        xgb=XGBCfg(n_estimators=1, max_depth=18, learning_rate=1.0, min_child_weight=0.0,
                                                   reg_lambda=0.0, early_stopping_rounds=0), experiment="nothing"))
    assert result["test_rmse"] >= result["test_rmse_baseline"]
    run = mlflow.get_run(result.run_id)
    assert run.data.tags["smp.beats_mean_predictor"] == "false"
    assert "does not beat the mean predictor" in run.data.tags["mlflow.note.content"]
    assert any("is not below the mean predictor's" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")
