"""The agent policy document: parsing (each bad key named) and each rule's decision, as pure functions.
Through a real agent, the shim and the SDK: tests/shim/test_policy.py and tests/sandbox/test_policy.py."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from pykata.agent.policy import IMAGE_ANNOTATION, PolicyError, PolicyGate, parse_policy, policy_from_mapping
from pykata.errors import Code, InvalidArgument, PermissionDenied
from pykata.protocols.agent import agent_pb2

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policy"

STRICT = {
    "version": 1,
    "allow_rpcs": ["CreateSandbox", "CreateContainer", "StartContainer", "ExecProcess", "ReadStdout",
                   "WaitProcess", "CopyFile"],
    "containers": {"images": ["docker.io/library/busybox:*"], "commands": [["sh", "-c"]],
                   "readonly_rootfs": True, "mounts": ["/etc/hosts", "/data/*"]},
    "exec": {"commands": [["ls"]], "stdio": False},
    "copy_file": {"paths": ["/run/pykata-agent/shared/ok"]},
}


def spec(args: list[str], *, image: str | None = "docker.io/library/busybox:1.36", readonly: bool = True,
         mounts: list[dict[str, object]] | None = None) -> agent_pb2.CreateContainerRequest:
    doc: dict[str, object] = {"process": {"args": args}, "root": {"path": "rootfs", "readonly": readonly},
                              "mounts": mounts or [{"destination": "/proc", "type": "proc", "source": "proc"}]}
    if image is not None:
        doc["annotations"] = {IMAGE_ANNOTATION: image}
    return agent_pb2.CreateContainerRequest(container_id="c1", oci_spec_json=json.dumps(doc))


def denied(rpc: str, req: object, rule: str) -> str:
    policy = policy_from_mapping(STRICT)
    with pytest.raises(PermissionDenied) as info:
        policy.check(rpc, req)
    assert info.value.rpc_code == Code.PERMISSION_DENIED
    assert str(info.value).startswith(f"policy: {rule}: "), info.value
    return str(info.value)


def test_allowed_requests_pass() -> None:
    policy = policy_from_mapping(STRICT)
    policy.check("CreateContainer", spec(["sh", "-c", "echo hi"], mounts=[
        {"destination": "/etc/hosts", "type": "bind", "source": "/x"},
        {"destination": "/data/a", "source": "/y", "options": ["rbind", "ro"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"}]))
    policy.check("ExecProcess", agent_pb2.ExecProcessRequest(process=agent_pb2.Process(args=["ls", "-l"])))
    policy.check("ReadStdout", agent_pb2.ReadStreamRequest(container_id="c1", exec_id=""))  # the init's
    policy.check("CopyFile", agent_pb2.CopyFileRequest(path="/run/pykata-agent/shared/ok/f"))


def test_each_rule_denies_naming_itself() -> None:
    assert "RemoveContainer is not allowed" in denied("RemoveContainer", agent_pb2.RemoveContainerRequest(),
                                                      "allow_rpcs")
    assert "'evil.io/x:1' is not allowed" in denied("CreateContainer", spec(["sh", "-c"], image="evil.io/x:1"),
                                                     "containers.images")
    denied("CreateContainer", spec(["sh", "-c"], image=None), "containers.images")
    denied("CreateContainer", spec(["/bin/sh", "-c"]), "containers.commands")
    denied("CreateContainer", spec(["sh"]), "containers.commands")  # shorter than the prefix
    denied("CreateContainer", spec(["sh", "-c"], readonly=False), "containers.readonly_rootfs")
    assert "'/etc/passwd'" in denied("CreateContainer", spec(["sh", "-c"], mounts=[
        {"destination": "/etc/../etc/passwd", "type": "bind", "source": "/x"}]), "containers.mounts")
    denied("CreateContainer", agent_pb2.CreateContainerRequest(oci_spec_json="[1]"), "containers")
    denied("ExecProcess", agent_pb2.ExecProcessRequest(process=agent_pb2.Process(args=["cat", "/etc/shadow"])),
           "exec.commands")
    denied("ExecProcess", agent_pb2.ExecProcessRequest(), "exec.commands")
    denied("ReadStdout", agent_pb2.ReadStreamRequest(container_id="c1", exec_id="e1"), "exec.stdio")
    # stdin carried by the exec, and output carried by the wait, are stdio too
    denied("ExecProcess", agent_pb2.ExecProcessRequest(exec_id="e1", process=agent_pb2.Process(args=["ls"]),
                                                       stdin=b"x"), "exec.stdio")
    denied("ExecProcess", agent_pb2.ExecProcessRequest(exec_id="e1", process=agent_pb2.Process(args=["ls"]),
                                                       close_stdin=True), "exec.stdio")
    denied("WaitProcess", agent_pb2.WaitProcessRequest(container_id="c1", exec_id="e1", output_limit=1), "exec.stdio")
    for path in ("/run/pykata-agent/shared/okay", "/run/pykata-agent/shared/ok/../../x", "relative"):
        denied("CopyFile", agent_pb2.CopyFileRequest(path=path), "copy_file.paths")


def test_wildcards_and_an_empty_prefix_allow_everything() -> None:
    policy = policy_from_mapping({"version": 1, "allow_rpcs": ["*"],
                                  "containers": {"images": ["*"], "commands": [[]], "mounts": ["*"]},
                                  "exec": {"commands": [[]], "stdio": True}, "copy_file": {"paths": ["/"]}})
    policy.check("CreateContainer", spec(["anything"], image=None, readonly=False,
                                         mounts=[{"destination": "/etc", "type": "bind", "source": "/"}]))
    policy.check("ReadStderr", agent_pb2.ReadStreamRequest(exec_id="e1"))
    policy.check("CopyFile", agent_pb2.CopyFileRequest(path="/etc/x"))


def test_an_empty_policy_denies_everything() -> None:
    policy = parse_policy('{"version": 1}')
    for rpc in ("CreateSandbox", "ExecProcess", "ReadStdout", "SetPolicy"):
        with pytest.raises(PermissionDenied, match="policy: allow_rpcs"):
            policy.check(rpc, agent_pb2.ReadStreamRequest())


@pytest.mark.parametrize(("doc", "field"), [
    ("{", "(document)"),
    ('[1]', "(document)"),
    ('{"version": 2}', "version"),
    ('{"version": 1, "deny": []}', "deny"),
    ('{"version": 1, "allow_rpcs": ["Explode"]}', "allow_rpcs[0]"),
    ('{"version": 1, "allow_rpcs": "ExecProcess"}', "allow_rpcs"),
    ('{"version": 1, "containers": {"readonly_rootfs": "yes"}}', "containers.readonly_rootfs"),
    ('{"version": 1, "containers": {"commands": ["sh"]}}', "containers.commands[0]"),
    ('{"version": 1, "containers": {"image": []}}', "containers.image"),
    ('{"version": 1, "exec": {"commands": [[1]]}}', "exec.commands[0]"),
    ('{"version": 1, "copy_file": {"paths": ["/a/../b"]}}', "copy_file.paths[0]"),
    ('{"version": 1, "copy_file": []}', "copy_file"),
])
def test_bad_documents_name_the_key(doc: str, field: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    assert info.value.field == field


def test_oversized_document_is_refused() -> None:
    with pytest.raises(PolicyError, match="at most"):
        parse_policy('{"version": 1, "allow_rpcs": []' + " " * (70 << 10) + "}")


def test_examples_parse() -> None:
    files = sorted(EXAMPLES.glob("*.toml"))
    assert files, EXAMPLES
    for path in files:
        policy_from_mapping(tomllib.loads(path.read_text()))


class _Service:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def ExecProcess(self, req: object, ctx: object) -> str:
        self.calls.append("ExecProcess")
        return "ran"


async def test_gate_checks_before_the_service_and_policy_is_set_once() -> None:
    service = _Service()
    gate = PolicyGate(service)
    req = agent_pb2.ExecProcessRequest(process=agent_pb2.Process(args=["id"]))
    assert await gate.ExecProcess(req, None) == "ran"  # no policy: everything runs
    gate.SetPolicy(agent_pb2.SetPolicyRequest(policy_json='{"version": 1, "allow_rpcs": ["CreateSandbox"]}'),
                    None)
    with pytest.raises(PermissionDenied, match="policy: allow_rpcs: ExecProcess is not allowed"):
        await gate.ExecProcess(req, None)
    assert service.calls == ["ExecProcess"]
    # The policy did not allow SetPolicy: it cannot be replaced or lifted.
    with pytest.raises(PermissionDenied, match="policy: allow_rpcs: SetPolicy"):
        gate.SetPolicy(agent_pb2.SetPolicyRequest(policy_json='{"version": 1, "allow_rpcs": ["*"]}'), None)
    fresh = PolicyGate(service)
    with pytest.raises(InvalidArgument) as info:
        fresh.SetPolicy(agent_pb2.SetPolicyRequest(policy_json='{"version": 1, "x": 1}'), None)
    assert info.value.field == "policy_json" and "policy: x: unknown key" in str(info.value)
