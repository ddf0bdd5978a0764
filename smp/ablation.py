"""Stage 10: a feature-group ablation of one model family, recorded as one parent run with nested model runs.

``smp ablation --model benchmark --groups tabular,time,user,text`` trains the family on every group set the
ablation needs -- all the groups, each group left out, each group alone -- and compares them on the test
posts. A group set that two rows stand for (with two groups, ``- user`` is ``tabular only``) is trained once
and listed in both rows.

Three phases, as the model jobs:

1. resolve (``ablation_plan``): the family, its groups, each group set's job config and the data, all checked
   before any run exists: a bad ``model`` or ``groups`` is a ``ConfigError``, a group the data lacks a
   ``DataError`` (``smp.groups.check_groups`` on the training posts), so a refused ablation leaves no run;
2. fit: each group set is a normal run of the family (``Family.run``), nested under the ablation's parent run,
   tagged ``smp.model`` by the family as always and ``smp.ablation`` (the rows it stands for), named after its
   first row (``- user · benchmark``). ``compare`` shows each group set as its own row (``benchmark [user]``;
   the family's default set is the plain ``benchmark`` row) and ``promote`` ranks every child with the
   family's other runs: each is a complete model run with its logged model;
3. record (``record_ablation``, pure ``ablation_table`` beside it): on the parent, the table (``ablation.md``,
   ``ablation.csv``: one row per group set with the child's test RMSE, MAE, Spearman and their change against
   ``all``), the bar chart ``plots/ablation.png``, the metrics ``ablation/{row}_test_rmse`` and a description.

A child that fails ends the parent FAILED with the reason (``smp.tracking.job_run``); the children finished
before it stay.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from smp import groups as feature_groups
from smp.config import ConfigError, apply, check, flatten, one_of, sig
from smp.data import DataCfg
from smp.families import FAMILIES, family
from smp.image_features import PAPER_CLIP_MODEL, PAPER_CLIP_PRETRAINED
from smp.jobs import Family, Job
from smp.splits import SplitCfg, prepare
from smp.tracking import JobResult, Parent, data_label, describe_run, job_run, log_figure

log = logging.getLogger("smp.ablation")

ALL = "all"  # the ``groups`` keyword, and the label of the row with every group
METRICS = ("test_rmse", "test_mae", "test_spearman")  # each row's figures (the child run's), and their changes


@dataclass(frozen=True)
class InputsCfg:
    """How every run of the ablation reads its inputs (each family setting of the same name takes the value)."""

    text_encoder: str = "hashing"  # the text group's encoder: hashing, or clip (the images' CLIP text tower)
    text_dim: int = 32             # the text group's components
    embed_run: str = ""            # an embed run id to read image features from ("" = find or run one)
    clip_model: str = PAPER_CLIP_MODEL  # the CLIP model of the image group (and of text_encoder=clip)
    clip_pretrained: str = PAPER_CLIP_PRETRAINED  # open_clip weights tag; "none" = random weights (offline)
    checkpoint: str = ""           # local CLIP checkpoint file (overrides clip_pretrained)


@dataclass(frozen=True)
class AblationJob:
    model: str = "benchmark"  # the model family to ablate (smp.families): trained once per group set
    groups: str = ALL         # comma list of feature groups to ablate (smp.groups); all = every group the family
    #                           takes (image only where its default reads it: the benchmark names it to add it)
    source: DataCfg = field(default_factory=DataCfg)
    splitting: SplitCfg = field(default_factory=SplitCfg)
    inputs: InputsCfg = field(default_factory=InputsCfg)
    experiment: str = ""  # "" = MLFLOW_EXPERIMENT_NAME, else "smp" (under `mlflow run`: its --experiment-name)

    def __post_init__(self) -> None:
        check(self, model=one_of(*FAMILIES))
        if self.groups.strip().lower() != ALL:
            named_groups(self.groups)


@dataclass(frozen=True)
class Variant:
    """One model run of the ablation: the group set it trains on and every row of the table it stands for."""

    groups: tuple[str, ...]
    labels: tuple[str, ...]  # ``all``, ``- user``, ``user only``: one or more (a set two rows need is run once)


@dataclass(frozen=True)
class Plan:
    """What an ablation runs, resolved and checked before any run: the family, its groups, one job config per
    group set (in ``sets`` order; None for a set the family refuses, ``refused`` saying why) and the data's
    digest."""

    family: Family
    groups: tuple[str, ...]
    sets: tuple[Variant, ...]
    configs: tuple
    refused: tuple[str, ...]  # per set: "" or why the family's config refuses it (ensemble_conv1d needs image)
    data_hash: str


def named_groups(text: str) -> tuple[str, ...]:
    """``"tabular, user"`` -> ``("tabular", "user")`` (``smp.groups.parse_features``); ``ConfigError`` naming
    ``groups`` for an unknown group or fewer than two (nothing to leave out)."""
    try:
        chosen = feature_groups.parse_features(text)
    except ConfigError as exc:
        raise ConfigError(f"groups={text!r}: {str(exc).split(': ', 1)[-1]}") from None
    if len(chosen) < 2:
        raise ConfigError(f"groups={text!r}: expected at least two feature groups to ablate (one of them left out "
                          f"at a time), from {', '.join(feature_groups.GROUPS)}")
    return chosen


def with_groups(config, groups: tuple[str, ...]):
    """A family's job config with ``feature_groups.features`` set to ``groups`` (the family's config checks
    them)."""
    return replace(config, feature_groups=replace(config.feature_groups, features=",".join(groups)))


def family_groups(fam: Family) -> tuple[str, ...]:
    """The feature groups model family ``fam`` takes: every group when its job config accepts them all together,
    else those it accepts one at a time; ``ConfigError`` for a family without a ``feature_groups`` setting
    (naming the families that have one)."""
    default = fam.default_config()
    if "feature_groups" not in {f.name for f in fields(default)}:
        able = [name for name, f in FAMILIES.items() if "feature_groups" in {x.name for x in fields(f.config)}]
        raise ConfigError(f"model={fam.name!r}: this family has no feature groups (no feature_groups setting) to "
                          f"ablate; expected one of {', '.join(able) or '(none yet)'}")
    try:
        with_groups(default, feature_groups.GROUPS)
        return tuple(feature_groups.GROUPS)
    except ConfigError:
        pass
    takes = []
    for group in feature_groups.GROUPS:
        try:
            with_groups(default, (group,))
        except ConfigError:
            continue
        takes.append(group)
    return tuple(takes)


def row_labels(groups: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """``[(label, group set)]`` in table order: all, each group left out (``- g``), each alone (``g only``)."""
    return ([(ALL, groups)] + [(f"- {g}", tuple(x for x in groups if x != g)) for g in groups]
            + [(f"{g} only", (g,)) for g in groups])


def group_sets(groups: tuple[str, ...]) -> tuple[Variant, ...]:
    """The ablation's group sets (``row_labels`` order), each distinct set once with every row it stands for."""
    labels: dict[tuple[str, ...], list[str]] = {}
    for label, chosen in row_labels(groups):
        if chosen:
            labels.setdefault(chosen, []).append(label)
    return tuple(Variant(chosen, tuple(names)) for chosen, names in labels.items())


