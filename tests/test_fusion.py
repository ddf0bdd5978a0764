"""The ``fusion`` family: its net (shapes, determinism, the residual head, modality dropout), its model on raw
posts (no image, unseen users), its job (a logged model serving raw posts, the compare row), its CLI and a study."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from smp.config import ConfigError
from smp.data import DataCfg
from smp.fusion import FUSION, FusionJob, run_fusion
from smp.fusion_net import USER_ID, FusionCfg, FusionModel, FusionNet, FusionRegressor
from smp.groups import FeaturesCfg
from smp.models import Part
from smp.splits import SplitCfg, prepare
from smp.synth import SynthCfg, draw_posts

TINY = FusionCfg(encoder_hidden=(8,), projection_dim=4, fusion_hidden=(8,), epochs=3, batch_size=16, patience=2)
LAYOUT = (("tabular", 3), ("user", 2), ("image", 5), (USER_ID, 1))


def _arrays(n: int, seed: int = 0, n_users: int = 4):
    """``X`` in the regressor's layout (stacked prediction, blocks, user rows) and a label it partly explains."""
    rng = np.random.default_rng(seed)
    blocks = rng.normal(size=(n, 10)).astype(np.float32)
    blocks[: n // 4, 5:] = np.nan  # a quarter without an image
    stacked = rng.normal(size=n)
    y = stacked + 0.5 * blocks[:, 0] + rng.normal(scale=0.3, size=n)
    rows = rng.integers(0, n_users, size=n)
    X = np.column_stack([stacked, blocks, rows]).astype(np.float32)
    return X, y


def _regressor(cfg: FusionCfg = TINY, n_users: int = 4) -> FusionRegressor:
    return FusionRegressor(cfg, layout=LAYOUT, n_users=n_users, progress=False)


# --------------------------------------------------------------------------- the net
@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_net_shapes_and_two_fits_with_one_seed_are_equal(fusion):
    X, y = _arrays(120)
    X_val, y_val = _arrays(40, seed=1)
    cfg = replace(TINY, fusion=fusion)
    a = _regressor(cfg).fit(X, y, X_val, y_val)
    b = _regressor(cfg).fit(X, y, X_val, y_val)
    pa, pb = a.predict(X_val), b.predict(X_val)
    assert pa.shape == (40,) and np.isfinite(pa).all()
    np.testing.assert_array_equal(pa, pb)
    assert [h["epoch"] for h in a.history_] == list(range(1, len(a.history_) + 1))
    bench, present, *rest = a._inputs(X_val, None)
    assert bench.shape == (40, 1) and present.shape == (40, 3)  # three groups; the user rows are no group
    assert [t.shape[1] for t in rest[:-1]] == [4, 3, 6] and rest[-1].dtype == torch.int64  # + missing indicator
    assert present[:10, 2].sum() == 0 and present[10:, 2].min() == 1  # the image group of the rows without one


def test_the_untrained_net_is_its_stacked_input_and_the_fit_never_loses_to_it_on_val():
    X, y = _arrays(120)
    X_val, y_val = _arrays(40, seed=1)
    still = _regressor(replace(TINY, lr=0.0)).fit(X, y, X_val, y_val)  # never moves: the residual head's zeros
    np.testing.assert_allclose(still.predict(X_val), X_val[:, 0], atol=1e-5)
    assert still.best_epoch_ == 0 and still.best_val_rmse_ == pytest.approx(still.input_val_rmse_, abs=1e-6)
    # labels the blocks cannot explain: whatever the net learns, it keeps no epoch worse than its input on val
    rng = np.random.default_rng(5)
    noise = _regressor().fit(X, X[:, 0] + rng.normal(size=120), X_val, X_val[:, 0] + rng.normal(size=40))
    assert noise.best_val_rmse_ <= noise.input_val_rmse_ + 1e-6  # float32 net vs float64 input: rounding apart
    fitted = _regressor(replace(TINY, epochs=20, patience=20)).fit(X, y, X_val, y_val)
    assert fitted.beats_input_ is True and fitted.best_val_rmse_ < fitted.input_val_rmse_


def test_modality_dropout_zeroes_encodings_only_in_training():
    torch.manual_seed(0)
    net = FusionNet(LAYOUT[:3], 4, replace(TINY, modality_dropout=0.5, dropout=0.0))
    X, _ = _arrays(64)
    reg = _regressor()
    reg.bench_mean_, reg.bench_scale_ = np.zeros(1, np.float32), np.ones(1, np.float32)
    reg.mean_, reg.scale_ = np.zeros(10, np.float32), np.ones(10, np.float32)
    inputs = reg._inputs(X, None)
    for p in net.parameters():  # a head that reads its input (the trained one would)
        torch.nn.init.normal_(p)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(*inputs), net(*inputs))
        net.train()
        assert not torch.equal(net(*inputs), net(*inputs))
    with pytest.raises(ConfigError, match="modality_dropout=1.0"):
        FusionCfg(modality_dropout=1.0)


