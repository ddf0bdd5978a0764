"""Stage 5: the logged MLflow model (pyfunc) that predicts from raw post rows.

A fitted smp model (any model family of ``smp.families``) is pickled as an
artifact and wrapped by ``PopularityModel`` (``smp.packaging.log_model``).  Its ``predict`` returns one row
per post: ``popularity`` (double) and ``status`` (string), as ``smp predict``
writes them:

* ``ok``: scored from the values given;
* ``partial: <what>``: scored, with some input treated as missing; the notes
  are joined by ``"; "``: ``tag_count=-3 out of range [0, 10000]; treated as
  missing`` (a number outside ``smp.data.FIELD_RANGES`` or +-inf; NaN is a
  missing value like null and is not noted), ``image unusable (<reason>);
  scored without image features`` and ``no image given; scored without image
  features`` (image models only); for a model with feature groups (``smp.groups``, its
  ``groups_in_use``): ``unseen user`` (the ``user`` group: no training post of this ``Uid``, or no ``Uid``
  -- missing, null, NaN, empty --: scored with the user prior) and ``text truncated`` (the ``text`` group:
  the title or the tags were cut to the encoder's bounds, ``smp.groups.MAX_TITLE_CHARS``, ``MAX_TAG_CHARS``,
  ``MAX_TAGS``; NUL bytes are dropped unnoted). A model without the group never says either
  (``group_notes``).

What is per post and what refuses the whole request (HTTP 400, the message
names the problem; ``coerce_request`` raises ``RequestError``, the pyfunc
``RequestRejected``):

* per post (``partial``): an out-of-range or infinite number; an unknown or
  missing ``Uid``, a title or tags over the text bounds (models with those
  groups: a 1 MB title or 100,000 tags are scored, cut); for an image
  model, an image that cannot be used, the same reason whether it came as
  ``image_b64`` or ``image_path``: a missing file, a directory or other
  non-regular file, zero bytes, over ``MAX_IMAGE_BYTES``, more than
  ``MAX_PIXELS`` pixels (refused from the header, never decoded), truncated,
  not an image, an ``image_path`` holding a NUL byte (``the path holds a NUL
  byte``: it names no file, in the image root or out of it).  ``image_b64`` of
  zero bytes is ``""``, i.e. no image given (``smp.image_requests`` checks each).
  A tabular model never opens an image: its status does not mention one
  (``ok``), so the same request serves whichever model is champion.  A field
  the model does not read is dropped by MLflow's schema step unseen: not noted
  (``smp predict`` counts it when loading, and leaves it out of the status too).
* whole request: not a table, no rows, no ``Pid`` column or an empty Pid, a
  duplicate ``Pid`` (``smp.data.load_data``'s rule and wording: each post is
  scored once), a number column holding text or lists, a value of the wrong
  JSON shape (``column 'Title': expected text, got a list (Pid '7')``: a list
  or an object in a text field -- ``TEXT_FIELDS`` --, in ``Pid`` or in ``Uid``;
  an ``image_path`` that is not text; a number or a bool in a text field,
  ``Pid`` or ``Uid`` is read as its text, as a natural frame holds one: ``12``,
  ``12.0`` and ``"12"`` are one post, one user, ``uid_text``), an
  ``image_b64`` that is not a string or not base64 (the request is garbled,
  not the image), an ``image_path`` in a server without
  ``SMP_SERVE_IMAGE_ROOT`` or outside it, a request over the size limit.

Request size, in a scoring server (``mlflow models serve``): at most
``MAX_REQUEST_ROWS`` (10,000) posts and ``MAX_REQUEST_MB`` (100) MiB of
values a request (``request_bytes``: the characters of its text cells,
base64 images included, plus 8 bytes a number: about the JSON body's size;
an image of ``MAX_IMAGE_BYTES`` fits as base64), else 400 naming the limit
(``the request holds 200.0 MiB of values; this server takes at most 100 MiB a
request (SMP_SERVE_MAX_MB): ...``).  ``SMP_SERVE_MAX_ROWS`` / ``SMP_SERVE_MAX_MB``
in the server's environment change the limits; in-process calls (``smp
predict``, a notebook) have none.  MLflow 3.17's scoring server has no body
limit of its own (no setting in ``mlflow/pyfunc/scoring_server``; uvicorn,
which runs it, bounds headers, not bodies) and reads and parses the whole body
before any model code, so this limit bounds the work and memory a request
causes after parsing, not its upload: stop large uploads in front of the
server (a proxy's body limit, e.g. nginx ``client_max_body_size 100m``).
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` (60 s by default) bounds each
request's time (504).

Image features at request time (``smp.image_requests``): the embed job's
feature cache under ``SMP_CACHE_DIR`` is read (its index once per process),
never written; a client's image never reaches the disk, so the server runs on
a read-only filesystem; features of request images are kept in memory, an LRU
by content hash of at most 4,096 images and 64 MiB (``SMP_REQUEST_CACHE_IMAGES``,
``SMP_REQUEST_CACHE_MB``).

What ``mlflow models serve`` does with errors (MLflow 3.17,
``mlflow/pyfunc/scoring_server/__init__.py``):

* an ``MlflowException`` raised from ``predict`` is answered with
  ``get_http_status_code()`` (``INVALID_PARAMETER_VALUE`` -> 400) and the body
  ``{"error_code", "message", "sqlstate", "error_class"}`` -- no
  ``stack_trace`` -- but the server first rewrites ``e.message`` to ``"Failed
  to predict data '<the whole request>'. Error: ..."``, echoing the request
  (image bytes included) back.  ``RequestRejected`` keeps its own message.
* any other exception from ``predict`` becomes a 400 whose body carries the
  full traceback in ``stack_trace``; so an unexpected model failure is
  re-raised as ``PredictionFailed`` (500, no traceback in the body; the
  traceback goes to the server log) with file paths cut from its message.
* errors before ``predict`` are MLflow's own: a body that is not JSON or has
  no ``dataframe_records`` / ``dataframe_split`` / ``inputs`` key gets a 400
  naming that; a CSV body that pandas cannot parse gets a 400 *with* a
  ``stack_trace`` (``parse_csv_input``), which no model code can prevent.

The logged model's schemas (every column MLflow's ``AnyType``: any natural frame passes, ``coerce_request``
parses the values) and how it is packaged are ``smp.packaging``'s. Callers in this package that hand the model
precomputed image feature columns (``smp predict``, ``promote``) call it through ``predict_frame`` (the
predictions) or ``predict_table`` (with the status), which skip MLflow's schema step (it would drop those
columns).
"""

