"""The one walker over the (nested, frozen) config dataclasses of the jobs.

A job's parameters are the leaf fields of its config. One name is one
parameter: a leaf name shared by two nested configs (``seed``) is set by one
CLI flag / MLproject parameter / tuning value and feeds both. The same walk
gives the MLflow params (``flatten``), the CLI options and MLproject
parameters (``leaves``, ``kind``), applies values back (``apply``) and parses
text values (``parse``: bool, int, float, tuples), so these never disagree.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

# MLproject types: float, int, string. Not `path`: MLflow refuses a `path` value that does not exist yet
# (outputs: `out`, `output`), and the inputs' defaults are keywords ("demo") or empty (left undeclared).


class ConfigError(ValueError):
    """A bad parameter value (not bad data): the message names the parameter and what it expects."""


def _walk(cfg, path=()):
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            yield from _walk(value, path + (f.name,))
        else:
            yield path + (f.name,), value


def leaves(cfg) -> list[tuple[tuple[str, ...], object]]:
    """``[(path, value)]``, one per leaf name (the first occurrence; same-named leaves are one parameter)."""
    out, seen = [], set()
    for path, value in _walk(cfg):
        if path[-1] not in seen:
            seen.add(path[-1])
            out.append((path, value))
    return out


def flatten(*cfgs) -> dict[str, object]:
    """``{name: value}`` of every leaf (the MLflow params of a run). A same-named leaf holding a different
    value from the first (possible only when a config is built in Python) is kept under its dotted path, so
    every value used is logged."""
    out: dict[str, object] = {}
    for cfg in cfgs:
        for path, value in _walk(cfg):
            name = path[-1]
            if name not in out:
                out[name] = value
            elif out[name] != value:
                out[".".join(path)] = value
    return out


def apply(cfg, values: dict[str, object]):
    """``cfg`` with every leaf named in ``values`` replaced (all same-named leaves); unknown names refused."""
    unknown = set(values) - {path[-1] for path, _ in _walk(cfg)}
    if unknown:
        raise ConfigError(f"unknown parameter(s) {sorted(unknown)} for {type(cfg).__name__}")
    return _apply(cfg, values)


def _apply(cfg, values):
    changes = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            changes[f.name] = _apply(value, values)
        elif f.name in values:
            changes[f.name] = values[f.name]
    return replace(cfg, **changes)


def kind(value) -> str:
    """The option kind of a default value: bool, int, float, tuple or str."""
    return ("bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float"
            if isinstance(value, float) else "tuple" if isinstance(value, tuple) else "str")


def mlproject_type(name: str, value) -> str:
    """The MLproject parameter type of a leaf: float, int or string (bools and tuples are strings)."""
    return {"float": "float", "int": "int"}.get(kind(value), "string")


def parse(default, text: str, name: str = ""):
    """``text`` parsed as the type of ``default``; ``ConfigError`` naming ``name`` when it is not one."""
    if not isinstance(text, str):
        return text
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"expected true/false, got {text!r}")
            return low in ("1", "true", "yes")
        if isinstance(default, int):
            value = float(text)
            if value != int(value):
                raise ValueError(f"expected an integer, got {text!r}")
            return int(value)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return parse_tuple(text, type(default[0]) if default else int)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}" if name else str(exc)) from None
    return text


def parse_tuple(text, item=int) -> tuple:
    """``"128,64"``, ``"(128, 64)"``, ``[128, 64]`` -> ``(128, 64)`` (items of type ``item``)."""
    if isinstance(text, (tuple, list)):
        return tuple(item(v) for v in text)
    if not isinstance(text, str) and float(text) == float(text):  # one number (an int from a sampler)
        return (item(text),)
    parts = [t for t in str(text).replace("(", "").replace(")", "").replace("[", "").replace("]", "")
             .replace(" ", "").split(",") if t]
    try:
        return tuple(item(float(t)) if item is int else item(t) for t in parts)
    except ValueError:
        raise ValueError(f"expected comma-separated {item.__name__}s, got {text!r}") from None


# --------------------------------------------------------------------------- value rules
# Each config dataclass refuses, when it is built, a value that cannot mean anything (``check`` in its
# ``__post_init__``): the CLI, ``mlflow run`` and Python callers all build configs before any data loads
# or any run starts, so a bad value never costs a data load, a run or a library traceback.

def at_least(lo, what: str = "") -> tuple:
    """The rule ``value >= lo`` (a whole number where ``lo`` is one)."""
    return (lambda v: v >= lo), what or f"a number >= {lo}"


def above(lo, hi=None) -> tuple:
    """The rule ``lo < value`` (``<= hi`` when given)."""
    if hi is None:
        return (lambda v: v > lo), f"a number > {lo}"
    return (lambda v: lo < v <= hi), f"a number in ({lo}, {hi}]"


def fraction() -> tuple:
    """The rule ``0 < value < 1``."""
    return (lambda v: 0 < v < 1), "a fraction strictly between 0 and 1"


def one_of(*choices) -> tuple:
    """The rule ``value in choices``."""
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def zero_or_at_least(lo, zero_means: str) -> tuple:
    """The rule ``value == 0 or value >= lo``."""
    return (lambda v: v == 0 or v >= lo), f"0 ({zero_means}) or a number >= {lo}"


def device() -> tuple:
    """The rule for a compute device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    return (lambda v: v in ("auto", "cpu", "cuda") or str(v).startswith("cuda:")), "auto, cpu, cuda or cuda:N"


def each(rule: tuple) -> tuple:
    """``rule`` applied to every item of a tuple value."""
    ok, what = rule
    return (lambda v: all(ok(x) for x in v)), f"items each {what}"


def check(cfg, **rules) -> None:
    """Refuse a field of ``cfg`` that breaks its rule: ``ConfigError`` naming the parameter, the value given and
    what is allowed (e.g. ``learning_rate=-1.0: expected a number in (0, 1]``)."""
    for name, (ok, what) in rules.items():
        value = getattr(cfg, name)
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good or (isinstance(value, float) and value != value):  # NaN passes no rule
            raise ConfigError(f"{name}={value!r}: expected {what}")


def sig(value, digits: int = 4) -> str:
    """A figure as descriptions show it: 4 significant digits (``1.904``, ``0.5763``, ``2.333e+04``)."""
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)
