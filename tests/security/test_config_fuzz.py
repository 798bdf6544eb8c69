"""Hypothesis over the configuration parser, the annotation overrides and the cgroup path check
(tests/security/config_fuzz.py): 12,000 cases in all, each either accepted and valid or refused with the
documented error naming a field; bench/fuzz_config.py runs the same properties longer."""

from __future__ import annotations

import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings

from tests.security import config_fuzz as fz

FAST = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=4000, **FAST)
@given(fz.config_mappings())
def test_config_mappings(data: dict[str, Any]) -> None:
    fz.check_mapping(data)


@settings(max_examples=2000, **FAST)
@given(fz.toml_texts)
def test_config_texts(text: str) -> None:
    fz.check_text(text)


@settings(max_examples=4000, **FAST)
@given(fz.annotation_maps)
def test_annotations(annotations: dict[str, str]) -> None:
    fz.check_annotations(annotations)


@settings(max_examples=2000, **FAST)
@given(fz.cgroup_paths)
def test_cgroup_paths(value: object) -> None:
    fz.check_cgroup_path(value)


@settings(max_examples=500, **FAST)
@given(fz.secret_files())
def test_pod_config_file_errors_never_quote_it(text: str) -> None:
    # a file a pod names (in an allowed directory): whatever it holds, the refusal shows none of it
    with tempfile.TemporaryDirectory() as directory:
        fz.check_secret_file(directory, text)
