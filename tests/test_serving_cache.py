"""Image features at request time (issue 26, "Serving"): the embed job's feature cache is read, never written.

Request images are kept in a bounded in-memory LRU (``smp.image_requests``); the cache index is read once
per process; a client's image never reaches the disk, so a server on a read-only filesystem answers 200
with image features. Quick tests call ``features_for_rows`` with smp's tiny CLIP; the ``slow`` ones serve an
image model with ``mlflow models serve`` over a writable cache directory and over a read-only one.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from smp import feature_cache, image_requests
from smp.clip import ClipCfg
from smp.embed import EmbedCfg, embed_images
from smp.image_requests import FeatureLRU, features_for_rows

CLIP_COLS = [f"clip_{j}" for j in range(32)]  # smp-tiny's embed_dim


def jpeg(seed: int) -> bytes:
    """A small JPEG that no other seed draws."""
    rng = np.random.default_rng(seed)
    img = np.zeros((40, 56, 3), np.uint8)
    img[:] = rng.integers(0, 255, 3)
    cv2.circle(img, (int(rng.integers(8, 48)), 20), 6 + seed % 9, [int(c) for c in rng.integers(0, 255, 3)], -1)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` -> (size, mtime_ns): any write, rename or new file changes it."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def fresh_stores():
    """Each test starts with no per-process request state (stores and their in-memory caches)."""
    image_requests.request_features.cache_clear()
    yield
    image_requests.request_features.cache_clear()


@pytest.fixture
def cached(tmp_path, tiny_clip, fresh_stores):
    """A feature cache filled by the embed pipeline with 3 images; their files, the cfg and the result."""
    files = []
    for i in range(3):
        path = tmp_path / f"train{i}.jpg"
        path.write_bytes(jpeg(i))
        files.append(str(path))
    cfg = EmbedCfg(**tiny_clip, device="cpu", num_workers=0, progress=False, cache_dir=str(tmp_path / "cache"))
    result = embed_images(["t0", "t1", "t2"], files, cfg)
    return {"cfg": cfg, "files": files, "result": result, "cache": tmp_path / "cache"}


# --------------------------------------------------------------------------- the in-memory LRU
def test_lru_is_bounded_by_entries_and_by_bytes():
    hc, clip = np.zeros(5), np.zeros(32, np.float32)
    size = hc.nbytes + clip.nbytes + 64  # 232 bytes an entry
    lru = FeatureLRU(max_entries=3, max_bytes=10**9)
    for key in "abcde":
        lru.put(key, hc, clip)
    assert len(lru) == 3 and lru.nbytes == 3 * size
    assert lru.get("a") is None and lru.get("b") is None  # the least recently used went first
    assert lru.get("c") is not None  # c is now the most recent: f pushes d out, not c
    lru.put("f", hc, clip)
    assert [k for k in "cdef" if lru.get(k) is not None] == ["c", "e", "f"]

    by_bytes = FeatureLRU(max_entries=1000, max_bytes=2 * size + 10)
    for key in "abcde":
        by_bytes.put(key, hc, clip)
    assert len(by_bytes) == 2 and by_bytes.nbytes == 2 * size
    by_bytes.put("huge", np.zeros(10**4), clip)  # one entry over the whole bound is not kept
    assert len(by_bytes) == 2 and by_bytes.get("huge") is None
    assert len(FeatureLRU(max_entries=0, max_bytes=10**9)) == 0

    stored = np.ones(5)
    lru.put("g", stored, clip)
    stored[:] = 7  # the caller's array changes later: the stored copy does not
    assert lru.get("g")[0].tolist() == [1.0] * 5


# --------------------------------------------------------------------------- features_for_rows
def test_request_images_never_reach_the_cache_and_the_index_is_read_once(cached, monkeypatch):
    cfg, cache = cached["cfg"], cached["cache"]
    before = snapshot(cache)
    assert any(name.endswith(".npz") for name in before)
    reads = []
    read_chunk = feature_cache.read_chunk
    monkeypatch.setattr(feature_cache, "read_chunk", lambda *a, **k: reads.append(a[0]) or read_chunk(*a, **k))
    new = [jpeg(100 + i) for i in range(12)]
    for n in range(4):  # 4 requests: 3 new images each, plus a training image (in the embed job's cache)
        rows = pd.DataFrame({"Pid": [f"r{n}-{j}" for j in range(4)],
                             "image_b64": [b64(d) for d in new[3 * n:3 * n + 3]] + [None],
                             "image_path": [None, None, None, cached["files"][n % 3]]})
        feats = features_for_rows(rows, cfg)
        assert feats["has_image"].tolist() == [1, 1, 1, 1]
    assert snapshot(cache) == before  # no chunk, no temp file, no rename, nothing rewritten
    store = image_requests.request_features(ClipCfg.of(cfg), str(cache.absolute()))
    assert store.counts == {"index_reads": 1, "computed": 12, "disk_hits": 3, "memory_hits": 1}
    assert len(reads) == 1 + 3  # the index: its one chunk, once; then that chunk per first use of a cached image

    # the vectors are the pipeline's: the cached image's, and a new image's as embed_images computes it
    again = features_for_rows(pd.DataFrame({"Pid": ["x", "y"], "image_path": [cached["files"][0], None],
                                            "image_b64": [None, b64(new[0])]}), cfg)
    np.testing.assert_allclose(again.loc[0, CLIP_COLS].to_numpy(float),
                               cached["result"].features.loc[0, CLIP_COLS].to_numpy(float), rtol=1e-6)
    (Path(cached["files"][0]).parent / "new0.jpg").write_bytes(new[0])
    fresh = embed_images(["y"], [str(Path(cached["files"][0]).parent / "new0.jpg")],
                         replace(cfg, cache_dir=str(cache.parent / "other-cache")))
    np.testing.assert_allclose(again.loc[1, CLIP_COLS].to_numpy(float), fresh.features.loc[0, CLIP_COLS]
                               .to_numpy(float), rtol=1e-4, atol=1e-6)


def test_request_features_need_no_writable_disk(cached, monkeypatch):
    """Every way of writing a file fails (a read-only filesystem): request images still get their features."""
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    for target, name in [(feature_cache.FeatureCache, "write"), (tempfile, "mkstemp"), (tempfile, "mkdtemp"),
                         (tempfile, "NamedTemporaryFile"), (Path, "mkdir"), (Path, "write_bytes"),
                         (os, "replace"), (os, "rename")]:
        monkeypatch.setattr(target, name, read_only)
    rows = pd.DataFrame({"Pid": ["a", "b", "c"], "image_b64": [b64(jpeg(200)), None, b64(jpeg(201))],
                         "image_path": [None, cached["files"][1], None]})
    feats = features_for_rows(rows, cached["cfg"])
    assert feats["has_image"].tolist() == [1, 1, 1] and feats.attrs["bad"].empty


def test_request_cache_bound_from_the_environment(cached, monkeypatch):
    monkeypatch.setenv(image_requests.IMAGES_ENV, "5")
    for n in range(4):
        features_for_rows(pd.DataFrame({"Pid": ["a", "b", "c"], "image_b64": [b64(jpeg(300 + 3 * n + j))
                                                                                for j in range(3)]}), cached["cfg"])
    store = image_requests.request_features(ClipCfg.of(cached["cfg"]),
                                            str(cached["cache"].absolute()))
    assert len(store.memory) == 5 and store.counts["computed"] == 12
    assert store.memory.max_bytes == image_requests.MAX_CACHED_MB * 2**20

    image_requests.request_features.cache_clear()
    monkeypatch.setenv(image_requests.MB_ENV, "lots")
    with pytest.raises(ValueError, match="SMP_REQUEST_CACHE_MB='lots': expected a whole number"):
        features_for_rows(pd.DataFrame({"Pid": ["a"], "image_b64": [b64(jpeg(1))]}), cached["cfg"])


def test_unusable_images_and_repeats_in_one_request(cached):
    """A NUL byte in a path, a missing file, bad base64 and a broken image each get their reason; an image
    sent twice in one request is embedded once and fills both rows."""
    good = b64(jpeg(400))
    rows = pd.DataFrame({"Pid": ["nul", "missing", "b64", "broken", "one", "two"],
                         "image_b64": [None, None, "!!", b64(b"not an image"), good, good],
                         "image_path": ["/srv/x\0y.jpg", str(cached["cache"] / "absent.jpg"), None, None, None,
                                        None]})
    feats = features_for_rows(rows, cached["cfg"])
    assert feats.attrs["bad"].values.tolist() == [["nul", "the path holds a NUL byte"], ["missing", "missing file"],
                                                  ["b64", "image_b64 is not valid base64"],
                                                  ["broken", "not an image / cannot decode"]]
    assert feats["has_image"].tolist() == [0, 0, 0, 0, 1, 1]
    np.testing.assert_array_equal(feats.loc[4, CLIP_COLS].to_numpy(), feats.loc[5, CLIP_COLS].to_numpy())
    store = image_requests.request_features(ClipCfg.of(cached["cfg"]),
                                            str(cached["cache"].absolute()))
    assert store.counts["computed"] == 1


def test_each_image_b64_is_decoded_once(cached, monkeypatch):
    """A post's image_b64 is base64-decoded once: served (the request check, the per-post image checks and
    the embedding share the bytes) and in smp predict (the features first, then the pyfunc's request check
    on each batch)."""
    from types import SimpleNamespace

    from smp.models import ImageFeatureSource
    from smp.scoring import predict_rows, with_image_features
    from smp.serving import PopularityModel

    sent = [b64(jpeg(600 + i)) for i in range(4)]
    decoded = []
    real = base64.b64decode

    def counting(data, *args, **kwargs):
        if isinstance(data, str) and data in sent:
            decoded.append(sent.index(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(base64, "b64decode", counting)

    class ImageModel:
        images = ImageFeatureSource(["clip_0", "clip_1"], embed_cfg=cached["cfg"])

        def predict(self, frame):
            return frame["clip_0"].to_numpy(dtype=float)

    pyfunc = PopularityModel()
    pyfunc.model = ImageModel()
    rows = pd.DataFrame({"Pid": ["a", "b", "c", "d"], "image_b64": sent,
                         "image_path": [cached["files"][0], None, None, None]})  # image_b64 wins for a
    served = pyfunc.predict(None, rows)
    assert list(served["status"]) == ["ok"] * 4 and np.isfinite(served["popularity"]).all()
    assert sorted(decoded) == [0, 1, 2, 3]

    decoded.clear()
    loaded = SimpleNamespace(unwrap_python_model=lambda: pyfunc)  # as mlflow.pyfunc.load_model gives it
    with_features, notes = with_image_features(loaded, rows)
    pred, status = predict_rows(loaded, with_features, batch_size=2)
    assert notes == {} and status == ["ok"] * 4
    assert sorted(decoded) == [0, 1, 2, 3]
    np.testing.assert_allclose(pred, served["popularity"].to_numpy())


# --------------------------------------------------------------------------- the served model
def read_only_mount_works() -> bool:
    """Whether ``unshare -rm`` can give a process a read-only bind mount here (as a container's filesystem)."""
    probe = Path(tempfile.mkdtemp(prefix="smp-ro-probe-"))
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind "$1" "$1" && mount -o remount,ro,bind '
                            '"$1" "$1" && ! touch "$1/x" 2>/dev/null', "sh", str(probe)], capture_output=True,
                           timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        subprocess.run(["rm", "-rf", str(probe)])


