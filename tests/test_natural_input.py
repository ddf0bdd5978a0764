"""The registered model predicts on the frames users build the natural way, with no cast (issue 25, item 1).

``pd.read_csv`` / ``pd.read_json`` of the real posts (int64 ``Pid``, dates and counts; a bool column and the
label beside them), the official SMPD JSON files read by pandas, numbers as int or float, ``Pid`` as int or
text, missing values in integer columns, extra columns: each predicts as is, through
``mlflow.pyfunc.load_model("models:/smp-popularity@champion")``, and gives the same predictions.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from smp.data import load_data
from smp.registry import PromoteJob, run_promote
from smp.train import run_benchmark

REAL_POSTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "smpd2019" / "posts.csv"
CHAMPION = "models:/smp-popularity@champion"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_sample(tmp_path_factory) -> Path:
    """1,000 real posts (seeded sample), written as the shared file is: int ids, int dates and counts."""
    if not REAL_POSTS.exists():
        pytest.skip(f"the shared real posts are not at {REAL_POSTS}")
    posts = pd.read_csv(REAL_POSTS)
    out = tmp_path_factory.mktemp("real") / "posts_sample.csv"
    posts.sample(n=1000, random_state=0).to_csv(out, index=False)
    return out


def _champion_from(tiny, data: str) -> mlflow.pyfunc.PyFuncModel:
    run_benchmark(tiny.job("benchmark", data, experiment="natural"))
    outcome = run_promote(PromoteJob(experiment="natural"))
    assert outcome["champion"] is True  # the first model in a fresh store
    return mlflow.pyfunc.load_model(CHAMPION)


def test_champion_predicts_on_read_csv_of_real_posts_without_a_cast(real_sample, tiny, caplog):
    model = _champion_from(tiny, str(real_sample))
    raw = pd.read_csv(real_sample)  # what a user types first
    assert raw["Pid"].dtype == np.int64 and raw["Postdate"].dtype == np.int64 and raw["tag_count"].dtype == np.int64
    with caplog.at_level(logging.WARNING):
        out = model.predict(raw)
    assert list(out.columns) == ["popularity", "status"] and len(out) == 1000
    assert np.isfinite(out["popularity"]).all() and set(out["status"]) == {"ok"}
    # the extra columns (the label, postdate_estimated) are ignored, and named once in the log
    extra = [r.getMessage() for r in caplog.records if "extra inputs" in r.getMessage()]
    assert len(extra) == 1 and "'label'" in extra[0] and "'postdate_estimated'" in extra[0]

    # the same posts in every other natural shape give the same predictions
    expected = out["popularity"].to_numpy()
    shapes = {
        "read_json of the records": pd.read_json(io.StringIO(raw.to_json(orient="records"))),
        "Pid as text": raw.assign(Pid=raw["Pid"].astype(str)),
        "numbers as float": raw.astype({"Postdate": float, "tag_count": float}),
        "without the extra columns": raw.drop(columns=["label", "postdate_estimated"]),
        "nullable Int64": raw.astype({"tag_count": "Int64", "Postdate": "Int64"}),
    }
    for what, frame in shapes.items():
        got = model.predict(frame)
        assert np.allclose(got["popularity"], expected, rtol=1e-9), what
        assert set(got["status"]) == {"ok"}, what

    # a missing value in an integer column: pandas makes the column float64 (or <NA> in Int64); it is a
    # missing value for that post only, and the others are unchanged
    holes = raw.copy()
    holes.loc[[3, 7], "tag_count"] = np.nan
    assert holes["tag_count"].dtype == np.float64
    got = model.predict(holes)
    keep = ~np.isin(np.arange(len(raw)), [3, 7])
    assert np.allclose(got["popularity"][keep], expected[keep], rtol=1e-9)
    assert np.isfinite(got["popularity"]).all() and set(got["status"]) == {"ok"}
    nullable = raw.astype({"tag_count": "Int64"})
    nullable.loc[[3, 7], "tag_count"] = pd.NA
    assert np.allclose(model.predict(nullable)["popularity"], got["popularity"], rtol=1e-9)

    # a value that is no number is refused whole, naming the column and the post (MLflow's 400 when served)
    bad = raw.head(3).astype({"tag_count": object})
    bad.loc[1, "tag_count"] = "twelve"
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"column 'tag_count'.*'twelve'.*Pid"):
        model.predict(bad)


def test_champion_predicts_on_official_smpd_json_files_read_by_pandas(smpd_dir, tiny):
    model = _champion_from(tiny, str(smpd_dir))
    # each official file as pandas reads it (Pid and Uid become numbers, Postdate a number), joined on Pid
    frame = pd.read_json(smpd_dir / "train_category.json")
    for name in ("train_temporalspatial_information.json", "train_text.json", "train_user_data.json"):
        if (smpd_dir / name).exists():
            part = pd.read_json(smpd_dir / name)
            frame = frame.merge(part.drop(columns=[c for c in part.columns if c in frame.columns and c != "Pid"]),
                                on="Pid", how="left")
    out = model.predict(frame)
    assert len(out) == len(frame) and np.isfinite(out["popularity"]).all()
    # the same predictions as the project's own loader gives (text ids, numbers parsed to float)
    loaded = load_data(str(smpd_dir)).drop(columns=["label", "image_path"])
    by_pid = pd.Series(out["popularity"].to_numpy(), index=frame["Pid"].astype(str))
    expected = model.predict(loaded)["popularity"].to_numpy()
    assert np.allclose(by_pid.loc[loaded["Pid"]].to_numpy(), expected, rtol=1e-9)


def test_logged_model_page_describes_what_to_send(real_sample, tiny):
    _champion_from(tiny, str(real_sample))
    version = mlflow.MlflowClient().get_model_version_by_alias("smp-popularity", "champion")
    info = mlflow.models.get_model_info(CHAMPION)
    schema = info.signature.inputs
    assert schema.input_names()[0] == "Pid" and schema.required_input_names() == ["Pid"]
    assert {"Category", "Postdate", "tag_count", "image_b64"} <= set(schema.input_names())
    assert all(str(c.type) == "Any" for c in schema.inputs)  # every natural dtype passes MLflow's check
    note = mlflow.get_logged_model(info.model_id).tags["mlflow.note.content"]  # the model page's description
    assert note.startswith("benchmark: ") and "Postdate: number (Unix seconds)" in note
    assert "numbers may be int or float" in note and "Test RMSE" in note
    assert version.run_id == info.run_id  # the registered version is the run that logged this model
