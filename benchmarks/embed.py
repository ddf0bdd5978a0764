"""Speed of the image-feature pipeline (smp.embed) on this machine.

    .venv/bin/python benchmarks/embed.py [--n 256] [--inductor] [--rss 128 512]

Measures, in one run on generated 500x375 JPEGs, in interleaved rounds (each round
times every variant back to back on its own slice of images; ratios are per round,
medians reported, because other jobs' load on a shared machine drifts by minutes):
  naive      PIL open + open_clip preprocess per image, batches of 32, fp32, default
             memory format, eager model.encode_image under no_grad
  pipeline   smp.embed.embed_images, fresh cache: default graph (CPU: jit trace+freeze),
             eager (compile="none"), and with --inductor torch.compile
  bound      model FLOPs per image (torch.utils.flop_counter) / measured fp32 matmul
             throughput (median of torch.mm timings around each variant, torch's
             default threads)
plus a fully cached rerun per round, handcrafted-feature ms/image, and peak RSS at
two image counts (each in a subprocess). Random CLIP weights: same architecture and
FLOPs as the pretrained model, no download. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_images(directory: Path, n: int, seed: int = 0) -> list[str]:
    """Write n photo-like 500x375 JPEGs (gradients, shapes, noise); return their paths."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        img = np.stack([a * x / 500, b * y / 375, c * (x + y) / 875], axis=2)
        for _ in range(int(rng.integers(3, 9))):
            color = [int(v) for v in rng.integers(0, 256, 3)]
            if rng.random() < 0.5:
                center = (int(rng.integers(0, 500)), int(rng.integers(0, 375)))
                cv2.circle(img, center, int(rng.integers(10, 120)), color, -1)
            else:
                p1 = (int(rng.integers(0, 500)), int(rng.integers(0, 375)))
                p2 = (int(rng.integers(0, 500)), int(rng.integers(0, 375)))
                cv2.rectangle(img, p1, p2, color, -1)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        path = directory / f"{i:05d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    return paths