@pytest.fixture(scope="module")
def tiny_image_model(tmp_path_factory, smpd_dir, tiny_clip, model_in_own_store):
    """pca_boost with smp's tiny CLIP, as a local model directory, and the feature cache its embed run filled."""
    from smp.data import DataCfg
    from smp.models import PCACfg, XGBCfg
    from smp.splits import SplitCfg
    from smp.train import PCABoostJob, UpstreamCfg, run_pca_boost

    root = tmp_path_factory.mktemp("tiny_image_model")
    local = model_in_own_store(root, run_pca_boost, PCABoostJob(
        source=DataCfg(data=str(smpd_dir)), splitting=SplitCfg(sample_size=0),
        xgb=XGBCfg(n_estimators=20, max_depth=3, early_stopping_rounds=5), pca=PCACfg(n_components=8),
        upstream=UpstreamCfg(**tiny_clip), experiment="serve_cache"), "pca_boost")
    from smp.data import load_data

    posts = load_data(str(smpd_dir))
    row = json.loads(posts.drop(columns=["label", "image_path"]).head(1).to_json(orient="records"))[0]
    return {"model": local, "cache": root / "cache", "row": row, "train_image": posts["image_path"].iloc[0]}


def ask(server, records: list[dict]):
    r = server.post({"dataframe_records": records})
    return r.status_code, r.json()


