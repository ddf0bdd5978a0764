"""Speed of the tabular path on the real SMPD posts.

Measures, each in a fresh subprocess so peak memory is the job's own:
  (1) load + featurise all 243k real posts: wall time and peak RSS;
  (2) the default benchmark job (80k subsample, paper's XGBoost) end to end: wall time.

Run:  .venv/bin/python benchmarks/tabular.py [--posts ../shared/data/smpd2019/posts.csv] [--repeats 3] [--skip-job]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

LOAD = """
import json, resource, time
t0 = time.perf_counter()
from smp.data import load_data
from smp.features import TabularFeaturizer
posts = load_data({posts!r})
t1 = time.perf_counter()
X = TabularFeaturizer().fit(posts).transform(posts)
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(rows=len(posts), cols=X.shape[1], load_s=t1 - t0, featurise_s=t2 - t1, total_s=t2 - t0,
                      peak_mb=peak)))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", default="../shared/data/smpd2019/posts.csv")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-job", action="store_true")
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", LOAD.format(posts=args.posts)], capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in runs) for k in ("load_s", "featurise_s", "total_s", "peak_mb")}
    print(f"load + featurise {runs[0]['rows']} posts -> {runs[0]['cols']} features "
          f"(median of {len(runs)}): load {med['load_s']:.2f} s, featurise {med['featurise_s']:.2f} s, "
          f"total {med['total_s']:.2f} s (target < 20 s), peak RSS {med['peak_mb']:.0f} MB (target < 2048 MB)")
    if args.skip_job:
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "smp.cli", "benchmark", "--data", args.posts], cwd=tmp, check=True,
                       capture_output=True, env={**__import__("os").environ,
                                                 "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"})
        wall = time.perf_counter() - t0
    print(f"`smp benchmark --data {args.posts}` (defaults: 80k subsample, 2000 trees, depth 18): "
          f"{wall:.0f} s wall (target < 600 s)")


if __name__ == "__main__":
    main()
