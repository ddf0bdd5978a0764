"""Model behaviour: the image models, leakage-free stacking, upstream reuse, compare, pyfuncs."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from smp.boosters import XGBCfg
from smp.data import load_data
from smp.features import TabularCfg
from smp.models import out_of_fold
from smp.report import CompareJob, compare_table, run_compare
from smp.train import run_ensemble_conv1d, run_ensemble_mlp, run_pca_boost

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory, smpd_bad, tiny):
    """One tracking store in which all four models were trained on the same tiny data (the tiny CLIP's features)."""
    root = tmp_path_factory.mktemp("chain")
    mp = pytest.MonkeyPatch()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "SMP_CACHE_DIR": str(root / "cache")}
    for k, v in env.items():
        mp.setenv(k, v)
    mp.chdir(root)
    out = {"env": env}

    def job(family, **overrides):
        return tiny.job(family, smpd_bad, experiment="img", stacking_folds=3, **overrides)

    out["ensemble_mlp"] = run_ensemble_mlp(job("ensemble_mlp"))
    out["runs_after_first"] = _count_jobs()
    out["ensemble_mlp_2"] = run_ensemble_mlp(  # the paper's head, cross-fitted stacking
        job("ensemble_mlp", epochs=3, head="paper", stacking_fit="crossfit"))
    out["runs_after_second"] = _count_jobs()
    out["ensemble_conv1d"] = run_ensemble_conv1d(job("ensemble_conv1d"))
    out["pca_boost"] = run_pca_boost(tiny.job("pca_boost", smpd_bad, experiment="img"))
    mp.undo()
    return out


@pytest.fixture(scope="module")
def smpd_bad(tmp_path_factory):
    """Tiny synthetic SMPD with broken images (zero-byte, truncated, not-an-image, missing)."""
    from smp.synth import SynthCfg, generate

    return generate(tmp_path_factory.mktemp("bad") / "smpd", SynthCfg(n=120, seed=5, bad_images=4))


def _count_jobs():
    exp = mlflow.get_experiment_by_name("img")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    jobs = [r.data.tags.get("smp.job") for r in runs]
    return {j: jobs.count(j) for j in set(jobs)}


def _use(chain, monkeypatch):
    for k, v in chain["env"].items():
        monkeypatch.setenv(k, v)
    mlflow.set_tracking_uri(chain["env"]["MLFLOW_TRACKING_URI"])


def test_upstream_runs_are_reused(chain):
    assert chain["runs_after_first"]["embed"] == 1 and chain["runs_after_first"]["benchmark"] == 1
    # the second ensemble run started no embed or benchmark run
    assert chain["runs_after_second"]["embed"] == 1 and chain["runs_after_second"]["benchmark"] == 1
    assert chain["runs_after_second"]["ensemble_mlp"] == 2


def test_ensemble_runs_log_epochs_and_stacking(chain, monkeypatch):
    _use(chain, monkeypatch)
    exp = mlflow.get_experiment_by_name("img").experiment_id
    run = mlflow.search_runs([exp], filter_string="tags.`smp.job` = 'ensemble_mlp'", output_format="list")[-1]
    hist = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_rmse_epoch")
    assert [m.step for m in hist] == [1, 2, 3, 4]
    assert run.data.tags["smp.stacking"] == "oof" and run.data.params["stacking_folds"] == "3"
    assert run.data.tags["smp.clip_random_weights"] == "true"
    for m in ("test_rmse", "test_mae", "test_bias", "test_error_var", "test_spearman", "test_rmse_baseline"):
        assert np.isfinite(run.data.metrics[m])


