"""The ``clip`` text encoder (smp.text_clip.ClipText) on smp's tiny CLIP with random weights: its rows, bounded
inputs, the embedding cache, pickling without the model, and refusals."""

from __future__ import annotations

import pickle
import sqlite3

import numpy as np
import pandas as pd
import pytest
import torch

from smp.data import DataError
from smp.groups import MAX_TITLE_CHARS
from smp.text_clip import ClipText, _tower, encode_trimmed, post_texts

POSTS = pd.DataFrame({
    "Pid": [str(i) for i in range(8)],
    "Title": ["Sunset over the sea", "sea sunset", "Sunset over the sea", "dog park", None, "city lights at night",
              "", "mountain lake"],
    "Alltags": ["sunset sea beach", "sea", "sunset sea beach", "dog", np.nan, "city night", "cat", "lake hiking"],
})


@pytest.fixture
def encoder(tiny_clip):
    """``make(dim=3, **kw)``: a ClipText on the tiny CLIP (random weights)."""
    def make(dim: int = 3, **kw) -> ClipText:
        return ClipText(dim, tiny_clip["clip_model"], tiny_clip["clip_pretrained"], **kw)
    return make


def test_rows_shapes_and_a_post_without_text_is_missing(encoder):
    group = encoder()
    X = group.fit_transform(POSTS, np.zeros(len(POSTS)), seed=0)
    assert X.shape == (8, 3) and X.dtype == np.float32 and group.feature_names_ == ["text_0", "text_1", "text_2"]
    assert np.isnan(X[4]).all() and np.isfinite(np.delete(X, 4, axis=0)).all()  # neither title nor tags
    assert group.facts_["features/text_empty_train"] == 1
    assert group.facts_["features/text_encoder"] == group.identity == "clip:smp-tiny/none"
    np.testing.assert_array_equal(X[0], X[2])  # same text, same row
    assert min(np.abs(X[i] - X[j]).max() for i in (0, 1, 3, 5) for j in (0, 1, 3, 5) if i < j) > 1e-4
    Y = group.transform(POSTS.iloc[[5, 4, 0]])
    assert Y.shape == (3, 3) and Y.dtype == np.float32 and np.isnan(Y[1]).all()
    np.testing.assert_allclose(Y[[0, 2]], X[[5, 0]], rtol=1e-5, atol=1e-6)  # transform = fit's encoding
    assert group.fields == ["Title", "Alltags"]


def test_a_seed_gives_the_same_rows(encoder, tmp_path):
    first = encoder(cache_dir=str(tmp_path / "a")).fit_transform(POSTS, None, seed=7)
    second = encoder(cache_dir=str(tmp_path / "b")).fit_transform(POSTS, None, seed=7)  # computed again
    np.testing.assert_array_equal(first, second)


def test_dim_is_capped_by_the_training_posts(encoder):
    group = encoder(dim=50)
    X = group.fit_transform(POSTS, None)
    assert X.shape == (8, 7)  # 7 posts with text, fewer than 50 components and the 32-d embedding


def test_huge_title_nul_bytes_and_many_tags_are_bounded_and_counted(encoder, monkeypatch):
    posts = pd.DataFrame({
        "Pid": ["0", "1", "2", "3"],
        "Title": ["x" * (MAX_TITLE_CHARS + 10**6), "nul\x00byte title", "short", " ".join(["word"] * 200)],
        "Alltags": ["beach", "a\x00b", " ".join(f"t{i}" for i in range(100_000)), ""],
    })
    texts, cut = post_texts(posts)
    assert "\x00" not in "".join(texts) and max(map(len, texts)) <= 1_000
    assert cut.tolist() == [True, False, True, False]  # the char / tag bounds
    group = encoder()
    X = group.fit_transform(posts, None)
    assert np.isfinite(X).all()
    # 200 words fit the bounds but not the tokenizer's 77 tokens
    assert group.facts_["features/text_truncated_train"] == 3
    group.transform(posts)
    assert group.last_truncated_ == 3  # the tokenizer's cut, also from the cache
    with monkeypatch.context() as m:  # serving's per-post flags tokenize only: no text is encoded again
        m.setattr(ClipText, "_encode", lambda self, texts: pytest.fail("encoded a text to flag its cut"))
        m.setattr(ClipText, "_embed", lambda self, texts: pytest.fail("read the cache to flag a cut"))
        assert group.truncated(posts).tolist() == [True, False, True, True]
        assert group.truncated(posts.assign(Title="", Alltags="")).tolist() == [False] * 4


