"""The ablation job: group sets and their dedup, the table (pure), an end-to-end run of nested benchmark runs that
``compare`` and ``promote`` see, refusals that leave no run behind and a failing child that ends the parent."""

from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pandas as pd
import pytest

from smp.ablation import AblationJob, ablation_table, group_sets, run_ablation, to_markdown
from smp.config import ConfigError
from smp.data import DataCfg, DataError
from smp.splits import SplitCfg


def _job(data, **kw) -> AblationJob:
    return AblationJob(source=DataCfg(data=str(data)), splitting=SplitCfg(sample_size=0), experiment="t", **kw)


def _runs(tmp_path) -> list:
    """Every run of the test's store (none when the store was never made)."""
    if not (tmp_path / "mlflow.db").exists():
        return []
    client = mlflow.MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


# --------------------------------------------------------------------------- pure
def test_group_sets_list_all_each_left_out_each_alone_and_run_a_shared_set_once():
    two = group_sets(("tabular", "user"))
    assert [(s.groups, s.labels) for s in two] == [
        (("tabular", "user"), ("all",)),
        (("user",), ("- tabular", "user only")),
        (("tabular",), ("- user", "tabular only"))]
    four = group_sets(("tabular", "time", "user", "text"))
    assert len(four) == 9 and len({s.groups for s in four}) == 9
    assert [label for s in four for label in s.labels][:3] == ["all", "- tabular", "- time"]


def test_the_table_has_a_row_per_label_with_changes_against_all():
    sets = group_sets(("tabular", "user"))
    results = [{"run_id": "r_all", "test_rmse": 2.0, "test_mae": 1.5, "test_spearman": 0.6},
               {"run_id": "r_user", "test_rmse": 2.3, "test_mae": 1.8, "test_spearman": 0.4},
               {"run_id": "r_tab", "test_rmse": 2.1, "test_mae": 1.6}]  # no Spearman: NaN, not an error
    table = ablation_table(sets, results)
    assert list(table["label"]) == ["all", "- tabular", "- user", "tabular only", "user only"]
    assert list(table["run_id"]) == ["r_all", "r_user", "r_tab", "r_tab", "r_user"]
    assert list(table["groups"]) == ["tabular,user", "user", "tabular", "tabular", "user"]
    np.testing.assert_allclose(table["delta_test_rmse"], [0.0, 0.3, 0.1, 0.1, 0.3])
    np.testing.assert_allclose(table["delta_test_mae"], [0.0, 0.3, 0.1, 0.1, 0.3])
    assert np.isnan(table.loc[2, "delta_test_spearman"]) and table.loc[1, "delta_test_spearman"] == pytest.approx(-0.2)
    text = to_markdown(table)
    lines = text.splitlines()
    assert len(lines) == 2 + 5 and len({len(line) for line in lines}) == 1  # columns line up in a terminal
    assert "| - user " in text and "+0.1000" in text and "r_tab" in text


def test_a_group_set_the_family_cannot_take_is_a_row_not_run_saying_why(smpd_dir):
    from smp.ablation import ablation_plan, table_text

    plan = ablation_plan(_job(smpd_dir, model="ensemble_conv1d", groups="tabular,image"))
    assert [(v.labels, bool(why)) for v, why in zip(plan.sets, plan.refused)] == [
        (("all",), False), (("- tabular", "image only"), True), (("- image", "tabular only"), True)]
    assert plan.configs[0].feature_groups.features == "tabular,image" and plan.configs[1:] == (None, None)
    assert "must include image" in plan.refused[2]
    table = ablation_table(plan.sets, [{"run_id": "r", "test_rmse": 2.0}, None, None])
    text = table_text(plan, table)
    assert "not run (- image | tabular only): " in text and text.count("| not run ") == 4


def test_all_groups_are_what_the_family_reads_image_where_its_default_does(smpd_dir):
    from smp.ablation import ablation_plan

    assert ablation_plan(_job(smpd_dir, model="benchmark")).groups == ("tabular", "time", "user", "text")
    assert ablation_plan(_job(smpd_dir, model="ensemble_mlp")).groups == ("tabular", "time", "user", "text", "image")
    asked = ablation_plan(_job(smpd_dir, model="benchmark", groups="tabular,image"))
    assert asked.groups == ("tabular", "image")  # named, the benchmark's image group is ablated too


def test_the_ablations_input_settings_reach_every_run(smpd_dir):
    """``clip_pretrained`` / ``text_encoder`` on the ablation are the runs' settings (offline: random weights)."""
    from smp.ablation import InputsCfg, ablation_plan

    plan = ablation_plan(_job(smpd_dir, model="ensemble_mlp", groups="text,image",
                              inputs=InputsCfg(clip_pretrained="none", text_encoder="clip")))
    runs = [c for c in plan.configs if c is not None]
    assert runs and all(c.upstream.clip_pretrained == "none" and c.feature_groups.clip_pretrained == "none"
                        and c.feature_groups.text_encoder == "clip" for c in runs)