def test_a_pickled_regressor_predicts_the_same():
    X, y = _arrays(80)
    reg = _regressor().fit(X, y, X[:20], y[:20])
    again = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(again.predict(X), reg.predict(X))


# --------------------------------------------------------------------------- the model on raw posts
class _Mean:
    """A stand-in stacked benchmark: the training labels' mean for every post."""

    input_fields_ = ["Pid"]

    def __init__(self, value: float):
        self.value = value

    def predict(self, posts):
        return np.full(len(posts), self.value)


@pytest.fixture(scope="module")
def fitted_model(smpd_dir):
    prep = prepare(DataCfg(data=str(smpd_dir)), SplitCfg(sample_size=0))
    rng = np.random.default_rng(0)
    images = {p: rng.normal(size=(len(idx), 6)).astype(np.float32) for p, idx in prep.parts.items()}
    images["train"][:5] = np.nan
    mean = float(prep.y("train").mean())
    stacked = {p: np.full(len(idx), mean) for p, idx in prep.parts.items()}
    job = FusionJob(net=replace(TINY, user_embedding_min_posts=2, modality_dropout=0.3))
    from smp.models import ImageFeatureSource

    source = ImageFeatureSource([f"clip_{i}" for i in range(6)])
    model = FusionModel.from_job(job, "fusion", images=source, benchmark=_Mean(mean))
    model.fit(Part(prep.rows("train"), prep.y("train"), images["train"], stacked["train"]),
              Part(prep.rows("val"), prep.y("val"), images["val"], stacked["val"]))
    return model, prep


def test_the_model_reads_every_group_and_scores_posts_without_image_or_known_user(fitted_model):
    model, prep = fitted_model
    assert [g for g, _ in model.net.layout] == ["tabular", "time", "user", "text", "image", USER_ID]
    assert model.needs_images and model.groups_in_use is model.groups_
    assert {"Uid", "Title", "Alltags", "Postdate"} <= set(model.input_fields_)
    assert model.facts_["fusion/users_embedded"] == len(model.users_) > 0
    posts = draw_posts(SynthCfg(n=6, seed=11))[["Pid", "Uid", "Title", "Alltags", "Postdate", "Category"]]
    posts["Uid"] = ["never-seen"] * 3 + [None] * 3
    pred = model.predict(posts)  # no image columns: the image group is absent for every post
    assert pred.shape == (6,) and np.isfinite(pred).all()
    assert model.groups_.group("user").unseen(posts).all()
    known = prep.rows("test").head(8)
    assert np.isfinite(model.predict(known)).all()
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(again.predict(posts), pred)


def test_a_model_without_image_or_user_embedding_needs_neither():
    job = FusionJob(feature_groups=FeaturesCfg("tabular,text"), net=replace(TINY, user_embedding_dim=0))
    model = FUSION.build(job, images=None, benchmark=None)
    assert not model.needs_images and model.images is None and type(model.net) is FusionRegressor
    with pytest.raises(ConfigError, match=r"features='image'.*fusion stacks on a benchmark"):
        FusionJob(feature_groups=FeaturesCfg("image"))


