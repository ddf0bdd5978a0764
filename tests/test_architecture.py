"""The package's shape: data flows one way through the stage modules, and the model families live in one table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from smp.jobs import FAMILIES, JOBS

SMP = Path(__file__).resolve().parents[1] / "smp"
# A module may import from its own stage or a lower one, never a higher one. Stage 0 is plumbing any stage
# uses (the config walker, the job table of names, MLflow runs).
STAGES = {
    "__init__": 0, "config": 0, "jobs": 0, "tracking": 0,
    "synth": 1, "data": 1,
    "splits": 2,
    "features": 3, "image_features": 3, "clip": 3, "embed": 3, "image_requests": 3,
    "models": 4, "nets": 4,
    "serving": 5, "evaluate": 5, "plots": 5,
    "train": 6,
    "report": 7, "tune": 7, "registry": 7,
    "predict": 8,
    "cli": 9,
}


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


def test_model_families_are_listed_in_one_table():
    """Outside smp/jobs.py no collection literal names two model families: every list of them is derived from
    ``smp.jobs.JOBS`` (a family's own job code naming itself is fine)."""
    found = []
    for path in modules():
        if path.stem == "jobs":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in FAMILIES}
                if len(named) >= 2:
                    found.append(f"{path.name}:{node.lineno} {sorted(named)}")
    assert found == []
    assert FAMILIES == ("benchmark", "pca_boost", "ensemble_mlp", "ensemble_conv1d")
    assert all(JOBS[f].model and JOBS[f].space and JOBS[f].description and JOBS[f].paper for f in FAMILIES)


def test_every_family_builds_its_model_and_has_a_search_space():
    import optuna

    from smp import train, tune
    from smp.config import leaves
    from smp.models import ImageFeatureSource, create_model

    trial = optuna.trial.FixedTrial({
        "max_depth": 4, "learning_rate": 0.1, "n_estimators": 200, "min_child_weight": 1.0, "subsample": 1.0,
        "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.001, "n_components": 20, "hidden_1": 64,
        "hidden_2": 16, "dropout": 0.1, "lr": 1e-3, "weight_decay": 1e-5, "batch_size": 32, "epochs": 10,
        "n_pca": 8, "channels_1": 8, "channels_2": 16, "kernel_1": 3})
    for name in FAMILIES:
        cfg = JOBS[name].default_config()
        model = create_model(name, cfg, images=ImageFeatureSource(["clip_0"]), benchmark=None)
        assert model.family == name and hasattr(model, "fit") and hasattr(model, "predict")
        values = tune.space_for(name)(trial)
        assert set(values) <= {path[-1] for path, _ in leaves(cfg)}
        assert JOBS[name].run_function() is getattr(train, f"run_{name}")
