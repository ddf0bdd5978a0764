"""`smp predict`'s CSV is safe to open in a spreadsheet (issue 26, "Serving"; OWASP: CSV injection).

A text cell (``Pid``, ``status``) that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return
is written with a single quote in front; the ``popularity`` column stays numbers (``-1.5``).
"""

from __future__ import annotations

import csv

import mlflow
import numpy as np
import pandas as pd
import pytest

from smp.predict import PredictJob, run_predict, spreadsheet_safe


class Echo(mlflow.pyfunc.PythonModel):
    """A stand-in model: popularity from the post's ``photo_count`` (negative ones too)."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame({"popularity": model_input["photo_count"].astype(float).to_numpy() - 2.5,
                             "status": "ok"})


def test_spreadsheet_safe_quotes_formula_starts_only():
    """The rule, on every kind of cell (a status too: the smp statuses start with a word, but the rule does not
    rely on it)."""
    cells = pd.Series(["=1+1", "+33", "-5", "@SUM(A1)", "\t=x", "\r=x", "ok", "a=b", "", None, 3.0])
    assert spreadsheet_safe(cells).tolist() == ["'=1+1", "'+33", "'-5", "'@SUM(A1)", "'\t=x", "'\r=x", "ok", "a=b",
                                                "", None, 3.0]


@pytest.mark.slow  # a real smp predict run: a tracking store, a saved model
def test_smp_predict_csv_escapes_text_cells_and_keeps_numbers(tmp_path):
    mlflow.pyfunc.save_model(str(tmp_path / "model"), python_model=Echo())
    posts = pd.DataFrame({
        "Pid": ["=HYPERLINK(\"http://x\",\"y\")", "+33", "-5", "@SUM(A1)", "plain", "7"],
        "photo_count": [1, 2, 3, 4, 5, 1],
    })
    posts.to_csv(tmp_path / "posts.csv", index=False)
    out_path = tmp_path / "pred.csv"
    metrics = run_predict(PredictJob(model=str(tmp_path / "model"), input=str(tmp_path / "posts.csv"),
                                     output=str(out_path)))
    with open(out_path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Pid", "popularity", "status"]
    assert [r[0] for r in rows[1:]] == ["'=HYPERLINK(\"http://x\",\"y\")", "'+33", "'-5", "'@SUM(A1)", "plain", "7"]
    assert [r[2] for r in rows[1:]] == ["ok"] * 6  # statuses start with ok / partial / error: never quoted
    assert [float(r[1]) for r in rows[1:]] == [-1.5, -0.5, 0.5, 1.5, 2.5, -1.5]
    assert rows[1][1] == "-1.5"  # a number, not text: no quote
    back = pd.read_csv(out_path)
    assert back["popularity"].dtype == np.float64
    counts = {"data/rows": 6, "data/scored_rows": 6, "data/error_rows": 0, "data/partial_rows": 0,
              "data/unseen_user_rows": 0, "data/text_truncated_rows": 0}  # of the partial: feature-group notes
    assert {k: v for k, v in metrics.items() if k.startswith("data/")} == counts
    logged = mlflow.get_run(metrics.run_id).data  # the result holds what its run logged
    assert {k: int(v) for k, v in logged.params.items() if k.startswith("data/")} == counts
    assert logged.metrics["time/predict_s"] == pytest.approx(metrics["time/predict_s"])
