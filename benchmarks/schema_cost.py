"""What MLflow's input-schema step costs a logged model's ``predict``: the AnyType schema (any natural frame
passes; MLflow then walks every value in Python) against the typed one it replaced (double / string columns,
which refused int64 ``Pid`` / dates / counts: issue 25).

The frame: the demo generator's posts (2,000, repeated to ``--rows``), the 14 raw SMPD fields a model reads,
as ``load_data`` gives them. Times MLflow's own ``_enforce_schema`` (what ``PyFuncModel.predict`` and the
scoring server call before the model), median of ``--repeat`` runs, for the whole frame and for one row.

Run:  .venv/bin/python benchmarks/schema_cost.py [--rows 10000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    from mlflow.models.utils import _enforce_schema
    from mlflow.types.schema import ColSpec, Schema

    from smp.data import load_data
    from smp.features import RAW_FIELDS
    from smp.packaging import input_schema
    from smp.synth import SynthCfg, generate

    raw = load_data(str(generate(tempfile.mkdtemp() + "/smpd", SynthCfg(n=2000, seed=0))))
    cols = [c for c in RAW_FIELDS if c in raw.columns]
    frame = pd.concat([raw[cols]] * (args.rows // len(raw) + 1), ignore_index=True).head(args.rows)
    frame["Pid"] = np.arange(len(frame)).astype(str)
    typed = Schema([ColSpec("double" if pd.api.types.is_numeric_dtype(frame[c]) and c != "Pid" else "string", c,
                            required=c == "Pid") for c in cols])
    for name, schema in (("AnyType (current)", input_schema(cols)), ("typed double/string (before)", typed)):
        def median(rows: pd.DataFrame, repeat: int) -> float:
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                _enforce_schema(rows, schema)
                times.append(time.perf_counter() - t0)
            return float(np.median(times))

        print(f"{name}: {len(frame)} rows x {len(cols)} columns {median(frame, args.repeat):.4f} s; "
              f"one row {1000 * median(frame.head(1), 50 * args.repeat):.3f} ms", flush=True)


if __name__ == "__main__":
    main()
