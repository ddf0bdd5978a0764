"""Serving an image model (issue 26): latency and cache-directory writes over many requests with new images.

Trains ``pca_boost`` (CLIP RN50 with random weights, as ``benchmarks/image_memory.py``; ``--clip-model smp-tiny``
for the tests' tiny CLIP) on 160 synthetic posts in a throw-away tracking store; its embed run fills the
feature cache with the training images, as a deployment's ``smp embed`` would. The model is then served by
``mlflow models serve --workers 1`` on loopback with ``SMP_CACHE_DIR`` = that cache, and:

* ``--n`` requests (default 400), one after another, each one post carrying an image never seen before
  (a JPEG drawn here, ``image_b64``): latency of each (median of the first 50, of the last 50, of all, p90),
  the HTTP statuses, and the files in the cache directory before and after;
* one request of ``--big-mb`` MB (default 200: one post whose ``image_b64`` is that long): HTTP status,
  answer, seconds and the serving worker's peak RSS before and after;
* ``--n-read-only`` more requests (default 50) to a second server whose cache directory is mounted
  read-only (``unshare -rm`` + a read-only bind mount, as in a container with a read-only filesystem):
  HTTP statuses and post statuses (skipped where ``unshare`` cannot do it).

The served model runs the smp code it was logged with (MLflow puts the model's ``code/`` first on
``sys.path``), so the code under test is the one this script imports: to measure another commit, put a
checkout of it first on ``PYTHONPATH`` (the script prints which ``smp`` it uses)::

    git worktree add /tmp/smp-before <commit>
    PYTHONPATH=/tmp/smp-before .venv/bin/python benchmarks/serve_cache.py --json before.json
    .venv/bin/python benchmarks/serve_cache.py --json after.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np


def train(work: Path, clip_model: str = "RN50", experiment: str = "serve_cache") -> Path:
    """pca_boost on 160 synthetic posts (random CLIP weights); the logged model as a local directory."""
    import mlflow

    from smp.data import DataCfg
    from smp.models import PCACfg, XGBCfg
    from smp.splits import SplitCfg
    from smp.synth import SynthCfg, generate
    from smp.train import PCABoostJob, UpstreamCfg, run_pca_boost

    data = generate(work / "smpd", SynthCfg(n=160, seed=3))
    run_pca_boost(PCABoostJob(source=DataCfg(data=str(data)), splitting=SplitCfg(sample_size=0),
                              xgb=XGBCfg(n_estimators=30, max_depth=3, early_stopping_rounds=5),
                              pca=PCACfg(n_components=8),
                              upstream=UpstreamCfg(clip_model=clip_model, clip_pretrained="none"),
                              experiment=experiment))
    run_id = mlflow.last_active_run().info.run_id
    return Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/pca_boost", dst_path=str(work / "model")))


def jpeg(seed: int, size: tuple[int, int] = (240, 320)) -> bytes:
    """A distinct JPEG: smooth noise plus a few coloured rectangles, drawn from ``seed``."""
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), size[::-1], interpolation=cv2.INTER_CUBIC)
    for _ in range(4):
        y, x = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
        img[y:y + 20 + int(rng.integers(0, 60)), x:x + 20 + int(rng.integers(0, 60))] = rng.integers(0, 256, 3)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def files_under(root: Path) -> list[str]:
    """Every file below ``root`` (relative paths), sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def unshare_works() -> bool:
    """Whether this machine lets an unprivileged user + mount namespace make a read-only bind mount."""
    probe = Path(tempfile.mkdtemp(prefix="smp-ro-probe-"))
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c",
                            'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && ! touch "$1/x" 2>/dev/null',
                            "sh", str(probe)], capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def serve(model: Path, port: int, env: dict, log: Path, read_only: Path | None = None) -> subprocess.Popen:
    """``mlflow models serve`` of ``model`` on loopback; with ``read_only``, that directory is mounted read-only."""
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    if read_only is not None:
        cmd = ["unshare", "-rm", "sh", "-c", 'd="$1"; shift; mount --bind "$d" "$d" && '
               'mount -o remount,ro,bind "$d" "$d" && exec "$@"', "sh", str(read_only), *cmd]
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no /ping answer in {timeout:.0f} s")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def proc_kb(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (``VmRSS``; ``VmHWM``: the peak since start or the last reset), 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker_pid(server_pid: int) -> int:
    """The serving worker: the server's descendant (or the server) with the largest RSS, the one that loaded
    the model (from the parent ids in /proc/*/stat)."""
    kids, frontier = [], [server_pid]
    while frontier:
        nxt = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) in frontier:
                        nxt.append(int(d.name))
                except (OSError, IndexError, ValueError):
                    pass
        kids += nxt
        frontier = nxt
    return max(kids + [server_pid], key=lambda p: proc_kb(p, "VmRSS"))


