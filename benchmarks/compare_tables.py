"""Two `compare` tables (compare.csv, e.g. from benchmarks/demo_compare.sh) side by side: the largest difference
of any test metric and whether they agree to 4 decimals. Usage: python benchmarks/compare_tables.py A.csv B.csv"""
import sys

import pandas as pd

COLUMNS = ["test_rmse", "test_bias", "test_error_var", "test_mae", "test_spearman", "test_rmse_baseline"]


def main(a_path: str, b_path: str) -> int:
    a, b = (pd.read_csv(p).set_index("model")[COLUMNS] for p in (a_path, b_path))
    if list(a.index) != list(b.index):
        print(f"different rows: {list(a.index)} vs {list(b.index)}")
        return 1
    print(pd.concat({"A": a.round(4), "B": b.round(4)}, axis=1).to_string())
    print(f"largest difference: {(a - b).abs().max().max():.3g}; same to 4 decimals: {(a.round(4) == b.round(4)).all().all()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
