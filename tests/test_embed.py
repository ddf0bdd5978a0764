"""CLIP + handcrafted embedding pipeline: shapes, determinism, cache, resume, bad images.

smp's tiny CLIP with random weights (the ``tiny_clip`` fixture), a few small generated JPEGs and
the cache under tmp_path: nothing is downloaded. One slow test runs the paper's RN50 shapes.
"""

import base64
import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch

from smp import clip, embed, feature_cache
from smp.embed import EmbedCfg, embed_images, load_clip
from smp.image_features import HANDCRAFTED

N_GOOD = 8
BAD = {  # file name -> expected words in the reason
    "zero.jpg": "zero-byte",
    "truncated.jpg": "truncated",
    "text.jpg": "not an image",
    "missing.jpg": "missing",
    None: "no image path",
}
CLIP_COLS = [f"clip_{j}" for j in range(32)]  # smp-tiny's embed_dim


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[list[str], list[str | None]]:
    """8 small distinct JPEGs followed by one post per bad-image case."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths: list[str | None] = []
    for i in range(N_GOOD):
        img = np.zeros((48 + 4 * i, 64, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        cv2.circle(img, (int(rng.integers(8, 56)), 24), 10 + i, [int(c) for c in rng.integers(0, 255, 3)], -1)
        path = root / f"img{i}.jpg"
        cv2.imwrite(str(path), img)
        paths.append(str(path))
    good = Path(paths[0]).read_bytes()
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "text.jpg").write_text("not a jpeg")
    paths += [None if name is None else str(root / name) for name in BAD]
    return [f"p{i}" for i in range(len(paths))], paths


@pytest.fixture(scope="module")
def cfg_for(tiny_clip):
    """``cfg_for(cache_dir, **overrides)``: the tiny CLIP, eager, in the main process, caching under cache_dir."""
    def make(cache_dir, **kw) -> EmbedCfg:
        base = dict(**tiny_clip, batch_size=4, num_workers=0, chunk_size=4,
                    cache_dir=str(cache_dir), progress=False, compile="none")  # eager: no graph build
        return EmbedCfg(**{**base, **kw})

    return make


@pytest.fixture(scope="module")
def baseline(images, cfg_for, tmp_path_factory):
    """One uninterrupted run; returns (cfg, result)."""
    cfg = cfg_for(tmp_path_factory.mktemp("cache"))
    return cfg, embed_images(*images, cfg)


def test_rows_shape_and_bad_images(images, baseline):
    pids, _ = images
    _, res = baseline
    f = res.features
    assert list(f.columns) == ["Pid", "has_image", *HANDCRAFTED, *CLIP_COLS]
    assert f["Pid"].tolist() == pids  # every post kept, input order
    assert f["has_image"].tolist() == [1] * N_GOOD + [0] * len(BAD)
    assert f[CLIP_COLS].dtypes.eq(np.float32).all()
    good, bad = f.iloc[:N_GOOD], f.iloc[N_GOOD:]
    assert np.isfinite(good[[*HANDCRAFTED, *CLIP_COLS]].to_numpy()).all()
    assert bad[[*HANDCRAFTED, *CLIP_COLS]].isna().all().all()
    assert res.bad["Pid"].tolist() == pids[N_GOOD:]
    for reason, words in zip(res.bad["reason"], BAD.values()):
        assert words in reason
    assert res.stats["images"] == len(pids) and res.stats["bad_images"] == len(BAD)
    assert res.stats["computed"] == N_GOOD and res.stats["cache_hits"] == 0
    assert res.stats["embedding_dim"] == 32 and res.stats["images_per_s"] > 0
    assert res.info["random_weights"] is True and res.info["embedding_dim"] == 32
    assert res.info["model"] == "smp-tiny" and res.info["image_size"] == 64
    assert res.info["compile"] == "eager"
    chunk_files = list(Path(res.info["cache_dir"]).glob("chunk-*.npz"))
    assert len(chunk_files) == N_GOOD // 4
    assert list(Path(res.info["cache_dir"]).glob(".tmp-*")) == []  # every chunk renamed into place


def test_second_run_is_served_from_cache(images, baseline, monkeypatch, caplog):
    cfg, first = baseline
    monkeypatch.setattr(embed, "load_clip", lambda cfg: pytest.fail("model loaded on a cached run"))
    with caplog.at_level(logging.INFO, logger="smp.embed"):
        again = embed_images(*images, cfg)
    assert again.stats["computed"] == 0 and again.stats["cache_hits"] == N_GOOD
    assert f"all {N_GOOD} images served from cache" in caplog.text
    assert again.features.equals(first.features)
    assert again.bad.equals(first.bad)


def test_workers_and_a_fresh_model_reproduce_the_vectors(images, baseline, cfg_for, tmp_path):
    """Random init is seeded (same vectors from a new model) and workers change nothing."""
    _, first = baseline
    state = torch.random.get_rng_state()
    res = embed_images(*images, cfg_for(tmp_path, num_workers=2))
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert res.stats["computed"] == N_GOOD
    np.testing.assert_array_equal(res.features[CLIP_COLS].to_numpy(), first.features[CLIP_COLS].to_numpy())
    np.testing.assert_array_equal(res.features[list(HANDCRAFTED)].to_numpy(),
                                  first.features[list(HANDCRAFTED)].to_numpy())
    assert res.bad.equals(first.bad)


def test_changed_model_or_preprocess_never_reuses_vectors(images, baseline, monkeypatch, tmp_path):
    cfg, first = baseline
    pids, paths = images
    dirs = {feature_cache.spec_directory(c.cache_dir, feature_cache.feature_spec(c)) for c in [
        cfg,
        replace(cfg, clip_model="RN101"),
        replace(cfg, clip_pretrained="openai"),
        replace(cfg, force_quick_gelu=True),
        replace(cfg, checkpoint=str(paths[0])),  # any file: keyed by its sha256
    ]}
    assert len(dirs) == 5
    monkeypatch.setattr(feature_cache, "PREPROCESS_VERSION", "test-bumped")
    res = embed_images(pids[:2], paths[:2], cfg)
    assert res.stats["computed"] == 2 and res.stats["cache_hits"] == 0
    assert res.info["preprocess_version"] == "test-bumped"


def test_interrupted_run_resumes(images, baseline, cfg_for, tmp_path):
    _, first = baseline
    pids, paths = images[0][:5], images[1][:5]
    cfg = cfg_for(tmp_path, batch_size=2, chunk_size=2)

    def stop_after_first_chunk(info):
        raise KeyboardInterrupt(f"simulated interruption after {info['path']}")

    with pytest.raises(KeyboardInterrupt):
        embed_images(pids, paths, cfg, on_chunk=stop_after_first_chunk)
    resumed = embed_images(pids, paths, cfg)
    assert resumed.stats["cache_hits"] == 2 and resumed.stats["computed"] == 3
    np.testing.assert_allclose(resumed.features[CLIP_COLS].to_numpy(),
                               first.features[CLIP_COLS].to_numpy()[:5], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(resumed.features[list(HANDCRAFTED)].to_numpy(),
                                  first.features[list(HANDCRAFTED)].to_numpy()[:5])
    assert len(list(Path(resumed.info["cache_dir"]).glob("chunk-*.npz"))) == 3  # 2 + 2 + final 1


def test_offline_tag_download_explains_local_checkpoint(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_network)
    with pytest.raises(RuntimeError) as err:
        load_clip(EmbedCfg(clip_pretrained="openai", cache_dir=str(tmp_path)))
    msg = str(err.value)
    assert "RN50" in msg and "openai" in msg and "offline" in msg
    assert "checkpoint=" in msg and "quickgelu" in msg


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_local_checkpoints_state_dict_and_torchscript(tiny_clip, tmp_path):
    """A plain state_dict file and an OpenAI-style fp16 TorchScript archive both load."""
    source, _, _ = load_clip(EmbedCfg(**tiny_clip, device="cpu"))
    tiny = tiny_clip["clip_model"]
    half = source.eval().half()  # fp16 like OpenAI's files (and half the bytes to write)
    for p in half.parameters():  # weights unlike the seeded random init
        p.data.mul_(1.5)
    plain = tmp_path / "plain.pt"
    torch.save(half.state_dict(), plain)
    model, _, info = load_clip(EmbedCfg(clip_model=tiny, checkpoint=str(plain), device="cpu"))
    assert info["checkpoint_sha256"] == hashlib.sha256(plain.read_bytes()).hexdigest()
    assert info["random_weights"] is False
    assert torch.equal(model.visual.conv1.weight, half.visual.conv1.weight.float())

    with torch.no_grad():
        archive = torch.jit.trace_module(half, {"encode_text": torch.zeros(1, 77, dtype=torch.long)})
    scripted = tmp_path / "RN50-openai-style.pt"
    torch.jit.save(archive, str(scripted))
    model, _, info = load_clip(EmbedCfg(clip_model=tiny, checkpoint=str(scripted), force_quick_gelu=True,
                                        device="cpu"))
    assert torch.equal(model.visual.conv1.weight, half.visual.conv1.weight.float())
    assert info["force_quick_gelu"] is True


def test_frozen_graph_and_a_preloaded_model_match_eager(images, baseline, cfg_for, tmp_path):
    _, first = baseline
    pids, paths = images[0][:3], images[1][:3]
    cfg = cfg_for(tmp_path, compile="freeze", batch_size=2)
    loaded = load_clip(cfg)  # reused across calls, e.g. by a server
    res = embed_images(pids, paths, cfg, loaded=loaded)
    assert res.info["compile"] == "freeze"
    np.testing.assert_allclose(res.features[CLIP_COLS].to_numpy(),
                               first.features[CLIP_COLS].to_numpy()[:3], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="loaded"):
        embed_images(pids, paths, replace(cfg, force_quick_gelu=True), loaded=loaded)


def test_auto_graph_mode():
    auto, many, few = EmbedCfg().compile, 10_000, 10
    assert clip.graph_mode(auto, "cpu", many) == "freeze"  # tracing pays off
    assert clip.graph_mode(auto, "cpu", few) == "eager"
    assert clip.graph_mode(auto, "cuda", many) == "eager"
    assert clip.graph_mode("inductor", "cpu", few) == "inductor"
    with pytest.raises(ValueError):
        clip.graph_mode("jit", "cpu", few)


@pytest.mark.parametrize("mode, module, attr", [("inductor", torch, "compile"), ("freeze", torch.jit, "trace")])
def test_graph_failure_falls_back_to_eager(images, baseline, cfg_for, monkeypatch, tmp_path, mode, module, attr):
    _, first = baseline

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler / cannot trace")

    monkeypatch.setattr(module, attr, broken)
    pids, paths = images[0][:3], images[1][:3]
    res = embed_images(pids, paths, cfg_for(tmp_path, compile=mode))
    assert res.info["compile"] == "eager" and res.stats["computed"] == 3
    np.testing.assert_allclose(res.features[CLIP_COLS].to_numpy(),
                               first.features[CLIP_COLS].to_numpy()[:3], rtol=1e-4, atol=1e-6)


def test_tiny_clip_is_an_open_clip_model(tiny_clip):
    """smp-tiny is registered with open_clip when a config first names it: spec, transform and model come
    from open_clip as RN50's do."""
    cfg = EmbedCfg(**tiny_clip, device="cpu")
    assert feature_cache.feature_spec(cfg)["embedding_dim"] == 32 and clip.preprocess_for(cfg).transforms[1].size == (64, 64)
    model, _, info = load_clip(cfg)
    assert info["image_size"] == 64 and tiny_clip["clip_model"] in open_clip.list_models()
    assert model.encode_image(torch.zeros(2, 3, 64, 64)).shape == (2, 32)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        feature_cache.feature_spec(replace(cfg, clip_model="smp-huge"))


