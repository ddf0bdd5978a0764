"""Serving: request validation, `mlflow models serve` of @champion, and `smp predict` on raw rows."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from smp import image_requests, serving
from smp.data import DataCfg, DataError, load_data
from smp.models import XGBCfg
from smp.predict import PredictJob, run_predict
from smp.scoring import predict_rows
from smp.registry import PromoteJob, run_promote
from smp.serving import PopularityModel, RequestError, RequestRejected, coerce_request
from smp.splits import SplitCfg
from smp.train import BenchmarkJob, run_benchmark

CHAMPION = "models:/smp-popularity@champion"


def jpeg_b64(colour=(200, 30, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------- request validation (unit)
@pytest.mark.parametrize("request_rows, problem", [
    ([], "no rows"),
    ([{"photo_count": 3}], "missing required column(s): ['Pid']"),
    ([{"Pid": "1", "photo_count": "abc"}], "'photo_count'"),
    ([{"Pid": "1", "photo_count": [1, 2]}], "'photo_count': expected a number"),
    ([{"Pid": None, "photo_count": 1}], "'Pid': empty"),
    ([{"Pid": "1", "image_b64": "@@@ not base64"}], "'image_b64': not valid base64 (Pid '1')"),
    ([{"Pid": "1", "image_b64": 42}], "'image_b64': expected a base64 string"),
    ([{"Pid": "7"}, {"Pid": "8"}, {"Pid": 7}], "request: 1 duplicate Pid value(s), e.g. ['7']"),
])
def test_malformed_requests_name_the_problem(request_rows, problem):
    with pytest.raises(RequestError) as err:
        coerce_request(pd.DataFrame(request_rows))
    assert problem in str(err.value)


def test_valid_request_is_coerced_not_changed():
    raw = pd.DataFrame([{"Pid": 7, "photo_count": "3", "ispro": True, "Postdate": " ", "image_b64": jpeg_b64()},
                        {"Pid": 8, "photo_count": "-2", "ispro": 1, "Postdate": "inf", "image_b64": None}])
    frame = coerce_request(raw)
    assert frame.loc[0, "Pid"] == "7" and frame.loc[0, "photo_count"] == 3.0 and frame.loc[0, "ispro"] == 1.0
    assert np.isnan(frame.loc[0, "Postdate"])  # blank = missing, not an error
    assert raw.loc[0, "photo_count"] == "3"  # the caller's frame is left alone
    # out of range / infinite: missing, with a note per post (a whole-request error would cost the others)
    assert np.isnan(frame.loc[1, ["photo_count", "Postdate"]].astype(float)).all()
    assert dict(frame.attrs["row_notes"]) == {"8": (
        "Postdate=inf out of range [631152000, 2051222400]; treated as missing",
        "photo_count=-2 out of range [0, 100000000]; treated as missing")}


def test_image_paths_confined_to_the_serving_root(tmp_path, monkeypatch):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    rows = pd.DataFrame([{"Pid": "1", "image_path": "a/x.jpg"}])
    escape = pd.DataFrame([{"Pid": "2", "image_path": "../secret.jpg"}])
    absolute = pd.DataFrame([{"Pid": "3", "image_path": "/etc/passwd"}])
    # in-process (a notebook, `smp predict`): paths are the caller's own
    assert coerce_request(escape).loc[0, "image_path"] == "../secret.jpg"
    # a scoring server without a root reads no files at all
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    with pytest.raises(RequestError, match="reads no server-side files"):
        coerce_request(rows)
    # with a root: relative paths resolve below it, escapes are refused
    monkeypatch.setenv(image_requests.IMAGE_ROOT_ENV, str(root))
    assert coerce_request(rows).loc[0, "image_path"] == str((root / "a/x.jpg").resolve())
    for bad in (escape, absolute):
        with pytest.raises(RequestError, match="outside the image root"):
            coerce_request(bad)


def test_errors_keep_their_message_and_status():
    """MLflow's scoring server rewrites ``e.message`` (echoing the request); ours stays the problem."""
    exc = RequestRejected("column 'photo_count': not a number")
    exc.message = "Failed to predict data '<the whole request>'. \nError: " + exc.message
    body = json.loads(exc.serialize_as_json())
    assert body["message"] == "column 'photo_count': not a number" and "stack_trace" not in body
    assert exc.get_http_status_code() == 400
    assert serving.PredictionFailed("boom").get_http_status_code() == 500

    class Broken:
        needs_images = False

        def predict(self, posts):
            raise RuntimeError("the booster is gone")

    model = PopularityModel()
    model.model = Broken()
    with pytest.raises(MlflowException, match="prediction failed: RuntimeError: the booster is gone") as err:
        model.predict(None, pd.DataFrame([{"Pid": "1"}]))
    assert err.value.get_http_status_code() == 500
    # what a model failure says never shows a server path (an image root, a module file)
    Broken.predict = lambda self, posts: open("/srv/smp/images/secret/a.jpg")
    with pytest.raises(MlflowException) as err:
        model.predict(None, pd.DataFrame([{"Pid": "1"}]))
    assert "/srv" not in err.value.message and "'<path>'" in err.value.message, err.value.message
    assert image_requests.scrub_paths('File "/usr/lib/python3/x.py", not an image / cannot decode, image/png') == \
        'File "<path>", not an image / cannot decode, image/png'
    with pytest.raises(RequestRejected, match="no rows"):
        model.predict(None, pd.DataFrame())