def ablation_plan(cfg: AblationJob, base=None) -> Plan:
    """Resolve and check everything the ablation runs, before any run exists: the family (``ConfigError`` naming
    the families), its groups (``ConfigError`` for one it does not take), one job config per group set -- ``base``
    (default: the family's default config) with the ablation's data, split, experiment and that set's groups --
    and the data (``DataError`` for a group whose fields the training posts lack).  Returns the ``Plan``."""
    fam = family(cfg.model)
    takes = family_groups(fam)
    if cfg.groups.strip().lower() == ALL:
        # the benchmark can read the image too, but by default it does not: "all" keeps to what the family is
        # (an image benchmark is pca_boost without the PCA, and its deep trees over ~1,000 columns take many
        # minutes a run); groups=...,image asks for it
        image = fam.default_config().feature_groups.image
        chosen = tuple(g for g in takes if g != "image" or image)
        if len(chosen) < 2:
            raise ConfigError(f"model={fam.name!r} takes {len(chosen)} feature group(s) ({', '.join(chosen)}): "
                              "nothing to ablate")
    else:
        chosen = named_groups(cfg.groups)
        refused = [g for g in chosen if g not in takes]
        if refused:
            raise ConfigError(f"groups={cfg.groups!r}: model family {fam.name} does not take {', '.join(refused)}; "
                              f"it takes {', '.join(takes)}")
    base = base if base is not None else fam.default_config()
    base = replace(base, source=cfg.source, splitting=cfg.splitting, experiment=cfg.experiment)
    names = set(flatten(base))
    base = apply(base, {k: v for k, v in flatten(cfg.inputs).items() if k in names})
    sets = group_sets(chosen)
    configs, refused = [], []
    for variant in sets:  # a set the family cannot take (ensemble_conv1d without image) is a row, not run
        try:
            configs.append(with_groups(base, variant.groups))
            refused.append("")
        except ConfigError as exc:
            if ALL in variant.labels:
                raise ConfigError(f"groups={cfg.groups!r}: {exc}") from None
            configs.append(None)
            refused.append(str(exc))
    prep = prepare(cfg.source, cfg.splitting)
    feature_groups.check_groups(configs[0].feature_groups, prep.rows("train"))  # every group on the data's fields
    return Plan(fam, chosen, sets, tuple(configs), tuple(refused), prep.digest)


