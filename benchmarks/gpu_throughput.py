"""GPU throughput of the GPU-able stages, in one command on a lent GPU machine (CPU works too, slowly).

On ``--device`` (auto = cuda when torch sees a GPU), timed with ``time.perf_counter()`` after a CUDA synchronize:

  embed      smp.embed.embed_images, cold cache, over ``--images`` smp.synth JPEGs of 375-500 px a side (the real
             ones are 500 px), CLIP RN50 with random weights (pretrained=none: same FLOPs, no download): images/s
             end to end and after the first batch; and the model alone (smp.clip.Encoder on host pixel batches)
  benchmark  smp.models.BenchmarkModel (XGBCfg -> tree_settings -> make_booster) on ``--n`` synthetic posts split
             by smp.splits.prepare, exactly ``--rounds`` rounds; device=cuda and device=cpu when a GPU is there
             (else cpu): seconds, seconds per round, test RMSE, the tree settings used
  nets       smp.nets' ensemble MLP and Conv1D, ``--epochs`` epochs on n_train x 1030 (stand-in benchmark
             prediction + 1029 random image columns, as benchmarks/entrypoints.py): seconds per epoch, rows/s

Figures: ``--out`` (JSON, rewritten after each section: a run cut short keeps what it finished) and a table.
GPU machine (H100, 16 cores, no internet): the run must fit in ONE call of ~10 minutes at most (estimated, not
measured: 3-5 minutes, mostly the 80k posts' tables and the CPU XGBoost fit):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_throughput.py --out $OUT/gpu.json

Its python3 lacks open_clip_torch (+ ftfy, wcwidth) and xgboost: carry them as wheels (device README); MLflow is
not needed. A failing section records its error and the others still run. CPU smoke test (about a minute):

    nice -n 19 env PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_throughput.py --n 2000 \\
        --images 64 --rounds 10 --epochs 1 --device cpu --work /tmp/gpu_smoke --out /tmp/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

SECTIONS = ("embed", "benchmark", "nets")
CPUS = os.cpu_count() or 1


def clock(device: str) -> float:
    """perf_counter, after every queued GPU kernel has finished when ``device`` is a GPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({platform.machine()}, {CPUS} cores)"


def make_data(work: Path, n: int, images: int) -> tuple[Path, list[str], list[str]]:
    """An SMPD directory of n smp.synth posts with JPEGs for the first ``images`` only, rendered in a process pool
    (``smp synth`` renders every post's: tens of minutes for 80k on one core); their Pids and paths."""
    from smp.synth import SynthCfg, _image_bytes, draw_posts, write_files

    posts = draw_posts(SynthCfg(n=n, seed=0, img_min=375, img_max=500))
    out = work / f"smpd-n{n}-i{images}"
    if not (out / "train_label.txt").exists():
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=work, prefix=".smpd-"))
        specs = [SimpleNamespace(**row) for row in posts.iloc[:images].to_dict("records")]
        with ProcessPoolExecutor(max(1, CPUS - 1)) as pool:
            for path, data in zip(posts["img_path"].iloc[:images], pool.map(_image_bytes, specs, chunksize=16)):
                (tmp / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp / path).write_bytes(data)
        write_files(posts.assign(image_kind="missing", img_w=1, img_h=1), tmp)  # the tables; 1x1 px, not written
        os.replace(tmp, out)
        print(f"{n} synthetic posts ({images} JPEGs) in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return out, posts["Pid"].iloc[:images].tolist(), [str(out / p) for p in posts["img_path"].iloc[:images]]


def load_model(cfg):
    """smp.clip.load_clip(cfg); where MLflow is missing (smp.tracking mutes open_clip's random-weights notice),
    the same random-weights model built here."""
    import open_clip
    import torch

    from smp.clip import RANDOM_SEED, load_clip, model_spec, resolve_device

    try:
        return load_clip(cfg)
    except ModuleNotFoundError as e:
        if e.name != "mlflow":
            raise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.clip_model, pretrained=None)
    device = resolve_device(cfg)
    model = model.eval().to(device=device, memory_format=torch.channels_last)
    return model, preprocess, {**model_spec(cfg), "device": device}


