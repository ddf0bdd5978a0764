"""The package's shape: data flows one way through the stage modules; a model job reads resolve -> fit ->
record; the model families are objects listed in one table."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

SMP = Path(__file__).resolve().parents[1] / "smp"
# A module may import from its own stage or a lower one, never a higher one. Stage 0 is plumbing any stage
# uses (the config walker, the Job/Family types, MLflow runs).
STAGES = {
    "__init__": 0, "config": 0, "jobs": 0, "tracking": 0,
    "synth": 1, "data": 1,
    "splits": 2,
    "features": 3, "post_text": 3, "text_clip": 3, "groups": 3, "image_features": 3, "clip": 3, "feature_cache": 3, "embed": 3, "image_requests": 3,
    "boosters": 4, "models": 4, "nets": 4, "spaces": 4, "fusion_net": 4,
    "serving": 5, "evaluate": 5, "plots": 5,
    "packaging": 6, "fit": 6,
    "upstream": 7, "record": 7,
    "train": 8, "fusion": 8,
    "families": 9,
    "report": 10, "ablation": 10, "tune": 10, "registry": 10,
    "scoring": 11, "spark": 11,
    "predict": 12, "engines": 12,
    "catalog": 13,
    "cli": 14,
}
# The fit phase and everything it runs: no MLflow (fitting is pure; the record phase logs).
FIT_PHASE = ("fit", "boosters", "models", "nets", "spaces", "evaluate", "plots", "features", "jobs")


@functools.cache
def smp_imports(path: Path) -> list[tuple[str, bool]]:
    """``[(imported smp module, at module level)]`` of one source file, function-level imports included."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "smp":
            names = [a.name for a in node.names] if node.module == "smp" else [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("smp.")]
        out += [(name, id(node) in top_level) for name in names]
    return out


def modules() -> list[Path]:
    return sorted(SMP.glob("*.py"))


def test_every_module_has_a_stage():
    assert sorted(p.stem for p in modules()) == sorted(STAGES)


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_no_module_imports_from_a_higher_stage(path):
    higher = [(name, STAGES[name]) for name, _ in smp_imports(path) if STAGES[name] > STAGES[path.stem]]
    assert higher == [], f"{path.stem} (stage {STAGES[path.stem]}) imports from higher stages: {higher}"


def test_the_import_graph_has_no_cycle():
    graph = {p.stem: {name for name, _ in smp_imports(p) if name != p.stem} for p in modules()}
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_module_imports_another_by_a_string_name():
    """Every dependency is an import statement the graph above sees: no importlib, __import__ or globals()[...]."""
    found = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if name in ("import_module", "__import__"):
                    found.append(f"{path.name}:{node.lineno} {name}")
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call) \
                    and getattr(node.value.func, "id", "") == "globals":
                found.append(f"{path.name}:{node.lineno} globals()[...]")
    assert found == []


@pytest.mark.parametrize("name", FIT_PHASE)
def test_the_fit_phase_imports_no_mlflow(name):
    source = (SMP / f"{name}.py").read_text()
    imported = [n for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])]
    assert [n for n in imported if n.split(".")[0] == "mlflow"] == []


@pytest.mark.slow  # a fresh interpreter (subprocess)
def test_fitting_loads_no_mlflow_at_all():
    """Importing the fit phase (and what it imports, transitively) leaves MLflow unloaded."""
    code = "import sys, smp.fit; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _calls(fn: ast.FunctionDef) -> list[str]:
    """``module.name`` or ``name`` of every call in a function body, in source order."""
    out = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                out.append((node.lineno, node.col_offset, f"{f.value.id}.{f.attr}"))
            elif isinstance(f, ast.Name):
                out.append((node.lineno, node.col_offset, f.id))
    return [name for *_, name in sorted(out)]


def test_each_model_job_reads_resolve_fit_record():
    """A model job's run function opens its run (``job_run``), resolves upstream (``upstream.*``), fits
    (``fit.*``) and records (``record.*``), in that order, and touches MLflow through nothing else."""
    tree = ast.parse((SMP / "train.py").read_text())
    tracking = {a.name for node in tree.body if isinstance(node, ast.ImportFrom) and node.module == "smp.tracking"
                for a in node.names}
    assert tracking <= {"JobResult", "Parent", "job_run", "params_hash"}
    assert not any(isinstance(node, (ast.Import, ast.ImportFrom)) and "mlflow" in ast.dump(node)
                   for node in ast.walk(tree))
    runs = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)
            and node.name in ("run_benchmark", "run_pca_boost", "run_ensemble")}
    assert len(runs) == 3
    for name, fn in runs.items():
        phases = [c.split(".")[0] for c in _calls(fn) if c.split(".")[0] in ("job_run", "upstream", "fit", "record")]
        order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]  # runs of one phase collapsed
        assert order == ["job_run", "upstream", "fit", "record"], (name, phases)  # benchmark: with features=image


def test_model_families_are_listed_in_one_table():
    """Outside smp/families.py no collection literal names two model families: every list of them is derived
    from ``smp.families.FAMILIES`` (a family's own job code naming itself is fine)."""
    from smp.families import FAMILIES
    from smp.jobs import Family

    found = []
    for path in modules():
        if path.stem == "families":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in FAMILIES}
                if len(named) >= 2:
                    found.append(f"{path.name}:{node.lineno} {sorted(named)}")
    assert found == []
    assert tuple(FAMILIES) == ("benchmark", "pca_boost", "ensemble_mlp", "ensemble_conv1d", "fusion")
    assert all(isinstance(f, Family) and f.space and f.description for f in FAMILIES.values())
    # the paper's four families carry its figures; a family beyond the paper (fusion) has none to show
    assert [name for name, f in FAMILIES.items() if f.paper] == ["benchmark", "pca_boost", "ensemble_mlp",
                                                                  "ensemble_conv1d"]


def test_every_family_builds_its_model_and_has_a_search_space():
    import optuna

    from smp.config import leaves
    from smp.families import FAMILIES
    from smp.models import ImageFeatureSource

    trial = optuna.trial.FixedTrial({
        "max_depth": 4, "learning_rate": 0.1, "n_estimators": 200, "min_child_weight": 1.0, "subsample": 1.0,
        "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001, "n_components": 20, "hidden_1": 64,
        "hidden_2": 16, "dropout": 0.4, "lr": 1e-3, "weight_decay": 1e-5, "batch_size": 32, "epochs": 10,
        "n_pca": 8, "channels_1": 8, "channels_2": 16, "kernel_1": 3, "modality_dropout": 0.1,
        "user_embedding_dim": 8, "fusion": "gated"})
    for name, family in FAMILIES.items():
        cfg = family.default_config()
        model = family.build(cfg, images=ImageFeatureSource(["clip_0"]), benchmark=None)
        assert (type(model), model.family) == (family.model, name)
        if family.net is not None:
            assert type(model.net) is family.net and model.net.cfg == cfg.net
        values = family.space(trial)
        assert values and set(values) <= {path[-1] for path, _ in leaves(cfg)}


def test_the_catalog_lists_every_entry_point_once_with_its_run_function():
    from smp.catalog import JOBS
    from smp.families import FAMILIES

    assert list(JOBS) == ["synth", "embed", *FAMILIES, "compare", "ablation", "tune", "promote", "predict"]
    for name, job in JOBS.items():
        assert job.name == name and job.run.__name__ == f"run_{name}" and job.help
