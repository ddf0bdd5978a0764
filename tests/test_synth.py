"""Synthetic SMPD generator: layout, formats, determinism, calibration, text signal, broken images, cache."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import pathlib
import re

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from smp import synth
from smp.config import ConfigError
from smp.synth import SynthCfg, demo_data_dir, draw_posts, generate

CFG = SynthCfg(n=48, seed=3, img_min=40, img_max=72)
JSON_FILES = (
    "train_category.json",
    "train_temporalspatial_information.json",
    "train_additional_information.json",
    "train_text.json",
)
ALL_FILES = JSON_FILES + ("train_user_data.json", "train_label.txt", "train_img_filepath.txt")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> pathlib.Path:
    return generate(tmp_path_factory.mktemp("synth") / "smpd", CFG)


def _load(root: pathlib.Path, name: str):
    return json.loads((root / name).read_text(encoding="utf-8"))


def _lines(root: pathlib.Path, name: str) -> list[str]:
    return (root / name).read_text().splitlines()


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------- layout ----
def test_every_file_has_n_entries_in_the_same_order(out):
    assert sorted(p.name for p in out.iterdir()) == sorted(ALL_FILES + ("train",))
    ids = [(r["Uid"], r["Pid"]) for r in _load(out, "train_category.json")]
    assert len(ids) == CFG.n
    for name in JSON_FILES[1:]:
        assert [(r["Uid"], r["Pid"]) for r in _load(out, name)] == ids
    users = _load(out, "train_user_data.json")
    assert set(users) == {"Uid", "Pid", "photo_count", "ispro", "canbuypro", "photo_firstdate",
                          "photo_firstdatetaken", "timezone_offset", "timezone_id"}
    for col in users.values():
        assert list(col) == [str(i) for i in range(CFG.n)]
    assert list(zip(users["Uid"].values(), users["Pid"].values())) == ids
    assert len(_lines(out, "train_label.txt")) == CFG.n
    assert _lines(out, "train_img_filepath.txt") == [f"train/{u}/{p}.jpg" for u, p in ids]


def test_ids_and_field_formats(out):
    cat = _load(out, "train_category.json")
    pids = [r["Pid"] for r in cat]
    assert len(set(pids)) == len(pids) and all(p.isdigit() for p in pids)
    assert all(re.fullmatch(r"\d+@N\d\d", r["Uid"]) for r in cat)
    assert len({r["Uid"] for r in cat}) > 1
    for r in cat:
        assert r["Category"] in synth.CATEGORY_FREQ
        assert r["Concept"] in synth.SUBCATEGORIES[r["Category"]][r["Subcategory"]][2]

    ts = _load(out, "train_temporalspatial_information.json")
    dates = [int(r["Postdate"]) for r in ts]
    assert dates == sorted(dates)  # the official order is chronological
    lo, hi = (int(dt.datetime(*d, tzinfo=dt.timezone.utc).timestamp()) for d in ((2015, 1, 1), (2016, 4, 1)))
    assert lo <= min(dates) and max(dates) < hi
    for r in ts:
        assert 0 <= int(r["Geoaccuracy"]) <= 16
        assert (r["Latitude"] == "0") == (r["Longitude"] == "0") == (r["Geoaccuracy"] == "0")
        float(r["Latitude"]), float(r["Longitude"])

    extra = _load(out, "train_additional_information.json")
    assert all(r["Mediastatus"] == "ready" and r["Ispublic"] == 1 for r in extra)
    text = _load(out, "train_text.json")
    assert all(r["Mediatype"] == "photo" for r in text)
    tags = [r["Alltags"].split() for r in text]
    assert all(len(t) == len(set(t)) for t in tags)
    assert len({len(t) for t in tags}) > 5  # tag counts vary widely

    users = _load(out, "train_user_data.json")
    assert all(re.fullmatch(r"[+-]\d\d:\d\d", v) for v in users["timezone_offset"].values())
    assert all(isinstance(v, int) and v >= 1 for v in users["photo_count"].values())
    assert all(int(v) < lo for v in users["photo_firstdate"].values())
    labels = [float(x) for x in _lines(out, "train_label.txt")]
    assert all(1.0 <= x <= 16.6 for x in labels)


def test_user_fields_are_repeated_per_post_of_the_same_user(out):
    users = _load(out, "train_user_data.json")
    seen = {}
    for i, uid in users["Uid"].items():
        row = tuple(users[c][i] for c in ("photo_count", "ispro", "photo_firstdate", "timezone_id"))
        assert seen.setdefault(uid, row) == row
    assert len(seen) < CFG.n  # some users post more than once


def test_images_decode_with_sides_in_range(out):
    for rel in _lines(out, "train_img_filepath.txt"):
        img = cv2.imread(str(out / rel))
        assert img is not None and img.dtype == np.uint8 and img.shape[2] == 3
        assert CFG.img_min <= img.shape[0] <= CFG.img_max and CFG.img_min <= img.shape[1] <= CFG.img_max


def test_files_match_draw_posts(out):
    posts = draw_posts(CFG)
    assert posts["Pid"].tolist() == [r["Pid"] for r in _load(out, "train_category.json")]
    assert [f"{x:.2f}" for x in posts["label"]] == _lines(out, "train_label.txt")
    assert (posts["image_kind"] == "ok").all()


# --------------------------------------------------------- determinism ----
def test_same_seed_same_bytes_other_seed_differs(out, tmp_path):
    again = generate(tmp_path / "again", CFG)
    for name in ALL_FILES:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    for rel in _lines(out, "train_img_filepath.txt")[::9]:
        assert _digest(again / rel) == _digest(out / rel)

    other = generate(tmp_path / "other", SynthCfg(n=CFG.n, seed=CFG.seed + 1, img_min=40, img_max=72))
    assert (other / "train_label.txt").read_bytes() != (out / "train_label.txt").read_bytes()
    assert (other / "train_category.json").read_bytes() != (out / "train_category.json").read_bytes()


# ----------------------------------------------------- label behaviour ----
@pytest.fixture(scope="module")
def big():
    return draw_posts(SynthCfg(n=1500, seed=11))


def test_label_calibrated_to_real_marginals(big):
    y = big["label"]
    assert abs(y.mean() - 6.4) < 0.4 and abs(y.std() - 2.5) < 0.4
    assert y.min() >= 1.0 and y.max() <= 16.6
    shares = big["Category"].value_counts(normalize=True)
    assert shares.index[0] == max(synth.CATEGORY_FREQ, key=synth.CATEGORY_FREQ.get)
    for cat, freq in synth.CATEGORY_FREQ.items():
        assert abs(shares.get(cat, 0.0) - freq) < 4 * np.sqrt(freq * (1 - freq) / len(big)) + 1e-3


def test_hidden_score_matches_the_documented_formula(big):
    p = big
    t = p["Postdate"].map(lambda s: dt.datetime.fromtimestamp(s, dt.timezone.utc))
    wd, month, hour = (t.map(f).to_numpy() for f in (dt.datetime.weekday, lambda d: d.month, lambda d: d.hour))
    user = 1.40 * p["latent_quality"] + 0.55 * (np.log(p["photo_count"]) - 6.8) + 0.40 * (p["ispro"] - 0.2)
    time = (0.30 * ((wd >= 5) - 0.29) + 0.35 * (np.cos(2 * np.pi * (month - 4) / 12) + 0.16)
            + 0.30 * (((17 <= hour) & (hour <= 22)) - 0.08))
    content = [synth.CATEGORY_EFFECT[c] + synth.SUBCATEGORIES[c][s][1]
               + synth.CONCEPT_EFFECT[synth.SUBCATEGORIES[c][s][2].index(k)]
               for c, s, k in zip(p["Category"], p["Subcategory"], p["Concept"])]
    tags = 0.90 * (np.log1p(p["tag_count"]) - 2.75)
    image = (2.4 * (p["latent_brightness"] - 0.5) + 1.9 * (p["latent_colourfulness"] - 0.5)
             + 2.6 * (p["latent_sharpness"] - 0.5) + 0.50 * (p["latent_centred"] - 0.4))
    score = user + time + np.asarray(content) + tags + image
    np.testing.assert_allclose(synth.hidden_score(p), score, atol=1e-9)

    resid = (p["label"] - (6.40 + score - score.mean()))[(p["label"] > 1.0) & (p["label"] < 16.6)]
    assert abs(resid.std() - synth.NOISE_SD) < 0.1  # best possible RMSE about 1.0
    assert p["tag_count"].tolist() == [len(a.split()) for a in p["Alltags"]]


def test_image_part_carries_a_fifth_of_the_variance(big):
    parts = synth.score_components(big)
    share = parts["image"].var() / big["label"].var()
    assert 0.15 < share < 0.30
    assert np.corrcoef(parts["image"], big["label"])[0, 1] > 0.35
    # brighter, more colourful, sharper -> higher score, all else equal
    base = synth.image_score(0.5, 0.5, 0.5, 0)
    assert synth.image_score(0.9, 0.5, 0.5, 0) > base
    assert synth.image_score(0.5, 0.9, 0.5, 0) > base
    assert synth.image_score(0.5, 0.5, 0.9, 0) > base
    bright = big["latent_brightness"] > 0.5
    assert big.loc[bright, "label"].mean() > big.loc[~bright, "label"].mean() + 0.3


def test_rendered_images_show_their_latents(out):
    posts = draw_posts(CFG)
    grey, sharp, colour = [], [], []
    for rel in posts["img_path"]:
        img = cv2.imread(str(out / rel))
        g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        grey.append(g.mean())
        sharp.append(np.log1p(cv2.Laplacian(g, cv2.CV_64F).var()))
        colour.append(cv2.cvtColor(img, cv2.COLOR_BGR2HSV)[..., 1].astype(float).std()
                      + img.astype(float).std(axis=2).mean())

    def rank_corr(a, b):
        return np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]

    assert rank_corr(grey, posts["latent_brightness"]) > 0.9
    assert rank_corr(sharp, posts["latent_sharpness"]) > 0.7
    assert rank_corr(colour, posts["latent_colourfulness"]) > 0.5


def test_blurred_render_is_less_sharp():
    args = dict(w=96, h=80, brightness=0.5, colourfulness=0.5, centred=1, seed=7)
    lap = [cv2.Laplacian(cv2.cvtColor(synth.render_image(sharpness=s, **args), cv2.COLOR_BGR2GRAY),
                         cv2.CV_64F).var() for s in (0.05, 0.95)]
    assert lap[0] < lap[1] / 10


# -------------------------------------------------- text signal (v2) ----
# sha256 of the seven tables, then of every image, of SynthCfg(n=300, seed=0, img_min=32, img_max=48) as
# written by the generator before data version 2 existed: version 1 must keep these bytes.
V1_TABLES_SHA256 = "94f2d6ea13ed4a1021cf4968b09f9f91211585bfd1abdb9e0427e4bc45207e6c"
V1_ALL_SHA256 = "5c0069b7d0d888d41b42685bb6b6424f781c45d1ce156ce98ea30ff22de3541c"


def test_version_1_reproduces_the_original_generator(tmp_path):
    root = generate(tmp_path / "v1", SynthCfg(n=300, seed=0, img_min=32, img_max=48, data_version=1))
    h = hashlib.sha256()
    for name in ALL_FILES:
        h.update((root / name).read_bytes())
    assert h.hexdigest() == V1_TABLES_SHA256
    for rel in _lines(root, "train_img_filepath.txt"):
        h.update((root / rel).read_bytes())
    assert h.hexdigest() == V1_ALL_SHA256


def test_version_2_changes_only_which_words_appear(tmp_path):
    cfg = dict(n=200, seed=4, img_min=32, img_max=48, bad_images=4)
    v1, v2 = (draw_posts(SynthCfg(**cfg, data_version=v)) for v in (1, 2))
    assert SynthCfg().data_version == 2
    assert set(v2.columns) == set(v1.columns) | {"latent_topic"}
    same = [c for c in v1.columns if c not in ("Title", "Alltags")]
    pd.testing.assert_frame_equal(v1[same], v2[same])
    # counts the tabular features read: words and characters of the title, tags
    for f in (lambda t: t.str.split().str.len(), lambda t: t.str.len()):
        assert f(v1["Title"]).tolist() == f(v2["Title"]).tolist()
    assert v2["tag_count"].tolist() == [len(a.split()) for a in v2["Alltags"]]
    assert all(len(set(a.split())) == len(a.split()) for a in v2["Alltags"])
    own = [a.split()[:2] for a in v1["Alltags"]]  # concept and subcategory tags stay first
    assert own == [a.split()[:2] for a in v2["Alltags"]]
    assert (v1["Title"] != v2["Title"]).mean() > 0.3 and (v1["Alltags"] != v2["Alltags"]).mean() > 0.5

    # the written files: only train_text.json differs, images included
    a, b = (generate(tmp_path / f"v{v}", SynthCfg(**cfg, data_version=v)) for v in (1, 2))
    for name in ALL_FILES:
        assert ((a / name).read_bytes() == (b / name).read_bytes()) == (name != "train_text.json"), name
    for rel in _lines(a, "train_img_filepath.txt"):
        assert (a / rel).exists() == (b / rel).exists()
        if (a / rel).exists():
            assert _digest(a / rel) == _digest(b / rel)


def test_topic_words_name_their_topic_and_keep_lengths():
    taken = set(synth.GENERIC_TAGS) | set(synth.TITLE_WORDS)
    for cat, subs in synth.SUBCATEGORIES.items():
        taken.add(cat.split("&")[0].lower())
        for sub, (_, _, concepts) in subs.items():
            taken |= {sub.lower().replace("&", ""), *concepts}
    words = [w for topic in synth.TOPIC_WORDS for w in topic]
    assert len(set(words)) == len(words) and not set(words) & taken
    for topic in synth.TOPIC_WORDS:  # one word per length, so a title word swaps for one of its own length
        assert sorted(len(w) for w in topic) == list(range(3, 9))
    assert all(len(w) <= 8 for w in synth.TITLE_WORDS)
    effect = np.asarray(synth.TOPIC_EFFECT)
    assert len(effect) == len(synth.TOPIC_WORDS) and (np.diff(effect) > 0).all()
    np.testing.assert_allclose(effect, -effect[::-1], atol=1e-12)


@pytest.fixture(scope="module")
def text_draws():
    return {v: draw_posts(SynthCfg(n=4000, seed=21, data_version=v)) for v in (1, 2)}


def _noise(posts) -> np.ndarray:
    score = synth.hidden_score(posts)
    return posts["label"].to_numpy() - (synth.LABEL_MEAN + score - score.mean())


def test_text_effect_carries_the_documented_share(text_draws):
    v1, v2 = text_draws[1], text_draws[2]
    assert not synth.text_effect(v1).any()
    effect = synth.text_effect(v2)
    share = effect.var() / v2["label"].var()
    assert abs(share - 0.076) < 0.015  # the module docstring's 0.076 (50,000 posts)
    # the effect is the topic's mean noise, and what is left has none
    noise = _noise(v2)
    means = pd.Series(noise).groupby(v2["latent_topic"].to_numpy()).mean()
    np.testing.assert_allclose(means.to_numpy(), synth.TOPIC_EFFECT, atol=0.15)
    assert abs(np.corrcoef(effect, noise - effect)[0, 1]) < 0.05


def test_words_predict_the_noise_under_version_2_only(text_draws):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    r2 = {}
    for v, posts in text_draws.items():
        words = CountVectorizer(binary=True).fit_transform(posts["Title"] + " " + posts["Alltags"])
        noise, half = _noise(posts), len(posts) // 2
        model = Ridge(alpha=10.0).fit(words[:half], noise[:half])
        r2[v] = r2_score(noise[half:], model.predict(words[half:]))
    assert r2[1] < 0.02 and r2[2] > 0.2, r2


def test_bad_data_version_is_refused(tmp_path):
    for bad in (0, 3):
        with pytest.raises(ConfigError, match="data_version"):
            SynthCfg(data_version=bad)
        with pytest.raises(ConfigError, match="data_version"):
            demo_data_dir(n=8, cache_dir=tmp_path / "c", data_version=bad)
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------- broken images ----
def test_bad_images_cover_the_four_kinds(tmp_path):
    cfg = SynthCfg(n=12, seed=5, img_min=32, img_max=48, bad_images=4)
    root = generate(tmp_path / "bad", cfg)
    posts = draw_posts(cfg)
    assert sorted(posts["image_kind"].value_counts().items()) == sorted(
        [("ok", 8)] + [(k, 1) for k in synth.BAD_KINDS])
    found = set()
    for rel in _lines(root, "train_img_filepath.txt"):
        path = root / rel
        if not path.exists():
            found.add("missing")
            continue
        data = path.read_bytes()
        if not data:
            found.add("empty")
        elif not data.startswith(b"\xff\xd8"):
            assert cv2.imread(str(path)) is None
            found.add("not_image")
        elif not data.endswith(b"\xff\xd9"):
            with pytest.raises(OSError), Image.open(path) as im:
                im.load()
            found.add("truncated")
    assert found == set(synth.BAD_KINDS)
    # broken images change nothing else: metadata and labels as without them
    clean = generate(tmp_path / "clean", SynthCfg(n=12, seed=5, img_min=32, img_max=48))
    for name in ALL_FILES:
        assert (clean / name).read_bytes() == (root / name).read_bytes(), name


def test_bad_cfg_is_refused():
    with pytest.raises(ValueError):
        draw_posts(SynthCfg(n=3, bad_images=4))
    with pytest.raises(ValueError):
        draw_posts(SynthCfg(n=3, img_min=50, img_max=40))


# ---------------------------------------------------------- demo cache ----
def test_demo_data_dir_generates_once_then_reuses(tmp_path, monkeypatch):
    path = demo_data_dir(n=16, seed=2, cache_dir=tmp_path / "c")
    assert path == tmp_path / "c" / f"demo-n16-s2-v{synth.DATA_VERSION}"
    assert len(_lines(path, "train_label.txt")) == 16
    assert [p.name for p in (tmp_path / "c").iterdir()] == [path.name]  # no temp dir left
    mtime = (path / "train_label.txt").stat().st_mtime_ns

    monkeypatch.setattr(synth, "generate", lambda *a, **k: pytest.fail("regenerated"))
    assert demo_data_dir(n=16, seed=2, cache_dir=tmp_path / "c") == path
    assert (path / "train_label.txt").stat().st_mtime_ns == mtime


def test_demo_data_dir_keys_on_the_data_version(tmp_path):
    v1 = demo_data_dir(n=16, seed=2, cache_dir=tmp_path, data_version=1)
    v2 = demo_data_dir(n=16, seed=2, cache_dir=tmp_path)
    assert (v1.name, v2.name) == ("demo-n16-s2-v1", "demo-n16-s2-v2")
    assert (v1 / "train_label.txt").read_bytes() == (v2 / "train_label.txt").read_bytes()
    assert (v1 / "train_text.json").read_bytes() != (v2 / "train_text.json").read_bytes()


def test_demo_data_dir_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("SMP_CACHE_DIR", str(tmp_path / "env"))
    assert demo_data_dir(n=8).parent == tmp_path / "env"
    monkeypatch.delenv("SMP_CACHE_DIR")
    monkeypatch.chdir(tmp_path)
    path = demo_data_dir(n=8)
    assert path.is_absolute() and path.resolve().parent == (tmp_path / ".smp_cache").resolve()


def test_demo_data_dir_leaves_nothing_when_generation_dies(tmp_path, monkeypatch):
    def dies(out_dir, cfg):
        (pathlib.Path(out_dir) / "train_label.txt").write_text("1.00\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "generate", dies)
    with pytest.raises(KeyboardInterrupt):
        demo_data_dir(n=8, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []
