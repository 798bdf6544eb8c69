#!/usr/bin/env python3
"""Long fuzz run of the configuration parser, the annotation overrides and the cgroup path check: the
properties of tests/security/config_fuzz.py (CI runs 12,000 cases of them), here N cases each.

Prints, per property: cases run, how many were accepted and refused, how many distinct fields the
refusals named, cases a second, and failures (any exception other than the documented ConfigError /
CgroupError, or a refusal without a field: must be 0; the first failure is shown and the run exits 1).

    .venv/bin/python bench/fuzz_config.py [-n 50000] [--only mappings,texts,annotations,cgroups,files] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security import config_fuzz as fz

PROPERTIES: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], str | None]]] = {
    "mappings": (fz.config_mappings(), fz.check_mapping),
    "texts": (fz.toml_texts, fz.check_text),
    "annotations": (fz.annotation_maps, fz.check_annotations),
    "cgroups": (fz.cgroup_paths, fz.check_cgroup_path),
    # a pod-named file holding a secret: refused without a trace of it (writes one small file a case)
    "files": (fz.secret_files(), lambda text: fz.check_secret_file(_FILES_DIR, text)),
}
_FILES_DIR = tempfile.mkdtemp(prefix="pykata-fuzz-")


def run(name: str, n: int) -> dict[str, Any]:
    strategy, check = PROPERTIES[name]
    fields: collections.Counter[str] = collections.Counter()
    counts = {"cases": 0, "accepted": 0, "refused": 0}

    @settings(max_examples=n, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def prop(value: Any) -> None:
        field = check(value)
        counts["cases"] += 1
        if field is None:
            counts["accepted"] += 1
        else:
            counts["refused"] += 1
            fields[field.split("[")[0]] += 1

    start = time.monotonic()
    failure = None
    try:
        prop()
    except Exception as e:  # a property failure: Hypothesis has shrunk it to a minimal example
        failure = f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - start
    return {"property": name, **counts, "distinct_fields": len(fields), "seconds": round(elapsed, 1),
            "cases_per_s": round(counts["cases"] / elapsed) if elapsed else 0, "failures": int(failure is not None),
            "failure": failure, "top_fields": fields.most_common(5)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=50_000, help="cases per property (default 50000)")
    ap.add_argument("--only", default=",".join(PROPERTIES), help="comma-separated properties")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the refused pod files' details, which go to the runtime's log
    try:
        results = [run(name, args.n) for name in args.only.split(",")]
    finally:
        shutil.rmtree(_FILES_DIR, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'property':<12} {'cases':>8} {'accepted':>9} {'refused':>8} {'fields':>7} {'s':>7} "
              f"{'cases/s':>8} {'failures':>8}")
        for r in results:
            print(f"{r['property']:<12} {r['cases']:>8} {r['accepted']:>9} {r['refused']:>8} "
                  f"{r['distinct_fields']:>7} {r['seconds']:>7} {r['cases_per_s']:>8} {r['failures']:>8}")
            if r["failure"]:
                print(f"  FAILURE: {r['failure'][:2000]}")
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
