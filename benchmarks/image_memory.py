"""Bad images (issue 13): peak memory of the serving worker for one request, by image.

Trains ``pca_boost`` (CLIP RN50 with random weights, a small booster) on a synthetic SMPD set of 160
posts in a throw-away tracking store, serves it with ``mlflow models serve --workers 1`` on loopback
(``SMP_SERVE_IMAGE_ROOT`` set, so ``image_path`` is read too), warms the worker with one request (CLIP
loaded, one image embedded), then for each case:

* resets the worker's peak RSS (``/proc/<pid>/clear_refs`` = 5, Linux >= 4.0), sends one request of one
  post, reads ``VmHWM`` (the peak since the reset) and ``VmRSS`` before it;
* reports the HTTP status, the post's ``status``, the wall time of the request, and the peak RSS.

The worker is the server's descendant process with the largest RSS (the one that loaded the model). Cases:
a normal JPEG (``image_b64``), a decompression-bomb PNG (30,000 x 30,000 1-bit pixels, ~110 KB, written
row by row here, never as an array) as ``image_b64`` and as ``image_path``, and a truncated JPEG. For
scale, the last row is what decoding the same PNG costs when nothing refuses it (Pillow with its own limit
lifted, ``convert("RGB")`` as a decoder pipeline would), in a fresh subprocess (``ru_maxrss``).

Run:  .venv/bin/python benchmarks/image_memory.py [--json out.json] [--no-unguarded]
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_cache import free_port, proc_kb, serve, stop, train, wait_up, worker_pid  # noqa: E402 - the serving helpers


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A complete 1-bit greyscale PNG of black pixels, compressed row by row (no pixel array is built)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\0" * (1 + math.ceil(width / 8))  # filter byte + the packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def unguarded_decode(png: Path) -> dict:
    """Peak RSS of a fresh Python decoding ``png`` with Pillow's own bomb limit lifted (what is avoided)."""
    code = ("import time, numpy as np; from PIL import Image; Image.MAX_IMAGE_PIXELS = None; t0 = time.perf_counter(); "
            f"im = Image.open({str(png)!r}); im.load(); a = np.asarray(im.convert('RGB')); "
            "print(a.shape, time.perf_counter() - t0)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"case": "same bomb PNG decoded with no limit (Pillow, RGB; not the model)",
            "http": "-", "status": out.stdout.strip() or out.stderr.strip()[-200:], "wall_s": wall,
            "rss_before_mb": None, "peak_mb": max(peak, before) / 1024}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="", help="also write the rows here")
    ap.add_argument("--no-unguarded", action="store_true", help="skip the unguarded-decode reference row")
    args = ap.parse_args(argv)
    import requests

    work = Path(tempfile.mkdtemp(prefix="smp-image-memory-"))
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", SMP_CACHE_DIR=str(work / "cache"))
    server = None
    try:
        model = train(work, experiment="image_memory")
        from smp.data import load_data

        posts = load_data(str(work / "smpd"))
        images = work / "images"
        images.mkdir()
        good = Path(posts["image_path"].iloc[0]).read_bytes()
        (images / "bomb.png").write_bytes(bomb_png())
        row = json.loads(posts.drop(columns=["label", "image_path"]).head(1).to_json(orient="records"))[0]
        warm = {**row, "Pid": "warm", "image_b64": base64.b64encode(Path(posts["image_path"].iloc[1]).read_bytes())
                .decode()}
        cases = {
            "normal JPEG, image_b64": {"image_b64": base64.b64encode(good).decode()},
            f"bomb PNG 30,000 x 30,000 ({(images / 'bomb.png').stat().st_size / 1024:.0f} KB), image_b64":
                {"image_b64": base64.b64encode((images / "bomb.png").read_bytes()).decode()},
            "bomb PNG, image_path": {"image_path": "bomb.png"},
            "truncated JPEG (first half), image_b64": {"image_b64": base64.b64encode(good[: len(good) // 2]).decode()},
        }

        port = free_port()
        env = {**os.environ, "SMP_SERVE_IMAGE_ROOT": str(images), "SMP_CACHE_DIR": str(work / "serve-cache"),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        server = serve(model, port, env, work / "serve.log")
        url = f"http://127.0.0.1:{port}"
        wait_up(url, server, work / "serve.log", timeout=180)

        def ask(record) -> tuple[int, str, float]:
            t0 = time.perf_counter()
            r = requests.post(f"{url}/invocations", json={"dataframe_records": [record]}, timeout=600)
            wall = time.perf_counter() - t0
            body = r.json()
            status = body["predictions"][0]["status"] if r.ok else body.get("message", "")
            return r.status_code, status, wall

        code, status, wall = ask(warm)
        assert code == 200, status
        worker = worker_pid(server.pid)
        rows = [{"case": "warm-up (CLIP loaded, one image embedded)", "http": code, "status": status,
                 "wall_s": wall, "rss_before_mb": None, "peak_mb": proc_kb(worker, "VmHWM") / 1024}]
        for name, extra in cases.items():
            before = proc_kb(worker, "VmRSS")
            Path(f"/proc/{worker}/clear_refs").write_text("5")  # peak RSS := current RSS
            code, status, wall = ask({**row, **extra})
            rows.append({"case": name, "http": code, "status": status, "wall_s": wall,
                         "rss_before_mb": before / 1024, "peak_mb": proc_kb(worker, "VmHWM") / 1024})
        if not args.no_unguarded:
            rows.append(unguarded_decode(images / "bomb.png"))
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)

    print("| case | HTTP | status returned | wall s | RSS before MB | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        before = "-" if r["rss_before_mb"] is None else f"{r['rss_before_mb']:.0f}"
        print(f"| {r['case']} | {r['http']} | {r['status']} | {r['wall_s']:.2f} | {before} | {r['peak_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