# --------------------------------------------------------------------------- the job
@pytest.mark.slow  # a fresh interpreter (subprocess)
def test_run_fusion_is_the_stacked_job_and_its_model_code_loads_no_mlflow():
    """Fusion's job is every stacked net's (``run_ensemble``, whose resolve -> fit -> record order
    test_architecture checks); only its config and model are its own."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "smp" / "fusion.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_fusion")
    calls = [getattr(node.func, "id", "") for stmt in fn.body for node in ast.walk(stmt) if isinstance(node, ast.Call)]
    assert calls == ["run_ensemble"]
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) and "mlflow" in ast.dump(n) for n in ast.walk(tree))
    code = "import sys, smp.fusion_net; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.slow  # trains and logs a fusion job
def test_a_fusion_run_logs_a_model_that_serves_raw_posts_and_a_compare_row(smpd_dir, tiny):
    from smp.families import FAMILIES
    from smp.report import compare_table
    from smp.tracking import logged_model_uri

    result = run_fusion(tiny.job("fusion", smpd_dir, epochs=3, batch_size=16, encoder_hidden=(8,),
                                 fusion_hidden=(8,), projection_dim=4))
    run = mlflow.get_run(result.run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["smp.model"] == "fusion" and tags["smp.head"] == "residual" and tags.get("smp.embed_run")
    assert tags["smp.beats_stacked_benchmark"] in ("true", "false") and tags.get("smp.benchmark_run")
    assert {"test_rmse", "val_rmse", "stacked_input/test_rmse", "stacked_input/val_rmse", "fit/best_epoch"} \
        <= set(metrics)
    assert metrics["val_rmse"] <= metrics["stacked_input/val_rmse"] + 1e-9  # never worse than its input on val
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "val_rmse_epoch")
    assert [m.step for m in history] == list(range(1, len(history) + 1))  # the per-epoch curve
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "plots")}
    assert any(p.endswith("training_curve.png") for p in artifacts)
    bench = mlflow.get_run(tags["smp.benchmark_run"]).data.params
    assert bench["features"] == "tabular,time,user,text"  # the benchmark it stacks on: every group but image
    # new posts through the logged model: raw rows with Uid, Title, Alltags; no image fields
    loaded = mlflow.pyfunc.load_model(logged_model_uri(result.run_id))
    rows = draw_posts(SynthCfg(n=5, seed=9))[["Pid", "Uid", "Title", "Alltags", "Category", "Postdate"]]
    out = loaded.predict(rows)
    assert len(out) == 5 and np.isfinite(np.asarray(out["popularity"], dtype=float)).all()
    assert all(s == "ok" or s.startswith("partial: ") for s in out["status"])
    assert any("unseen user" in s for s in out["status"])  # these users have no training post
    table = compare_table(run.info.experiment_id, "random", FAMILIES)
    row = table.set_index("model").loc["fusion"]
    assert row["run_id"] == result.run_id and row["test_rmse"] == pytest.approx(result.metrics["test_rmse"])


def test_the_cli_lists_the_fusion_flags():
    out = subprocess.run([sys.executable, "-m", "smp.cli", "fusion", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--fusion STR", "--modality-dropout FLOAT", "--user-embedding-min-posts INT", "--encoder-hidden",
                 "--features STR", "--stacking STR", "--benchmark-run STR"):
        assert flag in out.stdout, flag


@pytest.mark.slow
def test_a_two_trial_study_of_fusion(smpd_dir, tiny, tmp_path, monkeypatch):
    """``tune --model fusion``: the family's space and run function, nested trial runs (the family's default
    settings shrunk to the tiny ones, as a demo-sized study would use them)."""
    import smp.families
    from smp.tune import StudyCfg, TuneJob, run_tune

    small = tiny.job("fusion", smpd_dir, epochs=2, batch_size=16, encoder_hidden=(8,), fusion_hidden=(8,))
    space = FUSION.space
    shrunk = lambda trial: {**space(trial), "epochs": 2, "batch_size": 16}  # noqa: E731 - the space, tiny trials
    monkeypatch.setitem(smp.families.FAMILIES, "fusion", replace(FUSION, config=lambda: small, space=shrunk))
    cfg = TuneJob(source=DataCfg(data=str(smpd_dir)), splitting=SplitCfg(sample_size=0), experiment="tune",
                  study=StudyCfg(model="fusion", n_trials=2, study_name="f", pruner="none",
                                 storage=f"sqlite:///{tmp_path}/optuna.db"))
    result = run_tune(cfg)
    assert np.isfinite(result["val_rmse"]) and result["study/trials_complete"] == 2
    exp = mlflow.get_experiment_by_name("tune").experiment_id
    trials = mlflow.search_runs([exp], filter_string="tags.`smp.model` = 'fusion'", output_format="list")
    assert len(trials) == 2 and all(r.data.params["encoder_hidden"] != "(8,)" for r in trials)  # the space's