def test_a_second_fit_encodes_nothing_and_a_damaged_cache_is_recomputed(encoder, tmp_path, monkeypatch):
    first = encoder()
    X = first.fit_transform(POSTS, None)
    assert first.facts_["features/text_cache_hits"] == 0
    second = encoder()
    with monkeypatch.context() as m:
        m.setattr(ClipText, "_encode", lambda self, texts: pytest.fail("encoded a cached text"))
        np.testing.assert_array_equal(second.fit_transform(POSTS, None), X)
    assert second.facts_["features/text_cache_hits"] == 6  # the distinct non-empty texts

    db = next((tmp_path / "cache" / "features" / "text").glob("*/embeddings.sqlite"))
    with sqlite3.connect(db) as con:  # one row of the wrong width: that text is encoded again
        con.execute("UPDATE emb SET vec = ? WHERE rowid = 1", (b"\x00" * 12,))
    third = encoder()  # that text alone in its batch: equal up to float rounding
    np.testing.assert_allclose(third.fit_transform(POSTS, None), X, rtol=1e-4, atol=1e-5)
    assert third.facts_["features/text_cache_hits"] == 5

    db.write_bytes(b"not a database" * 100)  # the whole file: set aside, everything encoded again
    fourth = encoder()
    np.testing.assert_array_equal(fourth.fit_transform(POSTS, None), X)
    assert fourth.facts_["features/text_cache_hits"] == 0
    assert db.with_name("embeddings.sqlite.damaged").exists()
    assert encoder().fit_transform(POSTS, None) is not None and db.exists()  # the new file is written


def test_a_cache_that_cannot_be_written_only_loses_its_speed_up(encoder, tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("")  # the cache root is a file: its folders cannot be made
    group = encoder(cache_dir=str(blocked))
    X = group.fit_transform(POSTS, None)
    assert np.isfinite(np.delete(X, 4, axis=0)).all()
    np.testing.assert_array_equal(group.transform(POSTS), X)
    assert group.last_cache_hits_ == 0


def test_the_pickle_holds_no_model_and_scores_the_same(encoder, tiny_clip):
    group = encoder()
    X = group.fit_transform(POSTS, None)
    blob = pickle.dumps(group)
    model = _tower(group._clip_cfg()).model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(blob) < weights / 100, (len(blob), weights)
    back = pickle.loads(blob)
    assert "_tower" in group.__dict__ and "_tower" not in back.__dict__ and back.identity == group.identity
    np.testing.assert_array_equal(back.transform(POSTS), X)
    fresh = pd.DataFrame({"Pid": ["n"], "Title": ["never seen words"], "Alltags": ["new"]})
    assert np.isfinite(back.transform(fresh)).all()  # not cached: encoded by the process's model


def test_trimmed_encoding_equals_open_clips(encoder):
    tower = _tower(encoder()._clip_cfg())
    tokens = tower.tokenizer(["a", "sunset over the sea", " ".join(["word"] * 100)])
    with torch.inference_mode():
        full = tower.model.encode_text(tokens)
        short = tower.tokenizer(["a", "sunset over the sea"])
        np.testing.assert_allclose(encode_trimmed(tower.model, short, 0), full[:2], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(encode_trimmed(tower.model, tokens, 0), full, rtol=1e-5, atol=1e-5)


def test_posts_without_title_and_tags_are_refused_naming_the_group(encoder):
    posts = pd.DataFrame({"Pid": ["1", "2"], "Title": [None, "  "]})
    posts.attrs["source"] = "posts.csv"
    with pytest.raises(DataError, match=r"group 'text' reads Title or Alltags, which posts.csv lacks.*"
                                        r"missing or empty: Title, Alltags"):
        encoder().check(posts)
    with pytest.raises(DataError, match=r"group 'text' reads Title or Alltags"):
        encoder().fit_transform(posts, None)
