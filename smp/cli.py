"""The ``smp`` console command: one subcommand per job, generated from the job configs.

Each job is ``(run function, default config)``; its parameters are the leaf
fields of the (nested) config dataclass.  The MLproject file is generated from
the same table (``smp mlproject``), so entry points and CLI mirror each other
one to one.  A leaf name shared by two nested configs (``seed``) is one
parameter that feeds both.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields, is_dataclass, replace


def jobs() -> dict:
    """``{name: (run_fn, default_cfg, help)}`` for every job (imported lazily)."""
    from smp import embed, predict, registry, report, synth, train, tune

    table = {
        "synth": (synth.run_synth, synth.SynthJob(), "write a synthetic SMPD dataset (official layout, JPEGs)"),
        "embed": (embed.run_embed, embed.EmbedJob(), "CLIP + handcrafted image features, cached by content"),
        "benchmark": (train.run_benchmark, train.BenchmarkJob(), "the paper's tabular XGBoost benchmark"),
        "pca_boost": (train.run_pca_boost, train.PCABoostJob(), "[CLIP, handcrafted, tabular] -> PCA -> XGBoost"),
        "ensemble_mlp": (train.run_ensemble_mlp, train.EnsembleMLPJob(),
                         "benchmark prediction + image features -> MLP (the main job)"),
        "ensemble_conv1d": (train.run_ensemble_conv1d, train.EnsembleConv1DJob(),
                            "benchmark prediction + PCA'd image features -> Conv1D net"),
        "compare": (report.run_compare, report.CompareJob(), "the paper's results table from this experiment's runs"),
        "tune": (tune.run_tune, tune.TuneJob(), "an Optuna study (nested MLflow runs) for one model family"),
        "promote": (registry.run_promote, registry.PromoteJob(),
                    "register the best run; alias champion only if it beats the current champion"),
        "predict": (predict.run_predict, predict.PredictJob(), "predict popularity for raw posts with a model URI"),
    }
    return table


def leaves(cfg, prefix=()) -> list[tuple[tuple[str, ...], object]]:
    """``[(path, default)]`` for every leaf field of a nested dataclass, first occurrence of a name wins."""
    out, seen = [], set()

    def walk(obj, path):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, path + (f.name,))
            elif f.name not in seen:
                seen.add(f.name)
                out.append((path + (f.name,), value))

    walk(cfg, prefix)
    return out


def _parse_value(default, text: str):
    if isinstance(default, bool):
        low = text.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return low in ("1", "true", "yes")
    if isinstance(default, int):
        value = float(text)
        if value != int(value):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        return int(value)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, tuple):
        items = [t for t in text.replace(" ", "").split(",") if t]
        kind = type(default[0]) if default else int
        return tuple(kind(float(t)) if kind is int else kind(t) for t in items)
    return text


def format_value(value) -> str:
    """How a default is written on the command line / in MLproject."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def apply(cfg, values: dict[str, object]):
    """Return ``cfg`` with every leaf named in ``values`` replaced (shared names feed all)."""
    changes = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            changes[f.name] = apply(value, values)
        elif f.name in values:
            changes[f.name] = values[f.name]
    return replace(cfg, **changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smp", description="Social-media popularity prediction with MLflow")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="job", required=True)
    for name, (_, default, help_text) in jobs().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for path, value in leaves(default):
            leaf = path[-1]
            p.add_argument(f"--{leaf.replace('_', '-')}", f"--{leaf}", dest=leaf, default=value,
                           type=lambda t, d=value: _parse_value(d, t),
                           help=f"default: {format_value(value)!r}")
    sub.add_parser("mlproject", help="print the MLproject file generated from the job configs")
    return parser


def mlproject_text() -> str:
    """The MLproject YAML: one entry point per job, parameters = the CLI's, same defaults."""
    lines = ["# Generated by `smp mlproject` from the job configs in smp/: edit those, then regenerate.",
             "name: smp", "", "conda_env: conda.yaml", "", "entry_points:"]
    for name, (_, default, help_text) in jobs().items():
        lines.append(f"  {name}:  # {help_text}")
        lines.append("    parameters:")
        args = []
        for path, value in leaves(default):
            leaf = path[-1]
            kind = "float" if isinstance(value, float) else "int" if isinstance(value, int) and not isinstance(
                value, bool) else "string"
            lines.append(f"      {leaf}: {{type: {kind}, default: {_yaml_scalar(format_value(value))}}}")
            args.append(f"--{leaf} {{{leaf}}}")
        lines.append(f"    command: \"python entrypoints/{name}.py {' '.join(args)}\"")
    return "\n".join(lines) + "\n"


def _yaml_scalar(text: str) -> str:
    return '""' if text == "" else f'"{text}"' if not _is_number(text) else text


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``smp`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.job == "mlproject":
        sys.stdout.write(mlproject_text())
        return 0
    run_fn, default, _ = jobs()[args.job]
    values = {path[-1]: getattr(args, path[-1]) for path, _ in leaves(default)}
    from smp.data import DataError

    try:
        result = run_fn(apply(default, values))
    except DataError as exc:
        logging.getLogger("smp").error("%s", exc)
        return 2
    if isinstance(result, dict):
        for key in sorted(result):
            if key.startswith("test_") or key.startswith("val_rmse") or not key.startswith(("val_",)):
                value = result[key]
                if isinstance(value, float):
                    print(f"{key}: {value:.4f}")
                else:
                    print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
