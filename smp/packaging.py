"""Stage 6: a fitted model packaged as an MLflow pyfunc (``smp.serving.PopularityModel``), with its schemas,
input example, description, requirements and the package's code.

Every logged model has an input schema naming the raw post fields it reads (the SMPD fields its feature
groups read -- ``Uid`` for ``user``, ``Title`` and ``Alltags`` for ``text`` -- plus ``image_b64`` /
``image_path``, all optional but ``Pid``) with MLflow's ``AnyType`` for each, and an output
schema (``popularity`` double, ``status`` string). Why ``AnyType``: a frame a user builds the natural way
(``pd.read_csv`` / ``pd.read_json`` of the real posts or the official SMPD JSON) holds ``Pid`` and the dates
and counts as int64, the same numbers as float64 once one is missing, and text columns as float64 when a
sample has none; MLflow's typed columns refuse each of these (``string`` takes no int64 ``Pid``, ``double``
no int64 date, ``long`` no NaN), so no typed schema serves every natural frame. With ``AnyType`` MLflow still
checks the names (``Pid`` required; an extra column is named once in MLflow's log, "Found extra inputs ...
These inputs will be ignored", and dropped) and ``smp.serving.coerce_request`` parses the values, refusing
what is not a number with a message naming the column and the post. What each field holds is in
``smp.serving.FIELD_KINDS``, the logged model's description and its MLmodel metadata (``smp_input_kinds``).
The cost, in MLflow 3.17: the scoring server reads a CSV body with the schema's pandas dtypes, which
``AnyType`` has none of, so a CSV body is refused (400) before any model code; JSON bodies
(``dataframe_records`` / ``dataframe_split``) are the served format.

What a model family is (its description) comes from the caller, the model job's record phase: packaging
looks no family up by name.
"""

from __future__ import annotations

import base64
import pickle
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from smp.image_requests import IMAGE_INPUTS, with_image_features
from smp.serving import FIELD_KINDS, PopularityModel, coerce_request
from smp.tracking import muted

MODEL_ARTIFACT = "smp_model.pkl"  # the pickled fitted model, the pyfunc's ``smp_model`` artifact


def example_input(posts: pd.DataFrame, fields, n: int = 3, images: bool = False) -> pd.DataFrame:
    """A small raw-post input example with the columns the model reads; ``images``: each post's image file
    as ``image_b64`` (what a client sends to an image model)."""
    cols = [c for c in fields if c in posts.columns]
    example = posts[cols].head(n).reset_index(drop=True)
    if images and "image_path" in posts.columns:
        def b64(path):
            try:
                return base64.b64encode(Path(path).read_bytes()).decode("ascii")
            except (OSError, TypeError):
                return None  # a post without a readable image: sent without one

        example["image_b64"] = [b64(p) for p in posts["image_path"].head(n)]
    return example


def group_fields(model) -> list[str]:
    """The raw fields read by the feature groups ``model`` uses beyond ``tabular`` (``groups_in_use``): ``Uid``
    and ``Postdate`` for ``user``, ``Title`` and ``Alltags`` for ``text``, ``Postdate`` for ``time``.

    The tabular fields are the example's, as ever: the featurizer names a field it would read (``tag_count``)
    where the training posts held another source (``Alltags``), and a tabular model's schema stays as it was."""
    groups = getattr(model, "groups_in_use", None)
    return [] if groups is None else [f for g in groups.groups_ if g.name != "tabular" for f in g.fields]


def input_columns(example: pd.DataFrame, fields=()) -> list[str]:
    """The raw-rows columns a model reads: the example's, then each of ``fields`` (``group_fields``) the
    example lacks, then ``image_b64`` / ``image_path``.

    A field left out would be dropped by MLflow's schema step before the model sees it, so a field missing
    from the example's posts is listed all the same. Every family accepts the image columns, so a client
    sends the same request whichever model is champion (a tabular model checks the image and ignores it).
    """
    columns = list(example.columns)
    for c in [*fields, *IMAGE_INPUTS]:
        if c not in columns:
            columns.append(c)
    return columns


def input_schema(columns: list[str]):
    """The input schema: each column by name, MLflow's ``AnyType`` (any natural frame; the model parses the
    values), optional except ``Pid``."""
    from mlflow.types.schema import AnyType, ColSpec, Schema

    return Schema([ColSpec(AnyType(), c, required=(c == "Pid")) for c in columns])


def input_text(columns: list[str]) -> str:
    """The accepted columns and what each holds, for the model's description."""
    return "; ".join(f"{c}: {FIELD_KINDS.get(c, 'text')}" for c in columns)


def output_schema():
    """What the pyfunc returns per post: ``popularity`` (double) and ``status`` (string, ``smp.serving``)."""
    from mlflow.types.schema import ColSpec, Schema

    return Schema([ColSpec("double", "popularity"), ColSpec("string", "status")])


