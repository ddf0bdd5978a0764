"""Bad input to prediction (issue 13): `smp predict` and the served image model give one answer per post.

Families: values out of their range in ``smp.data.FIELD_RANGES`` (negative counts, 1e308, inf, far-off
dates) are scored as missing with a ``partial`` status naming the field; an image that cannot be used
(truncated, not an image, a decompression bomb, missing, a directory, zero bytes) is scored without image
features with the reason, the same whether it is sent as ``image_b64`` or ``image_path``; a duplicate Pid
refuses the whole input; no error body shows a traceback or a server path. The training and registry
families are in ``test_bad_input.py``.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from smp import image_requests, serving
from smp.data import DataCfg, DataError, load_data
from smp.models import PCACfg, XGBCfg
from smp.predict import PredictJob, run_predict
from smp.splits import SplitCfg
from smp.train import PCABoostJob, UpstreamCfg, run_pca_boost

pytestmark = pytest.mark.slow

NO_IMAGE = "partial: no image given; scored without image features"
TRUNCATED = "partial: image unusable (truncated JPEG); scored without image features"
NOT_IMAGE = "partial: image unusable (not an image / cannot decode); scored without image features"
BOMB = ("partial: image unusable (image too large (its header declares more than 178,956,970 pixels; "
        "the limit is 40,000,000)); scored without image features")
MISSING = "partial: image unusable (missing file); scored without image features"
DIRECTORY = "partial: image unusable (a directory, not an image file); scored without image features"
ZERO = "partial: image unusable (zero-byte file); scored without image features"
NUL = "partial: image unusable (the path holds a NUL byte); scored without image features"
PHOTOS_NEG = "photo_count=-3 out of range [0, 100000000]; treated as missing"
LAT_INF = "Latitude=inf out of range [-90, 90]; treated as missing"
DATE_HUGE = "Postdate=1e+308 out of range [631152000, 2051222400]; treated as missing"
DATE_2100 = "Postdate=4102444800 out of range [631152000, 2051222400]; treated as missing"


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A complete 1-bit greyscale PNG of ``width`` x ``height`` black pixels (~110 KB for 30,000 x 30,000;
    900 M pixels once decoded), written row by row: the pixels never exist as an array here."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\0" * (1 + math.ceil(width / 8))  # filter byte + the packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def image_model(tmp_path_factory, smpd_dir, model_in_own_store):
    """A pca_boost model (random CLIP weights) trained once, as a local model directory, and an image root
    holding one good JPEG and every kind of broken image."""
    root = tmp_path_factory.mktemp("image_model")
    local = model_in_own_store(root, run_pca_boost, PCABoostJob(
        source=DataCfg(data=str(smpd_dir)), splitting=SplitCfg(sample_size=0),
        xgb=XGBCfg(n_estimators=30, max_depth=3, early_stopping_rounds=5), pca=PCACfg(n_components=8),
        upstream=UpstreamCfg(clip_pretrained="none"), experiment="bad"), "pca_boost")
    images = root / "images"
    (images / "a_dir").mkdir(parents=True)
    posts = load_data(str(smpd_dir))
    good = Path(posts["image_path"].iloc[0]).read_bytes()
    files = {"good.jpg": good, "truncated.jpg": good[: len(good) // 2], "not_image.jpg": b"hello, not a JPEG",
             "zero.jpg": b"", "bomb.png": bomb_png()}
    for name, data in files.items():
        (images / name).write_bytes(data)
    return {"model": local, "images": images, "files": files, "posts": posts}


def raw_rows(image_model, n: int) -> pd.DataFrame:
    """``n`` raw posts as a client sends them: the SMPD fields, counts as int64 (as pandas reads them), no
    label or image."""
    posts = image_model["posts"].drop(columns=["label", "image_path"]).head(n).reset_index(drop=True)
    posts.attrs = {}
    posts["tag_count"] = posts["Alltags"].fillna("").str.split().str.len().astype("int64")  # SMPD has only the words
    return posts


# --------------------------------------------------------------------------- smp predict
def test_smp_predict_notes_out_of_range_values_and_broken_images(image_model, tmp_path):
    images = image_model["images"]
    posts = raw_rows(image_model, 10).astype({"Latitude": object, "Postdate": object, "photo_count": object})
    posts["image_path"] = str(images / "good.jpg")
    cases = {  # row -> (change, expected status)
        0: ({"photo_count": -3}, f"partial: {PHOTOS_NEG}"),
        1: ({"Postdate": "1e308"}, f"partial: {DATE_HUGE}"),
        2: ({"Latitude": "inf", "Postdate": 4102444800}, f"partial: {DATE_2100}; {LAT_INF}"),
        3: ({"photo_count": "NaN"}, "ok"),  # NaN is a missing value, as an empty cell: nothing to note
        4: ({"image_path": str(images / "truncated.jpg")}, TRUNCATED),
        5: ({"image_path": str(images / "absent.jpg")}, MISSING),
        6: ({"image_path": str(images / "a_dir")}, DIRECTORY),
        7: ({"image_path": str(images / "zero.jpg")}, ZERO),
        8: ({"image_path": str(images / "bomb.png"), "photo_count": -3}, f"partial: {PHOTOS_NEG}; {BOMB[9:]}"),
        # a field this model does not read (it counts the words of Alltags): made missing and counted when
        # loaded, but not in the status, as the server never sees it (MLflow's schema drops it)
        9: ({"image_path": "", "tag_count": -5}, NO_IMAGE),
    }
    for i, (change, _) in cases.items():
        for col, value in change.items():
            posts.loc[i, col] = value
    posts.to_csv(tmp_path / "posts.csv", index=False)

    loaded = load_data(str(tmp_path / "posts.csv"))  # what predict reads: counted, noted per post, made NaN
    assert loaded.attrs["parse_issues"] == {"Postdate:out_of_range": 2, "Latitude:out_of_range": 1,
                                            "photo_count:out_of_range": 2, "tag_count:out_of_range": 1}
    assert dict(loaded.attrs["row_notes"])[posts.loc[2, "Pid"]] == (DATE_2100, LAT_INF)
    assert loaded.loc[[0, 1, 2, 8, 9], ["photo_count", "Postdate", "Latitude", "tag_count"]].isna().sum().to_dict() \
        == {"photo_count": 2, "Postdate": 2, "Latitude": 1, "tag_count": 1}

    out_path = tmp_path / "pred.csv"
    metrics = run_predict(PredictJob(model=str(image_model["model"]), input=str(tmp_path / "posts.csv"),
                                     output=str(out_path), batch_size=4))
    out = pd.read_csv(out_path, dtype={"Pid": str})
    assert list(out["Pid"]) == list(posts["Pid"])
    assert {i: out.loc[i, "status"] for i in cases} == {i: s for i, (_, s) in cases.items()}
    assert np.isfinite(out["popularity"]).all()  # every post scored
    assert metrics["data/rows"] == 10 and metrics["data/partial_rows"] == 9 and metrics["data/error_rows"] == 0
    assert str(images) not in out["status"].str.cat()


def test_smp_predict_refuses_a_duplicate_pid_naming_it(image_model, tmp_path):
    posts = raw_rows(image_model, 4)
    posts.loc[3, "Pid"] = posts.loc[1, "Pid"]
    posts.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match=rf"dup\.csv: 1 duplicate Pid value\(s\), e\.g\. \['{posts.loc[1, 'Pid']}'\]"):
        run_predict(PredictJob(model=str(image_model["model"]), input=str(tmp_path / "dup.csv"),
                               output=str(tmp_path / "out.csv")))
    assert not (tmp_path / "out.csv").exists()


def test_smp_predict_gives_a_nul_byte_path_its_status(image_model, tmp_path):
    """A NUL byte in image_path (no file can be named so; os.stat raises ValueError) is one post's status,
    as any unusable path: the other posts keep their predictions."""
    images = image_model["images"]
    posts = raw_rows(image_model, 3)
    posts["image_path"] = [str(images / "good.jpg"), str(images / "good\0.jpg"), "/etc/passwd\0"]
    posts.to_csv(tmp_path / "posts.csv", index=False)
    metrics = run_predict(PredictJob(model=str(image_model["model"]), input=str(tmp_path / "posts.csv"),
                                     output=str(tmp_path / "pred.csv")))
    out = pd.read_csv(tmp_path / "pred.csv", dtype={"Pid": str})
    assert list(out["status"]) == ["ok", NUL, NUL]
    assert np.isfinite(out["popularity"]).all()
    assert metrics["data/scored_rows"] == 3 and metrics["data/error_rows"] == 0


# --------------------------------------------------------------------------- the served model
@pytest.fixture(scope="module")
def server(image_model, tmp_path_factory, serve_model):
    """`mlflow models serve` of the image model on loopback, reading image_path below the image root."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {image_requests.IMAGE_ROOT_ENV: image_model["images"], "SMP_CACHE_DIR": log_path.parent / "cache",
           serving.ROWS_ENV: "20", serving.MB_ENV: "2"}  # small limits, so the test sends small bodies
    with serve_model(image_model["model"], log_path, env=env, workers=1) as running:
        yield running


