"""The guest's PID 1 (pykata.agent.pid1): its pure parts on the host. What it does to a machine
(mounts, cgroups, lo, power off) runs only in a VM: tests/guestimage boots it (health check, debug
diagnostics) and every VM test goes through it."""

from __future__ import annotations

import pytest

from pykata.agent.main import AgentArgs, _parse_init_args, parse_args
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



def test_the_agent_reads_the_init_argv_as_argparse_does() -> None:
    for options in ({}, {"debug": "1"}, {"exec": "spawner"}, {"debug": "1", "exec": "crun"}):
        argv = agent_argv(options, "vsock:1024")
        fast = _parse_init_args(argv)
        assert fast is not None, argv
        assert parse_args(argv) == fast
        assert parse_args([*argv, "--crun", "crun"]) == fast  # --crun: argparse parses it
    assert _parse_init_args(["--exec-with", "crun", "--channel", "c"]) == AgentArgs(channel="c", exec_with="crun")


def test_other_agent_command_lines_go_to_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--listen", "unix:/x"]) == AgentArgs(listen="unix:/x")
    assert parse_args(["--channel", "a", "--channel", "b"]).channel == "b"  # argparse: the last one wins
    for bad, says in ((["--channel", "a", "--exec-with", "bogus"], "--exec-with: invalid choice"),
                      (["--channel"], "--channel: expected one argument"),
                      (["--channel", "a", "--nope"], "unrecognized arguments: --nope")):
        assert _parse_init_args(bad) is None
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2
        assert says in capsys.readouterr().err
