"""Team mode: latency of one tracking-server request, by how `mlflow server` is run (docs/team.md).

Starts a throwaway PostgreSQL (``scripts/pg.sh``), then for each server configuration an ``mlflow server``
on loopback with that database, waits ``--settle`` seconds after it answers ``/health``, and times, from
one client, ``--n`` calls of each:
  * ``GET /api/2.0/mlflow/runs/get`` on one kept-alive ``requests.Session`` (how the MLflow client talks),
  * the same ``GET`` on a fresh connection each time,
  * ``MlflowClient.get_run`` and ``MlflowClient.set_tag``.
Medians in ms.  A kept-alive request much slower than a fresh one is Nagle's algorithm meeting a delayed
ACK: uvicorn with ``--workers`` > 1 leaves ``TCP_NODELAY`` off (Kludex/uvicorn#3149).  Everything it starts
is stopped at the end.

Run:  .venv/bin/python benchmarks/server_latency.py [--n 15] [--settle 5] [--job-runner]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from team import ROOT, SERVER_ENV, free_port, wait_healthy  # noqa: E402  (the team benchmark's helpers)

CONFIGS = ["--workers 4", "--workers 2", "--workers 1", "--workers 2 --gunicorn-opts '--timeout 120'"]


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(pg: str, opts: str, work: Path, args) -> dict:
    import mlflow
    import requests

    url = f"http://127.0.0.1:{free_port()}"
    log = work / f"server-{abs(hash(opts))}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", **({} if args.job_runner else SERVER_ENV))
    with open(log, "wb") as fh:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{pg}/smp",
             "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1",
             "--port", url.rsplit(":", 1)[1], *shlex.split(opts)],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_healthy(url, server, 300, log)
        time.sleep(args.settle)
        client = mlflow.MlflowClient(tracking_uri=url)
        run_id = client.create_run("0").info.run_id
        api = f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}"
        session = requests.Session()
        session.get(api).raise_for_status()
        return {
            "GET kept-alive": median_ms(lambda: session.get(api).raise_for_status(), args.n),
            "GET fresh connection": median_ms(lambda: requests.get(api).raise_for_status(), args.n),
            "MlflowClient.get_run": median_ms(lambda: client.get_run(run_id), args.n),
            "MlflowClient.set_tag": median_ms(lambda: client.set_tag(run_id, "k", "v"), args.n),
        }
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=15, help="calls per measurement (median reported)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to wait after /health answers")
    ap.add_argument("--job-runner", action="store_true",
                    help="leave MLflow's GenAI job runner on (MLFLOW_SERVER_ENABLE_JOB_EXECUTION unset)")
    ap.add_argument("--configs", nargs="+", default=CONFIGS, help="mlflow server options, one string each")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smp-bench-latency-"))
    work.chmod(0o755)  # PostgreSQL's user must reach work/pg
    rows = []
    try:
        pg = subprocess.run(["bash", str(ROOT / "scripts" / "pg.sh"), "start", str(work / "pg"), str(free_port())],
                            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        for opts in args.configs:
            rows.append((opts, measure(pg, opts, work, args)))
            print(opts, {k: round(v, 1) for k, v in rows[-1][1].items()}, flush=True)
    finally:
        if (work / "pg").exists():
            subprocess.run(["bash", str(ROOT / "scripts" / "pg.sh"), "stop", str(work / "pg")])
        shutil.rmtree(work, ignore_errors=True)
    names = list(rows[0][1]) if rows else []
    print(f"\nmedian ms over {args.n} calls, one client, {args.settle:g} s after start, job runner "
          f"{'on' if args.job_runner else 'off'}\n")
    print("| mlflow server options | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for opts, res in rows:
        print(f"| `{opts}` | " + " | ".join(f"{res[k]:.1f}" for k in names) + " |")


if __name__ == "__main__":
    main()