def send(url: str, row: dict, images: list[bytes]) -> tuple[list[float], Counter, Counter]:
    """One request per image (one post each): latencies (s), HTTP codes, post statuses (first 60 chars)."""
    import requests

    session = requests.Session()
    times, codes, statuses = [], Counter(), Counter()
    for i, data in enumerate(images):
        body = {"dataframe_records": [{**row, "Pid": f"req{i}", "image_b64": base64.b64encode(data).decode()}]}
        t0 = time.perf_counter()
        r = session.post(f"{url}/invocations", json=body, timeout=600)
        times.append(time.perf_counter() - t0)
        codes[r.status_code] += 1
        answer = r.json()
        statuses[answer["predictions"][0]["status"][:60] if r.ok else answer.get("message", "")[:60]] += 1
    return times, codes, statuses


def big_body(url: str, row: dict, mb: int, server_pid: int) -> dict:
    """One request whose body is ``mb`` MB (one post, ``image_b64`` of zero bytes): HTTP status, message,
    seconds, and the serving worker's peak RSS before and after (VmHWM, Linux)."""
    import requests

    pid = worker_pid(server_pid)
    peak_before = proc_kb(pid, "VmHWM")
    body = json.dumps({"dataframe_records": [{**row, "Pid": "big",
                                              "image_b64": base64.b64encode(bytes(mb * 10**6 * 3 // 4)).decode()}]})
    t0 = time.perf_counter()
    r = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=600)
    seconds = time.perf_counter() - t0
    answer = r.json()
    return {"body_mb": len(body) / 1e6, "http": r.status_code, "seconds": seconds,
            "answer": (answer["predictions"][0]["status"] if r.ok else answer.get("message", ""))[:200],
            "worker_peak_rss_mb_before": peak_before / 1024, "worker_peak_rss_mb_after": proc_kb(pid, "VmHWM") / 1024}


def summary(times: list[float]) -> dict:
    ms = [1000 * t for t in times]
    return {"first50_median_ms": statistics.median(ms[:50]), "last50_median_ms": statistics.median(ms[-50:]),
            "median_ms": statistics.median(ms), "p90_ms": float(np.percentile(ms, 90)), "n": len(ms)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="requests with a new image each (writable cache)")
    ap.add_argument("--n-read-only", type=int, default=50, help="requests to the read-only-cache server (0: skip)")
    ap.add_argument("--big-mb", type=int, default=200, help="then one request of this many MB (0: skip)")
    ap.add_argument("--clip-model", default="RN50", help="CLIP architecture (random weights); smp-tiny is fast")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    import smp

    print(f"smp under test: {Path(smp.__file__).parent}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="smp-serve-cache-"))
    cache = work / "cache"
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", SMP_CACHE_DIR=str(cache))
    out: dict = {"smp": str(Path(smp.__file__).parent), "clip_model": args.clip_model}
    procs = []
    try:
        model = train(work, args.clip_model)
        from smp.data import load_data

        posts = load_data(str(work / "smpd"))
        row = json.loads(posts.drop(columns=["label", "image_path"]).head(1).to_json(orient="records"))[0]
        warm = base64.b64encode(Path(posts["image_path"].iloc[0]).read_bytes()).decode()  # cached by training
        env = {**os.environ, "SMP_CACHE_DIR": str(cache),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        images = [jpeg(1000 + i) for i in range(args.n + args.n_read_only)]

        import requests

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        procs.append(serve(model, port, env, work / "serve.log"))
        wait_up(url, procs[-1], work / "serve.log")
        r = requests.post(f"{url}/invocations", json={"dataframe_records": [{**row, "image_b64": warm}]}, timeout=600)
        assert r.ok, r.text  # warm-up: CLIP loaded, the cache index read
        if args.n:
            before = files_under(cache)
            times, codes, statuses = send(url, row, images[:args.n])
            after = files_under(cache)
            out["writable"] = {**summary(times), "http": dict(codes), "statuses": dict(statuses),
                               "cache_files_before": len(before), "cache_files_after": len(after),
                               "chunk_files_added": len([f for f in set(after) - set(before) if f.endswith(".npz")])}
            print("writable cache:", json.dumps(out["writable"]), flush=True)
        if args.big_mb:
            out["big_body"] = big_body(url, row, args.big_mb, procs[-1].pid)
            print("big body:", json.dumps(out["big_body"]), flush=True)
        stop(procs.pop())

        if args.n_read_only and unshare_works():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            procs.append(serve(model, port, env, work / "serve-ro.log", read_only=cache))
            wait_up(url, procs[-1], work / "serve-ro.log")
            before = files_under(cache)
            times, codes, statuses = send(url, row, images[args.n:])
            out["read_only"] = {**summary(times), "http": dict(codes), "statuses": dict(statuses),
                                "cache_files_before": len(before), "cache_files_after": len(files_under(cache))}
            stop(procs.pop())
            print("read-only cache:", json.dumps(out["read_only"]), flush=True)
        elif args.n_read_only:
            out["read_only"] = "skipped: unshare cannot make a read-only bind mount here"
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
