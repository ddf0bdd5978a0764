"""Team mode: tuning throughput and logging overhead.

Starts a throwaway PostgreSQL (``scripts/pg.sh``) and ``mlflow server`` on 127.0.0.1, then runs the same
study budget with ``scripts/tune_workers.sh N`` for each N in ``--workers`` (PostgreSQL for Optuna, the
server for MLflow), and once with 1 worker on the sqlite default (``mlflow.db`` + ``optuna.db``).
Everything it starts is stopped at the end.

Fixed budget: ``--trials`` parameter sets are drawn once from the benchmark search space
(``smp.spaces.xgb_space``) by a seeded RandomSampler and enqueued in every study, and pruning is off
(``--pruner none``), so every configuration trains exactly the same models; only the workers differ.

Measured (each worker process is the real ``smp tune`` with timers wrapped around library calls):
  * trials per minute: trials / (last trial's end - first trial's start), from Optuna's timestamps;
    and end to end (process start-up, study creation and the per-worker summary included);
  * per trial: wall time of the objective; time inside MLflow calls (outermost ``mlflow.*`` /
    ``MlflowClient`` calls: runs, params, metrics, dataset inputs, figures, the logged model);
    time in Optuna's per-round ``report``/``should_prune`` (XGBoost pruning callback, one storage
    round trip per report, counted inside ``fit_seconds``); data preparation (``prepare``);
    the job's logged ``fit_seconds``.  Medians over trials.

Run:  .venv/bin/python benchmarks/team.py [--posts ../shared/data/smpd2019/posts.csv] [--sample-size 20000]
                                          [--trials 8] [--workers 1,2,4] [--skip-sqlite] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # scripts/ live beside benchmarks/
OUT_ENV = "SMP_BENCH_OUT"  # JSON lines written by the instrumented workers
# as scripts/team_demo.sh and docs/team.md: no GenAI job runner (7 huey processes, ~1.6 GB, ~40 s of CPU at start)
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# as docs/team.md: gunicorn (uvicorn with --workers > 1 leaves Nagle on, Kludex/uvicorn#3149: +40 ms a request)
SERVER_OPTS = "--workers 2 --gunicorn-opts '--timeout 120'"


# --------------------------------------------------------------------------- inside a worker process
def instrument(out_path: str) -> None:
    """Wrap MLflow's API, Optuna's report/should_prune and smp's prepare with timers; log one line per trial."""
    import functools

    import mlflow
    import mlflow.artifacts
    import mlflow.data
    import mlflow.models
    import mlflow.pyfunc
    import optuna

    spent = {"mlflow": 0.0, "optuna_round": 0.0, "prepare": 0.0}
    by_call: dict[str, float] = {}  # MLflow seconds per outermost function
    depth = [0]  # only the outermost timed call counts (mlflow.log_model calls MlflowClient, ...)

    def timed(fn, bucket):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                dt = time.perf_counter() - t0
                spent[bucket] += dt
                if bucket == "mlflow":
                    by_call[fn.__qualname__] = by_call.get(fn.__qualname__, 0.0) + dt
        return wrapper

    fluent = ["start_run", "end_run", "log_params", "log_param", "log_metrics", "log_metric", "set_tags", "set_tag",
              "log_input", "log_figure", "log_dict", "log_artifact", "log_artifacts", "log_text", "set_experiment",
              "get_run", "search_runs", "get_experiment_by_name", "create_experiment", "last_active_run",
              "register_model"]
    for name in fluent:
        setattr(mlflow, name, timed(getattr(mlflow, name), "mlflow"))
    for module, name in ((mlflow.pyfunc, "log_model"), (mlflow.pyfunc, "load_model"), (mlflow.data, "from_pandas"),
                         (mlflow.artifacts, "download_artifacts"), (mlflow.models, "get_model_info")):
        setattr(module, name, timed(getattr(module, name), "mlflow"))
    for name, member in vars(mlflow.MlflowClient).items():
        if not name.startswith("_") and callable(member):
            setattr(mlflow.MlflowClient, name, timed(member, "mlflow"))
    for name in ("report", "should_prune"):
        setattr(optuna.trial.Trial, name, timed(getattr(optuna.trial.Trial, name), "optuna_round"))

    from smp import train, tune

    train.prepare = timed(train.prepare, "prepare")
    make_objective = tune.objective_for

    def objective_for(cfg, parent_run_id):
        objective = make_objective(cfg, parent_run_id)

        def timed_objective(trial):
            before, t0, start = dict(spent), time.perf_counter(), time.time()
            by_call.clear()
            try:
                return objective(trial)
            finally:
                row = {"trial": trial.number, "pid": os.getpid(), "start": start,
                       "wall_s": time.perf_counter() - t0, **{f"{k}_s": spent[k] - before[k] for k in spent},
                       "mlflow_calls": {k: round(v, 3) for k, v in sorted(by_call.items(), key=lambda kv: -kv[1])}}
                with open(out_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        return timed_objective

    tune.objective_for = objective_for


def worker_main(argv: list[str]) -> int:
    """``team.py _worker -m smp.cli tune ...``: the `smp tune` process, instrumented (PYTHON for tune_workers.sh)."""
    assert argv[:2] == ["-m", "smp.cli"], argv
    instrument(os.environ[OUT_ENV])
    from smp.cli import main

    return main(argv[2:])


# --------------------------------------------------------------------------- the driver
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"mlflow server did not come up on {url}:\n{log.read_text()[-3000:]}")