def test_predict_rows_isolates_the_rows_a_model_refuses():
    class Picky:
        calls = 0

        def predict(self, rows):
            Picky.calls += 1
            if (rows["x"] < 0).any():
                raise RequestRejected(f"column 'x': negative (Pid {rows.loc[rows['x'] < 0, 'Pid'].iloc[0]!r})")
            return rows["x"].to_numpy(dtype=float)

    rows = pd.DataFrame({"Pid": [str(i) for i in range(64)], "x": np.arange(64.0)})
    rows.loc[[5, 40], "x"] = -1.0
    pred, status = predict_rows(Picky(), rows, batch_size=32)
    assert [i for i, s in enumerate(status) if s != "ok"] == [5, 40]
    assert status[5] == "error: column 'x': negative (Pid '5')"
    assert np.isnan(pred[[5, 40]]).all()
    assert np.array_equal(np.delete(pred, [5, 40]), np.delete(np.arange(64.0), [5, 40]))
    assert Picky.calls < 30  # halving, not one call per row


def test_image_features_computed_once_with_reasons(monkeypatch, tmp_path):
    """Image models (`smp predict` and the served model alike) embed the usable images of a request once and
    say, per post, which could not be used; images refused from their size or header never reach the embedding."""
    from types import SimpleNamespace

    from smp.models import ImageFeatureSource
    from smp.scoring import with_image_features

    cols = ["hue_count", "clip_0"]
    seen = {}

    def fake_features(pids, images, cfg):  # stands in for CLIP (and spares this test importing torch)
        seen["pids"], seen["cfg"] = list(pids), cfg
        seen["images"] = [type(i).__name__ for i in images]
        feats = pd.DataFrame({"Pid": pids, "hue_count": np.arange(len(pids), dtype=float) + 5,
                              "clip_0": 0.5, "has_image": 1.0})
        feats.loc[1, ["hue_count", "clip_0", "has_image"]] = [np.nan, np.nan, 0.0]
        feats.attrs["bad"] = pd.DataFrame({"Pid": ["b"], "reason": ["truncated JPEG"]})
        return feats

    monkeypatch.setattr(image_requests, "features_for_images", fake_features)
    inner = SimpleNamespace(images=ImageFeatureSource(cols, embed_cfg="the training settings"))
    model = SimpleNamespace(unwrap_python_model=lambda: SimpleNamespace(model=inner))  # a loaded pyfunc
    truncated = base64.b64decode(jpeg_b64())[:-40]
    bomb = base64.b64encode(_png_header(30000, 30000)).decode()
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "x.jpg").write_bytes(base64.b64decode(jpeg_b64()))
    rows = pd.DataFrame({"Pid": ["a", "b", "c", "d", "e", "f"],
                         "image_b64": [jpeg_b64(), base64.b64encode(truncated).decode(), None, bomb, None,
                                       "not base64!"],
                         "image_path": [str(tmp_path / "x.jpg"), None, None, None, str(tmp_path / "a_dir"),
                                        str(tmp_path / "x.jpg")]}, index=[7, 8, 9, 10, 11, 12])
    out, notes = with_image_features(model, rows)
    # only the images that may be usable, as bytes: image_b64 wins over image_path (post a has both)
    assert seen == {"pids": ["a", "b"], "cfg": "the training settings", "images": ["DecodedImage"] * 2}
    assert list(out["Pid"]) == ["a", "b", "c", "d", "e", "f"]
    assert list(out["hue_count"].fillna(-1)) == [5.0, -1.0, -1.0, -1.0, -1.0, -1.0]
    assert notes == {"b": ["image unusable (truncated JPEG); scored without image features"],
                     "c": ["no image given; scored without image features"],
                     "d": ["image unusable (image too large (its header declares more than 178,956,970 pixels; "
                           "the limit is 40,000,000)); scored without image features"],
                     "e": ["image unusable (a directory, not an image file); scored without image features"],
                     "f": ["image unusable (image_b64 is not valid base64); scored without image features"]}
    assert str(tmp_path) not in str(notes)
    # the image columns stay: image_b64 decoded (no later step decodes it again), the garbled one as sent
    assert out.loc[0, "image_b64"] == base64.b64decode(rows.loc[7, "image_b64"])
    assert out.loc[5, "image_b64"] == "not base64!" and out.loc[4, "image_path"] == str(tmp_path / "a_dir")
    # features sent with the posts are used as they are; a tabular model gets the rows untouched
    given = pd.DataFrame({"Pid": ["a"], "hue_count": [1.0], "clip_0": [0.0]})
    assert with_image_features(model, given)[0] is given
    tabular = SimpleNamespace(unwrap_python_model=lambda: SimpleNamespace(model=SimpleNamespace()))
    assert with_image_features(tabular, rows) == (rows, {})