@pytest.mark.slow
@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_served_image_model_leaves_the_cache_as_it_found_it(tiny_image_model, tmp_path, read_only, serve_model):
    if read_only and not read_only_mount_works():
        pytest.skip("unshare cannot make a read-only bind mount on this machine")
    cache, row = tiny_image_model["cache"], tiny_image_model["row"]
    before = snapshot(cache)
    assert any(name.endswith(".npz") for name in before)  # the training images, embedded by the embed run
    with serve_model(tiny_image_model["model"], tmp_path / "serve.log", env={"SMP_CACHE_DIR": cache}, workers=1,
                     read_only=cache if read_only else None) as server:
        answers = []
        for i in range(25):  # 25 requests, each with an image the server never saw
            status, body = ask(server, [{**row, "Pid": f"p{i}", "image_b64": b64(jpeg(500 + i))}])
            assert status == 200, body
            answers.append(body["predictions"][0])
        status, body = ask(server, [{**row, "Pid": "trained", "image_b64": b64(Path(tiny_image_model["train_image"])
                                                                               .read_bytes())},
                                    {**row, "Pid": "again", "image_b64": b64(jpeg(500))}])  # on disk / in memory
        assert status == 200, body
    assert [a["status"] for a in answers + body["predictions"]] == ["ok"] * 27  # every image used
    assert body["predictions"][1]["popularity"] == pytest.approx(answers[0]["popularity"], rel=1e-6)
    assert len({round(a["popularity"], 6) for a in answers}) > 1  # the images change the scores
    assert snapshot(cache) == before  # no file added, removed or rewritten
    if read_only:
        assert "Read-only file system" not in (tmp_path / "serve.log").read_text()
