"""Promotes at the same time (issue 26): real `smp promote` processes against sqlite and against team mode's
PostgreSQL-backed mlflow server, and the promote lease they share (mutual exclusion, a killed holder).

A race ends right when the best candidate is ``@champion`` and the champions form one chain: every version that
took the title names the champion it replaced (``compared_against_version``), no champion was replaced twice,
and following ``replaced_by`` from the first champion leads to the current one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from smp import registry
from smp.boosters import XGBCfg
from smp.data import DataCfg, DataError
from smp.splits import SplitCfg
from smp.train import BenchmarkJob, run_benchmark

from test_team import Team, team  # noqa: F401 - the team fixture: PostgreSQL + mlflow server on loopback

# smp promote, held after its first comparison until every promoter of the race has compared: each one has then
# compared its candidate with the same champion before any of them can move an alias (the race of issue 26)
GATED = """
import os, pathlib, sys, time
from smp import registry
gate, n, real, first = pathlib.Path(os.environ["RACE_GATE"]), int(os.environ["RACE_N"]), registry.judge, [True]
def judge(*args, **kwargs):
    out = real(*args, **kwargs)
    if first.pop() if first else False:
        (gate / str(os.getpid())).touch()
        deadline = time.monotonic() + 300
        while len(list(gate.iterdir())) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    return out
registry.judge = judge
from smp.cli import main
sys.exit(main(sys.argv[1:]))
"""

# takes the promote lease of model "m" N times; inside it, reads a counter, pauses, writes it + 1 (an update that
# is lost unless the lease excludes the others) and logs when it entered and left
LEASE_WORKER = """
import os, sys, time
from mlflow import MlflowClient
from smp import registry
counter, n = sys.argv[1], int(sys.argv[2])
client = MlflowClient()
for i in range(n):
    with registry.promote_lease(client, "m", f"worker {os.getpid()} #{i}"):
        t0 = time.time()
        value = int(open(counter).read())
        time.sleep(0.05)
        open(counter, "w").write(str(value + 1))
        open(counter + ".log", "a").write(f"{t0} {time.time()}\\n")
"""

# holds the lease of model "m" and sleeps (to be killed)
HOLDER = """
import time
from mlflow import MlflowClient
from smp import registry
with registry.promote_lease(MlflowClient(), "m", "holder"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture(autouse=True)
def _forget_tracking_uri():
    """Jobs run here against the team server set MLflow's global tracking URI: drop it afterwards."""
    yield
    mlflow.set_tracking_uri(None)


def train_runs(data: Path) -> tuple[str, list[str]]:
    """A weak champion and two candidates on the same data and split, each better than the last (test RMSE)."""
    def train(n: int, depth: int) -> str:
        run_benchmark(BenchmarkJob(source=DataCfg(data=str(data)), splitting=SplitCfg(sample_size=0),
                                   xgb=XGBCfg(n_estimators=n, max_depth=depth, learning_rate=0.1,
                                              early_stopping_rounds=0), experiment="race"))
        return mlflow.last_active_run().info.run_id

    runs = [train(3, 2), train(10, 3), train(40, 3)]
    rmse = [mlflow.get_run(r).data.metrics["test_rmse"] for r in runs]
    assert rmse == sorted(rmse, reverse=True), rmse  # the race needs a known best
    return runs[0], runs[1:]


def promote_cmd(model: str, run_id: str, gated: bool) -> list[str]:
    args = ["promote", "--run-id", run_id, "--model-name", model, "--experiment", "race"]
    return [sys.executable, "-c", GATED, *args] if gated else [sys.executable, "-m", "smp.cli", *args]


def race(env: dict, model: str, cands: list[str], cwd: Path, gated: bool) -> list[str]:
    """Promote every candidate at once, each in its own process; their outputs (all must exit 0)."""
    gate = cwd / f"gate-{model}"
    gate.mkdir()
    env = {**env, "RACE_GATE": str(gate), "RACE_N": str(len(cands)), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(promote_cmd(model, c, gated), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=cwd) for c in cands]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0])
    assert [p.returncode for p in procs] == [0] * len(procs), "\n\n".join(o[-3000:] for o in outs)
    return outs