def test_request_rows_share_one_model(images, baseline, monkeypatch, tmp_path):
    """Request-time features (smp predict, the served model): one model per process, the pipeline's vectors,
    a reason for an image_b64 that is not base64."""
    from smp import image_requests

    cfg, first = baseline
    paths = images[1]
    loads, load = [], image_requests.load_clip
    monkeypatch.setattr(image_requests, "load_clip", lambda c: loads.append(c) or load(c))
    image_requests.shared_clip.cache_clear()
    b64 = base64.b64encode(Path(paths[1]).read_bytes()).decode()
    rows = pd.DataFrame({"Pid": ["a", "b", "c", "d"], "image_b64": [None, b64, "not base64!", None],
                         "image_path": [paths[0], None, None, None]})
    for _ in range(2):  # the first computes, the second is served from the cache
        feats = image_requests.features_for_rows(rows, replace(cfg, cache_dir=str(tmp_path)))
    image_requests.shared_clip.cache_clear()
    assert len(loads) == 1
    assert feats["has_image"].tolist() == [1, 1, 0, 0]
    np.testing.assert_allclose(feats[CLIP_COLS].to_numpy()[:2], first.features[CLIP_COLS].to_numpy()[:2],
                               rtol=1e-4, atol=1e-6)
    assert feats.attrs["bad"].values.tolist() == [["c", "image_b64 is not valid base64"]]


