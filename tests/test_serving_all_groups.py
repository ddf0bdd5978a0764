"""The main job with every feature group (tabular, time, user, text, image) served over HTTP from raw posts:
``Uid``, ``Title``, ``Alltags`` and the image as base64, as a client holds them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from smp.data import load_data

pytestmark = pytest.mark.slow

ALL = "tabular,time,user,text,image"


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny, smpd_dir, model_in_own_store):
    from smp.train import run_ensemble_mlp

    root = tmp_path_factory.mktemp("all_groups")
    local = model_in_own_store(root, run_ensemble_mlp, tiny.job("ensemble_mlp", smpd_dir, features=ALL, text_dim=4),
                               "ensemble_mlp")
    return local


def test_the_main_job_with_every_group_answers_raw_posts_over_http(served_model, smpd_dir, tmp_path, serve_model):
    model = mlflow.pyfunc.load_model(str(served_model))
    inner = model.unwrap_python_model().model
    assert inner.needs_images and inner.groups_in_use.group("user") is not None
    assert {"Uid", "Title", "Alltags", "Postdate"} <= set(inner.input_fields_)
    posts = load_data(str(smpd_dir)).head(3).reset_index(drop=True)
    records = []
    for i, post in posts.iterrows():
        record = {k: post[k] for k in ("Pid", "Uid", "Title", "Alltags", "Postdate", "Category", "Subcategory")}
        if i < 2:  # an image as a client sends it
            record["image_b64"] = base64.b64encode(Path(post["image_path"]).read_bytes()).decode()
        records.append(json.loads(json.dumps(record, default=lambda v: v.item() if hasattr(v, "item") else str(v))))
    records[1]["Uid"] = "nobody@N00"  # a user the model never saw: the prior
    expected = model.predict(json_frame(records))
    with serve_model(str(served_model), tmp_path / "serve.log") as server:
        r = server.post({"dataframe_records": records}, timeout=300)
        assert r.status_code == 200, r.text[-2000:]
        answer = r.json()["predictions"]
    statuses = [a["status"] for a in answer]
    assert statuses[0] == "ok"
    assert statuses[1] == "partial: unseen user"
    assert statuses[2].startswith("partial: ") and "no image given" in statuses[2]
    served = np.array([a["popularity"] for a in answer], dtype=float)
    assert np.isfinite(served).all() and np.allclose(served, expected["popularity"], rtol=1e-5)
    assert statuses == expected["status"].tolist()


def json_frame(records):
    import pandas as pd

    return pd.DataFrame(records)


def _tiny_fusion(tiny, data, **kw):
    return tiny.job("fusion", data, epochs=3, batch_size=16, encoder_hidden=(8,), fusion_hidden=(8,),
                    projection_dim=4, text_dim=4, **kw)


def test_fusion_is_promoted_and_served_like_every_family(smpd_dir, tiny, tmp_path, serve_model):
    """No special case for the family beyond the paper: promote registers its best run as the champion, and the
    registered model answers raw posts (Uid, Title, Alltags, an image) over HTTP."""
    from smp.fusion import run_fusion
    from smp.registry import PromoteJob, current_alias, run_promote

    fused = run_fusion(_tiny_fusion(tiny, smpd_dir))
    out = run_promote(PromoteJob(experiment="t", family="fusion"))
    champion = current_alias(mlflow.MlflowClient(), "smp-popularity", "champion")
    assert out["champion"] is True and champion.run_id == fused.run_id
    local = mlflow.artifacts.download_artifacts("models:/smp-popularity@champion", dst_path=str(tmp_path / "m"))
    post = load_data(str(smpd_dir)).head(1).reset_index(drop=True)
    record = {k: post[k][0].item() if hasattr(post[k][0], "item") else post[k][0]
              for k in ("Pid", "Uid", "Title", "Alltags", "Postdate")}
    record["image_b64"] = base64.b64encode(Path(post["image_path"][0]).read_bytes()).decode()
    expected = mlflow.pyfunc.load_model(local).predict(json_frame([record]))
    with serve_model(local, tmp_path / "serve.log") as server:
        r = server.post({"dataframe_records": [record]}, timeout=300)
        assert r.status_code == 200, r.text[-2000:]
        answer = r.json()["predictions"][0]
    assert answer["status"] == expected["status"][0] == "ok"
    assert np.isclose(answer["popularity"], expected["popularity"][0], rtol=1e-5)