def post(server, records) -> tuple[int, dict]:
    r = server.post(records if isinstance(records, str) else {"dataframe_records": records})
    return r.status_code, r.json()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_served_image_model_answers_each_post_with_its_status(image_model, server, monkeypatch):
    files = image_model["files"]
    rows = json.loads(raw_rows(image_model, 13).to_json(orient="records"))
    sent = [  # (what the row carries, expected status)
        ({"image_b64": b64(files["good.jpg"])}, "ok"),
        ({"image_path": "good.jpg"}, "ok"),
        ({"image_b64": b64(files["truncated.jpg"])}, TRUNCATED),
        ({"image_path": "truncated.jpg"}, TRUNCATED),
        ({"image_b64": b64(files["not_image.jpg"])}, NOT_IMAGE),
        ({"image_path": "not_image.jpg"}, NOT_IMAGE),
        ({"image_b64": b64(files["bomb.png"])}, BOMB),
        ({"image_path": "bomb.png"}, BOMB),
        ({"image_path": "zero.jpg"}, ZERO),
        ({"image_b64": ""}, NO_IMAGE),  # zero bytes as base64 is "": no image
        ({"image_path": "absent.jpg"}, MISSING),
        ({"image_path": "a_dir"}, DIRECTORY),
        ({"photo_count": -3.0, "Postdate": 4102444800.0, "Latitude": float("nan"),  # NaN: missing, not noted
          "tag_count": -5.0},  # a field the model does not read: MLflow's schema drops it, nothing to note
         f"partial: {DATE_2100}; {PHOTOS_NEG}; {NO_IMAGE[9:]}"),
    ]
    records = [{**row, **extra} for row, (extra, _) in zip(rows, sent)]
    status, body = post(server, records)
    assert status == 200, body
    answer = body["predictions"]
    assert [r["status"] for r in answer] == [s for _, s in sent]
    assert all(np.isfinite(r["popularity"]) for r in answer)
    assert str(image_model["images"]) not in json.dumps(body)

    # infinity (Python's json writes it; MLflow reads it) and 1e308: the field named, the post scored
    status, body = post(server, json.dumps({"dataframe_records": [{**rows[0], "Latitude": float("inf")},
                                                                  {**rows[1], "Postdate": 1e308}]}))
    assert status == 200, body
    assert [r["status"] for r in body["predictions"]] == [f"partial: {LAT_INF}; {NO_IMAGE[9:]}",
                                                          f"partial: {DATE_HUGE}; {NO_IMAGE[9:]}"]

    # the pyfunc in-process (a notebook) answers the same, post for post
    monkeypatch.setenv(image_requests.IMAGE_ROOT_ENV, str(image_model["images"]))
    frame = pd.DataFrame(records)  # as pandas builds it: ints stay int64, no cast
    in_process = mlflow.pyfunc.load_model(str(image_model["model"])).predict(frame)
    assert list(in_process.columns) == ["popularity", "status"]
    assert list(in_process["status"]) == [s for _, s in sent]
    assert np.allclose(in_process["popularity"], [r["popularity"] for r in answer], rtol=1e-5)


