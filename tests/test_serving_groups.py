"""Raw-post serving of models with feature groups (``smp.groups``: user history, text, time): the request's
``Uid`` as text or a number, per-post statuses ``partial: unseen user`` / ``partial: text truncated``, an input
schema listing every field a group reads, and bad text or ids scored, never refused. The statuses of models
without these groups are unchanged (``ok``)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from smp.data import load_data
from smp.groups import MAX_TAG_CHARS, MAX_TAGS, MAX_TITLE_CHARS, FeaturesCfg, HashedText
from smp.models import BenchmarkModel, Part
from smp.packaging import input_columns
from smp.scoring import note_counts
from smp.serving import (PopularityModel, RequestError, coerce_request, group_notes,
                         uid_text)
from smp.synth import SynthCfg, draw_posts

UNSEEN = "partial: unseen user"
CUT = "partial: text truncated"
ALL_GROUPS = "tabular,time,user,text"
HUGE_TAGS = " ".join(f"t{i}" for i in range(100_000))  # 100,000 tags, ~590 KB
HUGE_TITLE = ("a\x00" * 500_000)  # 1 MB of title, half of it NUL bytes


# --------------------------------------------------------------------------- request coercion and the notes
def test_uid_as_int_str_or_float_is_one_user_and_blank_is_none():
    assert uid_text(pd.Series([12, 13])).tolist() == ["12", "13"]                        # an int64 column
    assert uid_text(pd.Series([12.0, np.nan])).tolist() == ["12", None]                  # a float column
    assert uid_text(pd.Series(["12", " 12 ", "", "  ", None, np.nan, "nan", "7@N01"], dtype=object)).tolist() \
        == ["12", "12", None, None, None, None, None, "7@N01"]
    assert uid_text(pd.Series([12, "12", 12.0, np.float32(12), np.float32("nan")], dtype=object)).tolist() \
        == ["12", "12", "12", "12", None]
    frame = coerce_request(pd.DataFrame({"Pid": ["1", "2", "3", "4"], "Uid": [12, "12", 12.0, None]}))
    assert frame["Uid"].tolist() == ["12", "12", "12", None]
    with pytest.raises(RequestError, match=r"column 'Uid': expected a user id \(text or a number\), got a list "
                                           r"\(Pid '2'\)"):
        coerce_request(pd.DataFrame({"Pid": ["1", "2"], "Uid": ["12", ["12"]]}))


def test_the_text_group_flags_each_post_it_cuts():
    """Per post, the rule ``HashedText`` counts by (``last_truncated_``): title over ``MAX_TITLE_CHARS``, tags
    over ``MAX_TAG_CHARS`` characters or ``MAX_TAGS`` tags; NUL bytes alone and missing text are not cut."""
    posts = pd.DataFrame({
        "Title": ["short", "x" * (MAX_TITLE_CHARS + 1), "x" * MAX_TITLE_CHARS, "nul\x00byte", HUGE_TITLE, None,
                  np.nan, 12345, ""],
        "Alltags": ["a b", None, "t " * MAX_TAGS, "t " * (MAX_TAGS + 1), "a", "y" * (MAX_TAG_CHARS + 1), HUGE_TAGS,
                    np.nan, ""]})
    train = draw_posts(SynthCfg(n=60, seed=0))
    text = HashedText(dim=4)
    text.fit_transform(train, train["label"].to_numpy())
    cut = text.truncated(posts)
    assert cut.tolist() == [False, True, False, True, True, True, True, False, False]
    text.transform(posts)
    assert text.last_truncated_ == int(cut.sum())  # the same rule as the encoder's own count


def test_note_counts_count_the_group_notes_among_other_notes():
    status = ["ok", UNSEEN, f"{UNSEEN}; text truncated", "partial: tag_count=-3 out of range [0, 10000]; treated "
              "as missing; unseen user", CUT, "error: the model returned no finite prediction"]
    assert note_counts(status) == {"unseen_user_rows": 3, "text_truncated_rows": 2}


def test_input_columns_list_the_group_fields_the_example_lacks():
    example = pd.DataFrame({"Pid": ["1"], "Postdate": [1.4e9], "Alltags": ["a"]})
    assert input_columns(example, ["Uid", "Postdate", "Title", "Alltags", "Postdate"]) \
        == ["Pid", "Postdate", "Alltags", "Uid", "Title", "image_b64", "image_path"]


# --------------------------------------------------------------------------- the pyfunc in process
@pytest.fixture(scope="module")
def fitted():
    """Benchmarks fitted in memory on 300 synthetic posts (no MLflow): every group, and tabular only."""
    from smp.boosters import XGBCfg

    posts = draw_posts(SynthCfg(n=300, seed=1))
    y = posts["label"].to_numpy(dtype=float)
    train, val = Part(posts.iloc[:240].reset_index(drop=True), y[:240]), Part(posts.iloc[240:].reset_index(drop=True),
                                                                                y[240:])
    xgb = XGBCfg(n_estimators=40, max_depth=3, learning_rate=0.1, early_stopping_rounds=10, n_jobs=1)

    def pyfunc(features):
        wrapper = PopularityModel()
        wrapper.model = BenchmarkModel(xgb, seed=0, features=FeaturesCfg(features, text_dim=4)).fit(train, val)
        return wrapper

    raw = posts.drop(columns=["label"]).iloc[:4].reset_index(drop=True)
    return {"all": pyfunc(ALL_GROUPS), "tabular": pyfunc("tabular"), "raw": raw}


def bad_posts(raw: pd.DataFrame) -> pd.DataFrame:
    """Four posts of known users (rows of ``raw``) with bad text and ids, as one frame: a 1 MB title with NUL
    bytes, 100,000 tags, a NaN Uid, a user no one saw, and an extra column."""
    posts = raw.head(4).copy()
    posts["Title"] = posts["Title"].astype(object)
    posts.loc[0, "Title"] = HUGE_TITLE
    posts.loc[1, "Alltags"] = HUGE_TAGS
    posts["Uid"] = posts["Uid"].astype(object)
    posts.loc[2, "Uid"] = np.nan
    posts.loc[3, ["Uid", "Title"]] = ["nobody@N00", "tab\tnul\x00"]  # NUL bytes are dropped, not cut
    posts["not_a_field"] = [[1], {"a": 1}, "x", None]
    return posts


def test_pyfunc_in_process_notes_unseen_users_and_cut_text(fitted):
    out = fitted["all"].predict(None, bad_posts(fitted["raw"]))
    assert out["status"].tolist() == [CUT, CUT, UNSEEN, UNSEEN]
    assert np.isfinite(out["popularity"]).all()
    tabular = fitted["tabular"].predict(None, bad_posts(fitted["raw"]))
    assert tabular["status"].tolist() == ["ok"] * 4 and np.isfinite(tabular["popularity"]).all()
    assert group_notes(fitted["tabular"].model, fitted["raw"]) == {}


# --------------------------------------------------------------------------- logged models
@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny, smpd_dir, model_in_own_store):
    """The synthetic SMPD posts as a posts table whose ``Uid`` values are numbers, and two benchmarks logged
    from it (each in a store of its own): every group, and tabular only (local model directories)."""
    from smp.train import run_benchmark

    root = tmp_path_factory.mktemp("groups_models")
    posts = load_data(str(smpd_dir)).drop(columns=["image_path"])
    codes = {u: str(7000 + i) for i, u in enumerate(sorted(posts["Uid"].unique()))}
    posts["Uid"] = posts["Uid"].map(codes)
    table = root / "posts.csv"
    posts.to_csv(table, index=False)
    models = {}
    for name, features in (("all", ALL_GROUPS), ("tabular", "tabular")):
        (root / name).mkdir()
        local = model_in_own_store(root / name, run_benchmark,
                                   tiny.job("benchmark", table, features=features, text_dim=4), "benchmark")
        models[name] = mlflow.pyfunc.load_model(str(local))
    return {**models, "posts": load_data(str(table)).drop(columns=["label"]),
            "local": str(root / "all" / "model" / "benchmark")}


def _known_posts(logged, n: int = 8) -> pd.DataFrame:
    """``n`` posts whose users the all-groups model has a history for."""
    inner = logged["all"].unwrap_python_model().model
    posts = logged["posts"]
    return posts[~inner.groups_in_use.group("user").unseen(posts)].head(n).reset_index(drop=True)


@pytest.mark.slow
def test_logged_model_schema_lists_every_field_its_groups_read(logged):
    names = logged["all"].metadata.get_input_schema().input_names()
    assert {"Pid", "Uid", "Title", "Alltags", "Postdate"} <= set(names)
    kinds = logged["all"].metadata.metadata["smp_input_kinds"]
    assert kinds["Uid"].startswith("user id (text or a number") and kinds["Title"].startswith("text")
    assert kinds["Alltags"].startswith("text (space-separated tags")
    assert "Uid" not in logged["tabular"].metadata.get_input_schema().input_names()


@pytest.mark.slow
def test_a_known_user_is_scored_from_history_an_unknown_one_with_the_prior(logged):
    model = logged["all"]
    known = _known_posts(logged)
    out = model.predict(known)
    assert out["status"].tolist() == ["ok"] * len(known)
    unknown = model.predict(known.assign(Uid="99999"))
    assert unknown["status"].tolist() == [UNSEEN] * len(known)
    assert (np.abs(out["popularity"] - unknown["popularity"]) > 1e-6).any()  # the history moved a prediction
    # no Uid at all (null, NaN, "", or no column) is the prior too, with the same note
    for missing in (None, np.nan, "", "  "):
        blank = model.predict(known.assign(Uid=pd.Series([missing] * len(known), dtype=object)))
        assert blank["status"].tolist() == [UNSEEN] * len(known)
        assert np.allclose(blank["popularity"], unknown["popularity"], rtol=1e-6)
    no_column = model.predict(known.drop(columns=["Uid"]))
    assert no_column["status"].tolist() == [UNSEEN] * len(known)
    assert np.allclose(no_column["popularity"], unknown["popularity"], rtol=1e-6)


@pytest.mark.slow
def test_int_str_and_float_forms_of_one_uid_give_one_prediction(logged):
    model = logged["all"]
    known = _known_posts(logged)
    as_text = model.predict(known)
    as_int = model.predict(known.assign(Uid=known["Uid"].astype(int)))
    as_float = model.predict(known.assign(Uid=known["Uid"].astype(float)))
    assert as_int["status"].tolist() == as_float["status"].tolist() == ["ok"] * len(known)
    assert np.array_equal(as_text["popularity"], as_int["popularity"])
    assert np.array_equal(as_text["popularity"], as_float["popularity"])
    # a float column with a missing value (how pandas holds ids beside a NaN): the others still known
    mixed = known.assign(Uid=known["Uid"].astype(float).mask(known.index == 0))
    out = model.predict(mixed)
    assert out["status"].tolist() == [UNSEEN] + ["ok"] * (len(known) - 1)
    assert np.array_equal(out["popularity"][1:], as_text["popularity"][1:])


@pytest.mark.slow
def test_bad_text_and_ids_are_scored_with_their_status(logged):
    known = _known_posts(logged, 4)
    out = logged["all"].predict(bad_posts(known))
    assert out["status"].tolist() == [CUT, CUT, UNSEEN, UNSEEN]
    assert np.isfinite(out["popularity"]).all()
    both = logged["all"].predict(bad_posts(known).assign(Uid="nobody"))
    assert both["status"].tolist() == [f"{UNSEEN}; text truncated"] * 2 + [UNSEEN] * 2
    # a tabular model reads none of it: its statuses are unchanged
    tabular = logged["tabular"].predict(bad_posts(known))
    assert tabular["status"].tolist() == ["ok"] * 4 and np.isfinite(tabular["popularity"]).all()


@pytest.mark.slow
def test_served_model_answers_raw_posts_with_uid_title_and_tags(logged, tmp_path, serve_model):
    import requests

    known = _known_posts(logged, 4)
    records = json.loads(known.to_json(orient="records"))
    records[0]["Uid"] = int(records[0]["Uid"])          # a number: the same user
    records[1]["Uid"] = None                            # no user: the prior
    records[1]["Alltags"] = HUGE_TAGS                   # 100,000 tags: cut
    records[2]["Title"] = HUGE_TITLE                    # 1 MB, NUL bytes: cut
    records[3]["Uid"] = "nobody@N00"                    # a user no one saw
    records[3]["extra"] = "not a field"                 # dropped by MLflow's schema step
    expected = logged["all"].predict(known.assign(Uid=[known["Uid"][0], None, known["Uid"][2], "nobody@N00"],
                                                  Alltags=[known["Alltags"][0], HUGE_TAGS, *known["Alltags"][2:]],
                                                  Title=[*known["Title"][:2], HUGE_TITLE, known["Title"][3]]))
    with serve_model(logged["local"], tmp_path / "serve.log") as server:
        r = server.post({"dataframe_records": records}, timeout=120)
        assert r.status_code == 200, r.text[-2000:]
        answer = r.json()["predictions"]
        assert [a["status"] for a in answer] == ["ok", f"{UNSEEN}; text truncated", CUT, UNSEEN]
        served = np.array([a["popularity"] for a in answer], dtype=float)
        assert np.isfinite(served).all() and np.allclose(served, expected["popularity"], rtol=1e-5)
        assert expected["status"].tolist() == [a["status"] for a in answer]
        # the Uid column as numbers, as pandas writes an int64 column: the same answers
        as_ints = [{**rec, "Uid": int(u)} for rec, u in zip(json.loads(known.to_json(orient="records")),
                                                             known["Uid"])]
        r = requests.post(f"{server.url}/invocations", json={"dataframe_records": as_ints}, timeout=60)
        assert r.status_code == 200, r.text[-2000:]
        assert [a["status"] for a in r.json()["predictions"]] == ["ok"] * 4
        assert np.allclose([a["popularity"] for a in r.json()["predictions"]],
                           logged["all"].predict(known)["popularity"], rtol=1e-5)
