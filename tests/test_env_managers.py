"""`mlflow run` under the environment managers README names: `local` from a plain shell, and `uv`.

Every MLproject command starts with ``sh entrypoints/python.sh``, which finds the Python that has smp
installed whatever PATH holds: `python` on PATH (the environment MLflow built and activated, or the caller's
activated one), else the Python running `mlflow run`, else this checkout's .venv; it says what it tried when
none has smp. `--env-manager uv` builds a venv from conda.yaml (MLflow reads its python and pip lines).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "entrypoints" / "python.sh"
VENV_BIN = Path(sys.executable).parent
SMALL_BENCHMARK = ["sample_size=0", "n_estimators=30", "max_depth=3", "early_stopping_rounds=5"]


def _plain_env(**extra: str) -> dict[str, str]:
    """This process's environment as a fresh shell has it: no venv on PATH, nothing activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MLFLOW_RUN_ID")}
    return {**env, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **extra}


def _copy_launcher(tmp_path: Path) -> Path:
    """The launcher in a checkout of its own, without a .venv."""
    (tmp_path / "entrypoints").mkdir()
    shutil.copy(LAUNCHER, tmp_path / "entrypoints" / "python.sh")
    return tmp_path


def _no_smp_python(tmp_path: Path) -> Path:
    """A directory whose `python` has no smp (the probe fails), to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "python").chmod(0o755)
    return bin_dir


def test_launcher_without_a_python_that_has_smp_says_what_it_tried(tmp_path):
    checkout = _copy_launcher(tmp_path)
    env = _plain_env(PATH=f"{_no_smp_python(tmp_path)}:/usr/bin:/bin")
    # run under a shell that forks it, so its parent is no Python (as under `--env-manager uv`)
    out = subprocess.run(["sh", "-c", "sh entrypoints/python.sh entrypoints/run.py benchmark --data demo; exit $?"],
                         cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 127, out.stderr
    assert "no Python with smp installed to run entrypoints/run.py benchmark" in out.stderr
    assert f"python on PATH: {tmp_path}/bin/python (no smp)" in out.stderr
    assert f"{checkout}/.venv/bin/python: absent" in out.stderr
    assert "scripts/setup.sh" in out.stderr and "SMP_PYTHON" in out.stderr and "--env-manager uv" in out.stderr


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="the launcher reads its parent from /proc")
def test_launcher_runs_the_python_that_started_it_when_path_has_none(tmp_path):
    """As `.venv/bin/mlflow run --env-manager local` from a plain shell: bash execs the command, so the
    launcher's parent is the Python running mlflow."""
    checkout = _copy_launcher(tmp_path)
    env = _plain_env(PATH=f"{_no_smp_python(tmp_path)}:/usr/bin:/bin")
    launch = ("import subprocess\n"
              "subprocess.run(['sh', 'entrypoints/python.sh', '-c', 'import sys; print(sys.executable)'])")
    out = subprocess.run([sys.executable, "-c", launch], cwd=checkout, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == sys.executable, out.stdout + out.stderr


def test_launcher_runs_its_own_checkout_of_smp(tmp_path):
    """An environment that MLflow built for another checkout (it keys them by conda.yaml alone) has that
    checkout's smp installed: the launcher's checkout goes first."""
    checkout = _copy_launcher(tmp_path)
    (checkout / "smp").mkdir()
    (checkout / "smp" / "__init__.py").write_text("")
    env = _plain_env(PATH=f"{VENV_BIN}:/usr/bin:/bin")  # `python` on PATH has smp, installed from ROOT
    out = subprocess.run(["sh", "entrypoints/python.sh", "-c", "import smp; print(smp.__file__)"], cwd=checkout,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == checkout / "smp" / "__init__.py"


def _launch(env_manager: str, data: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    mlflow_bin = VENV_BIN / "mlflow"
    if not mlflow_bin.exists():
        pytest.skip(f"no mlflow script beside {sys.executable}")
    cmd = [str(mlflow_bin), "run", str(ROOT), "-e", "benchmark", "--env-manager", env_manager,
           "--experiment-name", "envs", "-P", f"data={data}"]
    for p in SMALL_BENCHMARK:
        cmd += ["-P", p]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


def _the_run(uri: str):
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("envs")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow  # a real `mlflow run` (about 15 s)
def test_local_env_manager_from_a_plain_shell(tmp_path, smpd_dir):
    """README's `.venv/bin/mlflow run . --env-manager local` with nothing activated: `python` on PATH is the
    system's (or none), and the command still runs in the Python that has smp."""
    env = _plain_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    out = _launch("local", str(smpd_dir), env, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    run = _the_run(env["MLFLOW_TRACKING_URI"])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("benchmark · "), run.info.run_name
    assert run.data.metrics["test_rmse"] > 0


def _uv_settings_from_pip() -> dict[str, str]:
    """UV_* variables (and SSL_CERT_FILE) for what pip's configuration says here: uv reads no pip.conf.

    find-links, extra-index-url, index-url, constraint and cert, from `pip config list` (files and PIP_*
    variables); a variable already set wins."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         timeout=60).stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        for item in shlex.split(value):  # the value is quoted; list options separate items by whitespace
            for part in item.split():
                if part not in found.setdefault(option, []):
                    found[option].append(part)
    names = {"find-links": ("UV_FIND_LINKS", ","), "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
             "index-url": ("UV_INDEX_URL", None), "constraint": ("UV_CONSTRAINT", " "),
             "cert": ("SSL_CERT_FILE", None)}
    settings = {}
    for option, (name, sep) in names.items():
        if found.get(option) and name not in os.environ:
            settings[name] = sep.join(found[option]) if sep else found[option][-1]
    return settings


@pytest.mark.slow  # builds a venv with uv (about 5 s from uv's cache, 40 s cold), then a real `mlflow run`
def test_uv_env_manager_builds_the_environment_from_conda_yaml(tmp_path, smpd_dir):
    """`mlflow run . -e benchmark --env-manager uv`: MLflow builds a venv from conda.yaml (python 3.11, then
    `pip: -e .`, i.e. pyproject.toml's dependencies) with uv, activates it and runs the command there.

    uv must be on PATH (it is in the test extra, so beside this Python). The venv goes to a fresh
    MLFLOW_ENV_ROOT under tmp_path, so each run builds it (MLflow would otherwise reuse one keyed by
    conda.yaml alone, possibly built from another checkout); uv's own cache (~/.cache/uv) is kept.

    Bounded download: left alone, uv resolves the newest torch on PyPI, on Linux the CUDA build and its
    nvidia-* wheels (about 3 GB). uv reads no pip.conf, so the test hands it pip's own settings as UV_*
    variables (_uv_settings_from_pip). On this workplace's machines and CI these are a constraint file that
    caps torch/torchvision at the releases on local disk and local indexes holding them: uv then installs the
    same torch as .venv from local files, and only small wheels (xgboost, nccl, mlflow: about 0.5 GB) from
    PyPI. Measured on 2 cores: env build 40 s with an empty uv cache (the cache then holds 6.8 GB), 3 s with a
    warm one; the whole test about 30 s warm. Elsewhere, set UV_* yourself (e.g. UV_INDEX for a CPU build of
    torch) or expect uv's first build to download torch once.
    """
    uv = shutil.which("uv", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if uv is None:
        pytest.skip("uv is not installed (pip install uv; it is in smp's test extra)")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MLFLOW_RUN_ID")}
    env.update(_uv_settings_from_pip())
    env.update({"PATH": f"{Path(uv).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
                "MLFLOW_ENV_ROOT": str(tmp_path / "envs"), "HF_HUB_OFFLINE": "1",
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    out = _launch("uv", str(smpd_dir), env, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    run = _the_run(env["MLFLOW_TRACKING_URI"])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("benchmark · "), run.info.run_name
    assert run.data.tags["mlflow.project.env"] == "uv"
    assert run.data.metrics["test_rmse"] > 0
    (env_dir,) = (tmp_path / "envs").iterdir()  # the venv uv built, with smp installed from this checkout
    check = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                            "import importlib.metadata as m; print(m.distribution('smp').version)"],
                           cwd="/", capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