def draw_params(n: int, seed: int) -> list[dict]:
    """``n`` parameter sets from the benchmark search space, by a seeded RandomSampler."""
    import optuna

    from smp.spaces import xgb_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(xgb_space(trial))
        study.tell(trial, 0.0)
    return out


def run_config(label: str, workers: int, env: dict, storage: str, args, params: list[dict], work: Path) -> dict:
    """One study of len(params) enqueued trials with ``workers`` processes; the measurements."""
    import mlflow
    import optuna

    from smp.tune import make_storage

    study_name = f"bench-{label}"
    optuna.create_study(study_name=study_name, storage=make_storage(storage), direction="minimize")
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    for p in params:
        study.enqueue_trial(p)
    out_path = work / f"{label}.jsonl"
    wrapper = work / "python-instrumented"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} _worker \"$@\"\n")
    wrapper.chmod(0o755)
    per_worker = -(-len(params) // workers)
    cmd = ["bash", str(ROOT / "scripts" / "tune_workers.sh"), str(workers), "--data", args.posts,
           "--sample-size", str(args.sample_size), "--model", "benchmark", "--study-name", study_name,
           "--storage", storage, "--experiment", study_name, "--n-trials", str(per_worker),
           "--max-trials", str(len(params)), "--pruner", "none"]
    log = work / f"{label}.log"
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=work, start_new_session=True,
                                env={**env, "PYTHON": str(wrapper), OUT_ENV: str(out_path)})
        try:
            proc.wait(args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    end_to_end = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: tune_workers.sh failed (rc {proc.returncode}):\n{log.read_text()[-4000:]}")
    trials = optuna.load_study(study_name=study_name, storage=make_storage(storage)).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(study_name)
    fit = {}
    for r in client.search_runs([exp.experiment_id], "tags.`smp.job` = 'benchmark'", max_results=1000):
        fit[int(r.data.tags["optuna.trial_number"])] = r.data.metrics.get("time/fit_s", float("nan"))
    for row in rows:
        row["fit_s"] = fit.get(row["trial"], float("nan"))
        row["mlflow_share"] = row["mlflow_s"] / row["wall_s"]
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("wall_s", "mlflow_s", "mlflow_share", "optuna_round_s", "prepare_s", "fit_s")}
    return {"label": label, "workers": workers, "trials": len(done), "span_s": span, "end_to_end_s": end_to_end,
            "trials_per_min": 60 * len(done) / span, "trials_per_min_end_to_end": 60 * len(done) / end_to_end,
            "median": med, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", default="../shared/data/smpd2019/posts.csv")
    ap.add_argument("--sample-size", type=int, default=20000)
    ap.add_argument("--trials", type=int, default=8, help="trials per configuration (the same parameter sets)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the draw of the parameter sets")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--skip-sqlite", action="store_true")
    ap.add_argument("--server-opts", default=SERVER_OPTS,
                    help="mlflow server options (see docs/team.md; '--workers 4' = MLflow's default)")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per configuration")
    ap.add_argument("--out", default="", help="write all measurements to this JSON file")
    args = ap.parse_args()
    args.posts = str(Path(args.posts).resolve())
    params = draw_params(args.trials, args.seed)
    work = Path(tempfile.mkdtemp(prefix="smp-bench-team-"))
    work.chmod(0o755)  # PostgreSQL's user must reach work/pg
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base_env.update(MLFLOW_DISABLE_TELEMETRY="true", SMP_CACHE_DIR=str(work / "cache"))
    results, server = [], None
    try:
        if not args.skip_sqlite:
            sqlite_env = {**base_env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'sqlite' / 'mlflow.db'}"}
            (work / "sqlite").mkdir()
            storage = f"sqlite:///{work / 'sqlite' / 'optuna.db'}"  # = the default beside mlflow.db
            results.append(run_config("sqlite-1", 1, sqlite_env, storage, args, params, work))
            print(summary_line(results[-1]), flush=True)
        pg = subprocess.run(["bash", str(ROOT / "scripts" / "pg.sh"), "start", str(work / "pg"), str(free_port())],
                            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        url = f"http://127.0.0.1:{free_port()}"
        log = work / "mlflow-server.log"
        with open(log, "wb") as fh:
            server = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{pg}/smp",
                 "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1",
                 "--port", url.rsplit(":", 1)[1], *shlex.split(args.server_opts)],
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env={**base_env, **SERVER_ENV})
        wait_healthy(url, server, 300, log)
        for n in [int(x) for x in args.workers.split(",")]:
            env = {**base_env, "MLFLOW_TRACKING_URI": url}
            results.append(run_config(f"pg-{n}", n, env, f"{pg}/optuna", args, params, work))
            print(summary_line(results[-1]), flush=True)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        if (work / "pg").exists():
            subprocess.run(["bash", str(ROOT / "scripts" / "pg.sh"), "stop", str(work / "pg")])
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results, args))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "params": params, "results": results}, indent=1))