def check_one_chain(client, model: str, weak: str, cands: list[str]) -> dict:
    """The best candidate is champion, and the champions form one chain; ``{run_id: version}``."""
    by_run = {v.run_id: v for v in client.search_model_versions(f"name = '{model}'")}
    by_version = {str(v.version): v for v in by_run.values()}
    assert sorted(by_run) == sorted([weak, *cands])
    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.run_id == cands[-1]
    beaten = [v.tags["compared_against_version"] for v in by_run.values() if v.tags.get("decision") == "champion"
              and "compared_against_version" in v.tags]
    assert len(beaten) == len(set(beaten)), "a champion was replaced twice (a candidate never compared with " \
                                            f"the other): {[(v.version, v.tags) for v in by_run.values()]}"
    chain, v = [], by_run[weak]
    while True:
        chain.append(str(v.version))
        if "replaced_by" not in v.tags:
            break
        nxt = by_version[v.tags["replaced_by"]]
        assert nxt.tags["decision"] == "champion" and nxt.tags["compared_against_version"] == str(v.version)
        v = nxt
    assert chain[-1] == str(champion.version)
    for run_id, v in by_run.items():  # every candidate not in the chain lost to a champion it was compared with
        if str(v.version) not in chain:
            assert v.tags["decision"] == "challenger" and v.tags["compared_against_version"] in chain
    assert client.search_model_versions(f"name = '{model}{registry.LEASE_SUFFIX}'") == []  # no ticket left
    return {r: str(v.version) for r, v in by_run.items()}


def check_gated_race(client, model: str, weak: str, cands: list[str]) -> None:
    """Both candidates compared with the weak champion before either moved an alias: the first to take the
    lease replaced it, the other found a champion it had not compared with and compared again."""
    version = check_one_chain(client, model, weak, cands)
    mid, best = cands
    first = client.get_model_version(model, version[weak]).tags["replaced_by"]
    promotes = client.search_runs([client.get_experiment_by_name("race").experiment_id],
                                  f"tags.`smp.registered_model` = '{model}' and tags.`smp.job` = 'promote'")
    rounds = {r.data.tags["smp.candidate_run"]: r.data.tags["smp.compare_rounds"] for r in promotes}
    mid_v, best_v = (client.get_model_version(model, version[r]) for r in (mid, best))
    if first == version[best]:  # the better one first: the other loses to it
        assert rounds == {weak: "1", best: "1", mid: "2"}
        assert mid_v.tags["decision"] == "challenger" and mid_v.tags["compared_against_version"] == version[best]
        assert client.get_model_version_by_alias(model, "challenger").version == mid_v.version
        again = mid
    else:  # the worse one first: the better one compares again and replaces it
        assert first == version[mid] and rounds == {weak: "1", mid: "1", best: "2"}
        assert best_v.tags["compared_against_version"] == version[mid]
        assert mid_v.tags["replaced_by"] == version[best]
        again = best
    note = next(r for r in promotes if r.data.tags["smp.candidate_run"] == again).data.tags["mlflow.note.content"]
    assert "It was compared 2 times: other promotes changed the champion while it was being compared." in note


def run_races(env: dict, cwd: Path, client, weak: str, cands: list[str], prefix: str) -> None:
    subprocess.run(promote_cmd(f"{prefix}-gated", weak, False), env=env, cwd=cwd, check=True, capture_output=True)
    outs = race(env, f"{prefix}-gated", cands, cwd, gated=True)
    assert any("comparing again (round 2 of" in o for o in outs), outs  # the console says why it took longer
    check_gated_race(client, f"{prefix}-gated", weak, cands)
    subprocess.run(promote_cmd(f"{prefix}-plain", weak, False), env=env, cwd=cwd, check=True, capture_output=True)
    race(env, f"{prefix}-plain", cands, cwd, gated=False)  # as a user would: plain `smp promote`, at once
    check_one_chain(client, f"{prefix}-plain", weak, cands)


