"""Asserts that the README's main job learns (used by .ci/run): every trained strategy of a
finished `sar-ray sweep sweeps/quickstart.yaml` moved at least MIN of the way from the
`base (untuned)` row to the `real (held out)` row on the objective (the report's `realism`).

    python tests/e2e/check_quickstart.py --folder runs/quickstart [--trials 8] [--min-realism 0.25]

Prints the rows; exits non-zero naming the strategies below MIN.
"""

import argparse
import csv
import sys
from pathlib import Path

ANCHORS = ("base (untuned)", "real (held out)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True, help="the sweep folder (--out)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--min-realism", type=float, default=0.25)
    a = ap.parse_args()
    path = Path(a.folder) / "report" / "report.csv"
    if not path.is_file():
        sys.exit(f"check_quickstart: FAIL: no {path}; did the sweep finish?")
    rows = list(csv.DictReader(path.open()))
    for r in rows:
        print(f"  {r['strategy']:40s} {r['trial']:60.60s} realism {r['realism']}")
    anchors = {r["strategy"]: r for r in rows if r["strategy"] in ANCHORS}
    trained = [r for r in rows if r["strategy"] not in ANCHORS]
    if set(anchors) != set(ANCHORS):
        sys.exit(f"check_quickstart: FAIL: anchor rows {sorted(anchors)}, expected {list(ANCHORS)}")
    if len(trained) != a.trials:
        sys.exit(f"check_quickstart: FAIL: {len(trained)} strategy rows, expected {a.trials}")
    low = [f"{r['strategy']} ({r['realism']})" for r in trained
           if r["realism"] in ("", "-") or float(r["realism"]) < a.min_realism]
    if low:
        sys.exit(f"check_quickstart: FAIL: below realism {a.min_realism}: {', '.join(low)}")
    print(f"check_quickstart: ok: all {len(trained)} strategies >= {a.min_realism} of the way to real SAR")


if __name__ == "__main__":
    main()