from __future__ import annotations

import logging
import os
import pickle

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from smp.groups import user_ids
from smp.post_text import MAX_TAG_CHARS, MAX_TAGS, MAX_TITLE_CHARS, cut_by_bounds
from smp.image_requests import (IMAGE_INPUTS, IMAGE_ROOT_ENV, ImageColumnError, confined_paths, decoded_b64,
                                scrub_paths, with_image_features)

log = logging.getLogger("smp.serving")

_SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # set to "true" by MLflow's scoring server


class RequestError(ValueError):
    """A malformed prediction request; the message names the problem."""


class _PinnedMessage(MlflowException):
    """An ``MlflowException`` whose message the scoring server cannot rewrite (see the module docstring)."""

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__
            self._message = value


class RequestRejected(_PinnedMessage):
    """A malformed request: HTTP 400 from ``mlflow models serve``, body = the problem, no traceback.

    Its messages are this module's own text plus values the client sent; never a server path."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class PredictionFailed(_PinnedMessage):
    """The model failed on a well-formed request: HTTP 500, no traceback in the body (it is logged).

    The message comes from whatever failed, so file paths are cut from it (``scrub_paths``)."""

    def __init__(self, message: str):
        super().__init__(scrub_paths(message), error_code=INTERNAL_ERROR)


def status_text(notes) -> str:
    """A post's status: ``ok``, or ``partial: `` and its notes joined by ``"; "``."""
    notes = [n for n in notes if n]
    return "partial: " + "; ".join(notes) if notes else "ok"


class PopularityModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: raw posts DataFrame in; ``popularity`` and ``status`` per row out (module docstring)."""

    def load_context(self, context):
        with open(context.artifacts["smp_model"], "rb") as fh:
            self.model = pickle.load(fh)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            frame = coerce_request(model_input)
        except RequestError as exc:
            raise RequestRejected(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - anything else would reach the client with a traceback
            log.exception("the request could not be read")
            raise PredictionFailed(f"the request could not be read: {type(exc).__name__}: {exc}") from exc
        try:
            frame, image_notes = with_image_features(self.model, frame)
            groups_noted = group_notes(self.model, frame)
            pred = np.asarray(self.model.predict(frame), dtype=float).reshape(-1)
        except Exception as exc:
            log.exception("prediction failed on a well-formed request of %d rows", len(frame))
            raise PredictionFailed(f"prediction failed: {type(exc).__name__}: {exc}") from exc
        field_notes = frame.attrs.get("row_notes") or {}
        status = [status_text([*field_notes.get(pid, ()), *groups_noted.get(pid, ()), *image_notes.get(pid, ())])
                  for pid in frame["Pid"]]
        return pd.DataFrame({"popularity": pred, "status": pd.Series(status, dtype=object)})


def coerce_request(model_input, required=("Pid",)) -> pd.DataFrame:
    """Return the request as a posts DataFrame or raise ``RequestError`` (a whole-request problem).

    Numbers are parsed; an out-of-range or infinite one becomes NaN with a note in
    ``attrs["row_notes"]`` (Pid -> notes, as ``smp.data.load_data`` keeps them); ``image_b64`` must be
    base64 text and is decoded, once (``smp.image_requests.decoded_b64``); ``image_path`` is resolved
    (``smp.image_requests.confined_paths``). Images are not opened here.
    """
    from smp.data import NUMERIC_FIELDS, DataError, RowNotes, _check_unique_pids, out_of_range, range_note

    if isinstance(model_input, dict):
        try:
            model_input = pd.DataFrame(model_input)
        except ValueError as exc:
            raise RequestError(f"the request is not a table of posts: {exc}") from None
    if not isinstance(model_input, pd.DataFrame):
        raise RequestError(f"expected a table of posts, got {type(model_input).__name__}")
    if len(model_input) == 0:
        raise RequestError("the request holds no rows")
    if os.environ.get(_SERVING_ENV, "").lower() == "true":
        check_request_size(model_input)
    missing = [c for c in required if c not in model_input.columns]
    if missing:
        raise RequestError(f"missing required column(s): {missing}")
    frame = model_input.reset_index(drop=True)  # a copy: the caller's frame is never changed
    frame.attrs = {}
    for col in TEXT_FIELDS:
        if col in frame.columns:
            _check_shape(frame, col, "text", _scalar)
    if "Pid" in frame.columns:
        _check_shape(frame, "Pid", "a post id (text or a number)", _scalar, name_rows=False)
        blank = frame["Pid"].isna() | (frame["Pid"].astype(str).str.strip() == "")
        if blank.any():
            raise RequestError(f"column 'Pid': empty in {int(blank.sum())} row(s) (row {int(blank.idxmax())} first)")
        frame["Pid"] = pid_text(frame["Pid"])
        try:  # one rule with the loader's: a post is scored once
            _check_unique_pids(frame, "request")
        except DataError as exc:
            raise RequestError(f"{exc}; each post is scored once, send every Pid once") from None
    if "Uid" in frame.columns:
        _check_shape(frame, "Uid", "a user id (text or a number)", _scalar)
        frame["Uid"] = uid_text(frame["Uid"])
    notes: dict[str, list[str]] = {}
    for col in NUMERIC_FIELDS:
        if col not in frame.columns:
            continue
        # every number as float64 (ints, bools, pandas' nullable Int64 with <NA>): one dtype for the model
        if pd.api.types.is_numeric_dtype(frame[col]):
            frame[col] = frame[col].astype("float64")
        else:
            frame[col] = _numeric_column(frame, col)
        bad = out_of_range(col, frame[col])
        if bad.any():
            for i in np.flatnonzero(bad):
                notes.setdefault(_row_key(frame, i), []).append(range_note(col, frame[col].iloc[i]))
            frame[col] = frame[col].astype(float).mask(bad)
    try:
        if "image_b64" in frame.columns:
            frame["image_b64"] = decoded_b64(frame["image_b64"])
        if "image_path" in frame.columns:
            _check_shape(frame, "image_path", "a path (text)", lambda v: _missing(v) or isinstance(v, str))
            frame["image_path"] = confined_paths(frame["image_path"], os.environ.get(IMAGE_ROOT_ENV, ""),
                                                 in_server=os.environ.get(_SERVING_ENV, "").lower() == "true")
    except ImageColumnError as exc:
        raise RequestError(str(exc) if exc.row is None else f"{exc} ({_row_name(frame, exc.row)})") from None
    frame.attrs["row_notes"] = RowNotes(notes)
    return frame


# What each raw post field holds (the logged model's description and MLmodel metadata ``smp_input_kinds``,
# ``smp.packaging``; the schema itself types every column as MLflow's AnyType)
FIELD_KINDS = {"Pid": "post id (required; number or text)", "Category": "text", "Subcategory": "text",
               "Concept": "text", "ispro": "number (0/1)", "Postdate": "number (Unix seconds)",
               "photo_count": "number", "tag_count": "number",
               "Alltags": f"text (space-separated tags; a text model reads the first {MAX_TAG_CHARS:,} characters "
                          f"and {MAX_TAGS} tags)",
               "Title": f"text (a text model reads the first {MAX_TITLE_CHARS:,} characters)",
               "Uid": "user id (text or a number: 12, 12.0 and \"12\" are one user; missing or empty: an unseen "
                      "user, scored with the training posts' prior)",
               "Latitude": "number", "Longitude": "number",
               "photo_firstdate": "number (Unix seconds)", "timezone_offset": "number (hours, or text like +08:00)",
               "image_b64": "text (base64 of the image file)", "image_path": "text (a path the scorer can read)"}

# the text fields of a post the model reads (image_b64 / image_path are checked on their own)
TEXT_FIELDS = tuple(c for c, kind in FIELD_KINDS.items() if kind.startswith("text") and c not in IMAGE_INPUTS)


def pid_text(pids: pd.Series) -> pd.Series:
    """Post ids as text, whatever the frame holds: ``775``, ``"775"`` and ``775.0`` (a float column, as
    pandas makes one beside a missing value) are the same post ``"775"``."""
    if pd.api.types.is_float_dtype(pids):
        values = pids.to_numpy(dtype=float)
        if np.all(np.isfinite(values) & (values == np.round(values))):
            return pd.Series(values.astype(np.int64).astype(str), index=pids.index, dtype=object)
    if pd.api.types.is_bool_dtype(pids):
        return pids.astype(str)
    return pids.astype(str)


def uid_text(uids: pd.Series) -> pd.Series:
    """User ids as text, None where missing (``smp.groups.user_ids``: ``12``, ``12.0`` and ``"12"`` are one
    user; null, NaN, ``""`` and blank are no user)."""
    if uids.dtype == object:  # a numpy float32 in an object column is not a float: make it one
        uids = uids.map(lambda v: float(v) if isinstance(v, np.floating) else v)
    return pd.Series(user_ids(pd.DataFrame({"Uid": uids})), index=uids.index, dtype=object)


# --------------------------------------------------------------------------- notes of the feature groups
UNSEEN_USER = "unseen user"  # the user group scored the post with its prior (no history for its Uid)
TEXT_TRUNCATED = "text truncated"  # the text group cut the post's title or tags to its bounds


def group_notes(model, frame: pd.DataFrame) -> dict[str, list[str]]:
    """Pid -> the notes of the feature groups ``model`` uses (``groups_in_use``): ``UNSEEN_USER`` where its
    ``user`` group scores the post with the prior, ``TEXT_TRUNCATED`` where its ``text`` group cuts the post's
    text. Nothing for a model without groups, or without the group a note is about."""
    groups = getattr(model, "groups_in_use", None)
    if groups is None:
        return {}
    flags = []
    user, text = groups.group("user"), groups.group("text")
    if user is not None:
        flags.append((UNSEEN_USER, user.unseen(frame)))
    if text is not None:
        cut = getattr(text, "truncated", None)  # the encoder's own per-post rule (models pickled before: the bounds)
        flags.append((TEXT_TRUNCATED, cut(frame) if cut is not None else cut_by_bounds(frame)))
    notes: dict[str, list[str]] = {}
    for note, flag in flags:
        for i in np.flatnonzero(flag):
            notes.setdefault(_row_key(frame, i), []).append(note)
    return notes


def _row_key(frame: pd.DataFrame, i: int) -> str:
    return str(frame["Pid"].iloc[i]) if "Pid" in frame.columns else str(i)


def _row_name(frame: pd.DataFrame, i: int) -> str:
    return f"Pid {frame['Pid'].iloc[i]!r}" if "Pid" in frame.columns else f"row {i}"


def _missing(value) -> bool:
    """None, NaN or pandas' NA: a missing value in any column."""
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _scalar(value) -> bool:
    """Text, a number, a bool or missing: what a text field or a Pid may hold (a natural frame holds a
    number where a column of ids, titles or tags happens to look like numbers; it is read as its text)."""
    return _missing(value) or isinstance(value, (str, bool, int, float, np.number, np.bool_))


