"""The agent policy through containerd and the shim (`ctr`): the configured policy and a pod's own
(annotation, allowed by the configuration) refuse what they do not allow, naming the rule, and what
they allow runs. Each refused task leaves nothing behind."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.shim.harness import IMAGE, PYKATA_RUNTIME, Containerd, missing_prerequisites, running_with_busybox

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("prerequisites")]

POLICY = {
    "version": 1,
    "allow_rpcs": ["CreateSandbox", "DestroySandbox", "CreateContainer", "StartContainer", "RemoveContainer",
                   "WaitProcess", "SignalProcess", "CloseStdin", "ReadStdout", "ReadStderr", "WriteStdin",
                   "GetOOMEvent", "StatsContainer", "ExecProcess"],
    "containers": {"images": [IMAGE], "commands": [["sh", "-c"], ["sleep"]], "readonly_rootfs": True,
                   "mounts": ["/data"]},
    "exec": {"commands": [["echo"]], "stdio": True},
}
IMAGE_NOTE = f"io.kubernetes.cri.image-name={IMAGE}"


class PolicyContainerd(Containerd):
    config_path: Path | None = None

    def env(self) -> dict[str, str]:
        assert self.config_path is not None
        return {**super().env(), "PYKATA_CONFIG": str(self.config_path)}


@pytest.fixture(scope="module")
def ctd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyContainerd]:
    missing = missing_prerequisites()
    if missing:
        pytest.fail(f"the shim tests need {missing}")
    d = tmp_path_factory.mktemp("policy")
    policy_file = d / "policy.json"
    policy_file.write_text(json.dumps(POLICY))
    base = Path(os.environ.get("PYKATA_CONFIG") or
                Path(__file__).resolve().parents[2] / "src/pykata/config/configuration.toml").read_text()
    assert 'policy_file = ""' in base and "enable_policy_annotation = false" in base
    config = d / "configuration.toml"
    config.write_text(base.replace('policy_file = ""', f'policy_file = "{policy_file}"')
                      .replace("enable_policy_annotation = false", "enable_policy_annotation = true"))
    c = PolicyContainerd(d / "ctd")
    c.config_path = config
    with running_with_busybox(c, tmp_path_factory.mktemp("cache")):
        yield c


def run(ctd: Containerd, *args: str, cmd: tuple[str, ...] = ("sh", "-c", "echo allowed")) -> tuple[int, str, str]:
    cid = f"pol-{uuid.uuid4().hex[:8]}"
    try:
        p = ctd.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, *args, IMAGE, cid, *cmd, check=False)
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    finally:
        ctd.remove(cid)


def test_container_rules(ctd: PolicyContainerd, tmp_path: Path) -> None:
    code, out, _ = run(ctd, "--read-only", "--annotation", IMAGE_NOTE)
    assert (code, out) == (0, "allowed\n")
    refusals = [
        ((), "containers.images"),  # ctr names no image: only CRI sets the annotation
        (("--annotation", IMAGE_NOTE), "containers.readonly_rootfs"),
        (("--read-only", "--annotation", IMAGE_NOTE, "--mount",
          f"type=bind,src={tmp_path},dst=/etc/cron.d,options=rbind:ro"), "containers.mounts"),
    ]
    for args, rule in refusals:
        code, _, err = run(ctd, *args)
        assert code != 0 and f"policy: {rule}: " in err, (rule, err[-600:])
    code, _, err = run(ctd, "--read-only", "--annotation", IMAGE_NOTE, cmd=("ls", "/"))
    assert code != 0 and "policy: containers.commands: ['ls', '/']" in err, err[-600:]
    assert not ctd.tasks()


def test_exec_rules_and_a_pods_own_policy(ctd: PolicyContainerd) -> None:
    cid = f"pol-{uuid.uuid4().hex[:8]}"
    try:
        ctd.ctr("run", "-d", "--runtime", PYKATA_RUNTIME, "--read-only", "--annotation", IMAGE_NOTE,
                IMAGE, cid, "sleep", "600")
        ok = ctd.ctr("task", "exec", "--exec-id", "e1", cid, "echo", "exec", "allowed", check=False)
        assert (ok.returncode, ok.stdout) == (0, b"exec allowed\n"), ok.stderr[-600:]
        no = ctd.ctr("task", "exec", "--exec-id", "e2", cid, "cat", "/etc/shadow", check=False)
        assert no.returncode != 0 and b"policy: exec.commands: ['cat', '/etc/shadow']" in no.stderr, no.stderr
    finally:
        ctd.remove(cid)
    # a pod's own policy (the annotation; enable_policy_annotation = true here) replaces the configured one
    own = dict(POLICY, allow_rpcs=[r for r in POLICY["allow_rpcs"] if r != "ExecProcess"])  # type: ignore[union-attr]
    note = "io.katacontainers.config.agent.policy=" + base64.b64encode(json.dumps(own).encode()).decode()
    cid = f"pol-{uuid.uuid4().hex[:8]}"
    try:
        ctd.ctr("run", "-d", "--runtime", PYKATA_RUNTIME, "--read-only", "--annotation", IMAGE_NOTE,
                "--annotation", note, IMAGE, cid, "sleep", "600")
        no = ctd.ctr("task", "exec", "--exec-id", "e1", cid, "echo", "hi", check=False)
        assert no.returncode != 0 and b"policy: allow_rpcs: ExecProcess is not allowed" in no.stderr, no.stderr
    finally:
        ctd.remove(cid)
    assert not ctd.tasks()