def ablation_table(sets: tuple[Variant, ...], results: list[Mapping | None]) -> pd.DataFrame:
    """One row per label of ``sets`` (table order: all, each left out, each alone), from ``results`` (one per set,
    in ``sets`` order: a ``JobResult`` or any mapping of metrics with a ``run_id`` attribute or key; None for a
    set not run): ``label``, ``groups``, ``run_id``, the test RMSE, MAE and Spearman (NaN: not run, or not
    logged), and ``delta_<metric>``: the row's minus ``all``'s."""
    rows = []
    for s, result in zip(sets, results):
        result = {} if result is None else result
        run_id = getattr(result, "run_id", None) or result.get("run_id", "")
        for label in s.labels:
            rows.append({"label": label, "groups": ",".join(s.groups), "run_id": run_id,
                         **{m: float(result.get(m, np.nan)) for m in METRICS}})
    every = max((v.groups for v in sets), key=len, default=())  # the all-groups set
    order = [label for label, _ in row_labels(every)]
    table = pd.DataFrame(rows, columns=["label", "groups", "run_id", *METRICS])
    table["_order"] = [order.index(label) for label in table["label"]]
    table = table.sort_values("_order").drop(columns="_order").reset_index(drop=True)
    full = table[table["label"] == ALL]
    for m in METRICS:
        table[f"delta_{m}"] = table[m] - (float(full[m].iloc[0]) if len(full) else np.nan)
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown whose columns line up in a terminal: metrics to 4 decimals, changes signed, run ids
    shortened to 8 characters (the CSV keeps them whole)."""
    head = ["row", "groups", "run", *METRICS, *(f"Δ {m.removeprefix('test_')}" for m in METRICS)]
    def number(value, fmt: str) -> str:
        return format(value, fmt) if np.isfinite(value) else "-"

    body = [[row.label, row.groups, str(row.run_id)[:8] if isinstance(row.run_id, str) and row.run_id else "not run",
             *(number(getattr(row, m), ".4f") for m in METRICS),
             *(number(getattr(row, f"delta_{m}"), "+.4f") for m in METRICS)] for row in table.itertuples()]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    numeric = [i >= 3 for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(str(c).rjust(w) if num else str(c).ljust(w)
                                 for c, w, num in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(head), rule, *(line(r) for r in body)]) + "\n"


def ablation_bars(table: pd.DataFrame, title: str = "Test RMSE by feature groups"):
    """Horizontal bars of each row's test RMSE (all / left out / alone in three colours), ``all``'s as a dashed
    line, each bar labelled with its RMSE and its change against ``all``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    colours = ["dimgray" if x == ALL else "tab:red" if x.startswith("- ") else "tab:blue" for x in table["label"]]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(table) + 1.6))
    y = np.arange(len(table))[::-1]  # the first row on top
    values = table["test_rmse"].to_numpy(dtype=float)
    ax.barh(y, values, color=colours)
    full = table.loc[table["label"] == ALL, "test_rmse"]
    if len(full):
        ax.axvline(float(full.iloc[0]), color="k", ls="--", lw=1, label=f"all {sig(full.iloc[0])}")
        ax.legend(loc="lower right", fontsize="small")
    for yi, v, d in zip(y, values, table["delta_test_rmse"]):
        text = (f" {v:.3f}" + (f" ({d:+.3f})" if np.isfinite(d) else "")) if np.isfinite(v) else " not run"
        ax.text(v if np.isfinite(v) else 0, yi, text, va="center", fontsize="small")
    ax.set_yticks(y, table["label"])
    finite = values[np.isfinite(values)]
    if len(finite):
        ax.set_xlim(0, float(finite.max()) * 1.25)  # room for the labels
    ax.set(xlabel="test RMSE (lower is better)", title=title)
    fig.tight_layout()
    return fig


def slug(label: str) -> str:
    """A row label as a metric name part: ``all``, ``without_user``, ``user_only``."""
    return label.replace("- ", "without_").replace(" ", "_")


def parent_name(cfg: AblationJob) -> str:
    """The parent run's name, e.g. ``ablation · benchmark · demo · random · s0``."""
    return f"ablation · {cfg.model} · {data_label(cfg.source.data)} · {cfg.splitting.split} · s{cfg.splitting.seed}"