def test_each_pyfunc_predicts_raw_rows_and_missing_images(chain, monkeypatch, smpd_bad):
    _use(chain, monkeypatch)
    exp = mlflow.get_experiment_by_name("img").experiment_id
    posts = load_data(str(smpd_bad)).drop(columns=["label"])
    embed = mlflow.search_runs([exp], filter_string="tags.`smp.job` = 'embed'", output_format="list")[0]
    broken = set(pd.read_csv(mlflow.artifacts.download_artifacts(run_id=embed.info.run_id,
                                                                 artifact_path="bad_images.csv"))["Pid"].astype(str))
    rows = pd.concat([posts[posts["Pid"].isin(broken)], posts[~posts["Pid"].isin(broken)].head(8)])
    assert len(rows) == 12 and len(broken) == 4  # the four broken images (one of each kind) and eight good ones
    for family in ("pca_boost", "ensemble_mlp", "ensemble_conv1d"):
        run = mlflow.search_runs([exp], filter_string=f"tags.`smp.job` = '{family}'", output_format="list")[0]
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/{family}")  # the model is named after its family
        out = model.predict(rows)  # features computed from image_path inside the pipeline
        pred = out["popularity"].to_numpy(dtype=float)  # with a status per post (smp.serving)
        assert len(pred) == 12 and np.isfinite(pred).all(), family
        status = dict(zip(rows["Pid"], out["status"]))
        assert all(status[p].startswith("partial: image unusable (") for p in broken), (family, status)
        assert all(status[p] == "ok" for p in set(rows["Pid"]) - broken), (family, status)
        no_image = rows.drop(columns=["image_path"]).tail(3)  # no image at all -> still a finite prediction
        answer = model.predict(no_image)
        assert np.isfinite(answer["popularity"]).all(), family
        assert list(answer["status"]) == ["partial: no image given; scored without image features"] * 3, family


def test_broken_images_kept_and_logged(chain, monkeypatch):
    _use(chain, monkeypatch)
    exp = mlflow.get_experiment_by_name("img").experiment_id
    run = mlflow.search_runs([exp], filter_string="tags.`smp.job` = 'embed'", output_format="list")[0]
    assert run.data.params["data/bad_images"] == "4" and run.data.params["data/images"] == "120"
    bad = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="bad_images.csv"))
    assert len(bad) == 4 and bad["reason"].notna().all()
    feats = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                artifact_path="features.parquet"))
    assert len(feats) == 120 and int((feats["has_image"] == 0).sum()) == 4


def test_compare_table(chain, monkeypatch):
    from pathlib import Path

    from smp.families import FAMILIES

    _use(chain, monkeypatch)
    exp = mlflow.get_experiment_by_name("img").experiment_id
    paper = {name: f.paper for name, f in FAMILIES.items()}  # the one place smp keeps the paper's figures
    table = compare_table(exp, "random", FAMILIES)
    assert list(table["model"]) == ["benchmark", "pca_boost", "ensemble_mlp", "ensemble_mlp (paper head)",
                                    "ensemble_conv1d"]
    measured, paper_cols = ("test_rmse", "test_bias", "test_error_var"), ("paper_rmse", "paper_bias", "paper_error_var")
    client = mlflow.MlflowClient()
    for row in table.to_dict("records"):  # each family's measured figures beside its paper figures (both heads)
        run = client.get_run(row["run_id"]).data
        assert run.tags["smp.model"] == row["family"], row["model"]
        assert [row[c] for c in measured] == pytest.approx([run.metrics[c] for c in measured]), row["model"]
        assert tuple(row[c] for c in paper_cols) == paper[row["family"]], row["model"]
    mlp_runs = mlflow.search_runs([exp], filter_string="tags.`smp.job` = 'ensemble_mlp'",
                                  order_by=["attributes.start_time DESC"], output_format="list")
    by_head = {r.data.tags["smp.head"]: r for r in mlp_runs}
    assert table.loc[table.model == "ensemble_mlp", "test_rmse"].item() == pytest.approx(
        by_head["residual"].data.metrics["test_rmse"])
    assert table.loc[table.model == "ensemble_mlp (paper head)", "test_rmse"].item() == pytest.approx(
        by_head["paper"].data.metrics["test_rmse"])
    metrics = run_compare(CompareJob(experiment="img"))
    assert set(metrics) == {f"{m} test_rmse" for m in table["model"]}
    run = mlflow.last_active_run()
    assert run.data.metrics == {}  # the table is compare's artifact; its numbers stay on the models' runs
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"compare.md", "compare.csv"} <= arts
    # the rendered table: each model's row shows its run's figures and its family's paper figures, column by column
    md = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="compare.md")).read_text()
    header, _, *lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.strip().splitlines()]
    cells = {line[0]: dict(zip(header, line)) for line in lines}
    assert list(cells) == list(table["model"])
    for row in table.to_dict("records"):
        assert [cells[row["model"]][c] for c in measured] == [f"{row[c]:.3f}" for c in measured], row["model"]
        assert [cells[row["model"]][c] for c in paper_cols] == [f"{v:.3f}" for v in paper[row["family"]]], row["model"]
    csv = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="compare.csv"))
    assert list(zip(csv["model"], csv["paper_rmse"])) == [(m, paper[f][0]) for m, f in zip(table.model, table.family)]


def test_stacking_refit_by_default_cross_fit_on_request(chain, monkeypatch):
    _use(chain, monkeypatch)
    exp = mlflow.get_experiment_by_name("img").experiment_id
    bench = mlflow.search_runs([exp], filter_string="tags.`smp.job` = 'benchmark'", output_format="list")[0]
    mlp = {r.data.tags["smp.head"]: r for r in mlflow.search_runs(
        [exp], filter_string="tags.`smp.job` = 'ensemble_mlp'", output_format="list")}
    refit, crossfit = mlp["residual"].data, mlp["paper"].data
    assert crossfit.params["stacking_fit"] == "crossfit" and refit.params["stacking_fit"] == "refit"
    # refit: validation/test rows are stacked on the benchmark run's own predictions; cross-fit: on the fold mean
    assert refit.metrics["stacked_input/test_rmse"] == pytest.approx(bench.data.metrics["test_rmse"])
    assert crossfit.metrics["stacked_input/test_rmse"] != pytest.approx(bench.data.metrics["test_rmse"])
    assert "time/oof_s" in refit.metrics and "time/oof_s" not in crossfit.metrics  # fold models reused
    for run in (crossfit, refit):
        assert run.tags["smp.beats_stacked_benchmark"] in ("true", "false")
        assert np.isfinite(run.metrics["stacked_input/val_rmse"])
    trees = int(bench.data.metrics["fit/best_iteration"])
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(bench.info.run_id, "stacking")}
    assert arts == {f"stacking/folds_k3_t{trees}.pkl"}  # fold_rounds=benchmark: as many trees as the benchmark
    import cloudpickle

    path = mlflow.artifacts.download_artifacts(run_id=bench.info.run_id, artifact_path=f"stacking/folds_k3_t{trees}.pkl")
    with open(path, "rb") as fh:
        _, fitted = cloudpickle.load(fh)
    assert [m.booster_.get_booster().num_boosted_rounds() for m in fitted.models] == [trees] * 3


def test_out_of_fold_never_uses_own_label():
    """Labels are pure noise and each row has a unique id feature a deep booster memorises."""
    rng = np.random.default_rng(0)
    n = 400
    posts = pd.DataFrame({"Pid": [str(i) for i in range(n)], "Postdate": rng.permutation(n).astype(float) * 1e5 + 1.4e9,
                          "photo_count": rng.permutation(n).astype(float)})
    y = rng.normal(6, 2, n)
    val, y_val = posts.head(50), y[:50]
    cfg = XGBCfg(n_estimators=150, max_depth=12, learning_rate=0.3, early_stopping_rounds=0)
    from smp.models import BenchmarkModel, Part

    in_sample = BenchmarkModel(cfg, TabularCfg(), 0).fit(Part(posts, y), Part(val, y_val)).predict(posts)
    oof = out_of_fold(posts, y, val, y_val, cfg, TabularCfg(), seed=0, folds=5)
    assert np.corrcoef(in_sample, y)[0, 1] > 0.9  # memorised: in-sample stacking would leak the label
    assert abs(np.corrcoef(oof, y)[0, 1]) < 0.25  # out-of-fold: no trace of the row's own label
    with pytest.raises(ValueError, match="at least 2 folds"):
        out_of_fold(posts, y, val, y_val, cfg, TabularCfg(), seed=0, folds=1)


def test_image_models_refuse_data_without_images(tmp_path, tiny):
    df = pd.DataFrame({"Pid": range(200), "Category": "A", "Postdate": np.linspace(1.4e9, 1.5e9, 200),
                       "label": np.linspace(1, 10, 200)})
    df.to_csv(tmp_path / "posts.csv", index=False)
    from smp.data import DataError

    with pytest.raises(DataError, match="no images"):
        run_pca_boost(tiny.job("pca_boost", tmp_path / "posts.csv"))
