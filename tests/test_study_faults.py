"""Studies under faults (issue 26, "Studies"; docs/reliability.md): a worker killed with kill -9 mid-trial, a study
name reused on other data or another split, a `tune` that fails on a bad setting.

Workers are real ``smp tune`` processes where the fault is a process's (kill -9); the rules themselves are also
checked in-process on hand-made trials (a dead pid on this machine, a worker elsewhere, a stopped heartbeat).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest

from smp.config import ConfigError
from smp.data import DataCfg, DataError
from smp.splits import SplitCfg
from smp.spaces import xgb_space
from smp.tune import (PARENT_ATTR, StudyCfg, TuneJob, fail_stale_trials, make_storage, open_study, resume_seed,
                      run_tune, this_worker)

pytestmark = pytest.mark.slow

RUNNING, FAIL, COMPLETE = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL,
                           optuna.trial.TrialState.COMPLETE)
GOOD = {"max_depth": 3, "learning_rate": 0.3, "n_estimators": 200, "min_child_weight": 1.0, "subsample": 1.0,
        "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001}


def _cfg(smpd_dir, tmp_path, split: dict | None = None, data=None, **study) -> TuneJob:
    study = {"model": "benchmark", "n_trials": 1, "study_name": "s", "storage": f"sqlite:///{tmp_path}/optuna.db",
             **study}
    splitting = SplitCfg(**{"sample_size": 0, **(split or {})})
    return TuneJob(source=DataCfg(data=str(data or smpd_dir)), splitting=splitting, study=StudyCfg(**study),
                   experiment="tune")


def _cli(smpd_dir, storage, *args) -> list[str]:
    return [sys.executable, "-m", "smp.cli", "tune", "--data", str(smpd_dir), "--sample-size", "0",
            "--model", "benchmark", "--storage", storage, "--experiment", "tune", *args]


def _runs(experiment="tune") -> list:
    exp = mlflow.get_experiment_by_name(experiment)
    return [] if exp is None else mlflow.search_runs([exp.experiment_id], output_format="list")


def _first_proposal(seed: int) -> dict:
    """What a fresh TPE sampler seeded ``seed`` proposes first in the benchmark's space."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    trial = study.ask()
    xgb_space(trial)
    return trial.params


def _slow_seed() -> int:
    """A sampler seed whose first proposal trains longest (most trees per unit of learning rate): that trial is
    still training when it is killed."""
    return max(range(10), key=lambda s: _first_proposal(s)["n_estimators"] / _first_proposal(s)["learning_rate"])


