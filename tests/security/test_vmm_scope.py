"""A QEMU taken over by its guest, in the host's network namespace (an SDK sandbox with
network="egress": libslirp in QEMU opens the guest's connections as host sockets), tries the host's
abstract unix sockets, which neither its chroot, its uid nor iptables hide (they belong to the network
namespace). The Landlock scope (pykata.hypervisor.scope) must refuse the connection.

The takeover is stood in for by QMP, which makes the real QEMU connect where a compromised one would:
chardev-add with an abstract socket address. The scope itself is checked on a plain process too,
against a control without it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

import pykata
from pykata.hypervisor import scope
from pykata.hypervisor.errors import QmpError

CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect('\\0' + sys.argv[1])"


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, socket.socket]]:
    """An abstract unix socket of 'other host software' (this test, in the host's namespace)."""
    if not scope.supported():
        pytest.fail(f"this host's kernel has Landlock ABI {scope.abi()}, scopes need {scope.SCOPE_ABI}")
    name = f"pykata-test-{uuid.uuid4().hex[:8]}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(8)
    listener.settimeout(0.5)
    try:
        yield name, listener
    finally:
        listener.close()


def test_the_scope_refuses_abstract_sockets_made_outside(abstract_listener: tuple[str, socket.socket]) -> None:
    name, listener = abstract_listener
    control = subprocess.run([sys.executable, "-c", CONNECT, name], capture_output=True, timeout=30)
    assert control.returncode == 0, control.stderr  # the probe is sound: without the scope it connects
    listener.accept()[0].close()
    scoped = subprocess.run([sys.executable, "-c", CONNECT, name], capture_output=True, timeout=30,
                            preexec_fn=scope.confine)
    assert scoped.returncode != 0 and b"PermissionError" in scoped.stderr, scoped.stderr
    with pytest.raises(TimeoutError):
        listener.accept()


@pytest.mark.vm
async def test_an_egress_vmm_cannot_reach_the_hosts_abstract_sockets(
        abstract_listener: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    name, listener = abstract_listener
    probe = {"id": "probe", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": name, "abstract": True}}, "server": False}}}
    # control: a QEMU started without the scope does reach the socket (the probe is sound)
    with monkeypatch.context() as m:
        m.setattr(scope, "supported", lambda: False)
        async with pykata.AsyncSandbox(network="egress") as unscoped:
            assert unscoped._sandbox is not None and unscoped._sandbox.vm is not None
            await unscoped._sandbox.vm.qmp.execute("chardev-add", probe)
            listener.accept()[0].close()
    async with pykata.AsyncSandbox(network="egress") as sb:
        assert sb._sandbox is not None and sb._sandbox.vm is not None
        vm = sb._sandbox.vm
        with pytest.raises(QmpError) as info:
            await vm.qmp.execute("chardev-add", probe)
        assert "not permitted" in str(info.value), info.value
        with pytest.raises(TimeoutError):
            listener.accept()
        assert (await sb.run(["true"])).exit_code == 0  # the sandbox works on
