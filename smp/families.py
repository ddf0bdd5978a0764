"""Stage 9: the model families, one line each. A family is an ``smp.jobs.Family`` defined beside its run
function (``smp.train``); this table is what the stages above read (``tune``: run function and search space;
``report`` and ``registry``: which runs are models, the paper's figures; ``catalog``: the entry points).
Adding a family is its own module(s) plus one line here (then regenerate MLproject and cli_spec.json).
"""

from __future__ import annotations

from smp import fusion, train
from smp.config import ConfigError
from smp.jobs import Family, table

FAMILIES: dict[str, Family] = table(
    train.BENCHMARK,
    train.PCA_BOOST,
    train.ENSEMBLE_MLP,
    train.ENSEMBLE_CONV1D,
    fusion.FUSION,
)


def family(name: str) -> Family:
    """The family called ``name``; ``ConfigError`` naming the families otherwise."""
    if name not in FAMILIES:
        raise ConfigError(f"model family {name!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