def matmul_gflops(size: int = 2048, repeats: int = 9) -> float:
    """Median fp32 torch.mm throughput in GFLOP/s with torch's default thread count."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times) / 1e9


def model_gflop(model, size: int) -> float:
    """FLOPs of one encode_image call at size x size, as FlopCounterMode counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_image(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def naive(paths: list[str], model, preprocess, batch_size: int = 32) -> list[float]:
    """Seconds per batch of the straightforward loop (see module docstring)."""
    import torch
    from PIL import Image

    times = []
    with torch.no_grad():
        for s in range(0, len(paths), batch_size):
            t = time.perf_counter()
            batch = torch.stack([preprocess(Image.open(p)) for p in paths[s : s + batch_size]])
            model.encode_image(batch)
            times.append(time.perf_counter() - t)
    return times


def handcrafted_ms(paths: list[str], cv2_threads: int) -> tuple[float, float]:
    """Median (wall ms, CPU ms) per image of handcrafted_features on decoded images.

    CPU time (this thread's) is the figure that survives a machine shared with other
    jobs; it equals the work only with 1 OpenCV thread.
    """
    import cv2

    from smp.image_features import decode_image, handcrafted_features

    cv2.setNumThreads(cv2_threads)
    wall, cpu = [], []
    for p in paths:
        img = decode_image(Path(p).read_bytes())
        t, c = time.perf_counter(), time.thread_time()
        handcrafted_features(img)
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def child_rss(n: int, image_dir: str, cache_dir: str, batch_size: int, workers: int) -> None:
    """Subprocess body: embed the first n images with a fresh cache; print peak RSS (MB)."""
    from smp.embed import EmbedCfg, embed_images

    paths = sorted(str(p) for p in Path(image_dir).glob("*.jpg"))[:n]
    cfg = EmbedCfg(clip_pretrained="none", cache_dir=cache_dir, batch_size=batch_size,
                   num_workers=workers, compile="none", progress=False)
    res = embed_images([str(i) for i in range(n)], paths, cfg)
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM"))
    print(json.dumps({
        "n": n,
        "computed": res.stats["computed"],
        "main_peak_mb": int(hwm.split()[1]) / 1024,
        "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def peak_rss(n: int, image_dir: Path, tmp: Path, batch_size: int, workers: int) -> dict:
    cache = tempfile.mkdtemp(dir=tmp, prefix=f"rss{n}-")
    out = subprocess.run(
        [sys.executable, __file__, "--child-rss", str(n), "--images", str(image_dir),
         "--cache", cache, "--batch-size", str(batch_size), "--workers", str(workers)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--n", type=int, default=384, help="images for the speed runs (split over rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of naive / pipeline")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--inductor", action="store_true", help="also time compile='inductor' (minutes)")
    ap.add_argument("--rss", type=int, nargs="*", default=[128, 512], help="image counts for peak RSS")
    ap.add_argument("--skip-speed", action="store_true",
                    help="only handcrafted ms/image and peak RSS (no naive / pipeline runs)")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    ap.add_argument("--child-rss", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--images", default="", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_rss:
        child_rss(args.child_rss, args.images, args.cache, args.batch_size, args.workers)
        return {}

    tmp = Path(tempfile.mkdtemp(prefix="smp-bench-embed-"))
    # a cold torch.compile, as a first run on a new machine would see it
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp / "inductor"))
    import torch

    image_dir = tmp / "images"
    image_dir.mkdir()
    n_make = max([args.n, *args.rss])
    t = time.perf_counter()
    all_paths = make_images(image_dir, n_make)
    paths = all_paths[: args.n]
    print(f"{n_make} images in {image_dir} ({time.perf_counter() - t:.0f}s); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs",
          file=sys.stderr)
    r: dict = {"n": args.n, "batch_size": args.batch_size, "workers": args.workers,
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_start": os.getloadavg()[0]}
    if not args.skip_speed:
        speed(r, args, paths, tmp)
    import cv2

    default_threads = cv2.getNumThreads()
    r["handcrafted_ms"], r["handcrafted_cpu_ms"] = handcrafted_ms(paths, 1)  # as embed_images runs it
    r["handcrafted_ms_default_threads"], _ = handcrafted_ms(paths, default_threads)
    r["cv2_default_threads"] = default_threads
    r["rss"] = [peak_rss(n, image_dir, tmp, args.batch_size, args.workers) for n in args.rss]
    r["load_end"] = os.getloadavg()[0]

    print(table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return r


def speed(r: dict, args, paths: list[str], tmp: Path) -> None:
    """Naive loop, pipeline (default graph and eager) and bound, in interleaved rounds.

    Other jobs share this machine and their load changes within minutes, so each
    round times every variant on its own slice of images back to back, and the
    ratios are taken per round (median over rounds reported).
    """
    import open_clip
    import torch

    from smp.embed import EmbedCfg, embed_images

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("RN50", pretrained=None)
    model.eval()
    r["gflop_per_image"] = model_gflop(model, 224)
    per = len(paths) // args.rounds
    variants = [("pipeline", "auto"), ("eager", "none")] + ([("compiled", "inductor")] if args.inductor else [])
    r["rounds"] = []
    for k in range(args.rounds):
        sl = paths[k * per : (k + 1) * per]
        pids = [str(i) for i in range(len(sl))]
        rd: dict = {"images": len(sl), "mm": [matmul_gflops()]}
        batches = naive(sl, model, preprocess, args.batch_size)
        rd["naive_ips"] = len(sl) / sum(batches)
        rd["naive_steady_ips"] = (len(sl) - args.batch_size) / sum(batches[1:]) if len(batches) > 1 else 0.0
        rd["mm"].append(matmul_gflops())
        for tag, mode in variants:
            cfg = EmbedCfg(clip_pretrained="none", batch_size=args.batch_size, num_workers=args.workers,
                           cache_dir=str(tmp / f"cache-{tag}-{k}"), compile=mode, progress=False)
            res = embed_images(pids, sl, cfg)
            rd[f"{tag}_ips"] = len(sl) / res.stats["seconds"]
            rd[f"{tag}_steady_ips"] = res.stats["steady_images_per_s"]
            rd[f"{tag}_mode"] = res.info["compile"]
            if tag == "pipeline":
                again = embed_images(pids, sl, cfg)
                assert again.stats["computed"] == 0
                rd["cached_speedup"] = res.stats["seconds"] / again.stats["seconds"]
                rd["cached_s"] = again.stats["seconds"]
            rd["mm"].append(matmul_gflops())
        rd["bound_ips"] = statistics.median(rd["mm"]) / r["gflop_per_image"]
        r["rounds"].append(rd)
        print(f"round {k}: " + ", ".join(f"{key} {v:.2f}" for key, v in rd.items()
                                         if isinstance(v, float)), file=sys.stderr)


def table(r: dict) -> str:
    """The figures as Markdown."""
    head = (f"n={r['n']} images 500x375, batch {r['batch_size']}, {r['workers']} workers, "
            f"{r['threads']} torch threads, {r['cpus']} CPUs, CLIP RN50 (random weights), CPU fp32; "
            f"load average {r['load_start']:.1f} at start, {r['load_end']:.1f} at end")
    checks = [
        "| check | value | target |",
        "| --- | ---: | --- |",
        f"| handcrafted features (500x375), 1 OpenCV thread as in embed_images: median CPU ms/image "
        f"| {r['handcrafted_cpu_ms']:.2f} | < 5 |",
        f"| the same, median wall ms/image | {r['handcrafted_ms']:.2f} | |",
        f"| the same, OpenCV's default {r['cv2_default_threads']} threads: median wall ms/image "
        f"| {r['handcrafted_ms_default_threads']:.2f} | |",
    ]
    for x in r["rss"]:
        checks.append(f"| peak RSS at {x['n']} images: main / largest worker, MB | "
                      f"{x['main_peak_mb']:.0f} / {x['worker_peak_mb']:.0f} | flat |")
    if "rounds" not in r:
        return "\n".join([head, "", *checks])
    rounds = r["rounds"]

    def med(f) -> float:
        return statistics.median(f(rd) for rd in rounds)

    def each(f) -> str:
        return ", ".join(f"{f(rd):.2f}" for rd in rounds)

    rows = [(f"naive loop (PIL + preprocess, fp32 eager, no_grad, batch {r['batch_size']}): all batches",
             lambda rd: rd["naive_ips"], lambda rd: 1.0, lambda rd: rd["naive_ips"] / rd["bound_ips"]),
            ("naive loop: after the first batch",
             lambda rd: rd["naive_steady_ips"], lambda rd: rd["naive_steady_ips"] / rd["naive_ips"],
             lambda rd: rd["naive_steady_ips"] / rd["bound_ips"]),
            ("compute bound: median matmul GFLOP/s / GFLOP per image",
             lambda rd: rd["bound_ips"], lambda rd: rd["bound_ips"] / rd["naive_ips"], lambda rd: 1.0)]
    for tag, label, build in [("pipeline", "embed_images, default (CPU: jit trace + freeze)", " + trace/freeze"),
                              ("eager", "embed_images, compile='none' (eager)", ""),
                              ("compiled", "embed_images, compile='inductor'", " + compile")]:
        if f"{tag}_ips" not in rounds[0]:
            continue
        rows.append((f"{label}: end to end (model load{build} included)",
                     lambda rd, t=tag: rd[f"{t}_ips"], lambda rd, t=tag: rd[f"{t}_ips"] / rd["naive_ips"],
                     lambda rd, t=tag: rd[f"{t}_ips"] / rd["bound_ips"]))
        rows.append((f"{label}: after the first batch",
                     lambda rd, t=tag: rd[f"{t}_steady_ips"],
                     lambda rd, t=tag: rd[f"{t}_steady_ips"] / rd["naive_steady_ips"],
                     lambda rd, t=tag: rd[f"{t}_steady_ips"] / rd["bound_ips"]))
    checks[5:5] = [  # after the handcrafted rows
        f"| fully cached rerun of a round, s (median) | {med(lambda rd: rd['cached_s']):.3f} | |",
        f"| cached speed-up vs that round's first default run (median; per round) | "
        f"{med(lambda rd: rd['cached_speedup']):.0f}x ({each(lambda rd: rd['cached_speedup'])}) | >= 50x |",
    ]
    return "\n".join([
        head + f"; {len(rounds)} interleaved rounds of {rounds[0]['images']} images, "
        f"matmul {statistics.median(m for rd in rounds for m in rd['mm']):.0f} GFLOP/s (median), "
        f"{r['gflop_per_image']:.2f} GFLOP per image",
        "",
        "| run | images/s (median) | x naive (median of per-round ratios) | x compute bound | per round, images/s |",
        "| --- | ---: | ---: | ---: | --- |",
        *[f"| {label} | {med(ips):.2f} | {med(xn):.2f} | {med(xb):.2f} | {each(ips)} |"
          for label, ips, xn, xb in rows],
        "",
        *checks,
    ])

if __name__ == "__main__":
    main()
