"""The CLI and the MLproject mirror each other one to one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from smp.cli import apply, build_parser, jobs, leaves, main, mlproject_text
from smp.train import BenchmarkJob

ROOT = Path(__file__).resolve().parents[1]


def test_mlproject_is_generated_from_the_job_configs():
    assert (ROOT / "MLproject").read_text() == mlproject_text(), "run `smp mlproject > MLproject`"


def test_every_entry_point_has_a_thin_script_and_same_parameters():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert set(spec) == set(jobs())
    for name, (_, default, _) in jobs().items():
        assert (ROOT / "entrypoints" / f"{name}.py").exists(), name
        params = spec[name]["parameters"]
        assert list(params) == [p[-1] for p, _ in leaves(default)]
        for path, value in leaves(default):
            assert str(params[path[-1]]["default"]).lower() == (
                ",".join(map(str, value)) if isinstance(value, tuple) else str(value)).lower()


def test_cli_parses_into_config():
    args = build_parser().parse_args(["benchmark", "--max-depth", "7", "--split", "chrono", "--sample_size", "100"])
    cfg = apply(BenchmarkJob(), {k: getattr(args, k) for k in ("max_depth", "split", "sample_size")})
    assert cfg.xgb.max_depth == 7 and cfg.splitting.split == "chrono" and cfg.splitting.sample_size == 100
    assert cfg.xgb.learning_rate == 0.01  # untouched defaults stay the paper's


def test_cli_rejects_bad_values_and_reports_data_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "--max-depth", "2.5"])
    assert main(["benchmark", "--data", str(tmp_path / "absent.csv")]) == 2