NOT_AT_PREDICT_TIME = ("optuna", "matplotlib")  # smp dependencies no logged model imports
IMAGE_ONLY = ("torch", "torchvision", "open_clip_torch", "tqdm")  # needed only by models that read images


def pip_requirements(needs_images: bool) -> list[str] | None:
    """smp's own dependencies pinned to the installed versions, or None (MLflow infers) when smp isn't installed.

    MLflow's inference loads the model in a subprocess to see what it imports, which takes seconds a
    model; the package metadata gives the answer at once, and the bundled ``smp`` code needs exactly these.
    """
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        specs = requires("smp") or []
    except PackageNotFoundError:
        return None
    skip = set(NOT_AT_PREDICT_TIME) | (set() if needs_images else set(IMAGE_ONLY))
    out = []
    for spec in specs:
        req = Requirement(spec)
        if (req.marker is not None and not req.marker.evaluate({"extra": ""})) or req.name in skip:
            continue  # an extra (test, team, dev) or not needed to predict
        try:
            out.append(f"{req.name}=={version(req.name)}")
        except PackageNotFoundError:
            out.append(str(req))
    return out


def log_model(model, posts_example: pd.DataFrame, name: str = "model", summary: str = "", description: str = ""):
    """Log ``model`` as a pyfunc with its raw-post input schema, a raw-post input example and a description
    (``model_note``: what it is -- ``description``, its family's -- what it reads, ``summary`` = its headline
    figures)."""
    from mlflow.models import ModelSignature

    example = posts_example.copy()
    checked = coerce_request(example)
    np.asarray(model.predict(with_image_features(model, checked)[0]), dtype=float)  # it must predict before logging
    family = getattr(model, "family", "")
    columns = input_columns(example, group_fields(model))
    signature = ModelSignature(inputs=input_schema(columns), outputs=output_schema())
    note = model_note(family, description, columns, summary)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_ARTIFACT
        with open(path, "wb") as fh:
            pickle.dump(model, fh, protocol=pickle.HIGHEST_PROTOCOL)
        code = bundle_code(Path(tmp) / "code")
        # PopularityModel holds no state (the fitted model is the smp_model artifact): MLflow's notice that
        # a python_model object is cloudpickled leaves a user nothing to act on
        with muted("mlflow.pyfunc", "Passing a Python object as `python_model`"):
            return mlflow.pyfunc.log_model(
                name=name, python_model=PopularityModel(), artifacts={"smp_model": str(path)},
                signature=signature, input_example=example, model_type=family,
                tags={"smp.family": family, "smp.description": description,
                      "mlflow.note.content": note},  # the logged model page's Description
                metadata={"smp_family": family, "smp_input_columns": columns, "smp_required_columns": ["Pid"],
                          "smp_input_kinds": {c: FIELD_KINDS.get(c, "text") for c in columns}},
                pip_requirements=pip_requirements(getattr(model, "needs_images", False)),
                code_paths=[str(p) for p in code],
            )


def model_note(family: str, description: str, columns: list[str], summary: str = "") -> str:
    """The logged model's description: what it is (``description``, else the family's name), its figures,
    what to send it and what it answers."""
    what = description or family
    return (f"{family}: {what}. {summary + ' ' if summary else ''}"
            f"Input: one row per raw post, any subset of these columns ({input_text(columns)}); numbers may "
            "be int or float, missing values NaN/null, other columns are ignored. Output: popularity (the SMPD label scale) "
            "and status (ok, or partial: what was treated as missing, an unseen user scored with the prior, "
            "text truncated).")


CODE_ARCHIVE = "smp.zip"
_SHIM = '''"""smp as shipped inside a logged MLflow model (written by smp.packaging.bundle_code).

The package's modules are in ../{archive} (one artifact upload instead of one per file): this
stub adds the archive to the package path, then runs the package's own __init__ from it.
"""
import os as _os
import zipfile as _zipfile

_archive = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "{archive}")
__path__.append(_os.path.join(_archive, "smp"))
with _zipfile.ZipFile(_archive) as _zf:
    exec(compile(_zf.read("smp/__init__.py"), _os.path.join(_archive, "smp", "__init__.py"), "exec"))
del _os, _zipfile, _archive, _zf
'''


def bundle_code(dest: Path) -> list[Path]:
    """The package's sources for a logged model's ``code_paths``: ``smp.zip`` plus a small ``smp`` stub package.

    MLflow puts the model's ``code/`` directory first on ``sys.path``, so ``import smp`` finds the stub,
    which imports the modules from the archive (zipimport).  Against a tracking server every artifact
    file is one HTTP upload: two files instead of one per module (benchmarks/team.py).
    """
    import zipfile

    src = Path(__file__).resolve().parent
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / CODE_ARCHIVE
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for module in sorted(src.glob("*.py")):  # sources only: no __pycache__
            zf.write(module, f"smp/{module.name}")
    stub = dest / "smp"
    stub.mkdir(exist_ok=True)
    (stub / "__init__.py").write_text(_SHIM.format(archive=CODE_ARCHIVE))
    return [archive, stub]
