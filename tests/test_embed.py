"""CLIP + handcrafted embedding pipeline: shapes, determinism, cache, resume, bad images.

Random CLIP weights (clip_pretrained="none"), a few small generated JPEGs and
the cache under tmp_path: nothing is downloaded.
"""

import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import open_clip
import pytest
import torch

from smp import embed
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
CLIP_COLS = [f"clip_{j}" for j in range(1024)]


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


def _cfg(cache_dir, **kw) -> EmbedCfg:
    base = dict(clip_pretrained="none", batch_size=4, num_workers=0, chunk_size=4,
                cache_dir=str(cache_dir), progress=False, compile="none")  # eager: no graph build
    return EmbedCfg(**{**base, **kw})


@pytest.fixture(scope="module")
def baseline(images, tmp_path_factory):
    """One uninterrupted run; returns (cfg, result)."""
    cfg = _cfg(tmp_path_factory.mktemp("cache"))
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
    assert res.stats["embedding_dim"] == 1024 and res.stats["images_per_s"] > 0
    assert res.info["random_weights"] is True and res.info["embedding_dim"] == 1024
    assert res.info["compile"] == "eager"
    chunk_files = list(Path(res.info["cache_dir"]).glob("chunk-*.npz"))
    assert len(chunk_files) == N_GOOD // 4
    assert not list(Path(res.info["cache_dir"]).glob(".tmp-*"))


def test_second_run_is_served_from_cache(images, baseline, monkeypatch, caplog):
    cfg, first = baseline
    monkeypatch.setattr(embed, "load_clip", lambda cfg: pytest.fail("model loaded on a cached run"))
    with caplog.at_level(logging.INFO, logger="smp.embed"):
        again = embed_images(*images, cfg)
    assert again.stats["computed"] == 0 and again.stats["cache_hits"] == N_GOOD
    assert f"all {N_GOOD} images served from cache" in caplog.text
    assert again.features.equals(first.features)
    assert again.bad.equals(first.bad)


def test_workers_and_a_fresh_model_reproduce_the_vectors(images, baseline, tmp_path):
    """Random init is seeded (same vectors from a new model) and workers change nothing."""
    _, first = baseline
    state = torch.random.get_rng_state()
    res = embed_images(*images, _cfg(tmp_path, num_workers=2))
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert res.stats["computed"] == N_GOOD
    np.testing.assert_array_equal(res.features[CLIP_COLS].to_numpy(), first.features[CLIP_COLS].to_numpy())
    np.testing.assert_array_equal(res.features[list(HANDCRAFTED)].to_numpy(),
                                  first.features[list(HANDCRAFTED)].to_numpy())
    assert res.bad.equals(first.bad)


def test_changed_model_or_preprocess_never_reuses_vectors(images, baseline, monkeypatch, tmp_path):
    cfg, first = baseline
    pids, paths = images
    dirs = {embed._cache_dir(c, embed._spec(c)) for c in [
        cfg,
        replace(cfg, clip_model="RN101"),
        replace(cfg, clip_pretrained="openai"),
        replace(cfg, force_quick_gelu=True),
        replace(cfg, checkpoint=str(paths[0])),  # any file: keyed by its sha256
    ]}
    assert len(dirs) == 5
    monkeypatch.setattr(embed, "PREPROCESS_VERSION", "test-bumped")
    res = embed_images(pids[:2], paths[:2], cfg)
    assert res.stats["computed"] == 2 and res.stats["cache_hits"] == 0
    assert res.info["preprocess_version"] == "test-bumped"


def test_interrupted_run_resumes(images, baseline, tmp_path):
    _, first = baseline
    pids, paths = images[0][:5], images[1][:5]
    cfg = _cfg(tmp_path, batch_size=2, chunk_size=2)

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
def test_local_checkpoints_state_dict_and_torchscript(tmp_path):
    """A plain state_dict file and an OpenAI-style fp16 TorchScript archive both load."""
    source, _, _ = load_clip(EmbedCfg(clip_pretrained="none", device="cpu"))
    half = source.eval().half()  # fp16 like OpenAI's files (and half the bytes to write)
    for p in half.parameters():  # weights unlike the seeded random init
        p.data.mul_(1.5)
    plain = tmp_path / "plain.pt"
    torch.save(half.state_dict(), plain)
    model, _, info = load_clip(EmbedCfg(checkpoint=str(plain), device="cpu"))
    assert info["checkpoint_sha256"] and not info["random_weights"]
    assert torch.equal(model.visual.conv1.weight, half.visual.conv1.weight.float())

    with torch.no_grad():
        archive = torch.jit.trace_module(half, {"encode_text": torch.zeros(1, 77, dtype=torch.long)})
    scripted = tmp_path / "RN50-openai-style.pt"
    torch.jit.save(archive, str(scripted))
    model, _, info = load_clip(EmbedCfg(checkpoint=str(scripted), force_quick_gelu=True, device="cpu"))
    assert torch.equal(model.visual.conv1.weight, half.visual.conv1.weight.float())
    assert info["force_quick_gelu"] is True


def test_frozen_graph_and_a_preloaded_model_match_eager(images, baseline, tmp_path):
    _, first = baseline
    pids, paths = images[0][:3], images[1][:3]
    cfg = _cfg(tmp_path, compile="freeze", batch_size=2)
    loaded = load_clip(cfg)  # reused across calls, e.g. by a server
    res = embed_images(pids, paths, cfg, loaded=loaded)
    assert res.info["compile"] == "freeze"
    np.testing.assert_allclose(res.features[CLIP_COLS].to_numpy(),
                               first.features[CLIP_COLS].to_numpy()[:3], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="loaded"):
        embed_images(pids, paths, replace(cfg, force_quick_gelu=True), loaded=loaded)


def test_auto_graph_mode():
    cpu, many, few = EmbedCfg(), 10_000, 10
    assert embed._graph_mode(cpu, "cpu", many) == "freeze"  # tracing pays off
    assert embed._graph_mode(cpu, "cpu", few) == "eager"
    assert embed._graph_mode(cpu, "cuda", many) == "eager"
    assert embed._graph_mode(replace(cpu, compile="inductor"), "cpu", few) == "inductor"
    with pytest.raises(ValueError):
        embed._graph_mode(replace(cpu, compile="jit"), "cpu", few)


@pytest.mark.parametrize("mode, module, attr", [("inductor", torch, "compile"), ("freeze", torch.jit, "trace")])
def test_graph_failure_falls_back_to_eager(images, baseline, monkeypatch, tmp_path, mode, module, attr):
    _, first = baseline

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler / cannot trace")

    monkeypatch.setattr(module, attr, broken)
    pids, paths = images[0][:3], images[1][:3]
    res = embed_images(pids, paths, _cfg(tmp_path, compile=mode))
    assert res.info["compile"] == "eager" and res.stats["computed"] == 3
    np.testing.assert_allclose(res.features[CLIP_COLS].to_numpy(),
                               first.features[CLIP_COLS].to_numpy()[:3], rtol=1e-4, atol=1e-6)
