"""Hypothesis over the layer extractor: 10,000 generated (often malicious, often malformed) layers, each
either applied or refused with an ImageError, and never anything outside the root. See image_fuzz.py;
bench/fuzz_images.py runs many more cases."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from pykata.config.schema import ImageSection
from pykata.images import layers
from tests.security.image_fuzz import LayerSpec, cases, check_case, make_host
from tests.security.imagekit import fast_dir

EXAMPLES = 10_000


@pytest.mark.parametrize("resolver, examples", [("openat2", EXAMPLES), ("walk", EXAMPLES // 5)])
def test_extractor_fuzz(resolver: str, examples: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parents found with openat2 (10,000 cases) and with the O_NOFOLLOW walk of older kernels (2,000)."""
    if resolver == "walk":
        monkeypatch.setattr(layers, "_OPENAT2", None)
    elif layers._OPENAT2 is None:
        pytest.skip("this kernel has no openat2 (Linux < 5.6): the walk variant covers it")
    outcomes: Counter[str] = Counter()
    with fast_dir("pykata-imagefuzz-") as base:
        host_tree = make_host(base)

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(cases)
        def run(case: tuple[list[LayerSpec], ImageSection]) -> None:
            outcomes[check_case(case, Path(base), host_tree)] += 1

        run()
    # the generator must really exercise both sides, not just fail to build archives
    assert outcomes["ok"] >= examples // 10 and outcomes["refused"] >= examples // 10, outcomes
    assert sum(outcomes.values()) >= examples, outcomes
