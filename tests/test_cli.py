"""The CLI and the MLproject mirror each other one to one; help answers from the generated option table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smp.cli import (apply, build_parser, cli_spec, cli_spec_text, jobs, leaves, load_spec, main, mlproject_text,
                     result_text)
from smp.train import BenchmarkJob

ROOT = Path(__file__).resolve().parents[1]


def test_mlproject_and_option_table_are_generated_from_the_job_configs():
    assert (ROOT / "MLproject").read_text() == mlproject_text(), "run `smp mlproject > MLproject`"
    assert (ROOT / "smp" / "cli_spec.json").read_text() == cli_spec_text(), "run `smp cli-spec > smp/cli_spec.json`"


def test_every_entry_point_has_a_thin_script_and_same_parameters():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert set(spec) == set(jobs())
    for name, (_, default, _) in jobs().items():
        assert (ROOT / "entrypoints" / f"{name}.py").exists(), name
        params = spec[name]["parameters"]
        declared = [p[-1] for p, v in leaves(default) if v != ""]  # empty defaults: optional, not declared
        assert list(params) == declared
        for path, value in leaves(default):
            if value == "":
                continue
            assert str(params[path[-1]]["default"]).lower() == (
                ",".join(map(str, value)) if isinstance(value, tuple) else str(value)).lower()


def test_every_option_is_described_once():
    for name, entry in cli_spec().items():
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
    assert load_spec() == cli_spec()


def test_results_print_as_counts_flags_and_measurements():
    assert [result_text(v) for v in (3, True, False, 1.23456)] == ["3", "yes", "no", "1.2346"]


def test_cli_rejects_bad_values_and_reports_data_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "--max-depth", "2.5"])
    assert main(["benchmark", "--data", str(tmp_path / "absent.csv")]) == 2
