"""The image-feature cache under bad input: damaged chunk files and runs killed before a full chunk.

smp's tiny CLIP with random weights (the ``tiny_clip`` fixture), six JPEGs of the shared synthetic SMPD
fixture, the cache under tmp_path; one model is loaded per module and passed to every call.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from smp import clip
from smp.data import DataCfg, load_data
from smp.embed import EmbedCfg, EmbedJob, embed_images, load_clip, run_embed
from smp.feature_cache import ChunkWriter, FeatureCache, feature_spec, spec_directory
from smp.image_features import HANDCRAFTED

N = 6
CLIP_COLS = [f"clip_{j}" for j in range(32)]  # smp-tiny's embed_dim
HC_COLS = list(HANDCRAFTED)


@pytest.fixture(scope="module")
def images(smpd_dir) -> tuple[list[str], list[str]]:
    posts = load_data(str(smpd_dir)).head(N)
    return posts["Pid"].astype(str).tolist(), posts["image_path"].tolist()


@pytest.fixture(scope="module")
def cfg_for(tiny_clip):
    """``cfg_for(cache_dir, **overrides)``: the tiny CLIP, eager, in the main process, 2-image chunks."""
    def make(cache_dir, **kw) -> EmbedCfg:
        base = dict(**tiny_clip, batch_size=2, num_workers=0, chunk_size=2, flush_seconds=0.0,
                    cache_dir=str(cache_dir), progress=False, compile="none")
        return EmbedCfg(**{**base, **kw})

    return make


@pytest.fixture(scope="module")
def loaded(cfg_for):
    return load_clip(cfg_for(""))


@pytest.fixture(scope="module")
def reference(images, loaded, cfg_for, tmp_path_factory):
    """Features from one uninterrupted run into a cache of its own."""
    return embed_images(*images, cfg_for(tmp_path_factory.mktemp("ref")), loaded=loaded).features


def _same_features(got, want) -> None:
    assert got["Pid"].tolist() == want["Pid"].tolist()
    assert got["has_image"].tolist() == [1] * N
    np.testing.assert_array_equal(got[HC_COLS].to_numpy(), want[HC_COLS].to_numpy())
    assert np.allclose(got[CLIP_COLS].to_numpy(), want[CLIP_COLS].to_numpy(), rtol=1e-4, atol=1e-6)


def _chunks(cache_dir: str) -> list[Path]:
    return sorted(Path(cache_dir).glob("chunk-*.npz"))


def _member_data_offset(path: Path, member: str) -> int:
    """Where ``member``'s bytes start inside the zip file (after its local header)."""
    with zipfile.ZipFile(path) as z:
        header = z.getinfo(member).header_offset
    with open(path, "rb") as f:
        f.seek(header)
        local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return header + 30 + name_len + extra_len


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _damage(path: Path, how: str) -> None:
    """Damage one chunk file in place, as a crash, a bad disk or a buggy writer might."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "clip_bytes":  # opens fine, the keys read fine; the clip member fails its CRC
        _overwrite(path, _member_data_offset(path, "clip.npy") + 128 + 64, b"\xff" * 16)
    elif how == "clip_header":  # a sound zip (CRCs match) whose clip member is not an .npy array
        with zipfile.ZipFile(path) as z:
            members = {name: z.read(name) for name in z.namelist()}
        members["clip.npy"] = b"garbage!" + members["clip.npy"][8:]
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
    else:  # a well-formed zip whose arrays are wrong
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        if how == "row_mismatch":
            arrays["hc"] = arrays["hc"][:1]
        elif how == "wrong_width":
            arrays["clip"] = arrays["clip"][:, :16]
        elif how == "non_finite":
            arrays["clip"][1, 7] = np.nan
        with open(path, "wb") as f:
            np.savez(f, **arrays)


@pytest.mark.parametrize("how, problem", [
    ("truncated", "BadZipFile"),
    ("clip_bytes", "Bad CRC-32"),
    ("clip_header", "clip is not an .npy array"),
    ("row_mismatch", "hc has 1 rows for 2 keys"),
    ("wrong_width", "clip has 16 columns, expected 32"),
    ("non_finite", "clip has non-finite values"),
])
def test_damaged_chunk_is_set_aside_and_its_images_recomputed(images, loaded, reference, cfg_for, tmp_path, how,
                                                             problem):
    cfg = cfg_for(tmp_path / "cache")
    first = embed_images(*images, cfg, loaded=loaded)
    assert first.stats["computed"] == N and first.stats["damaged_chunks"] == 0
    chunks = _chunks(first.info["cache_dir"])
    assert len(chunks) == N // 2
    victim = chunks[1]
    _damage(victim, how)

    second = embed_images(*images, cfg, loaded=loaded)
    assert second.stats["damaged_chunks"] == 1
    assert second.stats["computed"] == 2 and second.stats["cache_hits"] == N - 2
    [(name, found)] = second.info["damaged_chunks"]
    assert name == victim.name and problem in found
    _same_features(second.features, reference)
    _same_features(first.features, reference)
    aside = victim.with_name(victim.name + ".damaged")
    assert aside.is_file()  # kept for a look, under a name the index never reads
    assert _chunks(first.info["cache_dir"]) == chunks  # same keys -> same chunk name, rewritten

    third = embed_images(*images, cfg, loaded=loaded)
    assert third.stats["damaged_chunks"] == 0 and third.info["damaged_chunks"] == []
    assert third.stats["computed"] == 0 and third.stats["cache_hits"] == N
    assert third.info["compile"] == "not loaded (nothing to compute)"
    _same_features(third.features, reference)


def test_chunk_damaged_after_indexing_is_recomputed_not_fatal(images, loaded, reference, cfg_for, tmp_path,
                                                              monkeypatch):
    """The index was built from a good file that is damaged before its rows are read."""
    cfg = cfg_for(tmp_path / "cache")
    first = embed_images(*images, cfg, loaded=loaded)
    victim = _chunks(first.info["cache_dir"])[0]
    read = FeatureCache.read

    def damage_then_read(self, *args):
        if victim.exists():
            _damage(victim, "clip_bytes")
        return read(self, *args)

    monkeypatch.setattr(FeatureCache, "read", damage_then_read)
    second = embed_images(*images, cfg, loaded=loaded)
    assert second.stats["computed"] == 2 and second.stats["cache_hits"] == N - 2
    assert second.stats["damaged_chunks"] == 1
    [(name, found)] = second.info["damaged_chunks"]
    assert name == victim.name and "Bad CRC-32" in found and "when reading" in found
    _same_features(second.features, reference)

    monkeypatch.setattr(FeatureCache, "read", read)
    third = embed_images(*images, cfg, loaded=loaded)
    assert third.stats["computed"] == 0 and third.stats["damaged_chunks"] == 0
    _same_features(third.features, reference)


@pytest.mark.slow  # an embed job, logged
def test_embed_job_logs_the_damaged_chunk_count(cfg_for, tmp_path):
    from smp.synth import SynthCfg, generate

    data = generate(tmp_path / "smpd", SynthCfg(n=4, seed=1, img_min=32, img_max=48))
    job = EmbedJob(source=DataCfg(data=str(data)), embed=cfg_for(tmp_path / "cache"), experiment="bad-input")
    assert run_embed(job)["damaged_chunks"] == 0
    cache_dir = spec_directory(job.embed.cache_dir, feature_spec(job.embed))
    _damage(_chunks(str(cache_dir))[0], "truncated")
    metrics = run_embed(job)
    assert metrics["damaged_chunks"] == 1 and metrics["computed"] == 2 and metrics["cache_hits"] == 2
    params = mlflow.get_run(metrics.run_id).data.params
    assert params["cache/damaged_chunks"] == "1" and params["cache/computed"] == "2"
    assert params["flush_seconds"] == "0.0"


class _Clock:
    """A fake clock the fake-slow encoder moves on."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_flush_bounds_what_a_kill_loses(images, loaded, reference, cfg_for, tmp_path, monkeypatch):
    """256-image chunks, 10 s per image, a flush every 25 s: killed at the 6th image, 3 are on disk."""
    clock, encode, calls = _Clock(), clip.Encoder.__call__, []

    def slow_then_killed(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 6:
            raise KeyboardInterrupt("simulated kill")
        clock.now += 10.0
        return encode(self, pixels)

    monkeypatch.setattr(clip.Encoder, "__call__", slow_then_killed)
    cfg = cfg_for(tmp_path / "cache", batch_size=1, chunk_size=256, flush_seconds=25.0)
    written = []
    with pytest.raises(KeyboardInterrupt):
        embed_images(*images, cfg, loaded=loaded, clock=clock,
                     on_chunk=lambda info: written.append((info["rows"], info["chunks_written"], info["computed"])))
    assert written == [(3, 1, 3)]  # at t=30 s, 30 s after the start; t=40, 50: 20 s since, not yet due
    [chunk] = _chunks(str(spec_directory(cfg.cache_dir, feature_spec(cfg))))
    with np.load(chunk) as z:
        assert len(z["keys"]) == 3

    monkeypatch.setattr(clip.Encoder, "__call__", encode)
    resumed = embed_images(*images, cfg, loaded=loaded)
    assert resumed.stats["cache_hits"] == 3 and resumed.stats["computed"] == N - 3
    _same_features(resumed.features, reference)


class _Recorder:
    """Stands in for the cache: records the rows of each chunk written."""

    def __init__(self):
        self.rows: list[list[str]] = []

    def write(self, keys, hc, clip, spec) -> str:
        assert hc.shape == (len(keys), 2) and clip.shape == (len(keys), 3)
        self.rows.append(list(keys))
        return f"chunk-{len(self.rows)}"


def _add(writer, keys: str) -> None:
    writer.add(list(keys), np.zeros((len(keys), 2)), np.zeros((len(keys), 3), np.float32))


def test_chunk_writer_writes_by_count_by_time_and_at_the_end():
    clock, cache, infos = _Clock(), _Recorder(), []
    writer = ChunkWriter(cache, {}, chunk_size=4, flush_seconds=10.0, on_chunk=infos.append, clock=clock)
    _add(writer, "abc")
    assert cache.rows == []
    clock.now = 5.0
    _add(writer, "defghi")  # 9 pending: two full chunks, one row left
    assert cache.rows == [list("abcd"), list("efgh")]
    clock.now = 14.0  # 9 s since the last write
    writer.flush(final=False)
    assert len(cache.rows) == 2
    clock.now = 15.0
    writer.flush(final=False)  # due: the one row goes out alone
    assert cache.rows[2:] == [["i"]] and writer.keys == []
    assert infos[-1] == {"path": "chunk-3", "rows": 1, "chunks_written": 3, "computed": 9}

    count_only = ChunkWriter(cache, {}, chunk_size=4, flush_seconds=0.0, clock=clock)
    _add(count_only, "xy")
    clock.now = 1e9
    count_only.flush(final=False)
    assert len(cache.rows) == 3
    count_only.flush(final=True)
    assert cache.rows[3:] == [["x", "y"]]
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkWriter(cache, {}, chunk_size=0, flush_seconds=0.0)
    with pytest.raises(ValueError, match="flush_seconds"):
        ChunkWriter(cache, {}, chunk_size=1, flush_seconds=-1.0)
