"""The CLI and the MLproject mirror each other one to one; help answers from the generated option table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smp.cli import (apply, build_parser, cli_spec_text, jobs, leaves, load_spec, main, mlproject_text,
                     result_text)
from smp.train import BenchmarkJob

ROOT = Path(__file__).resolve().parents[1]


def test_mlproject_and_option_table_are_generated_from_the_job_configs():
    assert (ROOT / "MLproject").read_text() == mlproject_text(), "run `smp mlproject > MLproject`"
    assert (ROOT / "smp" / "cli_spec.json").read_text() == cli_spec_text(), "run `smp cli-spec > smp/cli_spec.json`"


def test_every_entry_point_runs_the_one_script_with_its_own_parameters():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert set(spec) == set(jobs())
    assert (ROOT / "entrypoints" / "run.py").exists()
    for name, (_, default, _) in jobs().items():
        params = spec[name]["parameters"]
        command = spec[name]["command"].split()  # `smp NAME`, every declared parameter passed under its own name
        assert command[:4] == ["sh", "entrypoints/python.sh", "entrypoints/run.py", name], command
        assert command[4:] == [word for p in params for word in (f"--{p}", f"{{{p}}}")], name
        declared = [p[-1] for p, v in leaves(default) if v != ""]  # empty defaults: optional, not declared
        assert list(params) == declared
        for path, value in leaves(default):
            if value == "":
                continue
            assert str(params[path[-1]]["default"]).lower() == (
                ",".join(map(str, value)) if isinstance(value, tuple) else str(value)).lower()


def test_every_option_is_described_once():
    for name, entry in load_spec().items():  # the generated table (the test above: it is cli_spec() as written)
        names = [o["name"] for o in entry["options"]]
        assert len(names) == len(set(names)), name
    text = build_parser()._subparsers._group_actions[0].choices["promote"].format_help()
    assert text.count("--family") == 2  # usage line + one option line (not "--family FAMILY, --family FAMILY")
    assert "only runs of this model family" in text  # the dataclass comment is the help


@pytest.mark.slow  # a child Python process
def test_help_does_not_import_the_jobs():
    code = ("import sys; from smp.cli import main\n"
            "try:\n    main(['promote', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'open_clip', 'mlflow', 'xgboost', 'smp.train') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_cli_parses_into_config():
    args = build_parser().parse_args(["benchmark", "--max-depth", "7", "--split", "chrono", "--sample_size", "100"])
    cfg = apply(BenchmarkJob(), {k: getattr(args, k) for k in ("max_depth", "split", "sample_size")})
    assert cfg.xgb.max_depth == 7 and cfg.splitting.split == "chrono" and cfg.splitting.sample_size == 100
    assert cfg.xgb.learning_rate == 0.01  # untouched defaults stay the paper's


def test_results_print_as_counts_flags_and_measurements():
    assert [result_text(v) for v in (3, True, False, 1.23456)] == ["3", "yes", "no", "1.2346"]


def test_cli_rejects_bad_values_and_reports_data_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "--max-depth", "2.5"])
    assert main(["benchmark", "--data", str(tmp_path / "absent.csv")]) == 2


def test_help_lists_each_option_once_and_the_underscore_spelling_still_parses():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    for name, entry in load_spec().items():
        text = choices[name].format_help()
        for option in entry["options"]:
            leaf = option["name"]
            dashed = f"--{leaf.replace('_', '-')} {option['kind'].upper()}"
            assert text.count(dashed) == 2, (name, dashed)  # the usage line and its one help line
            if "_" in leaf:
                assert f"--{leaf}" not in text, (name, leaf)  # hidden, not listed beside the dashed one
    assert "--model_name" not in choices["promote"].format_help()
    # MLproject commands pass --name_with_underscores: both spellings set the same option
    under = parser.parse_args(["benchmark", "--sample_size", "7", "--max_depth", "3"])
    dashed = parser.parse_args(["benchmark", "--sample-size", "7", "--max-depth", "3"])
    assert vars(under) == vars(dashed) and under.sample_size == 7 and under.max_depth == 3
    assert parser.parse_args(["benchmark"]).sample_size == 80000  # the hidden spelling adds no default of its own


def test_the_printed_summary_uses_the_keys_the_run_logged(monkeypatch, capsys):
    """`smp JOB` ends with what the run logged, under the logged names (not the job's internal names)."""
    import mlflow

    import smp.cli as cli
    from smp.tracking import JobResult

    def fake_job(cfg):
        with mlflow.start_run() as run:
            mlflow.log_metrics({"test_rmse": 1.25, "test_rmse_baseline": 2.5, "val_rmse": 1.5, "val_mae": 1.0,
                                "time/embed_s": 3.25, "fit/best_epoch": 4.0})
            for epoch in (1, 2):
                mlflow.log_metrics({"train_loss": 9.0 / epoch, "val_rmse_epoch": 3.0 / epoch}, step=epoch)
            mlflow.log_params({"data/images": 600, "cache/hits": 0, "clip/device_used": "cpu", "seed": 0})
        # the job's own names for the same numbers (embed's stats) must not reach the console
        return JobResult(run.info.run_id, {"images": 600, "seconds": 3.25, "test_rmse": 1.25})

    real_job = cli.job
    monkeypatch.setattr(cli, "job", lambda name: (fake_job, *real_job(name)[1:]))
    assert main(["embed"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    run_id = mlflow.last_active_run().info.run_id
    assert lines == [f"run: {run_id}", "fit/best_epoch: 4", "test_rmse: 1.2500", "test_rmse_baseline: 2.5000",
                     "time/embed_s: 3.2500", "val_rmse: 1.5000", "cache/hits: 0", "data/images: 600"]
    logged = mlflow.get_run(run_id).data
    assert {line.split(":")[0] for line in lines[1:]} <= set(logged.metrics) | set(logged.params)


def test_outcomes_without_a_run_print_as_returned():
    from smp.cli import summary

    assert summary({"version": 2, "champion": True}) == [("champion", True), ("version", 2)]