def summary_line(r: dict) -> str:
    m = r["median"]
    return (f"{r['label']}: {r['trials']} trials, {r['trials_per_min']:.2f} trials/min "
            f"({r['trials_per_min_end_to_end']:.2f} end to end); median trial {m['wall_s']:.1f} s, "
            f"MLflow {m['mlflow_s']:.2f} s ({100 * m['mlflow_share']:.1f}%), Optuna per-round {m['optuna_round_s']:.1f} s, "
            f"prepare {m['prepare_s']:.1f} s, fit_seconds {m['fit_s']:.1f} s")


def table(results: list[dict], args) -> str:
    head = (f"posts {args.posts}, --sample-size {args.sample_size}, {args.trials} trials per configuration "
            f"(same parameter sets), pruning off, server `{args.server_opts}`; medians over trials\n\n"
            "| store | workers | trials/min (trial span) | trials/min (end to end) | trial wall s | MLflow s | "
            "MLflow % | Optuna per-round s | prepare s | fit_seconds |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        m = r["median"]
        store = "sqlite (default)" if r["label"].startswith("sqlite") else "PostgreSQL + mlflow server"
        lines.append(f"| {store} | {r['workers']} | {r['trials_per_min']:.2f} | {r['trials_per_min_end_to_end']:.2f} | "
                     f"{m['wall_s']:.1f} | {m['mlflow_s']:.2f} | {100 * m['mlflow_share']:.1f} | "
                     f"{m['optuna_round_s']:.1f} | {m['prepare_s']:.1f} | {m['fit_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    main()
