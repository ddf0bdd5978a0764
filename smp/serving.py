"""Stage 5: the logged MLflow model (pyfunc) that predicts from raw post rows.

A fitted smp model (any model family of ``smp.jobs.JOBS``) is pickled as an
artifact and wrapped by ``PopularityModel``.  Its ``predict`` returns one row
per post: ``popularity`` (double) and ``status`` (string), as ``smp predict``
writes them:

* ``ok``: scored from the values given;
* ``partial: <what>``: scored, with some input treated as missing; the notes
  are joined by ``"; "``: ``tag_count=-3 out of range [0, 10000]; treated as
  missing`` (a number outside ``smp.data.FIELD_RANGES`` or +-inf; NaN is a
  missing value like null and is not noted), ``image unusable (<reason>);
  scored without image features`` and ``no image given; scored without image
  features`` (image models only).

What is per post and what refuses the whole request (HTTP 400, the message
names the problem; ``coerce_request`` raises ``RequestError``, the pyfunc
``RequestRejected``):

* per post (``partial``): an out-of-range or infinite number; for an image
  model, an image that cannot be used, the same reason whether it came as
  ``image_b64`` or ``image_path``: a missing file, a directory or other
  non-regular file, zero bytes, over ``MAX_IMAGE_BYTES``, more than
  ``MAX_PIXELS`` pixels (refused from the header, never decoded), truncated,
  not an image, an ``image_path`` holding a NUL byte (``the path holds a NUL
  byte``: it names no file, in the image root or out of it).  ``image_b64`` of
  zero bytes is ``""``, i.e. no image given.
  A tabular model never opens an image: its status does not mention one
  (``ok``), so the same request serves whichever model is champion.  A field
  the model does not read is dropped by MLflow's schema step unseen: not noted
  (``smp predict`` counts it when loading, and leaves it out of the status too).
* whole request: not a table, no rows, no ``Pid`` column or an empty Pid, a
  duplicate ``Pid`` (``smp.data.load_data``'s rule and wording: each post is
  scored once), a number column holding text or lists, a value of the wrong
  JSON shape (``column 'Title': expected text, got a list (Pid '7')``: a list
  or an object in a text field -- ``TEXT_FIELDS`` -- or in ``Pid``; an
  ``image_path`` that is not text; a number or a bool in a text field or
  ``Pid`` is read as its text, as a natural frame holds one), an
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

Every logged model has an input schema naming the raw post fields it reads (the SMPD fields plus
``image_b64`` / ``image_path``, all optional but ``Pid``) with MLflow's ``AnyType`` for each, and an output
schema (``popularity`` double, ``status`` string). Why ``AnyType``: a frame a user builds the natural way
(``pd.read_csv`` / ``pd.read_json`` of the real posts or the official SMPD JSON) holds ``Pid`` and the dates
and counts as int64, the same numbers as float64 once one is missing, and text columns as float64 when a
sample has none; MLflow's typed columns refuse each of these (``string`` takes no int64 ``Pid``, ``double``
no int64 date, ``long`` no NaN), so no typed schema serves every natural frame. With ``AnyType`` MLflow still
checks the names (``Pid`` required; an extra column is named once in MLflow's log, "Found extra inputs ...
These inputs will be ignored", and dropped) and ``coerce_request`` parses the values, refusing what is not
a number with a message naming the column and the post. What each field holds is in ``FIELD_KINDS``, the
logged model's description and its MLmodel metadata (``smp_input_kinds``). The cost, in MLflow 3.17: the
scoring server reads a CSV body with the schema's pandas dtypes, which ``AnyType`` has none of, so a CSV
body is refused (400) before any model code; JSON bodies (``dataframe_records`` / ``dataframe_split``) are
the served format. Callers in this package that hand the model precomputed image feature columns
(``smp predict``, ``promote``) call it through ``predict_frame`` (the predictions) or ``predict_table``
(with the status), which skip MLflow's schema step (it would drop those columns).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import pickle
import re
import stat
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from smp.tracking import muted

log = logging.getLogger("smp.serving")

MODEL_ARTIFACT = "smp_model.pkl"
IMAGE_ROOT_ENV = "SMP_SERVE_IMAGE_ROOT"  # image_path in requests is read only under this directory
_SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # set to "true" by MLflow's scoring server
IMAGE_INPUTS = ("image_b64", "image_path")
NO_IMAGE = "no image given; scored without image features"


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


# an absolute POSIX path of two or more parts (/srv/images/a.jpg, /usr/lib/python3/x.py) or a Windows one
_PATH = re.compile(r"(?<![\w/.])/(?:[\w.@+~-]+/)+[\w.@+~-]*|[A-Za-z]:\\[^\s'\"]+")


def scrub_paths(text: str) -> str:
    """``text`` with absolute file paths replaced by ``<path>``: an error body must not show the
    server's layout (image roots, temp files, the package's module files)."""
    return _PATH.sub("<path>", str(text))


def status_text(notes) -> str:
    """A post's status: ``ok``, or ``partial: `` and its notes joined by ``"; "``."""
    notes = [n for n in notes if n]
    return "partial: " + "; ".join(notes) if notes else "ok"


