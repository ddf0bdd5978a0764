"""Stage 1: raw SMPD files or a posts table -> one posts DataFrame.

Two sources are accepted:

* an official SMPD 2019 directory (``train_category.json`` and, optionally,
  the temporal-spatial, additional, text and user files, ``train_label.txt``
  and ``train_img_filepath.txt`` with the images under the same directory);
* a posts table (``.csv``, ``.parquet`` or ``.json``) whose columns are SMPD
  field names (any subset, ``Pid`` required, ``label`` optional).

The output has one row per post in official order, ``Pid`` as a string, the
SMPD fields with numbers parsed (the JSON holds most values as strings), a
``label`` column when labels are known and an ``image_path`` column (absolute
path) when image paths are known.  A file that is absent leaves its columns
absent; a value that is missing or unparseable becomes NaN, never zero, and is
counted in ``df.attrs["parse_issues"]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("smp.data")

CATEGORY_FILE = "train_category.json"
SMPD_JSON_FILES = {
    CATEGORY_FILE: ("Uid", "Pid", "Category", "Subcategory", "Concept"),
    "train_temporalspatial_information.json": (
        "Uid", "Pid", "Postdate", "Latitude", "Longitude", "Geoaccuracy"),
    "train_additional_information.json": ("Uid", "Pid", "Pathalias", "Ispublic", "Mediastatus"),
    "train_text.json": ("Uid", "Pid", "Title", "Mediatype", "Alltags"),
    "train_user_data.json": None,  # per-post user fields; any columns
}
LABEL_FILE = "train_label.txt"
IMAGE_LIST_FILE = "train_img_filepath.txt"

# Fields stored as text in the JSON that are numbers.
NUMERIC_FIELDS = (
    "Postdate", "Latitude", "Longitude", "Geoaccuracy", "Ispublic", "photo_count",
    "ispro", "canbuypro", "photo_firstdate", "timezone_offset",
    "tag_count", "label",
)
# Date-times given as Unix seconds or as text ("2010-03-19 13:37:41", UTC) -> Unix seconds.
DATETIME_FIELDS = ("photo_firstdatetaken",)
TABLE_EXTENSIONS = (".csv", ".parquet", ".pq", ".json")


@dataclass(frozen=True)
class DataCfg:
    data: str = "demo"  # an SMPD directory, a posts table (.csv/.parquet/.json) or "demo" (built-in synthetic)
    images: str = ""    # images root when the images are not under the SMPD directory


class DataError(ValueError):
    """Bad input data; the message names the file or field and the problem."""


def load_data(data: str | Path | None = "demo", images_root: str | Path | None = None) -> pd.DataFrame:
    """Return the posts DataFrame for ``data``: ``"demo"``/empty, an SMPD directory or a table."""
    if data is None or str(data) in ("", "demo"):
        from smp.synth import demo_data_dir  # the built-in demo set, generated on first use

        data = demo_data_dir()
    path = Path(data)
    if path.is_dir():
        return load_smpd_dir(path, images_root=images_root)
    if path.exists():
        return load_posts_table(path, images_root=images_root)
    raise DataError(f"{path}: no such file or directory (expected an SMPD directory or a posts table)")


def load_smpd_dir(root: str | Path, images_root: str | Path | None = None) -> pd.DataFrame:
    """Read an official SMPD 2019 directory into one posts DataFrame (official order)."""
    root = Path(root)
    cat_path = root / CATEGORY_FILE
    if not cat_path.exists():
        raise DataError(f"{cat_path}: required file is missing (an SMPD directory needs {CATEGORY_FILE})")
    issues: dict[str, int] = {}
    posts = _records_frame(cat_path)
    _check_columns(posts, cat_path, ("Pid",))
    posts["Pid"] = posts["Pid"].astype(str)
    _check_unique_pids(posts, cat_path)
    for name, columns in SMPD_JSON_FILES.items():
        if name == CATEGORY_FILE or not (root / name).exists():
            continue
        posts = _join_file(posts, _records_frame(root / name), root / name, columns, issues)

    label_path = root / LABEL_FILE
    if label_path.exists():
        labels = _read_lines(label_path)
        _check_count(labels, posts, label_path)
        posts["label"] = pd.to_numeric(pd.Series(labels, index=posts.index).str.strip(), errors="coerce")
        bad = int(posts["label"].isna().sum()) - sum(1 for v in labels if v.strip().lower() in ("", "nan"))
        if bad:
            raise DataError(f"{label_path}: {bad} lines are not numbers")
    img_path = root / IMAGE_LIST_FILE
    if img_path.exists():
        rel = _read_lines(img_path)
        _check_count(rel, posts, img_path)
        base = Path(images_root) if images_root else root
        posts["image_path"] = [str((base / r.strip()).resolve()) if r.strip() else None for r in rel]

    posts = _parse_numbers(posts, issues, str(root))
    posts.attrs.update(source=str(root), parse_issues=issues)
    return posts


def load_posts_table(path: str | Path, images_root: str | Path | None = None) -> pd.DataFrame:
    """Read a posts table (.csv, .parquet or .json) with SMPD field names as columns."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, dtype={"Pid": str, "Uid": str}, low_memory=False)
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif suffix == ".json":
            df = _records_frame(path)
        else:
            raise DataError(f"{path}: unknown extension {suffix!r}; expected one of {', '.join(TABLE_EXTENSIONS)}")
    except DataError:
        raise
    except Exception as exc:  # parser errors from pandas / pyarrow
        raise DataError(f"{path}: cannot be read as a {suffix} table: {exc}") from exc
    return prepare_posts(df, source=str(path), images_root=images_root)