# --------------------------------------------------------------------------- refusals before any run
def test_a_bad_model_or_group_is_refused_naming_the_parameter_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match=r"model='nope'.*benchmark, pca_boost"):
        AblationJob(model="nope")
    with pytest.raises(ConfigError, match=r"groups='tabular,bogus'.*unknown group.*bogus"):
        AblationJob(groups="tabular,bogus")
    with pytest.raises(ConfigError, match=r"groups='user'.*at least two"):
        AblationJob(groups="user")
    assert not (tmp_path / "mlflow.db").exists()  # no store, no run


def test_a_group_the_data_lacks_exits_2_through_the_cli_without_a_traceback_or_a_run(tmp_path, capsys, caplog):
    from smp.cli import main
    from smp.synth import SynthCfg, draw_posts

    posts = draw_posts(SynthCfg(n=200, seed=1)).drop(columns=["Uid", "img_path"])
    posts.to_csv(tmp_path / "no_uid.csv", index=False)
    code = main(["ablation", "--data", str(tmp_path / "no_uid.csv"), "--groups", "tabular,user",
                 "--sample-size", "0", "--experiment", "t"])
    assert code == 2
    assert "group 'user' reads Uid" in caplog.text
    assert "Traceback" not in capsys.readouterr().err + caplog.text
    assert [r.info.status for r in _runs(tmp_path)] == []  # refused before the parent run opened


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow  # three model runs and a compare run (about 15 s on 2 busy cores)
def test_an_ablation_nests_a_model_run_per_group_set_logs_its_table_and_compare_sees_them(smpd_dir, tiny, tmp_path):
    ablated = run_ablation(_job(smpd_dir, groups="tabular,user"), base=tiny.job("benchmark", smpd_dir))
    client = mlflow.MlflowClient()
    parent = client.get_run(ablated.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("ablation · benchmark")
    assert parent.data.tags["smp.model"] == "ablation:benchmark" and "tabular, user" in parent.data.tags[
        "mlflow.note.content"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{ablated.run_id}'")
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["smp.model"] for c in children} == {"benchmark"}
    by_groups = {c.data.params["features"]: c for c in children}
    assert set(by_groups) == {"tabular,user", "tabular", "user"}
    assert by_groups["user"].data.tags["smp.ablation"] == "- tabular | user only"
    assert by_groups["user"].info.run_name == "- tabular · benchmark"

    artifacts = {a.path for a in client.list_artifacts(ablated.run_id)} | {
        a.path for a in client.list_artifacts(ablated.run_id, "plots")}
    assert {"ablation.md", "ablation.csv", "plots/ablation.png"} <= artifacts
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=ablated.run_id, artifact_path="ablation.csv",
                                                            dst_path=str(tmp_path / "dl")))
    assert list(table["label"]) == ["all", "- tabular", "- user", "tabular only", "user only"]
    rmse = {c.info.run_id: c.data.metrics["test_rmse"] for c in children}
    full = by_groups["tabular,user"].data.metrics["test_rmse"]
    for row in table.itertuples():
        assert row.test_rmse == pytest.approx(rmse[row.run_id])
        assert row.delta_test_rmse == pytest.approx(rmse[row.run_id] - full)
    assert table.set_index("label").loc["tabular only", "run_id"] == by_groups["tabular"].info.run_id
    assert ablated["ablation/user_only_test_rmse"] == pytest.approx(by_groups["user"].data.metrics["test_rmse"])

    # compare and promote see the children as runs of their family: compare lists each group set as a row of its
    # own (the default set, tabular, is the plain benchmark row), and every child is a promote candidate
    from smp.registry import ranked_runs
    from smp.report import CompareJob, run_compare

    compare = run_compare(CompareJob(experiment="t"))
    assert set(client.get_run(compare.run_id).data.tags["smp.compared_runs"].split(",")) == set(rmse)
    assert compare["benchmark test_rmse"] == pytest.approx(by_groups["tabular"].data.metrics["test_rmse"])
    assert compare["benchmark [user] test_rmse"] == pytest.approx(by_groups["user"].data.metrics["test_rmse"])
    assert set(rmse) <= {r.info.run_id for r in ranked_runs(parent.info.experiment_id, "benchmark").runs}


@pytest.mark.slow  # trains the ablation's runs
def test_a_failing_child_ends_the_parent_failed_with_the_reason(smpd_dir, tiny, monkeypatch):
    import smp.ablation as ablation
    from smp.families import FAMILIES

    real = FAMILIES["benchmark"]

    def flaky(cfg, parent=None, on_step=None):
        if cfg.feature_groups.features == "user":  # the second set run (after all)
            raise DataError("user-only posts went missing")
        return real.run(cfg, parent=parent, on_step=on_step)

    monkeypatch.setattr(ablation, "family", lambda name: dataclasses.replace(real, run=flaky))
    with pytest.raises(DataError, match="went missing"):
        run_ablation(_job(smpd_dir, groups="tabular,user"), base=tiny.job("benchmark", smpd_dir))
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert "RUNNING" not in {r.info.status for r in runs}
    parent = next(r for r in runs if r.data.tags.get("smp.job") == "ablation")
    assert parent.info.status == "FAILED" and "went missing" in parent.data.tags["smp.end_reason"]
    done = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [(r.data.params["features"], r.info.status) for r in done] == [("tabular,user", "FINISHED")]  # kept
