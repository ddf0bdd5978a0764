"""Which feature groups carry the signal, per family? ``smp ablation`` on the demo data over several seeds.

For each ``--seeds`` value (it seeds the split and the model; the demo data set stays the same:
``smp.synth.demo_data_dir(--n, --data-seed)``) the script runs ``smp ablation --model M --groups G --seed S``
in process (every model setting at the family's default), into a throw-away tracking store, reads each
ablation's table (``ablation.csv`` on its parent run) and prints one Markdown table: per row (all, each group
left out, each alone) the mean test RMSE, MAE and Spearman over the seeds, each seed's RMSE, and the change of
the mean against ``all``; then the wall time.  ``--out`` keeps the per-seed rows as JSON lines.

Not a timed test: figures for docs/benchmarks.md.

Run:  .venv/bin/python benchmarks/ablation.py --model benchmark --seeds 0 1 2 --n 2000 --groups tabular,time,user,text
      .venv/bin/python benchmarks/ablation.py --summary rows.jsonl   (the table of the rows an --out file holds)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def run_seed(model: str, groups: str, data: Path, seed: int, inputs: dict | None = None) -> list[dict]:
    """One ablation at split/model seed ``seed``: its table's rows (label, groups, run, metrics, changes)."""
    import mlflow
    import pandas as pd

    from smp.ablation import AblationJob, run_ablation
    from smp.config import apply

    cfg = apply(AblationJob(), {**(inputs or {}), "model": model, "groups": groups, "data": str(data), "seed": seed,
                                "experiment": "ablation"})
    result = run_ablation(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="ablation.csv", dst_path=tmp)
        table = pd.read_csv(path)
    return [{**row, "seed": seed} for row in table.to_dict("records")]


def summary(rows: list[dict]) -> str:
    """Mean over seeds per row (table order kept), each seed's RMSE and the change against ``all``."""
    import pandas as pd

    df = pd.DataFrame(rows)
    seeds = sorted(df["seed"].unique())
    order = list(dict.fromkeys(df["label"]))
    mean = df.groupby("label")[["test_rmse", "test_mae", "test_spearman"]].mean()
    full = mean.loc["all"]
    head = ["row", "groups", "test RMSE", "MAE", "Spearman", f"RMSE per seed ({'/'.join(map(str, seeds))})",
            "Δ RMSE", "Δ MAE", "Δ Spearman"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in order:
        m, part = mean.loc[label], df[df["label"] == label].sort_values("seed")
        lines.append(f"| {label} | {part['groups'].iloc[0]} | {m.test_rmse:.3f} | {m.test_mae:.3f} | "
                     f"{m.test_spearman:.3f} | {'/'.join(f'{v:.3f}' for v in part['test_rmse'])} | "
                     f"{m.test_rmse - full.test_rmse:+.3f} | {m.test_mae - full.test_mae:+.3f} | "
                     f"{m.test_spearman - full.test_spearman:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="benchmark", help="the model family to ablate")
    parser.add_argument("--groups", default="tabular,time,user,text", help="comma list of feature groups")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split/model seeds")
    parser.add_argument("--n", type=int, default=2000, help="posts in the demo data set")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the demo data set (fixed over --seeds)")
    parser.add_argument("--clip-pretrained", default="none",
                        help="CLIP weights of the image group (none = random weights: this machine is offline)")
    parser.add_argument("--text-encoder", default="hashing", help="the text group's encoder: hashing or clip")
    parser.add_argument("--out", default="", help="also append the per-seed rows here (JSON lines)")
    parser.add_argument("--summary", default="", help="only print the table of the rows in this --out file")
    args = parser.parse_args()
    if args.summary:
        rows = [json.loads(line) for line in Path(args.summary).read_text().splitlines() if line.strip()]
        print(summary(rows))
        return
    store = tempfile.mkdtemp(prefix="smp-ablation-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from smp.synth import demo_data_dir

    data = demo_data_dir(args.n, args.data_seed)
    t0, rows = time.perf_counter(), []
    for seed in args.seeds:
        t = time.perf_counter()
        found = run_seed(args.model, args.groups, data, seed,
                         {"clip_pretrained": args.clip_pretrained, "text_encoder": args.text_encoder})
        rows += found
        print(f"seed {seed}: {len({r['run_id'] for r in found})} model runs in {time.perf_counter() - t:.0f} s",
              flush=True)
        if args.out:
            with Path(args.out).open("a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in found)
    print(f"\n{args.model}, groups {args.groups}, demo data {args.n} posts (data seed {args.data_seed}), "
          f"seeds {', '.join(map(str, args.seeds))}: mean over seeds\n")
    print(summary(rows))
    print(f"\nwall time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
