"""Team mode under faults: PostgreSQL + `mlflow server`, several tuning workers, promotes racing.

One PostgreSQL (``scripts/pg.sh``) and one ``mlflow server`` (runs and registry in PostgreSQL,
artifacts served from a directory) on free 127.0.0.1 ports for the whole module; the Optuna studies
live in the same PostgreSQL.  Workers are real ``smp tune`` processes, as on a team's machines.
Skipped only when PostgreSQL's server binaries cannot be found (``apt-get install -y postgresql``).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pytest

from smp.data import DataCfg
from smp.splits import SplitCfg
from smp.tracking import TrackingUnavailable
from smp.tune import StudyCfg, TuneJob, run_tune

pytestmark = pytest.mark.integration

HEARTBEAT = 3  # seconds; a trial without a heartbeat for 5x this is stale (smp.tune.make_storage); a dead worker on this machine is found by its process at once
# Bounded client retries: rides out a server restart (0+2+4+...+64 s, about two minutes), then a clear error.
RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
# The server without MLflow's GenAI job runner (7 huey processes at start), as docs/team.md recommends.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# Trials enqueued with fixed parameters (n_estimators below the search space's 200: Optuna warns, uses them):
# FAST ones take seconds on the tiny data, SLOW runs for minutes when every round is reported to Optuna
# (`--report-every 1`).
GOOD = {"max_depth": 3, "learning_rate": 0.3, "n_estimators": 20, "min_child_weight": 1.0, "subsample": 1.0,
        "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001}
FAST = [{**GOOD, "max_depth": 2 + i % 4, "learning_rate": round(0.3 - 0.02 * i, 2)} for i in range(8)]
SLOW = {**GOOD, "max_depth": 6, "learning_rate": 0.005, "n_estimators": 3000}
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.fixture(autouse=True)
def _forget_tracking_uri():
    """In-process jobs here set MLflow's global tracking URI to the team server: drop it afterwards."""
    yield
    mlflow.set_tracking_uri(None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, every: float = 0.5):
    """Poll ``condition()`` until it returns something truthy (returned) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(url: str) -> bool:
    import requests

    try:
        return requests.get(f"{url}/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@dataclass
class Team:
    """A PostgreSQL and an `mlflow server` on loopback, plus the tiny data the workers tune on."""

    root: Path        # the repository (scripts/)
    work: Path        # throwaway: pg/, artifacts/, logs, data
    pg: str           # postgresql+psycopg2://smp@127.0.0.1:PORT (databases smp and optuna)
    url: str          # http://127.0.0.1:PORT of the tracking server
    data: Path        # synthetic SMPD, 160 posts
    server: subprocess.Popen | None = None

    @property
    def storage(self) -> str:
        return f"{self.pg}/optuna"

    @functools.cached_property
    def optuna(self) -> optuna.storages.RDBStorage:
        """One storage (one connection pool) for all the polling done here: a URL per call would open a pool each."""
        return optuna.storages.RDBStorage(self.storage)

    def enqueue(self, study: str, trials) -> None:
        """Create the study if needed and enqueue trials with fixed parameters."""
        s = optuna.create_study(study_name=study, storage=self.optuna, direction="minimize", load_if_exists=True)
        for params in trials:
            s.enqueue_trial(params)

    def env(self, **extra) -> dict:
        """The environment of a team member's process: the server as tracking URI, bounded retries."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        return {**env, "MLFLOW_TRACKING_URI": self.url, "SMP_CACHE_DIR": str(self.work / "cache"), **RETRY_ENV,
                "MLFLOW_DISABLE_TELEMETRY": "true",  # see scripts/tune_workers.sh
                "OMP_NUM_THREADS": "1", **extra}  # several XGBoost workers on a few cores

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.url, registry_uri=self.url)

    def start_server(self, timeout: float = 300) -> None:
        port = self.url.rsplit(":", 1)[1]
        log = open(self.work / "mlflow-server.log", "ab")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{self.pg}/smp",
             "--artifacts-destination", str(self.work / "artifacts"), "--host", "127.0.0.1", "--port", port,
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env(**SERVER_ENV))
        log.close()
        deadline = time.monotonic() + timeout
        while not healthy(self.url):
            if self.server.poll() is not None or time.monotonic() > deadline:
                tail = (self.work / "mlflow-server.log").read_text(errors="replace")[-3000:]
                self.stop_server()
                pytest.fail(f"mlflow server did not come up on {self.url}:\n{tail}")
            time.sleep(1)

    def stop_server(self, grace: float = 60) -> None:
        """SIGTERM the server's process group (uvicorn workers included), SIGKILL after ``grace`` s."""
        if self.server is None:
            return
        for sig, grace in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.server.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.server.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        self.server = None