def ablation_note(cfg: AblationJob, plan: Plan, table: pd.DataFrame) -> str:
    """The parent run's description: what it is, on what, and what the table says (4 significant digits)."""
    split = cfg.splitting
    text = (f"ablation: {plan.family.name} trained on each set of the feature groups {', '.join(plan.groups)} "
            f"(all, each left out, each alone) on data {data_label(cfg.source.data)} (split {split.split}, seed "
            f"{split.seed}); {sum(c is not None for c in plan.configs)} model runs nested under this one, compared on the test posts "
            "(ablation.md, ablation.csv, plots/ablation.png).")
    full = table[table["label"] == ALL]
    if len(full) and np.isfinite(full["test_rmse"].iloc[0]):
        text += f" All groups: test RMSE {sig(full['test_rmse'].iloc[0])}."
        out = table[table["label"].str.startswith("- ")].sort_values("delta_test_rmse", ascending=False)
        if len(out):
            worst = out.iloc[0]
            text += (f" Leaving out {worst.label[2:]} changes it most ({worst.delta_test_rmse:+.4g});")
        alone = table[table["label"].str.endswith(" only")].sort_values("test_rmse")
        if len(alone):
            best = alone.iloc[0]
            text += f" the best group alone is {best.label[:-5]} ({sig(best.test_rmse)})."
    return text


def table_text(plan: Plan, table: pd.DataFrame) -> str:
    """The table as Markdown (``to_markdown``) and a line per group set not run, saying why."""
    notes = [f"not run ({' | '.join(v.labels)}): {why}" for v, why in zip(plan.sets, plan.refused) if why]
    return to_markdown(table) + ("\n" + "\n".join(notes) + "\n" if notes else "")


def record_ablation(cfg: AblationJob, plan: Plan, table: pd.DataFrame) -> dict[str, float]:
    """Log the ablation on the active (parent) run: the table (Markdown, CSV), the bar chart, the row metrics
    ``ablation/{row}_test_rmse``, the data hash and the description.  Returns the metrics logged."""
    text = table_text(plan, table)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ablation.md").write_text(text)
        table.to_csv(Path(tmp) / "ablation.csv", index=False)
        mlflow.log_artifact(str(Path(tmp) / "ablation.md"))
        mlflow.log_artifact(str(Path(tmp) / "ablation.csv"))
    log_figure(lambda: ablation_bars(table, f"{plan.family.name}: test RMSE by feature groups"), "ablation.png")
    metrics = {f"ablation/{slug(row.label)}_test_rmse": float(row.test_rmse) for row in table.itertuples()
               if np.isfinite(row.test_rmse)}
    mlflow.log_metrics(metrics)
    mlflow.set_tags({"smp.data_hash": plan.data_hash, "smp.ablation_runs": ",".join(r for r in table["run_id"].unique() if r)})
    describe_run(ablation_note(cfg, plan, table))
    return metrics


def run_ablation(cfg: AblationJob = AblationJob(), base=None) -> JobResult:
    """Train ``cfg.model`` on each group set (all, each left out, each alone) as nested runs of one parent run;
    log, print and return the comparison.  ``base`` (Python callers): the family job config whose other
    settings every group set shares (default: the family's defaults).  Everything is checked before the parent
    run opens (``ablation_plan``)."""
    plan = ablation_plan(cfg, base)
    tags = {"smp.model": f"ablation:{cfg.model}", "smp.split": cfg.splitting.split,
            "smp.ablation_groups": ",".join(plan.groups), "mlflow.runName": parent_name(cfg)}
    with job_run("ablation", cfg.experiment, flatten(cfg), tags, what=ABLATION.help) as run:
        results = []
        for variant, config, why in zip(plan.sets, plan.configs, plan.refused):
            labels = " | ".join(variant.labels)
            if config is None:
                log.warning("ablation %s: %s (%s) not run: %s", cfg.model, labels, ",".join(variant.groups), why)
                results.append(None)
                continue
            log.info("ablation %s: %s (%s)", cfg.model, labels, ",".join(variant.groups))
            child = Parent(run.info.run_id, run.info.experiment_id, tags=(
                ("smp.ablation", labels), ("mlflow.runName", f"{variant.labels[0]} · {cfg.model}")))
            results.append(plan.family.run(config, parent=child))
        table = ablation_table(plan.sets, results)
        metrics = record_ablation(cfg, plan, table)
        print(f"\n{parent_name(cfg)}: test metrics per group set (Δ: the change against all)\n")
        print(table_text(plan, table))
    return JobResult(run.info.run_id, metrics)


ABLATION = Job("ablation", "a feature-group ablation of one model family (nested MLflow runs)", run_ablation,
               AblationJob)
