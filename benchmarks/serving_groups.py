"""Latency of one raw post through a served model: tabular only vs every feature group (tabular, time, user,
text), in process and through ``mlflow models serve``.

Generates a synthetic SMPD set (``--posts``), trains two benchmarks on it in a throw-away tracking store
(``features=tabular`` and ``features=tabular,time,user,text``; the same trees), then for each times ``--n``
single-post requests (after ``--warmup``), cycling over the first 20 posts:

* ``pyfunc``: ``mlflow.pyfunc.load_model(...).predict`` of a 1-row DataFrame of the fields the model reads
  (schema step, request checks, features, booster, statuses);
* ``HTTP``: a JSON ``dataframe_records`` POST to ``/invocations`` of ``mlflow models serve --env-manager
  local`` on loopback, one kept-alive ``requests.Session`` (one worker);
* ``HTTP, bad text``: the same post with a 1 MB title (NUL bytes in it) and 100,000 tags (``partial: text
  truncated`` from the all-groups model), to show what the text bounds cost.

Medians in ms. Everything it starts is stopped and the store removed at the end.

Run:  .venv/bin/python benchmarks/serving_groups.py [--n 50] [--posts 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"tabular": "tabular", "all groups": "tabular,time,user,text"}


def median_ms(fn, n: int, warmup: int) -> float:
    """Median wall time of ``fn(i)`` over ``n`` calls after ``warmup`` untimed ones, in ms."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_dir: str, log: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow models serve`` of ``model_dir`` on a free loopback port, once it answers ``/ping``."""
    import requests

    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_dir,
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"no /ping answer in 180 s: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def run(args, store: Path) -> dict:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    os.environ["SMP_CACHE_DIR"] = str(store / "cache")
    os.chdir(store)
    import mlflow
    import numpy as np
    import requests

    from smp.boosters import XGBCfg
    from smp.config import apply
    from smp.data import DataCfg, load_data
    from smp.serving import model_input
    from smp.splits import SplitCfg
    from smp.synth import SynthCfg, generate
    from smp.train import BenchmarkJob, run_benchmark

    data = generate(store / "smpd", SynthCfg(n=args.posts, seed=0))
    posts = load_data(str(data)).drop(columns=["label", "image_path"]).head(20).reset_index(drop=True)
    bad = posts.copy()
    bad["Title"] = "a\x00" * 500_000
    bad["Alltags"] = " ".join(f"t{i}" for i in range(100_000))
    xgb = XGBCfg(n_estimators=args.n_estimators, max_depth=args.max_depth, learning_rate=0.05,
                 early_stopping_rounds=50)
    results = {}
    for label, features in MODELS.items():
        cfg = apply(BenchmarkJob(source=DataCfg(data=str(data)), splitting=SplitCfg(sample_size=0), xgb=xgb,
                                 experiment="bench"), {"features": features})
        run_id = run_benchmark(cfg).run_id
        local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/benchmark", dst_path=str(store / label))
        model = mlflow.pyfunc.load_model(local)
        sent, sent_bad = model_input(model, posts), model_input(model, bad)  # the fields this model reads
        singles = [sent.iloc[[i]].reset_index(drop=True) for i in range(len(sent))]
        res = {"pyfunc": median_ms(lambda i: model.predict(singles[i % len(singles)]), args.n, args.warmup)}
        records = json.loads(sent.to_json(orient="records"))
        bad_records = json.loads(sent_bad.to_json(orient="records"))
        proc, url = serve(local, store / f"serve-{label.replace(' ', '_')}.log")
        try:
            session = requests.Session()

            def post(rows, i):
                r = session.post(f"{url}/invocations", json={"dataframe_records": [rows[i % len(rows)]]},
                                 timeout=60)
                r.raise_for_status()
                return r.json()["predictions"][0]

            res["HTTP"] = median_ms(lambda i: post(records, i), args.n, args.warmup)
            res["HTTP, bad text"] = median_ms(lambda i: post(bad_records, i), max(5, args.n // 5), 2)
            answer = post(bad_records, 0)
            assert np.isfinite(answer["popularity"]), answer
            res["bad text status"] = answer["status"]
        finally:
            stop(proc)
        results[label] = res
        print(label, res, flush=True)
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="single-post requests timed per measurement (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--posts", type=int, default=2000, help="synthetic posts to train on")
    ap.add_argument("--n-estimators", type=int, default=300)
    ap.add_argument("--max-depth", type=int, default=6)
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    out = str(Path(args.json).resolve()) if args.json else ""
    store = Path(tempfile.mkdtemp(prefix="smp-bench-groups-"))
    try:
        results = run(args, store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    names = ["pyfunc", "HTTP", "HTTP, bad text"]
    print(f"\nmedian ms of one post, {args.n} requests ({args.posts} synthetic posts, {args.n_estimators} trees "
          f"of depth {args.max_depth}, one server worker)\n")
    print("| model | " + " | ".join(names) + " | bad text status |")
    print("|---" * (len(names) + 2) + "|")
    for label, res in results.items():
        print(f"| {label} | " + " | ".join(f"{res[k]:.1f}" for k in names) + f" | {res['bad text status']} |")
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