def prepare_posts(df: pd.DataFrame, source: str = "<frame>", images_root: str | Path | None = None) -> pd.DataFrame:
    """Validate and normalise an in-memory posts frame (Pid as str, numbers parsed)."""
    df = df.copy()
    _check_columns(df, source, ("Pid",))
    df["Pid"] = df["Pid"].astype(str)
    _check_unique_pids(df, source)
    if "image_path" in df.columns and images_root:
        df["image_path"] = [resolve_image_path(p, images_root) for p in df["image_path"]]
    issues: dict[str, int] = {}
    df = _parse_numbers(df, issues, source)
    df.attrs.update(source=source, parse_issues=issues)
    return df


def resolve_image_path(path, images_root) -> str | None:
    """Join a relative image path to ``images_root``; refuse paths that escape it."""
    if path is None or (isinstance(path, float) and np.isnan(path)) or str(path) == "":
        return None
    if "\x00" in str(path):  # no file can have it: kept as given, so that post is reported unusable, not the run
        return str(path)
    root = Path(images_root).resolve()
    full = (root / str(path)).resolve()
    if root != full and root not in full.parents:
        raise DataError(f"image_path {path!r}: escapes the images root {root}")
    return str(full)


def data_hash(df: pd.DataFrame) -> str:
    """Content hash (16 hex chars) of a posts frame, independent of its index."""
    cols = sorted(c for c in df.columns if c != "image_path")
    h = hashlib.sha256()
    h.update(",".join(cols).encode())
    h.update(pd.util.hash_pandas_object(df[cols], index=False).to_numpy().tobytes())
    if "image_path" in df.columns:  # paths relative to nothing: hash only the file names
        names = df["image_path"].map(lambda p: Path(p).name if isinstance(p, str) else "")
        h.update(pd.util.hash_pandas_object(names, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


MAX_INVALID_LABEL_SHARE = 0.01  # +-inf labels: up to 1% are excluded (counted), more means a broken label column


def labelled(posts: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Return the rows with a finite label and how many were excluded.

    A missing label (blank or ``nan``: an unlabelled post) is excluded and
    counted.  Labels that are there but unusable refuse the data with a
    ``DataError`` naming the file: any text that is not a number (as an SMPD
    directory's ``train_label.txt`` is refused), and infinite labels in more
    than ``MAX_INVALID_LABEL_SHARE`` of the posts (fewer are excluded, counted
    and logged).
    """
    source = posts.attrs.get("source", "data")
    if "label" not in posts.columns:
        raise DataError(f"{source}: no 'label' column; training needs labels")
    text_labels = (posts.attrs.get("parse_issues") or {}).get("label:unparseable", 0)
    if text_labels:
        raise DataError(f"{source}: field label: {text_labels} of {len(posts)} values are not numbers")
    y = posts["label"].to_numpy(dtype=float)
    infinite = int(np.isinf(y).sum())
    if infinite > MAX_INVALID_LABEL_SHARE * len(posts):
        raise DataError(f"{source}: field label: {infinite} of {len(posts)} values are infinite "
                        f"(more than {MAX_INVALID_LABEL_SHARE:.0%}); fix or drop those posts")
    keep = np.isfinite(y)
    n_missing = int((~keep).sum())
    if infinite:
        log.warning("%s: %d posts with an infinite label are excluded from training", source, infinite)
    if n_missing - infinite:
        log.warning("%d posts have no label and are excluded from training", n_missing - infinite)
    out = posts.loc[keep].reset_index(drop=True)
    out.attrs.update(posts.attrs)
    return out, n_missing


# --------------------------------------------------------------------------- helpers
def _records_frame(path: Path) -> pd.DataFrame:
    """Read a JSON file holding a list of records or pandas' column-oriented dict-of-dicts."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    if isinstance(obj, list):
        if obj and not all(isinstance(r, dict) for r in obj):
            raise DataError(f"{path}: expected a list of records (objects)")
        return pd.DataFrame.from_records(obj)
    if isinstance(obj, dict) and all(isinstance(v, dict) for v in obj.values()):
        df = pd.DataFrame(obj)  # column-oriented: {"col": {"0": v, ...}}
        try:
            order = np.argsort(df.index.astype(int), kind="stable")
            df = df.iloc[order]
        except (TypeError, ValueError):
            pass
        return df.reset_index(drop=True)
    if isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()):
        return pd.DataFrame(obj)
    raise DataError(f"{path}: expected a list of records or a column-oriented object")


def _check_columns(df: pd.DataFrame, source, required) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing required field(s) {missing}")


def _check_unique_pids(df: pd.DataFrame, source) -> None:
    dup = df["Pid"].duplicated()
    if dup.any():
        examples = df.loc[dup, "Pid"].head(3).tolist()
        raise DataError(f"{source}: {int(dup.sum())} duplicate Pid value(s), e.g. {examples}")


def _check_count(lines: list[str], posts: pd.DataFrame, path: Path) -> None:
    if len(lines) != len(posts):
        raise DataError(f"{path}: {len(lines)} lines but {CATEGORY_FILE} has {len(posts)} posts")


def _read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # tolerate a trailing blank line
        lines.pop()
    return lines


def _join_file(posts, df, path, columns, issues) -> pd.DataFrame:
    """Left-join one SMPD file onto the posts (by Pid, else by Uid, else by row order)."""
    if columns is not None:
        keep = [c for c in df.columns if c in columns]
        df = df[keep]
    if "Pid" in df.columns:
        df = df.copy()
        df["Pid"] = df["Pid"].astype(str)
        _check_unique_pids(df, path)
        df = df.drop(columns=[c for c in ("Uid",) if c in df.columns and "Uid" in posts.columns])
        unknown = int((~df["Pid"].isin(posts["Pid"])).sum())
        if unknown:
            issues[f"{path.name}:unknown_pid"] = unknown
            log.warning("%s: %d rows with a Pid not in %s are ignored", path, unknown, CATEGORY_FILE)
        out = posts.merge(df, on="Pid", how="left", validate="one_to_one", suffixes=("", "_dup"))
        absent = len(posts) - int(posts["Pid"].isin(df["Pid"]).sum())
        if absent:
            issues[f"{path.name}:absent_posts"] = absent
            log.warning("%s: %d posts have no row; their fields are NaN", path, absent)
    elif len(df) == len(posts):
        out = pd.concat([posts, df.drop(columns=[c for c in df.columns if c in posts.columns])], axis=1)
    elif "Uid" in df.columns and "Uid" in posts.columns:
        out = posts.merge(df.drop_duplicates("Uid"), on="Uid", how="left", suffixes=("", "_dup"))
    else:
        raise DataError(f"{path}: has no Pid, {len(df)} rows for {len(posts)} posts, and cannot be aligned")
    return out.drop(columns=[c for c in out.columns if c.endswith("_dup")])


def _parse_numbers(df: pd.DataFrame, issues: dict, source: str) -> pd.DataFrame:
    """Parse numeric SMPD fields held as strings; unparseable and out-of-range values become NaN.

    Each is counted in ``issues`` (``<col>:unparseable`` / ``<col>:out_of_range``) and noted against its
    post in ``df.attrs["row_notes"]`` (a :class:`RowNotes`, Pid -> notes), so that ``smp predict`` can
    tell each post what was treated as missing without reading the raw files again.
    """
    notes: dict[str, list[str]] = {}
    pids = df["Pid"].astype(str).to_numpy() if "Pid" in df.columns else None

    def note(mask: np.ndarray, texts) -> None:
        if pids is not None:
            for pid, text in zip(pids[mask], texts):
                notes.setdefault(pid, []).append(text)

    def unparseable(col: str, raw: pd.Series, parsed: pd.Series, blank: pd.Series) -> None:
        bad = (parsed.isna() & ~blank).to_numpy(dtype=bool)
        if bad.any():
            issues[f"{col}:unparseable"] = int(bad.sum())
            log.warning("%s: field %s has %d unparseable values (set to NaN)", source, col, int(bad.sum()))
            note(bad, [f"unparseable {col}={v!r}; treated as missing" for v in raw[bad]])

    def in_range(col: str, parsed: pd.Series) -> pd.Series:
        if col not in FIELD_RANGES:
            return parsed
        bad = out_of_range(col, parsed)
        if not bad.any():
            return parsed
        lo, hi = FIELD_RANGES[col]
        issues[f"{col}:out_of_range"] = int(bad.sum())
        log.warning("%s: field %s has %d values outside [%s, %s] or not finite (set to NaN)", source, col,
                    int(bad.sum()), _number_text(lo), _number_text(hi))
        note(bad, [range_note(col, v) for v in parsed.to_numpy()[bad]])
        return parsed.mask(bad)

    for col in NUMERIC_FIELDS:
        if col not in df.columns:
            continue
        if pd.api.types.is_numeric_dtype(df[col]):  # every number is a float64 (as the models' input schema types it)
            df[col] = in_range(col, df[col].astype(float))
            continue
        raw = df[col]
        if col == "timezone_offset":
            parsed = raw.map(_parse_tz_offset)
        else:
            text = raw.astype("string").str.strip()
            lowered = text.str.lower()
            text = text.mask(lowered.isin(["true", "false"]), lowered.map({"true": "1", "false": "0"}))
            parsed = pd.to_numeric(text, errors="coerce")
        blank = raw.isna() | raw.astype("string").str.strip().str.lower().isin(["", "nan", "none", "null"])
        unparseable(col, raw, parsed, blank)
        df[col] = in_range(col, parsed.astype(float))
    for col in DATETIME_FIELDS:
        if col not in df.columns:
            continue
        if pd.api.types.is_numeric_dtype(df[col]):
            df[col] = in_range(col, df[col].astype(float))
            continue
        raw = df[col].astype("string").str.strip()
        blank = raw.isna() | raw.str.lower().isin(["", "nan", "none", "null", "0000-00-00 00:00:00"])
        numeric = pd.to_numeric(raw, errors="coerce")
        stamp = pd.to_datetime(raw.where(numeric.isna() & ~blank), errors="coerce", utc=True)
        seconds = (stamp - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        parsed = numeric.astype(float).fillna(seconds.astype(float)).where(~blank)
        unparseable(col, df[col], parsed, blank)
        df[col] = in_range(col, parsed.astype(float))
    df.attrs["row_notes"] = RowNotes(notes)
    return df


# Plausible values of each numeric SMPD field (inclusive); a value outside, or +-inf, is an error in the
# data, not a signal: it is treated as missing (NaN) and noted against its post, at load time
# (``_parse_numbers``, training and ``smp predict``) and in a served request (``smp.serving``).
# NaN itself is a missing value (JSON null/NaN, an empty or "nan" cell), as every field is optional.
# Dates are Unix seconds (UTC). The SMPD 2019 posts are from 2015-2016 and Flickr opened in 2004; the
# windows are generous so that no real post is refused: 1990-01-01 .. 2035-01-01 (a fixed end, so a
# result does not depend on the day it is computed). ``label`` has no range here: ``labelled()`` decides
# about labels (text and infinite labels refuse or exclude, they are never silently made missing).
_Y1800, _Y1990, _Y2035 = -5_364_662_400, 631_152_000, 2_051_222_400  # 1800/1990/2035-01-01 00:00 UTC
FIELD_RANGES: dict[str, tuple[float, float]] = {
    "Postdate": (_Y1990, _Y2035),         # when the post was uploaded
    "photo_firstdate": (_Y1990, _Y2035),  # the user's first upload
    "photo_firstdatetaken": (_Y1800, _Y2035),  # the taken date of the user's oldest photo: scans of old prints
                                               # and unset camera clocks go far back (photography: 1820s)
    "Latitude": (-90, 90),                # degrees (SMPD writes 0, 0 for "no geotag": in range, kept)
    "Longitude": (-180, 180),
    "Geoaccuracy": (0, 16),               # Flickr's accuracy levels 1 (world) .. 16 (street); 0 = none
    "Ispublic": (0, 1), "ispro": (0, 1), "canbuypro": (0, 1),  # flags
    "photo_count": (0, 1e8),              # the user's photos; the largest Flickr accounts hold millions
    "tag_count": (0, 10_000),             # Flickr allows 75 tags a photo (SMPD 2019's maximum is 75)
    "timezone_offset": (-14, 14),         # hours from UTC (UTC-12 .. UTC+14 exist)
}


def out_of_range(col: str, values) -> np.ndarray:
    """Boolean mask over ``values`` of field ``col``: given (not NaN) but non-finite or outside
    ``FIELD_RANGES[col]``. All False for a field without a range."""
    v = np.asarray(values, dtype=float)
    if col not in FIELD_RANGES:
        return np.zeros(v.shape, dtype=bool)
    lo, hi = FIELD_RANGES[col]
    with np.errstate(invalid="ignore"):
        return ~np.isnan(v) & ~((v >= lo) & (v <= hi))


def range_note(col: str, value: float) -> str:
    """The per-post note for an out-of-range ``value`` of ``col``: ``tag_count=-3 out of range [0, 10000];
    treated as missing``."""
    lo, hi = FIELD_RANGES[col]
    return f"{col}={_number_text(value)} out of range [{_number_text(lo)}, {_number_text(hi)}]; treated as missing"


def _number_text(value: float) -> str:
    """Whole numbers without a decimal point (dates stay readable), others as Python writes them (1e+308, inf)."""
    value = float(value)
    if np.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class RowNotes(Mapping):
    """Read-only Pid -> notes (tuple of strings) about values treated as missing when a frame was loaded.

    Kept in ``df.attrs``, which pandas deep-copies on every operation: immutable, it is shared instead
    (a plain dict of 20,000 notes would add ~65 ms to each filter of a 300k-row frame).
    """

    def __init__(self, notes=()):
        self._notes = {str(k): tuple(v) for k, v in dict(notes).items()}

    def __getitem__(self, pid):
        return self._notes[pid]

    def __iter__(self):
        return iter(self._notes)

    def __len__(self) -> int:
        return len(self._notes)

    def __repr__(self) -> str:
        return f"RowNotes({self._notes!r})"

    def __deepcopy__(self, memo):
        return self


def _parse_tz_offset(value) -> float:
    """``"+08:00"`` / ``"-0530"`` / seconds -> offset in hours; NaN when absent."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    s = str(value).strip()
    if not s or s.lower() in ("nan", "none", "null"):
        return np.nan
    try:
        num = float(s)
        return num / 3600.0 if abs(num) > 24 else num
    except ValueError:
        pass
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-").replace(":", "")
    if body.isdigit() and len(body) in (3, 4):
        return sign * (int(body[:-2]) + int(body[-2:]) / 60.0)
    return np.nan