@pytest.mark.slow
def test_rn50_shapes_and_frozen_graph(images, tmp_path):
    """The paper's backbone (random weights): 224 px input, 1024-d vectors; its frozen graph matches eager
    (a mismatch would have fallen back to eager)."""
    pids, paths = images[0][:2], images[1][:2]
    cfg = EmbedCfg(clip_pretrained="none", batch_size=2, num_workers=0, cache_dir=str(tmp_path), progress=False,
                   compile="freeze")
    res = embed_images(pids, paths, cfg)
    rn50_cols = [f"clip_{j}" for j in range(1024)]
    assert list(res.features.columns) == ["Pid", "has_image", *HANDCRAFTED, *rn50_cols]
    assert res.stats["embedding_dim"] == 1024 and res.info["model"] == "RN50" and res.info["image_size"] == 224
    assert res.info["compile"] == "freeze" and res.stats["computed"] == 2
    assert np.isfinite(res.features[rn50_cols].to_numpy()).all()


def test_a_path_with_a_nul_byte_is_one_bad_image_not_a_crash(images, cfg_for, tmp_path):
    from smp.data import resolve_image_path

    pids, paths = images
    nul = str(tmp_path / "a\x00b.jpg")
    res = embed_images([*pids[:2], "nul"], [*paths[:2], nul], cfg_for(tmp_path / "cache"))
    assert res.bad.set_index("Pid").loc["nul", "reason"] == "the path holds a NUL byte"
    assert res.features.set_index("Pid").loc[pids[0], "has_image"] == 1
    # joined to an images root (smp predict --images, load_data): kept as given, for the post's status
    assert resolve_image_path("a\x00b.jpg", tmp_path) == "a\x00b.jpg"
