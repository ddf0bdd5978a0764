"""Data checks: SMPD directory and posts-table loaders, bad input, splits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from smp.config import ConfigError
from smp.data import DataError, data_hash, labelled, load_data, load_posts_table, load_smpd_dir
from smp.splits import SplitCfg, split_indices, subsample


def _write(path, obj):
    path.write_text(json.dumps(obj))


def _mini_dir(tmp_path, user_format="columns"):
    """Three posts in the official layout, values as strings like the real JSON."""
    root = tmp_path / "mini"
    root.mkdir()
    uids = ["1@N01", "1@N01", "2@N02"]
    pids = ["11", "12", "13"]
    _write(root / "train_category.json", [
        {"Uid": u, "Pid": p, "Category": c, "Subcategory": s, "Concept": k}
        for u, p, c, s, k in zip(uids, pids, ["Fashion", "Travel", "Fashion"], ["Fashion", "Soccer", "Glam"],
                                 ["gloss", "goal", "gloss"])])
    _write(root / "train_temporalspatial_information.json", [
        {"Uid": u, "Pid": p, "Postdate": d, "Latitude": "0", "Longitude": lo, "Geoaccuracy": "0"}
        for u, p, d, lo in zip(uids, pids, ["1446016778", "1446103178", "1446189578"], ["0", "2.5", "0"])])
    _write(root / "train_text.json", [
        {"Uid": u, "Pid": p, "Title": t, "Mediatype": "photo", "Alltags": a}
        for u, p, t, a in zip(uids, pids, ["a title", "", "x"], ["a b c", "", "d"])])
    user = {"Uid": uids, "Pid": pids, "photo_count": ["10", "10", "300"], "ispro": ["0", "0", "1"],
            "timezone_offset": ["+08:00", "+08:00", "-05:30"]}
    if user_format == "columns":
        _write(root / "train_user_data.json", {k: {str(i): v for i, v in enumerate(vs)} for k, vs in user.items()})
    else:
        _write(root / "train_user_data.json", [dict(zip(user, row)) for row in zip(*user.values())])
    (root / "train_label.txt").write_text("7.5\n3.25\n10\n")
    (root / "train_img_filepath.txt").write_text("\n".join(f"train/{u}/{p}.jpg" for u, p in zip(uids, pids)) + "\n")
    return root


@pytest.mark.parametrize("user_format", ["columns", "records"])
def test_smpd_dir_parses_strings_and_keeps_order(tmp_path, user_format):
    df = load_smpd_dir(_mini_dir(tmp_path, user_format))
    assert df["Pid"].tolist() == ["11", "12", "13"]
    assert df["Postdate"].tolist() == [1446016778, 1446103178, 1446189578]
    assert df["photo_count"].tolist() == [10, 10, 300]
    assert df["ispro"].tolist() == [0, 0, 1]
    assert df["timezone_offset"].tolist() == [8.0, 8.0, -5.5]
    assert df["label"].tolist() == [7.5, 3.25, 10.0]
    assert df["Longitude"].tolist() == [0.0, 2.5, 0.0]
    assert df["image_path"].iloc[0].endswith("mini/train/1@N01/11.jpg")


def test_absent_optional_file_leaves_columns_absent(tmp_path):
    root = _mini_dir(tmp_path)
    (root / "train_user_data.json").unlink()
    (root / "train_label.txt").unlink()
    df = load_smpd_dir(root)
    assert "photo_count" not in df.columns and "ispro" not in df.columns and "label" not in df.columns
    with pytest.raises(DataError, match="label"):
        labelled(df)


def test_images_root_given_separately(tmp_path):
    df = load_smpd_dir(_mini_dir(tmp_path), images_root=tmp_path / "imgs")
    assert df["image_path"].iloc[2] == str((tmp_path / "imgs/train/2@N02/13.jpg").resolve())


def test_missing_field_values_become_nan_not_zero(tmp_path):
    root = _mini_dir(tmp_path)
    user = json.loads((root / "train_user_data.json").read_text())
    user["photo_count"]["1"] = "n/a"
    user["photo_count"]["2"] = ""
    _write(root / "train_user_data.json", user)
    df = load_smpd_dir(root)
    assert df["photo_count"].iloc[0] == 10
    assert np.isnan(df["photo_count"].iloc[1]) and np.isnan(df["photo_count"].iloc[2])
    assert df.attrs["parse_issues"] == {"photo_count:unparseable": 1}


def test_missing_label_rows_excluded_and_counted(tmp_path):
    root = _mini_dir(tmp_path)
    (root / "train_label.txt").write_text("7.5\nnan\n10\n")
    df, n_missing = labelled(load_smpd_dir(root))
    assert n_missing == 1 and df["Pid"].tolist() == ["11", "13"]


@pytest.mark.parametrize("breakage, message", [
    ("no_category", "train_category.json: required file is missing"),
    ("bad_json", "train_text.json: malformed JSON"),
    ("label_count", "train_label.txt: 2 lines but train_category.json has 3 posts"),
    ("label_text", "train_label.txt: 1 lines are not numbers"),
    ("dup_pid", "duplicate Pid"),
    ("img_count", "train_img_filepath.txt: 4 lines"),
])
def test_bad_smpd_dir_errors_name_file_and_problem(tmp_path, breakage, message):
    root = _mini_dir(tmp_path)
    if breakage == "no_category":
        (root / "train_category.json").unlink()
    elif breakage == "bad_json":
        (root / "train_text.json").write_text('[{"Uid": "1@N01", "Pid": ')
    elif breakage == "label_count":
        (root / "train_label.txt").write_text("1\n2\n")
    elif breakage == "label_text":
        (root / "train_label.txt").write_text("1\nabc\n2\n")
    elif breakage == "dup_pid":
        cat = json.loads((root / "train_category.json").read_text())
        cat[2]["Pid"] = "11"
        _write(root / "train_category.json", cat)
    elif breakage == "img_count":
        (root / "train_img_filepath.txt").write_text("a\nb\nc\nd\n")
    with pytest.raises(DataError, match=message):
        load_smpd_dir(root)


def test_posts_table_csv_parquet_json(tmp_path):
    df = pd.DataFrame({"Pid": [1, 2, 3], "Category": ["A", "B", None], "Postdate": [1.4e9, 1.5e9, np.nan],
                       "tag_count": [3, 0, 5], "label": [5.0, np.nan, 7.0]})
    df.to_csv(tmp_path / "p.csv", index=False)
    df.to_parquet(tmp_path / "p.parquet")
    df.to_json(tmp_path / "p.json", orient="records")
    for name in ("p.csv", "p.parquet", "p.json"):
        out = load_data(str(tmp_path / name))
        assert out["Pid"].tolist() == ["1", "2", "3"], name
        assert np.isnan(out["Postdate"].iloc[2]) and out["tag_count"].tolist() == [3, 0, 5]
        assert "Uid" not in out.columns
    assert data_hash(load_data(str(tmp_path / "p.csv"))) == data_hash(load_data(str(tmp_path / "p.parquet")))


def test_posts_table_bad_inputs(tmp_path):
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"p.xlsx: unknown extension '.xlsx'"):
        load_posts_table(tmp_path / "p.xlsx")
    pd.DataFrame({"Category": ["A"]}).to_csv(tmp_path / "nopid.csv", index=False)
    with pytest.raises(DataError, match=r"nopid.csv: missing required field\(s\) \['Pid'\]"):
        load_posts_table(tmp_path / "nopid.csv")
    pd.DataFrame({"Pid": [1, 1]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match="dup.csv: 1 duplicate Pid"):
        load_posts_table(tmp_path / "dup.csv")
    with pytest.raises(DataError, match="no such file"):
        load_data(str(tmp_path / "absent.csv"))


def test_generated_smpd_dir_loads_completely(smpd_dir):
    df = load_smpd_dir(smpd_dir)
    assert len(df) == 160 and df["Pid"].is_unique
    for col in ("Uid", "Category", "Postdate", "Alltags", "photo_count", "ispro", "label", "image_path"):
        assert col in df.columns and df[col].notna().all(), col
    assert df.attrs["parse_issues"] == {}


def _frame(n, seed=0, users=None):
    rng = np.random.default_rng(seed)
    data = {"Pid": [str(i) for i in range(n)], "Postdate": rng.uniform(1.42e9, 1.46e9, n), "label": rng.normal(6, 2, n)}
    if users:
        data["Uid"] = [f"u{i}" for i in rng.integers(0, users, n)]
    return pd.DataFrame(data)


def test_random_split_paper_proportions():
    parts = split_indices(_frame(80000), SplitCfg(split="random"))
    assert {k: len(v) for k, v in parts.items()} == {"train": 64800, "val": 7200, "test": 8000}
    allidx = np.concatenate(list(parts.values()))
    assert len(np.unique(allidx)) == 80000


def test_chrono_split_test_is_latest():
    df = _frame(1000)
    parts = split_indices(df, SplitCfg(split="chrono"))
    d = df["Postdate"].to_numpy()
    assert len(parts["test"]) == 100 and len(parts["val"]) == 90
    assert d[parts["test"]].min() >= d[parts["val"]].max() >= d[parts["train"]].max()


def test_user_split_no_overlap_and_clear_error():
    df = _frame(2000, users=150)
    parts = split_indices(df, SplitCfg(split="user", seed=4))
    sides = [set(df["Uid"].iloc[parts[k]]) for k in ("train", "val", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert 0.06 < len(parts["test"]) / 2000 < 0.16
    with pytest.raises(DataError, match="split=user needs the Uid field"):
        split_indices(_frame(100), SplitCfg(split="user"))
    with pytest.raises(ConfigError, match=r"split='bogus': expected one of random, chrono, user"):
        SplitCfg(split="bogus")  # refused when the config is built, before any data


def test_subsample_is_seeded_and_sized():
    df = _frame(500)
    a, b, c = subsample(df, 100, 1), subsample(df, 100, 1), subsample(df, 100, 2)
    assert len(a) == 100 and a["Pid"].tolist() == b["Pid"].tolist() != c["Pid"].tolist()
    assert len(subsample(df, 0, 1)) == 500
