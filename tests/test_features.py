"""Unit tests: tabular features and metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from smp.evaluate import baseline_metrics, regression_metrics
from smp.features import MISSING, TabularFeaturizer, derive_columns


def _posts():
    return pd.DataFrame({
        "Pid": ["1", "2", "3", "4"],
        "Category": ["Fashion", "Travel", "Fashion", None],
        "Postdate": [1446016778.0, 1446103178.0, np.nan, 1451606400.0],  # Wed 2015-10-28, Thu, -, Fri 2016-01-01
        "Alltags": ["a b c", "", None, "x y"],
        "ispro": [1.0, 0.0, np.nan, 0.0],
        "photo_count": [10.0, np.nan, 3.0, 7.0],
    })


def test_derive_columns_values():
    d = derive_columns(_posts())
    assert d["weekday"].tolist() == ["2", "3", MISSING, "4"]
    assert d["month"].tolist() == ["10", "10", MISSING, "1"]
    assert d["hour"].iloc[0] == 7.0
    assert d["tag_count"].iloc[:2].tolist() == [3.0, 0.0] and np.isnan(d["tag_count"].iloc[2])
    assert d["Category"].tolist() == ["Fashion", "Travel", "Fashion", MISSING]
    assert d["ispro"].tolist() == ["1", "0", MISSING, "0"]
    assert np.isnan(d["photo_count"].iloc[1])  # missing stays NaN, never zero
    assert np.isnan(d["has_geo"]).all()  # no geo fields at all


def test_more_tags_never_changes_row_count():
    p = _posts()
    p2 = p.assign(Alltags=p["Alltags"].fillna("") + " more tags here")
    assert len(derive_columns(p2)) == len(p) and (derive_columns(p2)["tag_count"] >= 3).all()


def test_featurizer_fitted_on_train_only_handles_unseen_levels():
    train = pd.DataFrame({"Pid": [str(i) for i in range(40)], "Category": ["A"] * 25 + ["B"] * 15,
                          "photo_count": np.arange(40.0)})
    fz = TabularFeaturizer().fit(train)
    assert "Category_A" in fz.feature_names_ and "Category_B" in fz.feature_names_
    test = pd.DataFrame({"Pid": ["x", "y"], "Category": ["C", "A"], "photo_count": [1.0, np.nan]})
    X = fz.transform(test)
    names = fz.feature_names_
    assert X.shape == (2, len(names)) and X.dtype == np.float32
    assert X[0, names.index("Category_A")] == 0 and X[0, names.index("Category_B")] == 0  # unseen -> no level
    assert X[1, names.index("Category_A")] == 1
    assert np.isnan(X[1, names.index("photo_count")])
    # a level that only the test rows have is not learnt: the transform is the train one
    assert not any("C" == n.split("_")[-1] for n in names)


def test_featurizer_groups_rare_levels():
    train = pd.DataFrame({"Pid": [str(i) for i in range(60)],
                          "Subcategory": ["common"] * 50 + [f"rare{i}" for i in range(10)]})
    fz = TabularFeaturizer().fit(train)
    assert "Subcategory_common" in fz.feature_names_
    assert not any(n.startswith("Subcategory_rare") for n in fz.feature_names_)
    assert "Subcategory_infrequent_sklearn" in fz.feature_names_


def test_metrics_against_hand_computed_values():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([2.0, 2.0, 2.0, 6.0])  # errors +1, 0, -1, +2
    m = regression_metrics(y, p, "test")
    assert m["test_rmse"] == pytest.approx(np.sqrt(6 / 4))
    assert m["test_mae"] == pytest.approx(1.0)
    assert m["test_bias"] == pytest.approx(0.5)
    assert m["test_error_var"] == pytest.approx(6 / 4 - 0.25)
    assert m["test_r2"] == pytest.approx(1 - 6 / 5)
    assert m["test_spearman"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [2, 2, 2, 4])[0, 1])
    assert m["test_rmse"] ** 2 == pytest.approx(m["test_bias"] ** 2 + m["test_error_var"])


def test_baseline_is_train_mean():
    b = baseline_metrics(np.array([2.0, 4.0]), np.array([1.0, 5.0]), "val")
    assert b["val_rmse_baseline"] == pytest.approx(np.sqrt((4 + 4) / 2))
    assert b["val_bias_baseline"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same length"):
        regression_metrics([1, 2], [1], "val")


def test_date_parts_match_pandas_including_edges():
    from smp.features import date_parts

    secs = np.array([0.0, -1.0, 1446016778.0, 1451606399.5, 1451606400.0, 951782400.0,  # 2000-02-29
                     -86400.0 * 365.25 * 50, 4102444800.0, np.nan, np.inf, 1e12])
    got = date_parts(secs)
    ts = pd.to_datetime(pd.Series(secs), unit="s", errors="coerce")
    for name, want in (("weekday", ts.dt.weekday), ("month", ts.dt.month), ("hour", ts.dt.hour)):
        np.testing.assert_array_equal(got[name], want.to_numpy(dtype=float), err_msg=name)
    assert np.isnan(got["month"][-3:]).all()  # missing, infinite, beyond pandas' range


def test_small_batch_transform_equals_the_fitted_column_transformer():
    """The lookup-table path (served requests) gives exactly the ColumnTransformer's matrix."""
    rng = np.random.default_rng(0)
    n = 400
    train = pd.DataFrame({
        "Pid": [str(i) for i in range(n)],
        "Category": rng.choice(["A", "B", "C", "rare1", "rare2"], n, p=[0.4, 0.3, 0.29, 0.005, 0.005]),
        "Subcategory": rng.choice([f"s{i}" for i in range(30)], n),
        "Concept": rng.choice(["x", None], n),
        "ispro": rng.choice([0.0, 1.0, np.nan], n),
        "Postdate": rng.uniform(1.2e9, 1.5e9, n),
        "photo_count": rng.integers(0, 500, n).astype(float),
        "Alltags": rng.choice(["a b", "", None, "c d e"], n),
    })
    fz = TabularFeaturizer().fit(train)
    test = train.sample(60, random_state=1).reset_index(drop=True)
    test.loc[:9, "Category"] = ["unseen", None, "", "rare1", "rare2", "A", "Z", "B", "C", "A"]
    test.loc[10:14, "Subcategory"] = "never-seen"
    test.loc[15:19, "Postdate"] = np.nan
    derived = derive_columns(test)
    want = np.asarray(fz.transformer_.transform(derived[fz.categorical_ + fz.numeric_]), dtype=np.float32)
    got = fz.transform(test)  # 60 rows: the small-batch path
    assert fz.__dict__.get("_tables")  # ... which was really taken
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fz.transform(test.iloc[[3]]), want[[3]])  # and one post at a time