@pytest.mark.slow
def test_promotes_racing_on_sqlite_end_with_the_best_champion(smpd_dir, tmp_path):
    weak, cands = train_runs(smpd_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", MLFLOW_DISABLE_TELEMETRY="true")
    run_races(env, tmp_path, mlflow.MlflowClient(), weak, cands, "sqlite")


@pytest.mark.integration
def test_promotes_racing_on_the_team_server_end_with_the_best_champion(team: Team, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.url)
    weak, cands = train_runs(team.data)
    run_races(team.env(), team.work, team.client(), weak, cands, "team")


@pytest.mark.integration
def test_a_champion_whose_artifacts_are_gone_on_the_server_loses_to_a_valid_candidate(team: Team,  # noqa: F811
                                                                                       monkeypatch):
    """On the team server a missing artifact is an error answer from a server that is up: the champion cannot be
    loaded, which is not the same as a server that does not answer."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.url)
    weak, (mid, best) = train_runs(team.data)
    model = "team-broken"
    env = team.env()
    subprocess.run(promote_cmd(model, best, False), env=env, cwd=team.work, check=True, capture_output=True)
    client = team.client()
    model_id = client.get_run(best).outputs.model_outputs[-1].model_id
    gone = [p for p in (team.work / "artifacts").rglob(model_id) if p.is_dir()]
    assert gone, f"no artifact directory for {model_id} under {team.work / 'artifacts'}"
    for p in gone:
        import shutil

        shutil.rmtree(p)
    out = subprocess.run(promote_cmd(model, mid, False), env=env, cwd=team.work, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.run_id == mid and champion.tags["comparison"] == "champion_unloadable"
    because = champion.tags["champion_unloadable_because"]
    assert because.startswith("champion v1 can no longer be loaded (its artifacts are missing from mlflow-artifacts:/")
    assert 'Could not find an "MLmodel" configuration file' in because
    assert client.get_model_version(model, "1").tags["replaced_by"] == champion.version


# --------------------------------------------------------------------------- the lease itself
@pytest.mark.slow
def test_the_promote_lease_excludes_other_processes(tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", MLFLOW_DISABLE_TELEMETRY="true")
    mlflow.MlflowClient().search_experiments()  # the store's tables exist before the workers start
    workers = [subprocess.Popen([sys.executable, "-c", LEASE_WORKER, str(counter), "5"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    assert counter.read_text() == "15"  # no update lost
    spans = sorted(tuple(map(float, line.split())) for line in Path(f"{counter}.log").read_text().splitlines())
    assert len(spans) == 15 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two inside at once
    assert mlflow.MlflowClient().search_model_versions(f"name = 'm{registry.LEASE_SUFFIX}'") == []


@pytest.mark.slow
def test_a_promoter_killed_holding_the_lease_blocks_the_others_only_until_it_expires(tmp_path, monkeypatch, caplog):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", MLFLOW_DISABLE_TELEMETRY="true")
    mlflow.MlflowClient().search_experiments()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        client = mlflow.MlflowClient()
        # while its holder lives, a promoter waits, then gives up naming the holder (here after 2 s)
        monkeypatch.setattr(registry, "LEASE_WAIT_S", 2.0)
        with pytest.raises(DataError, match=rf"m: waited 2 s for the promote lease, held by holder on .*, pid "
                                            rf"{holder.pid} \(ticket v1 of m\.promote-lease\); nothing was changed"):
            with registry.promote_lease(client, "m", "waiter"):
                pass
        os.killpg(holder.pid, signal.SIGKILL)  # killed inside the lease: it never releases its ticket
        holder.wait(30)
        monkeypatch.setattr(registry, "LEASE_WAIT_S", 600.0)
        monkeypatch.setattr(registry, "LEASE_S", 4.0)  # (120 s by default)
        monkeypatch.setattr(registry, "LEASE_MARGIN_S", 1.0)
        t0 = time.monotonic()
        with registry.promote_lease(client, "m", "after") as lease:
            waited = time.monotonic() - t0
            tickets = client.search_model_versions(f"name = 'm{registry.LEASE_SUFFIX}'")
            assert [t.tags["promoting"] for t in tickets] == ["after"] and lease.left() > 1.0
        assert 1.0 < waited < 30  # until the dead holder's ticket expired, not forever
        assert "promote ticket v1 (holder on" in caplog.text and "expired: its promoter stopped" in caplog.text
        assert client.search_model_versions(f"name = 'm{registry.LEASE_SUFFIX}'") == []
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()


def test_a_holder_whose_lease_ran_short_moves_nothing():
    lease = registry.Lease("m.promote-lease", "3", time.monotonic() - registry.LEASE_S + 10)
    with pytest.raises(DataError, match=r"the promote lease on m\.promote-lease ran short \(10 s left, at least 60 s "
                                        r"are needed\) before moving m's aliases: .*nothing more was changed"):
        lease.check("moving m's aliases")