def test_served_model_refuses_malformed_requests_whole(image_model, server):
    row = json.loads(raw_rows(image_model, 2).to_json(orient="records"))
    pid = row[0]["Pid"]
    refused = {
        "duplicate Pid": ([row[0], row[1], {**row[0]}],
                          f"request: 1 duplicate Pid value(s), e.g. ['{pid}']; each post is scored once, "
                          "send every Pid once"),
        "not base64": ([{**row[0], "image_b64": "%%% not base64"}],
                       f"column 'image_b64': not valid base64 (Pid '{pid}')"),
        "no Pid": ([{"tag_count": 3.0}], "missing inputs ['Pid']"),  # MLflow's schema check
        "outside the root": ([{**row[0], "image_path": "../../etc/passwd"}],
                             f"column 'image_path': '../../etc/passwd' is outside the image root (Pid '{pid}')"),
    }
    for what, (records, message) in refused.items():
        status, body = post(server, records)
        assert status == 400, (what, status, body)
        assert message in body["message"], (what, body)
        assert "stack_trace" not in body and "Traceback" not in json.dumps(body), (what, body)
        assert str(image_model["images"]) not in json.dumps(body), (what, body)
    status, body = post(server, '{"dataframe_records": 3}')  # not a table: MLflow's own 400
    assert status == 400 and body["message"] and "stack_trace" not in body, body