def _check_shape(frame: pd.DataFrame, col: str, expected: str, ok, name_rows: bool = True) -> None:
    """Refuse the request when a value of ``col`` fails ``ok`` (a list or an object where text belongs),
    naming the column, the type and the post (the row, for ``Pid`` itself)."""
    values = frame[col]
    if values.dtype != object:  # numbers, bools, strings: a column pandas could type holds no list or object
        if ok is _scalar or pd.api.types.is_string_dtype(values) or not values.notna().any():
            return
        i = int(np.flatnonzero(values.notna().to_numpy())[0])
    else:
        i = next((i for i, v in enumerate(values) if not ok(v)), None)
        if i is None:
            return
    where = _row_name(frame, i) if name_rows else f"row {i}"
    value = values.iloc[i]
    got = "number" if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) \
        else type(value).__name__
    raise RequestError(f"column {col!r}: expected {expected}, got a {got} ({where})")


MAX_REQUEST_ROWS = 10_000  # posts in one request to a scoring server (SMP_SERVE_MAX_ROWS overrides)
MAX_REQUEST_MB = 100  # MiB of values in one request: an image up to MAX_IMAGE_BYTES fits as base64 (SMP_SERVE_MAX_MB)
ROWS_ENV, MB_ENV = "SMP_SERVE_MAX_ROWS", "SMP_SERVE_MAX_MB"