@pytest.fixture(scope="module")
def team(pytestconfig):
    """PostgreSQL + mlflow server on free loopback ports for this module; everything stopped afterwards."""
    root = pytestconfig.rootpath
    pg_sh = root / "scripts" / "pg.sh"
    found = subprocess.run(["bash", str(pg_sh), "bindir"], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip("PostgreSQL server binaries not found ($PG_BIN, `pg_config --bindir`, "
                    "/usr/lib/postgresql/*/bin); install them with `apt-get install -y postgresql`")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.fail("psycopg2 is missing: `pip install -e .[team]` (or psycopg2-binary)")
    work = Path(tempfile.mkdtemp(prefix="smp-team-"))  # not under pytest's private tmp: postgres must reach it
    work.chmod(0o755)
    started = subprocess.run(["bash", str(pg_sh), "start", str(work / "pg"), str(free_port())], capture_output=True,
                             text=True, timeout=120)
    if started.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        pytest.fail(f"scripts/pg.sh start failed:\n{started.stdout}\n{started.stderr}")
    from smp.synth import SynthCfg, generate

    t = Team(root=root, work=work, pg=started.stdout.strip().splitlines()[-1],
             url=f"http://127.0.0.1:{free_port()}", data=generate(work / "smpd", SynthCfg(n=160, seed=3)))
    try:
        t.start_server()
        yield t
    finally:
        if "optuna" in t.__dict__:
            t.optuna.engine.dispose()
        t.stop_server(grace=5)  # nothing left to flush: PostgreSQL holds the data
        subprocess.run(["bash", str(pg_sh), "stop", str(work / "pg")], timeout=120)
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- helpers
def tune_args(team: Team, study: str, *extra: str) -> list[str]:
    return ["--data", str(team.data), "--sample-size", "0", "--model", "benchmark", "--study-name", study,
            "--storage", team.storage, "--experiment", study, *extra]


def worker(team: Team, study: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """One `smp tune` worker process (its output in a log file under work/)."""
    log = open(team.work / f"{study}-{time.monotonic_ns()}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "smp.cli", "tune", *tune_args(team, study, *extra)],
                            stdout=log, stderr=subprocess.STDOUT, env=env or team.env(), cwd=team.work)
    proc.log_path = log.name
    log.close()
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a worker; its output.  Fails the test (and kills the worker) if it overruns."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"worker {proc.pid} ran over {timeout} s:\n{Path(proc.log_path).read_text()[-3000:]}")
    return Path(proc.log_path).read_text(errors="replace")


def create_study(team: Team, study: str, monkeypatch, enqueue=()) -> str:
    """Create the study and its parent run here (as `--n-trials 0` does), enqueue trials; the parent id."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.url)
    team.enqueue(study, enqueue)
    run_tune(TuneJob(source=DataCfg(data=str(team.data)), splitting=SplitCfg(sample_size=0),
                     study=StudyCfg(n_trials=0, study_name=study, storage=team.storage), experiment=study))
    return load(team, study).user_attrs["mlflow_parent_run_id"]


def load(team: Team, study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=team.optuna)


def trial_runs(team: Team, study: str, parent: str) -> list:
    exp = team.client().get_experiment_by_name(study).experiment_id
    return team.client().search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


def check_one_run_per_trial(team: Team, study: optuna.Study, parent: str) -> dict:
    """No trial lost or run twice: numbers 0..n-1, each with exactly one nested run; ``{number: run}``."""
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(len(numbers)))
    runs = trial_runs(team, study.study_name, parent)
    by_trial = {}
    for r in runs:
        n = int(r.data.tags["optuna.trial_number"])
        assert n not in by_trial, f"trial {n} has two runs: {by_trial[n].info.run_id}, {r.info.run_id}"
        by_trial[n] = r
    assert sorted(by_trial) == numbers
    for t in study.trials:
        assert t.user_attrs.get("mlflow_run_id") in (None, by_trial[t.number].info.run_id)
    return by_trial


# --------------------------------------------------------------------------- 4 workers, server restarted mid-study
@dataclass
class SharedStudy:
    name: str
    parent: str
    output: str          # tune_workers.sh's output, all workers
    before: dict         # run id -> Run, as read just before the tracking server was restarted
    downtime: float      # seconds the tracking server was away


@pytest.fixture(scope="module")
def four_workers(team):
    """`scripts/tune_workers.sh 4` x 2 trials on one study; once trials have finished, the tracking
    server is stopped and started again while the workers go on."""
    name = "four"
    team.enqueue(name, FAST)  # quick trials; the script itself creates the parent run
    log = team.work / "four.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(team.root / "scripts" / "tune_workers.sh"), "4",
                                 *tune_args(team, name, "--n-trials", "2", "--heartbeat", str(HEARTBEAT))],
                                stdout=out, stderr=subprocess.STDOUT, env={**team.env(), "PYTHON": sys.executable},
                                cwd=team.work, start_new_session=True)
    try:
        def some_done():
            trials = load(team, name).trials
            return sum(t.state in DONE for t in trials) >= 2 or proc.poll() is not None

        wait_for(some_done, 400, "2 trials to finish", every=1)
        assert proc.poll() is None, log.read_text()[-4000:]
        study = load(team, name)
        parent = study.user_attrs["mlflow_parent_run_id"]
        before = {r.info.run_id: r for r in trial_runs(team, name, parent)}
        before[parent] = team.client().get_run(parent)
        down = time.monotonic()
        team.stop_server()
        assert not healthy(team.url)
        time.sleep(2)
        team.start_server()
        downtime = time.monotonic() - down
        proc.wait(max(60.0, 600 - (time.monotonic() - t0)))
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its workers
        proc.wait()
        raise
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output[-5000:]
    print(f"tune_workers.sh 4 x 2 trials: {time.monotonic() - t0:.0f} s, tracking server down {downtime:.0f} s")
    return SharedStudy(name, parent, output, before, downtime)


def test_four_workers_lose_no_trial_and_run_none_twice(team, four_workers):
    study = load(team, four_workers.name)
    assert len(study.trials) == 8 and all(t.state in DONE for t in study.trials), four_workers.output[-3000:]
    assert study.user_attrs["mlflow_parent_run_id"] == four_workers.parent
    assert f"parent run {four_workers.parent}: starting 4 workers" in four_workers.output
    by_trial = check_one_run_per_trial(team, study, four_workers.parent)
    assert all(r.info.status in ("FINISHED", "KILLED") for r in by_trial.values())  # KILLED = pruned
    finished = [r for r in by_trial.values() if r.info.status == "FINISHED"]
    assert min(r.data.metrics["val_rmse"] for r in finished) == pytest.approx(study.best_value)
    assert by_trial[study.best_trial.number].data.metrics["val_rmse"] == pytest.approx(study.best_value)
    for w in range(4):  # every worker ran trials of this study
        assert f"[w{w}] study {four_workers.name}: parent run {four_workers.parent}" in four_workers.output


def test_tracking_server_restart_mid_study_loses_nothing(team, four_workers):
    assert "Retrying" in four_workers.output  # workers met the stopped server and retried (urllib3's warning)
    assert len(four_workers.before) >= 3  # the parent and the finished trials' runs, at least
    client = team.client()
    for run_id, old in four_workers.before.items():  # what was logged before the restart is all still there
        new = client.get_run(run_id)
        assert old.data.params.items() <= new.data.params.items()
        assert old.data.tags.keys() <= new.data.tags.keys()
        if run_id != four_workers.parent:  # (the parent's summary metrics are rewritten by each worker)
            assert old.data.metrics.items() <= new.data.metrics.items()
        if old.info.status == "FINISHED" and run_id != four_workers.parent:
            assert new.info.status == "FINISHED"
            assert client.get_logged_model(old.outputs.model_outputs[0].model_id).status.name == "READY"


def test_two_promotes_at_once_make_one_champion(team, four_workers):
    cmd = [sys.executable, "-m", "smp.cli", "promote", "--experiment", four_workers.name,
           "--model-name", "smp-team-race"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=team.env(),
                              cwd=team.work) for _ in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0])
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    client = team.client()
    versions = client.search_model_versions("name = 'smp-team-race'")
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
    champion = client.get_model_version_by_alias("smp-team-race", "champion")
    assert champion.version == versions[0].version
    assert champion.run_id == load(team, four_workers.name).best_trial.user_attrs["mlflow_run_id"]


# --------------------------------------------------------------------------- a worker killed mid-trial
def test_killed_worker_fails_its_trial_and_the_study_goes_on(team, monkeypatch):
    name = "killed"
    parent = create_study(team, name, monkeypatch, enqueue=[SLOW, *FAST[:3]])
    # every boosting round reported (a PostgreSQL round trip each) keeps the SLOW trial busy for minutes
    hb = ["--heartbeat", str(HEARTBEAT), "--pruner", "none", "--report-every", "1"]
    workers = [worker(team, name, "--n-trials", "2", *hb), worker(team, name, "--n-trials", "2", *hb)]
    try:
        def slow_trial_training_and_another_done():
            trials = load(team, name).trials
            run_id = trials[0].user_attrs.get("mlflow_run_id") if trials else None
            if not (run_id and trials[1:2] and trials[1].state in DONE):
                return None
            return run_id if team.client().get_run(run_id).info.status == "RUNNING" else None

        killed_run = wait_for(slow_trial_training_and_another_done, 300,
                              "trial 0 (slow) training, RUNNING in MLflow, and trial 1 finished")
        # the worker that holds trial 0 has finished nothing; the other one logs "Trial 1 finished"
        logged = wait_for(lambda: [p for p in workers if "Trial 1 finished" in Path(p.log_path).read_text()], 30,
                          "a worker's log line 'Trial 1 finished'")
        other, victim = logged[0], next(p for p in workers if p is not logged[0])
        assert load(team, name).trials[0].state == optuna.trial.TrialState.RUNNING
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        time.sleep(3 * HEARTBEAT + 1)  # trial 0 is stale from now on
        # the killed worker, started again (here, in-process): it fails the stale trial, then runs one
        for key, value in RETRY_ENV.items():
            monkeypatch.setenv(key, value)
        run_tune(TuneJob(source=DataCfg(data=str(team.data)), splitting=SplitCfg(sample_size=0), experiment=name,
                         study=StudyCfg(n_trials=1, study_name=name, storage=team.storage, heartbeat=HEARTBEAT,
                                        pruner="none", parent_run=parent)))
        out = finish(other)
        assert other.returncode == 0, out[-3000:]
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
                p.wait()

    study = load(team, name)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert len(study.trials) == 4 and all(t.state in DONE for t in study.trials[1:])
    by_trial = check_one_run_per_trial(team, study, parent)
    assert by_trial[0].info.run_id == killed_run
    stale = team.client().get_run(killed_run)
    assert stale.info.status == "KILLED" and stale.data.tags["smp.trial_state"] == "STALE"
    assert [n for n, r in by_trial.items() if r.info.status == "RUNNING"] == []


# --------------------------------------------------------------------------- no server at all
def test_a_server_that_stays_down_fails_clearly(smpd_dir, tmp_path, monkeypatch):
    dead = f"127.0.0.1:{free_port()}"
    for key, value in {"MLFLOW_TRACKING_URI": f"http://{dead}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}.items():
        monkeypatch.setenv(key, value)
    cfg = TuneJob(source=DataCfg(data=str(smpd_dir)), splitting=SplitCfg(sample_size=0),
                  study=StudyCfg(n_trials=1, study_name="down", storage=f"sqlite:///{tmp_path}/optuna.db"))
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="is not answering") as err:  # the check at start, no retries
        run_tune(cfg)
    assert time.monotonic() - t0 < 30
    assert dead in str(err.value)


def test_team_demo_script_end_to_end(pytestconfig, tmp_path):
    """`scripts/team_demo.sh`: PostgreSQL + server + a 2-worker study + promote + serve, then nothing left behind."""
    root = pytestconfig.rootpath
    if subprocess.run(["bash", str(root / "scripts" / "pg.sh"), "bindir"], capture_output=True).returncode != 0:
        pytest.skip("PostgreSQL server binaries not found: install them with `apt-get install -y postgresql`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(WORKERS="2", TRIALS="1", SMP_CACHE_DIR=str(tmp_path / "cache"), MLFLOW_DISABLE_TELEMETRY="true")
    out = subprocess.run(["bash", "scripts/team_demo.sh"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=1200)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    served = re.search(r"smp-popularity v1 \(@champion, run (\w+)\) predicted (\d+) posts: (\{.*)", text)
    assert served, text[-4000:]
    assert int(served.group(2)) > 0 and '"predictions": [' in served.group(3)
    work = re.search(r"were in (\S+) \(removed on exit", text).group(1)
    assert not Path(work).exists()  # the throwaway directory (database, artifacts, logs) is gone
    left = [line for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
            .splitlines() if work in line]
    assert left == []  # no PostgreSQL or mlflow server still running from it
    ports = re.findall(r"on http://127\.0\.0\.1:(\d+)", text)  # the tracking server's and the model server's
    assert len(ports) == 2
    for port in ports:
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect(("127.0.0.1", int(port)))  # refused: nobody listens any more
