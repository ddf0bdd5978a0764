"""The promote race: K `smp promote --run-id` started at once, every candidate better than the
champion. How many tries end with the wrong champion, and how many leave two versions claiming to have
replaced the same champion?

Setup, once: a synthetic SMPD (400 posts) and, in experiment ``race``, a weak champion run plus K candidate
runs on the same data and split (so every comparison is on the same test posts), each better than the last:
the best candidate must end ``@champion`` whatever the order the promoters finish in.  Each try has its own
registered model ``race-<i>``: the weak run is promoted first (alone), then K ``smp promote --run-id``
processes start together, each after a random delay (0 to `--jitter` s, seeded).

Counted per try:
  * wrong champion: ``@champion`` is not the best candidate at the end;
  * fork: two versions tagged ``decision=champion`` name the same ``compared_against_version`` (each claims
    to have replaced the same champion; one of them was never compared with the other);
  * failed promoters (exit status not 0).

The promoters run the smp code under ``--code`` (default: this checkout), so the code before a change can be
measured from an export of an older commit:

    git archive e2d6f94 smp | tar -x -C /tmp/before     # the registry without the promote lease
    .venv/bin/python benchmarks/promote_race.py --tries 10 --code /tmp/before
    .venv/bin/python benchmarks/promote_race.py --tries 10
    .venv/bin/python benchmarks/promote_race.py --tries 10 --team   # PostgreSQL + mlflow server (scripts/pg.sh)

Runs are trained once with this checkout's smp (training is not what is measured).  Everything it starts is
stopped and its work directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # as docs/team.md: no GenAI job runner

from team import free_port, wait_healthy  # noqa: E402 - benchmarks/team.py: the team benchmark's server helpers


def train_runs(data: Path, k: int) -> tuple[str, list[str]]:
    """The weak champion's run and K candidate runs, best last; checks that their test RMSEs are in that order."""
    import mlflow

    from smp.boosters import XGBCfg
    from smp.data import DataCfg
    from smp.splits import SplitCfg
    from smp.train import BenchmarkJob, run_benchmark

    def train(n: int, depth: int) -> str:
        run_benchmark(BenchmarkJob(source=DataCfg(data=str(data)), splitting=SplitCfg(sample_size=0),
                                   xgb=XGBCfg(n_estimators=n, max_depth=depth, learning_rate=0.1,
                                              early_stopping_rounds=0), experiment="race"))
        return mlflow.last_active_run().info.run_id

    weak = train(3, 2)
    cands = [train(n, 3) for n in (10, 20, 40, 80, 160)[:k]]
    rmse = [mlflow.get_run(r).data.metrics["test_rmse"] for r in [weak, *cands]]
    if rmse != sorted(rmse, reverse=True):
        raise SystemExit(f"the runs' test RMSEs are not in decreasing order: {rmse}")
    print("test RMSE: champion " + ", candidates ".join(f"{x:.4f}" for x in rmse), flush=True)
    return weak, cands


def promote(env: dict, model: str, run_id: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smp.cli", "promote", "--run-id", run_id, "--model-name", model,
                             "--experiment", "race"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def one_try(env: dict, model: str, weak: str, cands: list[str], delays: list[float]) -> dict:
    import mlflow

    first = promote(env, model, weak)
    out = first.communicate()[0]
    if first.returncode != 0:
        raise SystemExit(f"promoting the weak champion failed:\n{out[-3000:]}")
    t0 = time.monotonic()
    procs = []
    for c, delay in sorted(zip(cands, delays), key=lambda x: x[1]):  # each starts after its random delay
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        procs.append(promote(env, model, c))
    outs = [p.communicate()[0] for p in procs]
    seconds = time.monotonic() - t0
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    champ = client.get_model_version_by_alias(model, "champion")
    versions = client.search_model_versions(f"name = '{model}'")
    beaten = [v.tags.get("compared_against_version") for v in versions
              if v.tags.get("decision") == "champion" and v.tags.get("compared_against_version")]
    failed = [o[-1500:] for p, o in zip(procs, outs) if p.returncode != 0]
    return {"model": model, "champion_run": champ.run_id, "wrong_champion": champ.run_id != cands[-1],
            "fork": len(beaten) != len(set(beaten)), "failed": len(failed), "seconds": round(seconds, 1),
            "delays": [round(d, 2) for d in delays],
            "failures": failed,
            "decisions": {v.version: (v.tags.get("decision"), v.tags.get("compared_against_version"))
                          for v in versions}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tries", type=int, default=10)
    ap.add_argument("--promoters", type=int, default=2, help="candidates promoted at once (2 to 5)")
    ap.add_argument("--code", default=str(ROOT), help="directory holding the smp package the promoters run")
    ap.add_argument("--jitter", type=float, default=2.0,
                    help="each promoter starts after a random delay of 0 to this many seconds (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--team", action="store_true", help="PostgreSQL + mlflow server instead of sqlite")
    ap.add_argument("--out", default="", help="write every try's outcome to this JSON file")
    args = ap.parse_args()
    code = Path(args.code).resolve()
    if not (code / "smp" / "registry.py").exists():
        raise SystemExit(f"--code {code}: no smp/registry.py there")
    work = Path(tempfile.mkdtemp(prefix="smp-bench-race-"))
    work.chmod(0o755)  # PostgreSQL's user must reach work/pg
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", SMP_CACHE_DIR=str(work / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    server = None
    try:
        if args.team:
            pg = subprocess.run(["bash", str(ROOT / "scripts" / "pg.sh"), "start", str(work / "pg"),
                                 str(free_port())], capture_output=True, text=True,
                                check=True).stdout.strip().splitlines()[-1]
            uri = f"http://127.0.0.1:{free_port()}"
            log = work / "mlflow-server.log"
            with open(log, "wb") as fh:
                server = subprocess.Popen(
                    [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{pg}/smp",
                     "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1",
                     "--port", uri.rsplit(":", 1)[1], "--workers", "2"],
                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env={**env, **SERVER_ENV})
            wait_healthy(uri, server, 300, log)
        else:
            uri = f"sqlite:///{work / 'mlflow.db'}"
        env["MLFLOW_TRACKING_URI"] = uri
        os.environ.update(MLFLOW_TRACKING_URI=uri, SMP_CACHE_DIR=env["SMP_CACHE_DIR"], MLFLOW_DISABLE_TELEMETRY="true")
        os.chdir(work)  # the sqlite store's artifacts (./mlruns) land in the work directory
        from smp.synth import SynthCfg, generate

        data = generate(work / "smpd", SynthCfg(n=400, seed=3))
        weak, cands = train_runs(data, args.promoters)
        import random

        rng = random.Random(args.seed)
        results = []
        for i in range(args.tries):
            r = one_try(env, f"race-{i}", weak, cands, [rng.uniform(0, args.jitter) for _ in cands])
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "failures"}), flush=True)
            for text in r["failures"]:
                print(text, flush=True)
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
    store = "PostgreSQL + mlflow server" if args.team else "sqlite"
    print(f"\n{store}, code {code}: {len(results)} tries of {args.promoters} promoters at once: "
          f"{sum(r['wrong_champion'] for r in results)} wrong champions, {sum(r['fork'] for r in results)} forks, "
          f"{sum(r['failed'] for r in results)} failed promoters; "
          f"median {sorted(r['seconds'] for r in results)[len(results) // 2]} s a race")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
