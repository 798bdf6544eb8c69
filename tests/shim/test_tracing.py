"""Tracing through the shim ([runtime] enable_tracing, JSON-lines file): one trace per task RPC that
containerd sends (Create, Start, Exec, Kill, Delete), holding the sandbox's work, its QMP commands and its
agent RPCs."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata.config import load_config
from pykata.monitor.scrape import SandboxProbe
from pykata.sandbox.lookup import find
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, Containerd, missing_prerequisites, running_with_busybox


class TracedContainerd(Containerd):
    """A private containerd whose shims read a configuration that traces into a file."""

    config: Path | None = None

    def env(self) -> dict[str, str]:
        env = super().env()
        assert self.config is not None
        return {**env, "PYKATA_CONFIG": str(self.config)}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TracedContainerd, Path]]:
    missing = missing_prerequisites()
    if missing:
        pytest.fail(f"the shim tests need {missing}")
    d = tmp_path_factory.mktemp("trace")
    spans = d / "spans.jsonl"
    config = d / "configuration.toml"
    base = os.environ.get("PYKATA_CONFIG")  # a dev run may pin its own settings: keep them
    text = Path(base).read_text() if base else ""
    assert "[runtime]" not in text, "PYKATA_CONFIG with a [runtime] table: merge by hand"
    config.write_text(f'{text}\n[runtime]\nenable_tracing = true\ntracing_file = "{spans}"\n')
    ctd = TracedContainerd(tmp_path_factory.mktemp("ctd"))
    ctd.config = config
    with running_with_busybox(ctd, tmp_path_factory.mktemp("cache")) as c:
        yield c, spans


async def owner_rows(sandbox_id: str) -> list[tuple[str, float, dict[str, str]]]:
    found = find(load_config(), sandbox_id)
    probe = SandboxProbe(found.dir, found.record)
    try:
        return await probe.owner(10)
    finally:
        await probe.close()


def traces(spans_file: Path) -> dict[str, list[dict[str, Any]]]:
    by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in spans_file.read_text().splitlines():
        span = json.loads(line)
        by_trace[span["context"]["trace_id"]].append(span)
    return by_trace


@pytest.mark.vm
def test_one_trace_per_task_rpc_with_sandbox_qmp_and_agent_spans(traced: tuple[TracedContainerd, Path]) -> None:
    ctd, spans_file = traced
    cid = f"tr{os.getpid()}"
    try:
        ctd.ctr("run", "-d", "--runtime", PYKATA_RUNTIME, IMAGE, cid, "sleep", "1000")
        p = ctd.ctr("task", "exec", "--exec-id", "e1", cid, "echo", "traced")
        assert p.stdout == b"traced\n"
        # the shim counts what it serves and sends, for `pykata monitor` (on its agent proxy socket)
        owner = {(name, labels.get("method", "")): value for name, value, labels in asyncio.run(owner_rows(cid))}
        assert owner[("pykata_shim_rpc", "Create")] == 1 and owner[("pykata_shim_rpc_errors", "Create")] == 0
        assert owner[("pykata_shim_rpc", "Exec")] == 1 and owner[("pykata_shim_rpc_duration_seconds", "Create")] > 0
        assert owner[("pykata_shim_agent_rpc", "CreateContainer")] == 1
        assert owner[("pykata_shim_events_sent", "")] >= 4 and owner[("pykata_shim_events_dropped", "")] == 0
        ctd.ctr("task", "kill", "-s", "KILL", cid)
        deadline = time.monotonic() + 30
        while ctd.tasks().get(cid) != "STOPPED" and time.monotonic() < deadline:
            time.sleep(0.1)
        ctd.ctr("task", "rm", cid)
    finally:
        ctd.remove(cid)
    # the shim writes each span as it ends; it has ended (Shutdown after the last Delete)
    deadline = time.monotonic() + 15
    while not any(s["name"] == "shim.Shutdown" for t in traces(spans_file).values() for s in t) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    by_root: dict[str, list[dict[str, Any]]] = {}
    for spans in traces(spans_file).values():
        [root] = [s for s in spans if s["parent_id"] is None]  # one root per trace
        assert root["name"].startswith("shim."), root["name"]
        by_root.setdefault(root["name"], []).extend(spans)
        ids = {s["context"]["span_id"] for s in spans}
        assert all(s["parent_id"] in ids for s in spans if s is not root)  # one tree
        assert root["resource"]["attributes"]["service.name"] == "pykata-shim"
    assert {"shim.Create", "shim.Start", "shim.Exec", "shim.Kill", "shim.Delete"} <= set(by_root)
    create = {s["name"] for s in by_root["shim.Create"]}
    assert {"sandbox.create", "vm.start", "mounts.setup", "mounts.rootfs", "agent.CreateSandbox",
            "agent.CreateContainer"} <= create, create
    assert any(n.startswith("qmp.") for n in create), create
    vm_start = next(s for s in by_root["shim.Create"] if s["name"] == "vm.start")
    assert vm_start["attributes"]["boot"] in ("template", "cold")
    # Exec only registers the process; its Start runs it (two Start traces: the container's, the exec's)
    assert {"agent.StartContainer", "agent.ExecProcess"} <= {s["name"] for s in by_root["shim.Start"]}
    assert "agent.SignalProcess" in {s["name"] for s in by_root["shim.Kill"]}
    # the sandbox stops with the last Delete or Shutdown: its QMP and agent calls are in that trace
    assert any(s["name"] == "sandbox.stop" for r in ("shim.Delete", "shim.Shutdown") for s in by_root.get(r, []))
    # every agent span is a client span naming the sandbox
    agent_spans = [s for spans in by_root.values() for s in spans if s["name"].startswith("agent.")]
    assert agent_spans and all(s["kind"] == "SpanKind.CLIENT" and s["attributes"]["sandbox_id"]
                               for s in agent_spans)