@pytest.mark.slow  # a fresh interpreter (subprocess)
def test_a_tabular_model_checks_request_images_without_torch():
    """A tabular model's environment has no torch (``smp.packaging.IMAGE_ONLY``): reading a request with
    images, and answering it, must not import it."""
    code = ("import sys, pandas as pd\n"
            "from smp.serving import PopularityModel\n"
            "class Tabular:\n"
            "    def predict(self, frame):\n"
            "        return [1.5] * len(frame)\n"
            "model = PopularityModel()\n"
            "model.model = Tabular()\n"
            f"out = model.predict(None, pd.DataFrame({{'Pid': ['1', '2'], 'image_b64': [{jpeg_b64()!r}, None], "
            "'image_path': [None, '/no/such.jpg']}))\n"
            "print(list(out['status']), sorted(m for m in ('torch', 'open_clip', 'smp.clip') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['ok', 'ok'] []"


# --------------------------------------------------------------------------- end to end
def train_and_promote(smpd_dir) -> None:
    run_benchmark(BenchmarkJob(source=DataCfg(data=str(smpd_dir)), splitting=SplitCfg(sample_size=0),
                               xgb=XGBCfg(n_estimators=60, max_depth=4, learning_rate=0.1, early_stopping_rounds=10),
                               experiment="t"))
    run_promote(PromoteJob(experiment="t"))


@pytest.mark.slow
def test_smp_predict_reports_every_post(smpd_dir, tmp_path):
    with pytest.raises(DataError, match="cannot be loaded"):  # nothing promoted yet
        run_predict(PredictJob(input=str(smpd_dir)))
    train_and_promote(smpd_dir)
    posts = load_data(str(smpd_dir)).drop(columns=["label", "image_path"]).head(12).astype({"photo_count": object})
    posts.loc[3, "photo_count"] = "abc"                 # unparseable: scored as missing, and said so
    posts["image_b64"] = None
    posts.loc[7, "image_b64"] = "this is not base64!"   # refused by the model: reported, not dropped
    posts.loc[8, "image_b64"] = jpeg_b64()              # a tabular model ignores a good image
    posts.to_csv(tmp_path / "raw.csv", index=False)

    out_path = tmp_path / "out" / "pred.csv"
    metrics = run_predict(PredictJob(input=str(tmp_path / "raw.csv"), output=str(out_path), batch_size=5))
    run = mlflow.get_run(metrics.run_id)  # the result names the predict run and the model it loaded
    assert run.data.tags["smp.job"] == "predict" and run.data.tags["smp.model_run"] == metrics.model.metadata.run_id
    out = pd.read_csv(out_path, dtype={"Pid": str})
    assert list(out.columns) == ["Pid", "popularity", "status"]
    assert list(out["Pid"]) == list(posts["Pid"].astype(str))  # every post, in input order
    status = dict(zip(out["Pid"], out["status"]))
    pid = posts["Pid"].astype(str)
    assert status[pid[3]].startswith("partial: unparseable photo_count='abc'")
    assert status[pid[7]] == f"error: column 'image_b64': not valid base64 (Pid '{pid[7]}')"
    assert np.isnan(out.loc[7, "popularity"])  # not scored
    assert (out.drop(index=[3, 7])["status"] == "ok").all() and np.isfinite(out.drop(index=7)["popularity"]).all()
    assert metrics["data/rows"] == 12 and metrics["data/error_rows"] == 1 and metrics["data/partial_rows"] == 1
    assert metrics["data/scored_rows"] == 11

    # a posts table with a header and no rows: zero rows out, a header-only file, the run FINISHED
    (tmp_path / "empty.csv").write_text(",".join(posts.columns) + "\n")
    empty = run_predict(PredictJob(input=str(tmp_path / "empty.csv"), output=str(tmp_path / "empty_out.csv")))
    assert empty["data/rows"] == 0 and empty["data/error_rows"] == 0
    assert pd.read_csv(tmp_path / "empty_out.csv").columns.tolist() == ["Pid", "popularity", "status"]
    assert mlflow.last_active_run().info.status == "FINISHED"

    # the same rows straight through the registered pyfunc, as a notebook would
    model = mlflow.pyfunc.load_model(CHAMPION)
    ok = load_data(tmp_path / "raw.csv").drop(index=7).drop(columns=["image_b64"]).reset_index(drop=True)
    answer = model.predict(ok)
    assert list(answer.columns) == ["popularity", "status"]  # the output schema
    assert model.metadata.get_output_schema().input_names() == ["popularity", "status"]
    assert np.allclose(answer["popularity"], out.drop(index=7)["popularity"], rtol=1e-6)
    assert list(answer["status"]) == ["ok"] * 11  # photo_count='abc' is NaN once loaded: nothing left to note
    run = mlflow.last_active_run()
    assert run.data.tags["smp.job"] == "predict" and run.data.tags["smp.model_version"] == "1"


def post(server, payload, content_type="application/json") -> tuple[int, str]:
    r = server.post(payload, content_type, timeout=60)
    return r.status_code, r.text


def _png_header(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares ``width`` x ``height`` pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_mlflow_models_serve_champion(smpd_dir, tmp_path, serve_model):
    train_and_promote(smpd_dir)
    raw = load_data(str(smpd_dir)).drop(columns=["label", "image_path"]).head(4)
    records = json.loads(raw.to_json(orient="records"))
    records[1]["image_b64"] = jpeg_b64()  # the same request shape serves image models

    # a plain Python session resolves the alias (only the tracking URI is set)
    # as pandas reads the JSON, with no cast: int64 Pid, dates and counts
    code = ("import json, sys, mlflow, pandas as pd; model = mlflow.pyfunc.load_model(%r); "
            "posts = pd.read_json(sys.stdin); "
            "print(json.dumps([float(p) for p in model.predict(posts)['popularity']]))" % CHAMPION)
    plain = subprocess.run([sys.executable, "-c", code], input=raw.to_json(orient="records"), text=True,
                           capture_output=True, timeout=120, cwd=tmp_path,
                           env={k: v for k, v in os.environ.items() if not k.startswith("SMP_")})
    assert plain.returncode == 0, plain.stderr[-2000:]
    expected = mlflow.pyfunc.load_model(CHAMPION).predict(raw)["popularity"]
    assert np.allclose(json.loads(plain.stdout.strip().splitlines()[-1]), expected, rtol=1e-6)

    with serve_model(CHAMPION, tmp_path / "serve.log", env={image_requests.IMAGE_ROOT_ENV: None}) as server:
        status, body = post(server, {"dataframe_records": records})
        assert status == 200, body
        answer = json.loads(body)["predictions"]  # one record per post: popularity and status
        served = np.array([r["popularity"] for r in answer], dtype=float)
        assert np.isfinite(served).all() and np.allclose(served, expected, rtol=1e-5)
        assert [r["status"] for r in answer] == ["ok"] * 4

        # a tabular model never opens an image: a broken one changes nothing (image models: test_bad_input_serving)
        for junk in (base64.b64encode(b"hi").decode(), base64.b64encode(_png_header(30000, 30000)).decode()):
            status, body = post(server, {"dataframe_records": [{**records[0], "image_b64": junk}]})
            assert status == 200 and json.loads(body)["predictions"][0]["status"] == "ok", body

        malformed = {
            "missing Pid": ({"dataframe_records": [{"photo_count": 3}]}, "'Pid'"),
            # refused by the model's own request check, which names the column and the post
            "not a number": ({"dataframe_records": [{"Pid": "1", "photo_count": "abc"}]},
                             "column 'photo_count': 1 value(s) are not numbers, e.g. 'abc' (Pid '1')"),
            "bad image": ({"dataframe_records": [{"Pid": "1", "image_b64": "%%%"}]}, "'image_b64'"),
            "duplicate Pid": ({"dataframe_records": [{"Pid": "1"}, {"Pid": "1"}]}, "1 duplicate Pid value(s)"),
            "server path": ({"dataframe_records": [{"Pid": "1", "image_path": "../../etc/passwd"}]},
                            "'image_path'"),
            "empty": ({"dataframe_records": []}, "missing inputs ['Pid']"),  # MLflow's schema check
            "no table": ({}, "dataframe_records"),
            "not JSON": ("{oops", "JSON"),
        }
        for what, (payload, problem) in malformed.items():
            status, body = post(server, payload)
            assert 400 <= status < 500, (what, status, body)
            assert problem in body and "Traceback" not in body and "stack_trace" not in body, (what, body)
        assert "Failed to predict data" not in post(server, malformed["not a number"][0])[1]  # no echo of the request

        # integers as JSON integers (as pandas writes an int64 column), Pid as a number: accepted as they are
        natural = json.loads(raw.assign(Pid=raw["Pid"].astype(int)).to_json(orient="records"))
        status, body = post(server, {"dataframe_records": natural})
        assert status == 200, body
        assert np.allclose([r["popularity"] for r in json.loads(body)["predictions"]], expected, rtol=1e-5)
        # a CSV body: MLflow 3.17's server parses CSV with the schema's pandas dtypes, which the AnyType schema
        # has none of, so it is refused (400) before any model code (documented in smp/packaging.py)
        status, body = post(server, raw.to_csv(index=False), "text/csv")
        assert status == 400 and "Failed to parse input" in body, body


HIDE_INSTALLED_SMP = """
import sys
# forget the installed (editable) smp: only the model's shipped code may provide it
sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
sys.path_hooks = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]
sys.path = [p for p in sys.path if p not in ('', '.', %r)]
sys.path_importer_cache.clear()
import importlib.util
assert importlib.util.find_spec('smp') is None, 'smp still importable'
"""


@pytest.mark.slow  # trains a job, then loads its model in child Python processes
def test_logged_model_ships_its_code_as_one_archive(smpd_dir, tmp_path):
    run_benchmark(BenchmarkJob(source=DataCfg(data=str(smpd_dir)), splitting=SplitCfg(sample_size=0),
                               xgb=XGBCfg(n_estimators=20, max_depth=3, early_stopping_rounds=5), experiment="t"))
    run_id = mlflow.last_active_run().info.run_id
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/benchmark", dst_path=str(tmp_path / "dl")))
    code_files = sorted(str(p.relative_to(local / "code")) for p in (local / "code").rglob("*") if p.is_file())
    assert code_files == ["smp.zip", "smp/__init__.py"]  # two uploads, not one per module

    raw = load_data(str(smpd_dir)).drop(columns=["label", "image_path"]).head(5)
    repo = str(Path(serving.__file__).resolve().parents[1])
    script = HIDE_INSTALLED_SMP % repo + (
        "import json, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({str(local)!r})\n"
        "import smp.serving\n"
        "print(json.dumps({'file': smp.serving.__file__, 'version': smp.__version__, "
        "'out': model.predict(pd.read_json(sys.stdin)).to_dict('list')}))\n")
    out = subprocess.run([sys.executable, "-c", script], input=raw.to_json(orient="records"), text=True,
                         capture_output=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(local / "code" / "smp.zip"))  # imported from the archive
    assert got["version"] == __import__("smp").__version__  # the package __init__ ran
    assert np.allclose(got["out"]["popularity"], mlflow.pyfunc.load_model(str(local)).predict(raw)["popularity"],
                       rtol=1e-6)
    assert got["out"]["status"] == ["ok"] * 5

    # and the check above can fail: without the shipped code smp is not importable there
    bare = subprocess.run([sys.executable, "-c", HIDE_INSTALLED_SMP % repo + "import smp\n"], text=True,
                          capture_output=True, timeout=60, cwd=tmp_path)
    assert bare.returncode != 0 and "No module named 'smp'" in bare.stderr