def test_served_model_gives_a_nul_byte_path_its_status(image_model, server):
    rows = json.loads(raw_rows(image_model, 3).to_json(orient="records"))
    status, body = post(server, [{**rows[0], "image_path": "good.jpg"}, {**rows[1], "image_path": "good\0.jpg"},
                                 {**rows[2], "image_path": "../../etc/passwd\0"}])  # out of the root, but no file
    assert status == 200, body
    assert [r["status"] for r in body["predictions"]] == ["ok", NUL, NUL]
    assert all(np.isfinite(r["popularity"]) for r in body["predictions"])


def test_served_model_refuses_values_of_the_wrong_json_shape(image_model, server):
    """A list or an object where text, a number or a post id belongs refuses the request (400 naming the
    column and the post); a number in a text field or as Pid is read as its text, as pandas gives it."""
    row = json.loads(raw_rows(image_model, 1).to_json(orient="records"))[0]
    pid = row["Pid"]
    refused = {
        "Title": (["a", "b"], f"column 'Title': expected text, got a list (Pid '{pid}')"),
        "Alltags": ({"tags": "x"}, f"column 'Alltags': expected text, got a dict (Pid '{pid}')"),
        "Category": (["x"], f"column 'Category': expected text, got a list (Pid '{pid}')"),
        "Concept": ({"a": 1}, f"column 'Concept': expected text, got a dict (Pid '{pid}')"),
        "Subcategory": ([1], f"column 'Subcategory': expected text, got a list (Pid '{pid}')"),
        "Pid": ([1, 2], "column 'Pid': expected a post id (text or a number), got a list (row 0)"),
        "image_path": (7, f"column 'image_path': expected a path (text), got a number (Pid '{pid}')"),
        "image_b64": (["aGk="], f"column 'image_b64': expected a base64 string, got list (Pid '{pid}')"),
        "photo_count": ({"n": 3}, f"column 'photo_count': expected a number, got a dict (Pid '{pid}')"),
        "Postdate": ([1], f"column 'Postdate': expected a number, got a list (Pid '{pid}')"),
    }
    for col, (value, message) in refused.items():
        status, body = post(server, [{**row, col: value}])
        assert status == 400, (col, status, body)
        assert message in body["message"], (col, body)
        assert "stack_trace" not in body, (col, body)
    # numbers where text or a Pid belongs: read as their text
    status, body = post(server, [{**row, "Pid": 12345, "Title": 2019, "Alltags": 7.5, "Category": True}])
    assert status == 200, body
    assert body["predictions"][0]["status"] == NO_IMAGE


def test_served_model_refuses_requests_over_its_size_limit(image_model, server):
    """The server of this module runs with SMP_SERVE_MAX_ROWS=20 and SMP_SERVE_MAX_MB=2: one post more, or
    one image of 3 MiB, is a 400 naming the limit and the variable; at the limit it is scored."""
    rows = json.loads(raw_rows(image_model, 21).to_json(orient="records"))
    status, body = post(server, rows)
    assert status == 400, body
    assert "the request holds 21 posts; this server takes at most 20 a request (SMP_SERVE_MAX_ROWS)" in body["message"]
    status, body = post(server, rows[:20])
    assert status == 200 and len(body["predictions"]) == 20, body
    big = b64(bytes(3 * 2**20))  # 3 MiB of zeros: 4 MiB of base64
    status, body = post(server, [{**rows[0], "image_b64": big}])
    assert status == 400, body
    assert ("the request holds 4.0 MiB of values; this server takes at most 2 MiB a request (SMP_SERVE_MAX_MB)"
            in body["message"]), body
    assert big not in body["message"]


def test_request_size_limit_applies_in_a_scoring_server_only(monkeypatch):
    """The default limits (10,000 posts, 100 MiB), read from the environment at each request; an in-process
    call (smp predict, a notebook) has none."""
    frame = pd.DataFrame({"Pid": [str(i) for i in range(10_001)]})
    assert len(serving.coerce_request(frame)) == 10_001
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    with pytest.raises(serving.RequestError, match="10,001 posts; this server takes at most 10,000 a request"):
        serving.coerce_request(frame)
    assert len(serving.coerce_request(frame.head(10_000))) == 10_000
    with pytest.raises(serving.RequestError, match="100.0 MiB of values; this server takes at most 100 MiB"):
        serving.coerce_request(pd.DataFrame({"Pid": ["a"], "image_b64": ["A" * (100 * 2**20 + 1)]}))
    monkeypatch.setenv(serving.ROWS_ENV, "many")
    with pytest.raises(ValueError, match="SMP_SERVE_MAX_ROWS='many': expected a whole number"):
        serving.coerce_request(frame.head(2))