def embed(args, dev: str, work: Path, pids: list[str], paths: list[str]) -> dict:
    import torch

    from smp.clip import Encoder
    from smp.embed import EmbedCfg, embed_images

    cfg = EmbedCfg(clip_pretrained="none", device=dev, batch_size=args.batch_size, num_workers=args.workers,
                   cache_dir=tempfile.mkdtemp(dir=work, prefix="features-"), progress=False)  # cold cache
    t0 = clock(dev)
    loaded = load_model(cfg)
    load_s = clock(dev) - t0
    t0 = clock(dev)
    res = embed_images(pids, paths, cfg, loaded=loaded)
    wall = clock(dev) - t0
    assert res.stats["computed"] == len(paths), res.stats
    enc = Encoder(loaded[0], dev, cfg.batch_size, res.info["compile"])  # the graph the pipeline used
    size = loaded[2]["image_size"]
    pixels = torch.randn(cfg.batch_size, 3, *((size, size) if isinstance(size, int) else size))
    pixels = pixels.pin_memory() if dev.startswith("cuda") else pixels
    reps = max(2, min(20, len(paths) // cfg.batch_size))
    for i in range(2 + reps):  # 2 untimed: graph build, cudnn autotune, allocator warm-up
        t0 = clock(dev) if i == 2 else t0
        enc(pixels)
    model_ips = reps * cfg.batch_size / (clock(dev) - t0)
    e = {"device": dev, "device_name": device_name(dev), "images": len(paths), "batch_size": cfg.batch_size,
         "workers": cfg.num_workers, "precision": loaded[2]["precision"], "graph": res.info["compile"],
         "model_load_s": load_s, "wall_s": wall, "images_per_s": len(paths) / wall,
         "loop_images_per_s": res.stats["images_per_s"], "steady_images_per_s": res.stats["steady_images_per_s"],
         "model_only_images_per_s": model_ips, "model_only_batches": reps}
    what = f"RN50 {e['precision']} {e['graph']}, batch {e['batch_size']}"
    e["table"] = [[e["device_name"], f"{len(paths)} JPEGs, {what}, {e['workers']} workers: images/s end to end / "
                   "after the first batch", f"{e['images_per_s']:.1f} / {e['steady_images_per_s']:.1f}"],
                  [e["device_name"], f"model only ({what}, host pixels -> vectors): images/s", f"{model_ips:.1f}"]]
    return e


def benchmark(args, dev: str, data: Path) -> dict:
    import xgboost as xgb

    from smp.boosters import XGBCfg, resolve_device
    from smp.data import DataCfg
    from smp.evaluate import regression_metrics
    from smp.features import TabularCfg
    from smp.models import BenchmarkModel, Part
    from smp.splits import SplitCfg, prepare

    prep = prepare(DataCfg(data=str(data)), SplitCfg(sample_size=args.n))
    train, val = Part(prep.rows("train"), prep.y("train")), Part(prep.rows("val"), prep.y("val"))
    out = {"xgboost": xgb.__version__, "xgboost_cuda_build": bool(xgb.build_info().get("USE_CUDA")),
           "rows": {k: len(v) for k, v in prep.parts.items()}, "runs": [], "table": []}
    # cuda too where this XGBoost build has CUDA and torch sees a GPU
    for device in (["cuda", "cpu"] if dev == "cuda" and resolve_device("auto") == "cuda" else ["cpu"]):
        cfg = XGBCfg(n_estimators=args.rounds, early_stopping_rounds=0, device=device)
        stamps: list[float] = []
        t0 = clock(device)
        model = BenchmarkModel(cfg, TabularCfg(), seed=0)
        model.fit(train, val, on_step=lambda step, val_rmse: stamps.append(clock(device)))
        fit_s = clock(device) - t0
        rmse = regression_metrics(prep.y("test"), model.predict(prep.rows("test")), "test")["test_rmse"]
        t = model.tree_settings_
        out["runs"].append({"device": device, "device_name": device_name(device), "rounds": len(stamps),
                            "tree_settings": t, "fit_s": fit_s, "s_per_round": fit_s / max(len(stamps), 1),
                            "to_first_round_s": stamps[0] - t0 if stamps else None, "test_rmse": rmse,
                            "steady_s_per_round": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)})
        out["table"].append([f"{device_name(device)} ({t['tree_method']}, {t['max_bin']} bins, n_jobs {t['n_jobs']})",
                             f"{len(stamps)} rounds on {len(train.y)} rows: fit s / s per round / test RMSE",
                             f"{fit_s:.1f} / {fit_s / max(len(stamps), 1):.3f} / {rmse:.3f}"])
        print(f"benchmark on {device}: {fit_s:.1f} s", flush=True)
    return out


def nets(args, dev: str) -> dict:
    import numpy as np

    from smp.nets import Conv1DRegressor, MLPRegressor
    from smp.splits import SplitCfg

    s = SplitCfg()
    n_val = int(round(s.val_frac * args.n))
    n_train = args.n - n_val - int(round(s.test_frac * args.n))
    rng = np.random.default_rng(0)
    y = rng.normal(6.4, 2.46, n_train + n_val)
    X = rng.standard_normal((n_train + n_val, 1030), dtype=np.float32)
    X[:, 0] = y + rng.normal(0, 1.9, len(y))  # the stacked benchmark prediction
    out = {"device": dev, "device_name": device_name(dev), "rows_train": n_train, "rows_val": n_val,
           "columns": X.shape[1], "runs": [], "table": []}
    for family, regressor in (("ensemble_mlp", MLPRegressor), ("ensemble_conv1d", Conv1DRegressor)):
        net = regressor.from_settings(epochs=args.epochs, patience=10**6, device=dev, progress=False)
        stamps: list[float] = []
        t0 = clock(dev)
        net.fit(X[:n_train], y[:n_train], X[n_train:], y[n_train:],
                on_epoch=lambda *_: stamps.append(clock(dev)))
        fit_s = clock(dev) - t0
        epoch_s = [b - a for a, b in zip([t0, *stamps], stamps)]  # the first includes setup (+ PCA for Conv1D)
        steady = statistics.median(epoch_s[1:]) if len(epoch_s) > 1 else epoch_s[0]
        out["runs"].append({"net": family, "batch_size": net.cfg.batch_size, "epochs": len(stamps), "fit_s": fit_s,
                            "epoch_s": epoch_s, "steady_epoch_s": steady, "rows_per_s": n_train / steady})
        which = "median after the first" if len(epoch_s) > 1 else "the only one, setup included"
        out["table"].append([out["device_name"], f"{family}, {n_train} x {X.shape[1]}, batch {net.cfg.batch_size}: "
                             f"s/epoch ({which}) / rows/s", f"{steady:.2f} / {n_train / steady:.0f}"])
    return out


def table(r: dict) -> str:
    rows = ["| section | device | measure | value |", "| --- | --- | --- | ---: |"]
    for name in r["sections"]:
        sec = r.get(name, {})
        rows += [f"| {name} | | error | {sec['error']} |"] if "error" in sec else []
        rows += [f"| {name} | {' | '.join(cells)} |" for cells in sec.get("table", [])]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=80000, help="posts (benchmark; the nets' rows are its 81%% train)")
    ap.add_argument("--images", type=int, default=4096, help="JPEGs embedded")
    ap.add_argument("--rounds", type=int, default=200, help="boosting rounds (early stopping off)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per net (no early stop)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--batch-size", type=int, default=32, help="embed batch (EmbedCfg's default)")
    ap.add_argument("--workers", type=int, default=max(2, CPUS - 2), help="embed DataLoader workers")
    ap.add_argument("--only", default="", help="comma list of embed,benchmark,nets (default: all)")
    ap.add_argument("--work", default="", help="scratch folder (default: a new temporary one)")
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    if set(only) - set(SECTIONS):
        ap.error(f"--only: unknown sections {sorted(set(only) - set(SECTIONS))}; choose from {SECTIONS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded (random weights); never try
    import torch

    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    work = Path(args.work or tempfile.mkdtemp(prefix="smp-gpu-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    r: dict = {"args": vars(args), "sections": only}
    data, pids, paths = None, [], []  # made first: its process pool forks before CUDA is initialised
    if {"embed", "benchmark"} & set(only):
        n_posts = args.n if "benchmark" in only else max(args.images, 100)
        data, pids, paths = make_data(work, n_posts, args.images if "embed" in only else 0)
    r["host"] = {"device": dev, "device_name": device_name(dev), "cpus": CPUS, "python": sys.version.split()[0],
                 "torch": torch.__version__, "torch_cuda": torch.version.cuda, "load_avg_start": os.getloadavg()[0]}
    steps = {"embed": lambda: embed(args, dev, work, pids, paths), "benchmark": lambda: benchmark(args, dev, data),
             "nets": lambda: nets(args, dev)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in only:
        t0 = time.perf_counter()
        try:
            r[name] = steps[name]()
        except Exception as e:  # noqa: BLE001 - one section's failure (a missing package) keeps the others
            traceback.print_exc()
            r[name] = {"error": f"{type(e).__name__}: {e}"}
        r[name]["section_s"] = time.perf_counter() - t0
        r["host"]["load_avg_end"] = os.getloadavg()[0]
        out.write_text(json.dumps(r, indent=1, default=str))
        print(f"{name}: done in {r[name]['section_s']:.0f} s -> {out}", flush=True)
    print(table(r))


if __name__ == "__main__":
    main()
