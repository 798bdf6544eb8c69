#!/usr/bin/env python3
"""Fuzz the image layer extractor with many more cases than CI runs (tests/security/test_image_fuzz.py).

Same strategies and property (tests/security/image_fuzz.py): every generated layer stack is either
applied or refused with an ImageError, nothing appears outside the root, the host directory beside it is
untouched and no device node is made. Prints cases/s, the totals and the share applied vs refused;
exits 1 on the first broken property (Hypothesis prints the shrunk case).

    .venv/bin/python bench/fuzz_images.py [--cases 200000] [--seconds 0] [--chunk 5000] [--seed N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, seed, settings

from pykata.config.schema import ImageSection
from tests.security.image_fuzz import LayerSpec, cases, check_case, make_host
from tests.security.imagekit import fast_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200_000)
    ap.add_argument("--seconds", type=float, default=0, help="stop after the chunk running then (0: no limit)")
    ap.add_argument("--chunk", type=int, default=5000, help="cases per Hypothesis run (each with its own seed)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    cpu = time.process_time()
    chunks = 0
    with fast_dir("pykata-fuzz-images-") as base:
        host_tree = make_host(base)
        while sum(outcomes.values()) < args.cases:
            if args.seconds and time.monotonic() - started > args.seconds:
                break
            chunk_seed = args.seed + chunks
            chunks += 1

            @seed(chunk_seed)
            @settings(max_examples=min(args.chunk, args.cases - sum(outcomes.values())), deadline=None,
                      database=None, suppress_health_check=list(HealthCheck))
            @given(cases)
            def run(case: tuple[list[LayerSpec], ImageSection]) -> None:
                outcomes[check_case(case, Path(base), host_tree)] += 1

            try:
                run()
            except Exception as e:  # a broken property: Hypothesis has printed the falsifying case
                print(f"FAILED after {sum(outcomes.values())} cases (seed {chunk_seed}): "
                      f"{type(e).__name__}: {e}", file=sys.stderr)
                return 1
    wall, cpu = time.monotonic() - started, time.process_time() - cpu
    total = sum(outcomes.values())
    result = {"cases": total, "applied": outcomes["ok"], "refused": outcomes["refused"],
              "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "cases_per_s": round(total / wall, 1),
              "cases_per_cpu_s": round(total / cpu, 1), "seeds": f"{args.seed}..{args.seed + chunks - 1}",
              "failures": 0}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{total} cases in {wall:.1f} s ({cpu:.1f} s CPU): {total / wall:.0f} cases/s "
              f"({total / cpu:.0f} per CPU second), {outcomes['ok']} applied, {outcomes['refused']} refused, "
              f"0 failures (seeds {result['seeds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
