"""The guest's PID 1 (pykata.agent.pid1): its pure parts on the host. What it does to a machine
(mounts, cgroups, lo, power off) runs only in a VM: tests/guestimage boots it (health check, debug
diagnostics) and every VM test goes through it."""

from __future__ import annotations

from pykata.agent.pid1 import agent_argv, parse_cmdline


def test_parse_cmdline_takes_pykata_options_only_last_one_wins() -> None:
    line = ("console=ttyS0 panic=-1 quiet pykata.channel=vsock pykata.vsock_port=9 pykata.hostname=a "
            "pykata.hostname=b pykata.unknown=1 pykata.debug pykata.exec=crun PYKATA_BOOT_MARKS=1\n")
    assert parse_cmdline(line) == {"channel": "vsock", "vsock_port": "9", "hostname": "b", "exec": "crun"}


def test_agent_argv_follows_the_options() -> None:
    assert agent_argv({}, "/dev/vport0p1") == ["--channel", "/dev/vport0p1"]
    assert agent_argv({"debug": "1", "exec": "spawner"}, "vsock:1024") == [
        "--channel", "vsock:1024", "--debug", "--exec-with", "spawner"]
    assert agent_argv({"debug": "0", "exec": "bogus"}, "vsock:1") == ["--channel", "vsock:1"]
