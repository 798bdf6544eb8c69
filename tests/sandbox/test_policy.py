"""The agent policy through the SDK and the Sandbox API, on real VMs: each rule refuses with
PERMISSION_DENIED naming itself (PolicyDeniedError in the SDK), what it allows still works, and a
refused sandbox leaves nothing behind. Bad documents fail before any VM starts."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import pykata
from pykata.config import Config, load_config
from pykata.config.annotations import apply_annotations
from pykata.errors import AgentError, ConfigError
from pykata.images import ImageStore
from pykata.sandbox import Sandbox, build_spec
from pykata.sandbox.ocispec import Volume
from pykata.sandbox.policy import load_policy
from pykata.sdk import PolicyDeniedError

ALL_RPCS = ["*"]


def with_policy(policy: dict[str, Any] | None = None, **agent: Any) -> Config:
    base = load_config()
    changes: dict[str, Any] = dict(agent)
    if policy is not None:
        changes["policy"] = json.dumps(policy)
    return dataclasses.replace(base, agent=dataclasses.replace(
        base.agent, pykata=dataclasses.replace(base.agent.pykata, **changes)))


def policy(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": 1, "allow_rpcs": ALL_RPCS,
                           "containers": {"images": ["busybox"], "commands": [["sleep"]], "mounts": ["/data"]},
                           "exec": {"commands": [["echo"]], "stdio": True}}
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            doc.setdefault(section, {})[name] = value
        else:
            doc[section] = value
    return doc


def test_bad_policies_fail_before_any_vm(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent\.pykata\.policy.*policy: exec\.stdio: must be true or false"), \
            pykata.Sandbox(image="busybox", config=with_policy(policy(exec__stdio="yes"))):
        pass
    bad = tmp_path / "p.toml"
    bad.write_text("version = 1\nallow_rpcs = ['Nope']\n")
    with pytest.raises(ConfigError, match=r"policy_file .*allow_rpcs\[0\]: unknown RPC 'Nope'"):
        load_policy(with_policy(policy_file=str(bad)).agent.pykata)
    good = tmp_path / "p.json"
    good.write_text(json.dumps(policy()))
    assert json.loads(load_policy(with_policy(policy_file=str(good)).agent.pykata) or "") == policy()
    # the pod's annotation only where the administrator allowed it
    note = {"io.katacontainers.config.agent.policy": base64.b64encode(json.dumps(policy()).encode()).decode()}
    with pytest.raises(ConfigError, match="enable_policy_annotation"):
        apply_annotations(with_policy(), note)
    applied = apply_annotations(with_policy(enable_policy_annotation=True), note)
    assert json.loads(load_policy(applied.agent.pykata) or "") == policy()
    with pytest.raises(ConfigError, match="base64"):
        apply_annotations(with_policy(enable_policy_annotation=True),
                          {"io.katacontainers.config.agent.policy": "%%%"})


@pytest.mark.vm
async def test_sdk_exec_rules(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("volume\n")
    # allowed: image, command, the /data mount, `echo` with its output
    async with pykata.AsyncSandbox(image="busybox", volumes=[f"{data}:/data:ro"],
                                   config=with_policy(policy())) as sb:
        assert (await sb.run(["echo", "hi"])).stdout == b"hi\n"
        with pytest.raises(PolicyDeniedError, match=r"policy: exec\.commands: \['cat', '/data/f'\]"):
            await sb.run(["cat", "/data/f"])
        # CopyFile outside the allowed paths (none given)
        with pytest.raises(AgentError, match=r"PERMISSION_DENIED: policy: copy_file\.paths"):
            await sb._sandbox.agent.copy_file("/run/pykata-agent/shared/x", b"x")
        # the policy cannot be lifted from the host side afterwards: SetPolicy is allowed here ("*"),
        # but a document is checked like the first one
        with pytest.raises(AgentError, match="INVALID_ARGUMENT: policy_json: policy: version"):
            await sb._sandbox.agent.set_policy('{"version": 9}')
    async with pykata.AsyncSandbox(image="busybox", config=with_policy(policy(exec__stdio=False))) as sb:
        with pytest.raises(PolicyDeniedError, match=r"policy: exec\.stdio: \w+ on exec process"):
            await sb.run(["echo", "hi"])
    no_exec = policy(allow_rpcs=["CreateSandbox", "DestroySandbox", "CreateContainer", "StartContainer",
                                 "RemoveContainer", "WaitProcess", "SignalProcess", "CloseStdin",
                                 "ReadStdout", "ReadStderr", "GetOOMEvent"])
    async with pykata.AsyncSandbox(image="busybox", config=with_policy(no_exec)) as sb:
        with pytest.raises(PolicyDeniedError, match="policy: allow_rpcs: ExecProcess is not allowed"):
            await sb.run(["echo", "hi"])


@pytest.mark.vm
async def test_sdk_container_refused_at_start_leaves_nothing() -> None:
    config = with_policy(policy(containers__images=["docker.io/library/*"]))
    sb = pykata.AsyncSandbox(image="busybox", config=config)
    with pytest.raises(PolicyDeniedError, match=r"policy: containers\.images: image 'busybox' is not allowed"):
        await sb.start()
    runtime = config.runtime.runtime_path / "sandboxes"
    assert not sb.id or not (runtime / sb.id).exists()


@pytest.mark.vm
async def test_container_rules_in_one_sandbox(tmp_path: Path) -> None:
    config = with_policy(policy(containers__readonly_rootfs=True))
    image = ImageStore(Path(config.runtime.cache_dir)).resolve("busybox")
    data = tmp_path / "data"
    data.mkdir()
    sandbox = await Sandbox.create(config=config)
    env = list(image.config.env)
    try:
        cases = [
            ("c-cmd", build_spec(["sh", "-c", "true"], env=env, readonly_rootfs=True), (), "containers.commands"),
            ("c-rw", build_spec(["sleep", "1"], env=env), (), "containers.readonly_rootfs"),
            ("c-mnt", build_spec(["sleep", "1"], env=env, readonly_rootfs=True),
             (Volume(data, "/etc/cron.d", True),), "containers.mounts"),
        ]
        for cid, spec, volumes, rule in cases:
            with pytest.raises(AgentError, match=rf"PERMISSION_DENIED: policy: {rule}: "):
                await sandbox.create_container(cid, spec, image.rootfs, volumes=volumes, image="busybox")
            assert cid not in sandbox.containers
            assert not (sandbox.shared_dir / cid).exists()  # its mounts were undone
        ok = build_spec(["sleep", "30"], env=env, readonly_rootfs=True)
        c = await sandbox.create_container("c-ok", ok, image.rootfs, volumes=(Volume(data, "/data", True),),
                                           image="busybox")
        await c.start()
    finally:
        await sandbox.stop(remove=True)