def _wait(condition, timeout: float, what: str, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the worker exited ({proc.returncode}) before {what}:\n{log.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


# --------------------------------------------------------------------------- a worker killed with kill -9
def _signal_mid_trial(args: list[str], storage: str, study: str, signum: int, tmp_path):
    """Start ``smp tune ARGS`` (one trial, every boosting round reported: a storage write each keeps it busy),
    send ``signum`` once it trains (5 rounds reported, its MLflow run recorded); ``(process, trial then, output)``."""
    log = open(tmp_path / "victim.log", "w+")
    victim = subprocess.Popen(args + ["--n-trials", "1", "--report-every", "1"], stdout=log, stderr=subprocess.STDOUT,
                              text=True, cwd=tmp_path)
    try:
        def training():
            try:
                trials = optuna.load_study(study_name=study, storage=storage).trials
            except KeyError:
                return None
            t = trials[0] if trials else None
            return t if t and t.state == RUNNING and "mlflow_run_id" in t.user_attrs and \
                len(t.intermediate_values) >= 5 else None

        trial = _wait(training, 180, "trial 0 training (5 rounds reported, its MLflow run recorded)", victim, log)
        victim.send_signal(signum)
        victim.wait(60)
    finally:
        if victim.poll() is None:
            victim.kill()
        log.seek(0)
        out = log.read()
        log.close()
    return victim, trial, out


def test_kill_9_mid_trial_then_resume_fails_the_trial_ends_its_run_and_proposes_new_parameters(smpd_dir, tmp_path):
    storage, seed = f"sqlite:///{tmp_path}/optuna.db", _slow_seed()
    args = _cli(smpd_dir, storage, "--study-name", "killed", "--sampler-seed", str(seed), "--pruner", "none")
    victim, killed, _ = _signal_mid_trial(args, storage, "killed", signal.SIGKILL, tmp_path)
    run_id = killed.user_attrs["mlflow_run_id"]
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # what kill -9 leaves: RUNNING in both stores
    assert killed.user_attrs["worker"]["pid"] == victim.pid

    # the same command again: the stale trial is failed at once, its run ended, and the sampler moves on
    resumed = subprocess.run(args + ["--n-trials", "1"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "study killed: trial(s) [0] were RUNNING with their worker gone" in resumed.stderr

    study = optuna.load_study(study_name="killed", storage=storage)
    t0, t1 = study.trials
    assert (t0.state, t1.state) == (FAIL, COMPLETE)
    assert t0.user_attrs["fail_reason"].startswith(f"its worker (pid {victim.pid} on ")
    run = mlflow.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["smp.trial_state"] == "STALE"
    assert run.data.tags["smp.end_reason"].startswith(f"trial 0 of study killed: its worker (pid {victim.pid} on ")
    assert [r.info.run_name for r in _runs() if r.info.status == "RUNNING"] == []
    # the killed trial's parameters were the seed's first proposal; a sampler seeded alike again would have
    # proposed them again (trial 1 = trial 0): the resumed study's sampler is seeded from (seed, 1 trial)
    assert t0.params == _first_proposal(seed)
    assert t1.params != t0.params and t1.params == _first_proposal(resume_seed(seed, 1))
    assert mlflow.get_run(study.user_attrs[PARENT_ATTR]).data.metrics["study/trials_fail"] == 1


def test_sigterm_mid_trial_fails_the_trial_at_once(smpd_dir, tmp_path):
    """SIGTERM is no Exception to Optuna, which would leave the trial RUNNING: the stopping worker fails it."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = _cli(smpd_dir, storage, "--study-name", "termed", "--sampler-seed", str(_slow_seed()), "--pruner", "none")
    victim, trial, out = _signal_mid_trial(args, storage, "termed", signal.SIGTERM, tmp_path)
    assert victim.returncode == 143, out[-3000:]
    (t0,) = optuna.load_study(study_name="termed", storage=storage).trials
    assert t0.state == FAIL and t0.user_attrs["fail_reason"] == "stopped by SIGTERM"
    run = mlflow.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["smp.end_reason"] == "SIGTERM"


def test_a_resumed_study_continues_its_sampler_sequence_instead_of_replaying_it(smpd_dir, tmp_path):
    cfg = _cfg(smpd_dir, tmp_path, sampler_seed=7)

    def fake(trial):  # the sampler is what is checked: no training
        p = xgb_space(trial)
        return p["learning_rate"] + p["max_depth"] / 100

    open_study(cfg).optimize(fake, n_trials=2)
    resumed = open_study(cfg)  # a new process opening the study, as `smp tune` does on resume
    resumed.optimize(fake, n_trials=2)
    params = [t.params for t in resumed.trials]
    assert all(params[i] != params[j] for i in range(4) for j in range(i))
    # what it did before: a sampler seeded 7 again starts over (trial 2 = trial 0)
    assert params[0] == _first_proposal(7) and resume_seed(7, 0) == 7 and resume_seed(7, 2) != 7


def _trial_with_run(study, worker: dict, client, experiment_id: str, parent: str):
    """A RUNNING trial of ``study`` held by ``worker``, with a RUNNING MLflow run as a trial's (tags, nesting)
    but no ``mlflow_run_id`` on the trial (killed before its first step recorded it)."""
    trial = study.ask()
    trial.set_user_attr("worker", worker)
    run = client.create_run(experiment_id, run_name=f"trial {trial.number}", tags={
        "mlflow.parentRunId": parent, "optuna.study": study.study_name, "optuna.trial_number": str(trial.number)})
    return trial, run.info.run_id


def test_stale_rules_dead_pid_here_failed_at_once_workers_elsewhere_and_live_ones_left_alone(smpd_dir, tmp_path):
    cfg = _cfg(smpd_dir, tmp_path, n_trials=0)
    run_tune(cfg)
    study = open_study(cfg)
    client = mlflow.MlflowClient()
    parent = study.user_attrs[PARENT_ATTR]
    exp = client.get_run(parent).info.experiment_id
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {**this_worker(), "pid": int(done.stdout), "started": "1"}  # a process of this machine, now gone
    elsewhere = {**dead, "host": "other", "machine": "other|boot|pid:[1]"}  # only heartbeats can tell
    live = this_worker()
    trials = {name: _trial_with_run(study, w, client, exp, parent)
              for name, w in (("dead", dead), ("elsewhere", elsewhere), ("live", live))}
    assert fail_stale_trials(study) == [trials["dead"][0].number]
    state = {t.number: t.state for t in study.trials}
    status = {name: client.get_run(run_id).info.status for name, (_, run_id) in trials.items()}
    assert [state[trials[n][0].number] for n in ("dead", "elsewhere", "live")] == [FAIL, RUNNING, RUNNING]
    assert status == {"dead": "KILLED", "elsewhere": "RUNNING", "live": "RUNNING"}
    reason = client.get_run(trials["dead"][1]).data.tags["smp.end_reason"]
    assert reason.startswith(f"trial 0 of study s: its worker (pid {dead['pid']} on {dead['host']}) is gone")
    assert fail_stale_trials(study) == []  # once only


def test_heartbeat_fails_a_silent_trial_after_the_grace_period_never_a_beating_one(smpd_dir, tmp_path):
    from smp.tune import GRACE_BEATS

    cfg = _cfg(smpd_dir, tmp_path, n_trials=0, heartbeat=1)
    run_tune(cfg)
    study = open_study(cfg)
    client = mlflow.MlflowClient()
    parent = study.user_attrs[PARENT_ATTR]
    exp = client.get_run(parent).info.experiment_id
    elsewhere = {**this_worker(), "host": "other", "machine": "other|boot|pid:[1]", "pid": 4242}
    silent, silent_run = _trial_with_run(study, elsewhere, client, exp, parent)
    beating, beating_run = _trial_with_run(study, elsewhere, client, exp, parent)
    storage = study._storage
    storage.record_heartbeat(silent._trial_id)
    deadline = time.monotonic() + GRACE_BEATS * 1 + 1.5
    while time.monotonic() < deadline:  # the other worker keeps beating, this one went silent
        storage.record_heartbeat(beating._trial_id)
        time.sleep(0.5)
    storage.record_heartbeat(beating._trial_id)
    fail_stale_trials(study)
    assert [t.state for t in study.trials] == [FAIL, RUNNING]
    run = client.get_run(silent_run)
    assert run.info.status == "KILLED" and run.data.tags["smp.trial_state"] == "STALE"
    assert run.data.tags["smp.end_reason"] == (f"trial 0 of study s: no heartbeat from its worker (pid 4242 on other) "
                                               f"for {GRACE_BEATS} s (one every 1 s expected): presumed dead")
    assert client.get_run(beating_run).info.status == "RUNNING"


def test_a_failed_heartbeat_write_does_not_stop_the_heartbeat(tmp_path, monkeypatch, caplog):
    storage = make_storage(f"sqlite:///{tmp_path}/hb.db", heartbeat=1)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    calls = []

    def locked(self, trial_id):
        calls.append(trial_id)
        raise RuntimeError("database is locked")

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", locked)
    storage.record_heartbeat(trial._trial_id)  # Optuna's heartbeat thread would end here; ours logs and goes on
    assert calls == [trial._trial_id] and "trial heartbeat not recorded" in caplog.text


def test_two_workers_with_heartbeats_never_fail_each_others_live_trials(smpd_dir, tmp_path):
    """Team mode on one sqlite study: trials longer than the grace period (1 s beats, 5 s grace) all finish."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cfg = _cfg(smpd_dir, tmp_path, study_name="team")
    slow = {**GOOD, "learning_rate": 0.0005, "n_estimators": 3000}  # 3,000 rounds, each reported (a storage write)
    study = open_study(cfg)
    for _ in range(2):
        study.enqueue_trial(slow)
    args = _cli(smpd_dir, storage, "--study-name", "team", "--heartbeat", "1", "--pruner", "none",
                "--report-every", "1", "--n-trials", "1")
    t0 = time.monotonic()
    procs = [subprocess.Popen(args + ["--sampler-seed", str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=tmp_path) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    study = optuna.load_study(study_name="team", storage=storage)
    assert [t.state for t in study.trials] == [COMPLETE, COMPLETE]
    assert min(t.duration.total_seconds() for t in study.trials) > 5, "trials shorter than the grace period"
    assert time.monotonic() - t0 < 300


# --------------------------------------------------------------------------- a study name reused on other data
def test_a_study_reused_on_another_split_or_other_data_is_refused_naming_both(smpd_dir, tmp_path):
    cfg = _cfg(smpd_dir, tmp_path, n_trials=0)
    run_tune(cfg)
    study = optuna.load_study(study_name="s", storage=cfg.study.storage)
    made = study.user_attrs["identity"]
    assert {k: made[k] for k in ("model", "data", "split", "sample_size", "seed")} == {
        "model": "benchmark", "data": str(smpd_dir), "split": "random", "sample_size": 0, "seed": 0}
    assert len(made["data_hash"]) == 16 and len(made["rows"]) == 16
    before = {r.info.run_id for r in _runs()}

    with pytest.raises(ConfigError) as err:
        run_tune(_cfg(smpd_dir, tmp_path, split={"split": "chrono"}))
    message = str(err.value)
    assert message.startswith(f"study 's' in {cfg.study.storage} was made on other data or another split "
                              "(split random -> chrono): its 0 trials would be compared "
                              "with this run's across different data.")
    assert f"data_hash {made['data_hash']}" in message and "--study-name smp-benchmark-chrono-" in message

    other = tmp_path / "other.csv"  # other posts: the first 120 of the same data
    from smp.data import load_data

    load_data(str(smpd_dir)).drop(columns=["image_path"]).head(120).to_csv(other, index=False)
    with pytest.raises(ConfigError, match=rf"\(data_hash {made['data_hash']} -> [0-9a-f]{{16}}\)"):
        run_tune(_cfg(smpd_dir, tmp_path, data=other))
    with pytest.raises(ConfigError, match=r"sample_size 0 -> 140"):  # other rows of the same data
        run_tune(_cfg(smpd_dir, tmp_path, split={"sample_size": 140}))
    with pytest.raises(ConfigError, match=r"model benchmark -> pca_boost"):
        run_tune(_cfg(smpd_dir, tmp_path, model="pca_boost", study_name="s"))
    # nothing was added: no trial, no run
    assert optuna.load_study(study_name="s", storage=cfg.study.storage).trials == []
    assert {r.info.run_id for r in _runs()} == before
    # the same data elsewhere (a copy) and sample_size 0 or above the post count (the same rows) continue it
    copy = shutil.copytree(smpd_dir, tmp_path / "copy")
    run_tune(_cfg(smpd_dir, tmp_path, data=copy, split={"sample_size": 80000}, n_trials=0))


def test_the_cli_refuses_a_reused_study_with_exit_2(smpd_dir, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    run_tune(_cfg(smpd_dir, tmp_path, n_trials=0, study_name="smp-benchmark-random"))
    out = subprocess.run(_cli(smpd_dir, storage, "--split", "chrono", "--study-name", "smp-benchmark-random",
                              "--n-trials", "1"), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 2
    assert "bad parameter: study 'smp-benchmark-random'" in out.stderr and "split random -> chrono" in out.stderr


def test_a_study_made_before_identities_gets_one_recorded(smpd_dir, tmp_path):
    cfg = _cfg(smpd_dir, tmp_path)
    optuna.create_study(study_name="s", storage=cfg.study.storage)  # as an older smp made it
    study = open_study(cfg)
    assert study.user_attrs["identity"]["data_hash"] and study.user_attrs["identity"]["split"] == "random"


# --------------------------------------------------------------------------- bad settings
BAD_SETTINGS = [  # (smp tune arguments, what it says); each is refused with exit status 2
    (["--model", "benchmark", "--learning-rate", "-1"], "unrecognized arguments: --learning-rate -1"),
    (["--model", "foo"], "bad parameter: model='foo': expected one of benchmark, pca_boost"),
    (["--n-trials", "-3"], "bad parameter: n_trials=-3: expected -1 (until timeout), 0 (only create) or more"),
    (["--report-every", "0"], "bad parameter: report_every=0: expected a number >= 1"),
    (["--heartbeat", "-5"], "bad parameter: heartbeat=-5: expected a number >= 0"),
    (["--pruner", "sometimes"], "bad parameter: pruner='sometimes': expected one of median, hyperband, none"),
    (["--split", "weekly"], "bad parameter: split='weekly'"),
    (["--sample-size", "-5"], "bad parameter: sample_size=-5"),
    (["--data", "/nonexistent/posts.csv"], "/nonexistent/posts.csv: no such file or directory"),
]


def test_a_tune_that_fails_on_a_bad_setting_leaves_no_study_and_no_run(smpd_dir, tmp_path):
    """Each case in a process of its own (run side by side), with its own study storage and MLflow store."""
    import os

    procs = []
    for i, (args, _) in enumerate(BAD_SETTINGS):
        (tmp_path / str(i)).mkdir()
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/{i}/mlflow.db"}
        procs.append(subprocess.Popen(_cli(smpd_dir, f"sqlite:///{tmp_path}/{i}/optuna.db", "--n-trials", "1") + args,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=tmp_path / str(i)))
    for i, ((args, says), proc) in enumerate(zip(BAD_SETTINGS, procs)):
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 2 and says in out, (args, out[-2000:])
        if (tmp_path / str(i) / "optuna.db").exists():
            assert optuna.get_all_study_names(f"sqlite:///{tmp_path}/{i}/optuna.db") == [], args
        if (tmp_path / str(i) / "mlflow.db").exists():
            mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/{i}/mlflow.db")
            assert mlflow.search_runs(search_all_experiments=True, output_format="list") == [], args


def test_a_fresh_study_whose_trials_all_fail_on_bad_data_is_removed_with_its_parent_run(smpd_dir, tmp_path):
    """The image families refuse data without images only when a trial starts: the study and parent go."""
    from smp.data import load_data

    posts = tmp_path / "posts.csv"
    load_data(str(smpd_dir)).drop(columns=["image_path"]).to_csv(posts, index=False)
    cfg = _cfg(smpd_dir, tmp_path, data=posts, model="ensemble_mlp", study_name="")
    with pytest.raises(DataError, match="this data has no images"):
        run_tune(cfg)
    assert optuna.get_all_study_names(cfg.study.storage) == []
    assert _runs() == []  # the parent and the trial's run are deleted (restorable: `mlflow runs restore`)
    deleted = mlflow.search_runs(search_all_experiments=True, run_view_type=mlflow.entities.ViewType.DELETED_ONLY,
                                 output_format="list")
    assert sorted(r.info.run_name.split(" · ")[0] for r in deleted) == ["trial 0", "tune"]


def test_a_study_that_holds_other_trials_is_kept_when_a_run_fails(smpd_dir, tmp_path):
    """Only a study this process created, with nothing but failed trials, is removed."""
    from smp.data import load_data

    posts = tmp_path / "posts.csv"
    load_data(str(smpd_dir)).drop(columns=["image_path"]).to_csv(posts, index=False)
    cfg = _cfg(smpd_dir, tmp_path, data=posts, model="ensemble_mlp", n_trials=0)
    run_tune(cfg)  # created (team mode's first step), then a worker fails on the data
    with pytest.raises(DataError):
        run_tune(_cfg(smpd_dir, tmp_path, data=posts, model="ensemble_mlp"))
    study = optuna.load_study(study_name="s", storage=cfg.study.storage)
    assert [t.state for t in study.trials] == [FAIL]
    assert mlflow.get_run(study.user_attrs[PARENT_ATTR]).info.lifecycle_stage == "active"