def request_limits() -> tuple[int, int]:
    """(rows, bytes) one request to a scoring server may hold: ``MAX_REQUEST_ROWS`` and ``MAX_REQUEST_MB``,
    or the whole numbers in ``SMP_SERVE_MAX_ROWS`` / ``SMP_SERVE_MAX_MB``."""
    out = []
    for env, default in ((ROWS_ENV, MAX_REQUEST_ROWS), (MB_ENV, MAX_REQUEST_MB)):
        text = os.environ.get(env, "").strip()
        try:
            out.append(int(text) if text else default)
        except ValueError:
            raise ValueError(f"{env}={text!r}: expected a whole number") from None
    return out[0], out[1] * 2**20


def request_bytes(frame: pd.DataFrame) -> int:
    """The size of a request's values: the characters of its text cells (base64 images included) and 8
    bytes for every other cell -- about its JSON body's size."""
    total = 0
    for col in frame.columns:
        values = frame[col]
        if pd.api.types.is_numeric_dtype(values):
            total += 8 * len(values)
        else:
            total += sum(len(v) if isinstance(v, str) else 8 for v in values)
    return total


def check_request_size(frame: pd.DataFrame) -> None:
    """Refuse a request to a scoring server over ``request_limits()`` (rows first: counting bytes reads every cell)."""
    max_rows, max_bytes = request_limits()
    if len(frame) > max_rows:
        raise RequestError(f"the request holds {len(frame):,} posts; this server takes at most {max_rows:,} a "
                           f"request ({ROWS_ENV}): send them in several requests")
    size = request_bytes(frame)
    if size > max_bytes:
        raise RequestError(f"the request holds {size / 2**20:,.1f} MiB of values; this server takes at most "
                           f"{max_bytes / 2**20:,.0f} MiB a request ({MB_ENV}): send fewer posts or smaller images "
                           "a request")


