"""`pykata install runtimeclass` prints a valid RuntimeClass whose overhead.podFixed is the sizing policy's
(the guest's share plus the measured host overhead, plus TCG's translation cache on a TCG node), and the
RuntimeClass shipped in deploy/kubernetes carries the same figures for a KVM node."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import yaml

from pykata.config import load_config
from pykata.resources import sizing

ROOT = Path(__file__).resolve().parents[2]
PYKATA = str(ROOT / ".venv/bin/pykata")


def printed(accelerator: str) -> dict[str, object]:
    out = subprocess.run([PYKATA, "install", "runtimeclass", "--accelerator", accelerator],
                         capture_output=True, check=True, timeout=60).stdout
    doc = yaml.safe_load(out)
    kubernetes_validate.validate(doc, "1.33.0", strict=True)
    assert isinstance(doc, dict)
    return doc


def test_printed_overhead_is_the_sizing_policy_and_matches_the_shipped_one() -> None:
    config = load_config()
    kvm, tcg = printed("kvm"), printed("tcg")
    memory, cpu = sizing.pod_fixed_overhead(config, tcg=False)
    assert kvm["overhead"] == {"podFixed": {"memory": f"{memory}Mi", "cpu": f"{cpu}m"}}
    tcg_memory, _ = sizing.pod_fixed_overhead(config, tcg=True)
    assert tcg["overhead"]["podFixed"]["memory"] == f"{tcg_memory}Mi"  # type: ignore[index]
    assert tcg_memory == memory + (config.qemu.tcg_tb_size or sizing.TCG_DEFAULT_TB_MIB)
    shipped = yaml.safe_load((ROOT / "deploy/kubernetes/runtimeclass.yaml").read_text())
    assert shipped["overhead"] == kvm["overhead"], "deploy/kubernetes/runtimeclass.yaml is out of date"
