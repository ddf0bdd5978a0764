"""Stage 7: the logged MLflow model (pyfunc) that predicts from raw post rows.

A fitted smp model (any entry in ``smp.models.MODELS``) is pickled as an
artifact and wrapped by ``PopularityModel``.  ``predict`` validates the request
(missing columns, wrong types, undecodable images) and raises an
``MlflowException`` with ``INVALID_PARAMETER_VALUE`` so that ``mlflow models
serve`` answers 400 with a message naming the problem, never a stack trace.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

log = logging.getLogger("smp.serving")

MODEL_ARTIFACT = "smp_model.pkl"


class RequestError(ValueError):
    """A malformed prediction request; the message names the problem."""


class PopularityModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: raw posts DataFrame in, one predicted popularity per row out."""

    def load_context(self, context):
        with open(context.artifacts["smp_model"], "rb") as fh:
            self.model = pickle.load(fh)

    def predict(self, context, model_input: pd.DataFrame, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            frame = coerce_request(model_input, required=("Pid",))
            return self.model.predict(frame)
        except RequestError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def coerce_request(model_input, required=("Pid",)) -> pd.DataFrame:
    """Return the request as a posts DataFrame or raise ``RequestError`` naming the problem."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise RequestError(f"expected a table of posts, got {type(model_input).__name__}")
    if len(model_input) == 0:
        raise RequestError("the request holds no rows")
    missing = [c for c in required if c not in model_input.columns]
    if missing:
        raise RequestError(f"missing required column(s): {missing}")
    frame = model_input.copy()
    frame["Pid"] = frame["Pid"].astype(str)
    from smp.data import NUMERIC_FIELDS

    for col in NUMERIC_FIELDS:
        if col in frame.columns and not pd.api.types.is_numeric_dtype(frame[col]):
            parsed = pd.to_numeric(frame[col], errors="coerce")
            bad = parsed.isna() & frame[col].notna() & (frame[col].astype(str).str.strip() != "")
            if bad.any():
                raise RequestError(f"column {col!r}: {int(bad.sum())} value(s) are not numbers, "
                                   f"e.g. {frame.loc[bad, col].iloc[0]!r}")
            frame[col] = parsed
    return frame


def example_input(posts: pd.DataFrame, fields, n: int = 5) -> pd.DataFrame:
    """A small raw-rows input example with the columns the model reads."""
    cols = [c for c in fields if c in posts.columns]
    return posts[cols].head(n).reset_index(drop=True)


def input_schema(example: pd.DataFrame, image_inputs: bool = False):
    """Raw-rows input schema: ``Pid`` required, every other field optional.

    Columns are typed ``Any`` so that an integer where a float is expected (or
    the reverse) is not refused by MLflow; ``coerce_request`` checks the
    values and names any column that does not hold numbers.
    """
    from mlflow.types.schema import AnyType, ColSpec, Schema

    cols = list(example.columns)
    if image_inputs:
        cols += [c for c in ("image_b64", "image_path") if c not in cols]
    return Schema([ColSpec(AnyType(), c, required=(c == "Pid")) for c in cols])


def log_model(model, posts_example: pd.DataFrame, name: str = "model"):
    """Log ``model`` as a pyfunc with signature and input example; return the ModelInfo."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    example = posts_example.copy()
    for col in example.columns:
        if col != "Pid" and pd.api.types.is_numeric_dtype(example[col]):
            example[col] = example[col].astype(float)
    example["Pid"] = example["Pid"].astype(str)
    np.asarray(model.predict(example), dtype=float)  # the example must predict before it is logged
    signature = ModelSignature(inputs=input_schema(example, getattr(model, "needs_images", False)),
                               outputs=Schema([ColSpec("double", "popularity")]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_ARTIFACT
        with open(path, "wb") as fh:
            pickle.dump(model, fh, protocol=pickle.HIGHEST_PROTOCOL)
        return mlflow.pyfunc.log_model(
            name=name, python_model=PopularityModel(), artifacts={"smp_model": str(path)},
            signature=signature, input_example=example,
            code_paths=[str(Path(__file__).resolve().parent)],
        )