def _numeric_column(frame: pd.DataFrame, col: str) -> pd.Series:
    """A number column that arrived as text or mixed objects, parsed as the loader parses an SMPD file
    (``"12"``, ``"true"``/``"false"``, a time zone as ``"+08:00"``); blank is missing; anything else refuses
    the request, naming the column and the post."""
    from smp.data import _parse_tz_offset

    text = frame[col].map(lambda v: float(v) if isinstance(v, bool) else v)  # JSON true/false: 1/0
    nested = text.map(lambda v: isinstance(v, (list, dict, tuple, set)))
    if nested.any():
        i = int(np.flatnonzero(nested.to_numpy())[0])
        raise RequestError(f"column {col!r}: expected a number, got a {type(text.iloc[i]).__name__} "
                           f"({_row_name(frame, i)})")
    stripped = text.map(lambda v: v.strip().lower() if isinstance(v, str) else v)
    blank = stripped.isna() | stripped.isin(["", "nan", "none", "null"])
    if col == "timezone_offset":
        parsed = pd.Series([np.nan if b else _parse_tz_offset(v) for v, b in zip(text, blank)], index=text.index)
    else:
        parsed = pd.to_numeric(stripped.replace({"true": 1.0, "false": 0.0}).mask(blank), errors="coerce")
    bad = (parsed.isna() & ~blank).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RequestError(f"column {col!r}: {int(bad.sum())} value(s) are not numbers, "
                           f"e.g. {text.iloc[i]!r} ({_row_name(frame, i)})")
    return parsed.astype(float)


def model_input(model, posts: pd.DataFrame) -> pd.DataFrame:
    """The columns of ``posts`` that a loaded pyfunc reads (its ``smp_input_columns``, else its schema's names)."""
    names = (model.metadata.metadata or {}).get("smp_input_columns")
    schema = model.metadata.get_input_schema()
    if not names and schema is not None and schema.has_input_names():
        names = schema.input_names()  # a model logged with an input schema (before smp_input_columns)
    if not names:
        return posts.drop(columns=[c for c in ("label",) if c in posts.columns])
    from smp.image_features import HANDCRAFTED

    keep = set(names) | {"Pid"} | set(HANDCRAFTED)  # precomputed image features pass too (``predict_frame``)
    return posts[[c for c in posts.columns if c in keep or c.startswith("clip_")]]


def predict_table(model, frame: pd.DataFrame) -> pd.DataFrame:
    """A loaded smp pyfunc's ``popularity`` and ``status`` per row of ``frame``, without MLflow's schema step:
    the frame may carry precomputed image feature columns (``smp predict``, ``promote``), which the schema
    would drop. A model logged before statuses existed returns bare predictions: their status is ``ok``."""
    try:
        inner = model.unwrap_python_model()
    except (AttributeError, MlflowException):
        inner = None
    out = inner.predict(None, frame) if inner is not None and hasattr(inner, "model") else model.predict(frame)
    if isinstance(out, pd.DataFrame) and "popularity" in out.columns:
        status = out["status"] if "status" in out.columns else pd.Series(["ok"] * len(out), dtype=object)
        return pd.DataFrame({"popularity": out["popularity"].to_numpy(dtype=float),
                             "status": status.astype(object).to_numpy()})
    pred = np.asarray(out, dtype=float).reshape(-1)
    return pd.DataFrame({"popularity": pred, "status": pd.Series(["ok"] * len(pred), dtype=object)})


def predict_frame(model, frame: pd.DataFrame) -> np.ndarray:
    """A loaded smp pyfunc's predictions for ``frame`` (1-D float array; ``predict_table`` without the status)."""
    return predict_table(model, frame)["popularity"].to_numpy(dtype=float)
