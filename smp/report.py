"""Stage 10: the paper's results table rebuilt from the MLflow runs of one experiment and split."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from smp import plots
from smp.config import ConfigError, flatten
from smp.families import FAMILIES
from smp.groups import parse_features
from smp.jobs import Family, Job
from smp.config import sig
from smp.tracking import JobResult, describe_run, job_run, log_figure

log = logging.getLogger("smp.report")

COLUMNS = ("test_rmse", "test_bias", "test_error_var", "test_mae", "test_spearman", "test_rmse_baseline")


@dataclass(frozen=True)
class CompareJob:
    split: str = "random"   # compare runs made with this split protocol
    data_hash: str = ""     # compare runs on this data ("" = the data of the newest model run)
    experiment: str = ""    # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)


def run_features(family: Family, params: dict) -> str:
    """The feature groups a run of ``family`` read, normalised (``tabular,user``); runs made before groups
    existed read the family's default."""
    default = family.config().feature_groups.features if hasattr(family.config(), "feature_groups") else ""
    text = params.get("features") or default
    try:
        return ",".join(parse_features(text))
    except ConfigError:
        return text


def compare_table(experiment_id: str, split: str, families: dict[str, Family], data_hash: str = "") -> pd.DataFrame:
    """One row per model family of ``families`` (per head for the nets, per feature groups), in their order: its
    newest finished run's test metrics beside the paper's figures (``Family.paper``). The nets' paper head (runs
    without a head tag predate the residual head) is the row ``<family> (paper head)``; a run with other feature
    groups than its family's default (``features``; an ablation's runs) is the row ``<family> [groups]``, so
    every row reads the inputs its label says."""
    runs = mlflow.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'FINISHED' and tags.`smp.split` = '{split}'",
        order_by=["attributes.start_time DESC"], output_format="list")
    runs = [r for r in runs if r.data.tags.get("smp.model") in families and "test_rmse" in r.data.metrics]
    if not runs:
        return pd.DataFrame(columns=["model", "run_id", *COLUMNS, "paper_rmse", "paper_bias", "paper_error_var"])
    data_hash = data_hash or runs[0].data.tags.get("smp.data_hash", "")
    rows, seen = [], set()
    for r in runs:
        family = r.data.tags["smp.model"]
        head = r.data.tags.get("smp.head", "paper") if families[family].net else ""
        features = run_features(families[family], r.data.params)
        label = f"{family} (paper head)" if head == "paper" else family
        if features != run_features(families[family], {}):
            label += f" [{features}]"
        if label in seen or r.data.tags.get("smp.data_hash", "") != data_hash:
            continue
        seen.add(label)
        paper = families[family].paper or (float("nan"),) * 3
        rows.append({"model": label, "family": family, "head": head, "features": features, "run_id": r.info.run_id,
                     **{c: r.data.metrics.get(c, float("nan")) for c in COLUMNS},
                     "stacking": r.data.tags.get("smp.stacking", ""),
                     "paper_rmse": paper[0], "paper_bias": paper[1], "paper_error_var": paper[2]})
    table = pd.DataFrame(rows)
    order = list(families)
    table["_order"] = [order.index(f) * 2 + (h == "paper") for f, h in zip(table["family"], table["head"])]
    table = table.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    table.attrs["data_hash"] = data_hash
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown (numbers to 3 decimals)."""
    cols = ["model", *COLUMNS, "paper_rmse", "paper_bias", "paper_error_var"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for _, row in table.iterrows():
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.3f}" for c in cols]
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def run_compare(cfg: CompareJob = CompareJob()) -> JobResult:
    """Build, print and log (Markdown, CSV, bar chart) the comparison table."""
    with job_run("compare", cfg.experiment, flatten(cfg), {"smp.split": cfg.split}, what=COMPARE.help) as run:
        table = compare_table(run.info.experiment_id, cfg.split, FAMILIES, cfg.data_hash)
        if table.empty:
            log.warning("no finished model runs with split=%s in this experiment", cfg.split)
        text = to_markdown(table)
        print(text)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "compare.md").write_text(text)
            table.to_csv(Path(tmp) / "compare.csv", index=False)
            mlflow.log_artifact(str(Path(tmp) / "compare.md"))
            mlflow.log_artifact(str(Path(tmp) / "compare.csv"))
        if not table.empty:
            log_figure(lambda: plots.compare_bars(table), "compare.png")
            mlflow.set_tag("smp.data_hash", table.attrs["data_hash"])
        # not a training run: the table is its artifact, no metrics of its own beside the models' runs
        result = {row.model: float(row.test_rmse) for row in table.itertuples()}
        mlflow.set_tags({"smp.compared_runs": ",".join(table["run_id"]) if not table.empty else ""})
        ranked = sorted(result.items(), key=lambda kv: kv[1])
        describe_run(f"compare: the paper's results table for split={cfg.split} from this experiment's newest run "
                     "of each model family on the same data (compare.md, compare.csv, plots/compare.png). "
                     + ("Test RMSE: " + ", ".join(f"{m} {sig(v)}" for m, v in ranked) + "."
                        if ranked else "No finished model run matched."))
    return JobResult(run.info.run_id, {f"{model} test_rmse": v for model, v in result.items()})


COMPARE = Job("compare", "the paper's results table from this experiment's runs", run_compare, CompareJob)