def image_note(reason: str) -> str:
    """The per-post note for an image that cannot be used."""
    return f"image unusable ({scrub_paths(reason)}); scored without image features"


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
            pred = np.asarray(self.model.predict(frame), dtype=float).reshape(-1)
        except Exception as exc:
            log.exception("prediction failed on a well-formed request of %d rows", len(frame))
            raise PredictionFailed(f"prediction failed: {type(exc).__name__}: {exc}") from exc
        field_notes = frame.attrs.get("row_notes") or {}
        status = [status_text([*field_notes.get(pid, ()), *image_notes.get(pid, ())]) for pid in frame["Pid"]]
        return pd.DataFrame({"popularity": pred, "status": pd.Series(status, dtype=object)})


def coerce_request(model_input, required=("Pid",)) -> pd.DataFrame:
    """Return the request as a posts DataFrame or raise ``RequestError`` (a whole-request problem).

    Numbers are parsed; an out-of-range or infinite one becomes NaN with a note in
    ``attrs["row_notes"]`` (Pid -> notes, as ``smp.data.load_data`` keeps them); ``image_b64`` must be
    base64 text; ``image_path`` is resolved (``_confined_paths``). Images are not opened here.
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
    if "image_b64" in frame.columns:
        _check_base64(frame)
    if "image_path" in frame.columns:
        frame["image_path"] = _confined_paths(frame)
    frame.attrs["row_notes"] = RowNotes(notes)
    return frame


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


def _given(value) -> bool:
    return isinstance(value, str) and value != ""


def _check_base64(frame: pd.DataFrame) -> None:
    """Every non-empty ``image_b64`` must be base64 text; what the bytes are is judged per post, later."""
    for i, value in enumerate(frame["image_b64"]):
        if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
            continue
        if not isinstance(value, str):
            raise RequestError(f"column 'image_b64': expected a base64 string, got {type(value).__name__} "
                               f"({_row_name(frame, i)})")
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"column 'image_b64': not valid base64 ({_row_name(frame, i)})") from None


def _confined_paths(frame: pd.DataFrame) -> list:
    """``image_path`` resolved under ``SMP_SERVE_IMAGE_ROOT``; refused in a server that has no such root.

    In-process use (``smp predict``, a notebook) reads any path the caller can;
    a scoring server reads only below the configured root and never follows
    ``../`` or absolute paths out of it.
    """
    from smp.data import DataError, resolve_image_path

    from smp.image_features import path_problem

    root = os.environ.get(IMAGE_ROOT_ENV, "")
    paths = frame["image_path"]
    _check_shape(frame, "image_path", "a path (text)", lambda v: _missing(v) or isinstance(v, str))
    given = paths.notna() & (paths.astype(str).str.strip() != "")
    if not root:
        if given.any() and os.environ.get(_SERVING_ENV, "").lower() == "true":
            raise RequestError(f"column 'image_path': this server reads no server-side files (set {IMAGE_ROOT_ENV} "
                               "to allow paths below a directory); send the image bytes as 'image_b64'")
        return list(paths)
    out = []
    for i, p in enumerate(paths):
        if isinstance(p, str) and path_problem(p) is not None:
            out.append(p)  # names no file, in the root or out of it: that post's status says why (file_problem)
            continue
        try:
            out.append(resolve_image_path(p, root))
        except DataError:
            raise RequestError(f"column 'image_path': {p!r} is outside the image root ({_row_name(frame, i)})") \
                from None
    return out


# --------------------------------------------------------------------------- per-post images
def file_problem(path: str) -> str | None:
    """Why the file at ``path`` cannot be an image (without reading more than its header), or None.

    Checked before the embedding reads it: a directory, a device (``/dev/zero`` would be read forever) or
    a huge file never reaches ``read_bytes``, and the reasons name no path.
    """
    from smp.image_features import bytes_problem, image_problem, path_problem

    if path_problem(path) is not None:  # os.stat would raise ValueError, not OSError
        return path_problem(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing file"
    except OSError as exc:
        return f"unreadable file ({type(exc).__name__})"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if bytes_problem(st.st_size) is not None:
        return bytes_problem(st.st_size)
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)  # enough for any header Pillow reads to learn the size
    except OSError as exc:
        return f"unreadable file ({type(exc).__name__})"
    return image_problem(head, complete=False)


def with_image_features(model, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """For an smp image model (one with an ``images`` ``ImageFeatureSource``): ``frame`` with its image
    feature columns, computed once, and notes (Pid -> notes) for each post scored without image features.
    Other models, or a frame that already has the feature columns: ``frame`` as given and no notes.

    An image is checked before it is embedded (``file_problem`` / ``image_problem``: size from the
    header, so a decompression bomb is never decoded); one that fails either check is left out, with its
    reason.  ``image_b64`` wins over ``image_path`` where a post has both (as in
    ``smp.image_requests``).
    """
    from smp.image_features import image_problem

    source = getattr(model, "images", None)
    if source is None or set(source.columns) <= set(frame.columns):
        return frame, {}
    frame = frame.reset_index(drop=True)
    n = len(frame)
    b64 = frame["image_b64"].tolist() if "image_b64" in frame.columns else [None] * n
    paths = frame["image_path"].tolist() if "image_path" in frame.columns else [None] * n
    pids = frame["Pid"].astype(str).tolist()
    notes: dict[str, list[str]] = {}
    keep_b64, keep_path = [None] * n, [None] * n
    for i in range(n):
        if _given(b64[i]):
            try:
                data = base64.b64decode(b64[i], validate=True)
            except (binascii.Error, ValueError):
                problem = "image_b64 is not valid base64"
            else:
                problem = image_problem(data)
            if problem is None:
                keep_b64[i] = b64[i]
        elif _given(paths[i]):
            problem = file_problem(paths[i])
            if problem is None:
                keep_path[i] = paths[i]
        else:
            notes[pids[i]] = [NO_IMAGE]
            continue
        if problem is not None:
            notes[pids[i]] = [image_note(problem)]
    usable = [i for i in range(n) if keep_b64[i] is not None or keep_path[i] is not None]
    # the image columns stay: the model reads the feature columns, and a caller that validates the request
    # after this (``smp predict``, through the pyfunc) still refuses a garbled image_b64 as it would unembedded
    rest = frame.drop(columns=[c for c in source.columns if c in frame.columns])
    if not usable or source.embed_cfg is None:
        for i in usable:  # a model without embedding settings cannot use an image
            notes[pids[i]] = [image_note("this model cannot embed images")]
        feats = pd.DataFrame(np.nan, index=range(n), columns=list(source.columns), dtype=np.float32)
    else:
        from smp.image_requests import features_for_rows  # torch / open_clip: only when images arrive

        images = pd.DataFrame({"Pid": [pids[i] for i in usable], "image_b64": [keep_b64[i] for i in usable],
                               "image_path": [keep_path[i] for i in usable]})
        got = features_for_rows(images, source.embed_cfg)
        for pid, reason in got.attrs["bad"][["Pid", "reason"]].itertuples(index=False):
            notes[str(pid)] = [image_note(reason)]
        feats = pd.DataFrame(np.nan, index=range(n), columns=list(source.columns), dtype=np.float32)
        feats.iloc[usable] = got[list(source.columns)].to_numpy(dtype=np.float32)
    out = pd.concat([rest.reset_index(drop=True), feats], axis=1)
    out.attrs = dict(frame.attrs)
    return out, notes


def model_input(model, posts: pd.DataFrame) -> pd.DataFrame:
    """The columns of ``posts`` that a loaded pyfunc reads (its ``smp_input_columns``, else its schema's names)."""
    names = (model.metadata.metadata or {}).get("smp_input_columns")
    schema = model.metadata.get_input_schema()
    if not names and schema is not None and schema.has_input_names():
        names = schema.input_names()  # a model logged with an input schema (before smp_input_columns)
    if not names:
        return posts.drop(columns=[c for c in ("label",) if c in posts.columns])
    from smp.models import HANDCRAFTED

    keep = set(names) | {"Pid"} | set(HANDCRAFTED)  # precomputed image features pass too (``predict_frame``)
    return posts[[c for c in posts.columns if c in keep or c.startswith("clip_")]]


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


def input_columns(example: pd.DataFrame) -> list[str]:
    """The raw-rows columns a model reads: the example's plus ``image_b64`` / ``image_path``.

    Every family accepts the image columns, so a client sends the same request
    whichever model is champion (a tabular model checks the image and ignores it).
    """
    return list(example.columns) + [c for c in IMAGE_INPUTS if c not in example.columns]


# What each raw post field holds (the logged model's description and MLmodel metadata ``smp_input_kinds``;
# the schema itself types every column as MLflow's AnyType: see the module docstring)
FIELD_KINDS = {"Pid": "post id (required; number or text)", "Category": "text", "Subcategory": "text",
               "Concept": "text", "ispro": "number (0/1)", "Postdate": "number (Unix seconds)",
               "photo_count": "number", "tag_count": "number", "Alltags": "text (space-separated tags)",
               "Title": "text", "Latitude": "number", "Longitude": "number",
               "photo_firstdate": "number (Unix seconds)", "timezone_offset": "number (hours, or text like +08:00)",
               "image_b64": "text (base64 of the image file)", "image_path": "text (a path the scorer can read)"}


# the text fields of a post the model reads (image_b64 / image_path are checked on their own)
TEXT_FIELDS = tuple(c for c, kind in FIELD_KINDS.items() if kind.startswith("text") and c not in IMAGE_INPUTS)


def input_schema(columns: list[str]):
    """The input schema: each column by name, MLflow's ``AnyType`` (any natural frame; the model parses the
    values), optional except ``Pid``."""
    from mlflow.types.schema import AnyType, ColSpec, Schema

    return Schema([ColSpec(AnyType(), c, required=(c == "Pid")) for c in columns])


def input_text(columns: list[str]) -> str:
    """The accepted columns and what each holds, for the model's description."""
    return "; ".join(f"{c}: {FIELD_KINDS.get(c, 'text')}" for c in columns)


def output_schema():
    """What the pyfunc returns per post: ``popularity`` (double) and ``status`` (string, see the module docstring)."""
    from mlflow.types.schema import ColSpec, Schema

    return Schema([ColSpec("double", "popularity"), ColSpec("string", "status")])


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


NOT_AT_PREDICT_TIME = ("optuna", "matplotlib")  # smp dependencies no logged model imports
IMAGE_ONLY = ("torch", "torchvision", "open_clip_torch", "tqdm")  # needed only by models that read images


def pip_requirements(needs_images: bool) -> list[str] | None:
    """smp's own dependencies pinned to the installed versions, or None (MLflow infers) when smp isn't installed.

    MLflow's inference loads the model in a subprocess to see what it imports
    (~15 s a model on a small machine); the package metadata gives the answer
    at once, and the bundled ``smp`` code needs exactly these.
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


def log_model(model, posts_example: pd.DataFrame, name: str = "model", summary: str = ""):
    """Log ``model`` as a pyfunc with its raw-post input schema, a raw-post input example and a description
    (``model_note``: what it is, what it reads, ``summary`` = its headline figures)."""
    from mlflow.models import ModelSignature

    example = posts_example.copy()
    checked = coerce_request(example)
    np.asarray(model.predict(with_image_features(model, checked)[0]), dtype=float)  # it must predict before logging
    family = getattr(model, "family", "")
    columns = input_columns(example)
    signature = ModelSignature(inputs=input_schema(columns), outputs=output_schema())
    note = model_note(family, columns, summary)
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
                tags={"smp.family": family, "smp.description": model_description(family),
                      "mlflow.note.content": note},  # the logged model page's Description
                metadata={"smp_family": family, "smp_input_columns": columns, "smp_required_columns": ["Pid"],
                          "smp_input_kinds": {c: FIELD_KINDS.get(c, "text") for c in columns}},
                pip_requirements=pip_requirements(getattr(model, "needs_images", False)),
                code_paths=[str(p) for p in code],
            )


def model_description(family: str) -> str:
    """What a logged model of ``family`` is (its ``smp.jobs`` entry), for its model page."""
    from smp.jobs import JOBS

    return JOBS[family].description if family in JOBS else ""


def model_note(family: str, columns: list[str], summary: str = "") -> str:
    """The logged model's description: what it is, its figures, what to send it and what it answers."""
    what = model_description(family) or family
    return (f"{family}: {what}. {summary + ' ' if summary else ''}"
            f"Input: one row per raw post, any subset of these columns ({input_text(columns)}); numbers may "
            "be int or float, missing values NaN/null, other columns are ignored. Output: popularity (the SMPD label scale) "
            "and status (ok, or partial: what was treated as missing).")


CODE_ARCHIVE = "smp.zip"
_SHIM = '''"""smp as shipped inside a logged MLflow model (written by smp.serving.bundle_code).

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
