"""A hostile pykata agent, for tests only: it runs INSIDE the guest in place of `pykata.agent`.

It is the real agent, except that chosen RPCs answer with an attack. It is never part of the
production image: `tests/security/hostile.py` appends it (and an /init that runs it) to a copy of the
guest initrd that only the tests' configuration names, so no pod setting can turn it on.

The test picks the attacks through what the host forwards anyway: a process argument of the form
`pykata-hostile=RPC:ATTACK[,RPC:ATTACK...]`. In a container's command it applies to that container's
RPCs (its init's stdio and wait, stats, signals, removal); in an exec's command, to that exec's
RPCs. RPCs without a container id (GetOOMEvent, DestroySandbox, ...) use every attack learnt so far.

Attacks (ATTACKS): hang (never answer), malformed (undecodable payload), bigframe (a frame header
over the 4 MiB limit, then garbage), oversize (a valid answer stuffed to ~4 MiB), outofrange (pids,
exit statuses, lengths, versions, ids no honest agent sends), wrongid (the answer on a stream id the
host never opened), flood (64 KiB data frames on a unary call; for GetOOMEvent an OOM event for every
call, at once), ignore (an honest-looking empty answer, the request not carried out: a SignalProcess
acknowledged, nothing killed), trickle (WriteStdin: one byte acknowledged per answer, none written),
errtext (an error status whose message is 512 KiB of text with a forged log line and terminal escapes).

Only the standard library, protobuf and pykata may be imported here (that is what the guest has).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from pykata.agent import main as agent_main
from pykata.protocols.agent import AGENT_SERVICE, agent_pb2
from pykata.ttrpc import Code
from pykata.ttrpc.frames import HEADER, Flags, FrameType, encode_frame
from pykata.ttrpc.server import Server

log = logging.getLogger("pykata.agent.hostile")

MARKER = "pykata-hostile="
ATTACKS = ("hang", "malformed", "bigframe", "oversize", "outofrange", "wrongid", "flood", "ignore", "trickle",
           "errtext")
_BIG = (4 << 20) - (16 << 10)  # just under ttrpc's 4 MiB frame limit
# what a guest would like the host to print: a forged line of the shim's log, a terminal escape that
# clears the screen of whoever reads it, then 512 KiB of text (a whole 4 MiB frame makes the same point
# and takes over 20 s to cross virtio-serial on a loaded TCG host)
FORGED = ('\ntime="2026-12-01T00:00:00Z" level=info msg="PYKATA-FORGED-LINE" runtime=pykata\r'
          '\x1b[2J\x1b[HPYKATA-FORGED-SCREEN\u202e')
_ERRTEXT = FORGED + "E" * ((512 << 10) - len(FORGED))


def parse_attacks(args: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in args:
        if isinstance(arg, str) and arg.startswith(MARKER):
            for item in arg[len(MARKER):].split(","):
                rpc, _, kind = item.partition(":")
                if kind in ATTACKS:
                    out[rpc] = kind
    return out


def _pad(payload: bytes, size: int = _BIG) -> bytes:
    """`payload` plus an unknown length-delimited field 1000, so the message is `size` bytes."""
    tag = bytes([0xC2, 0x3E])  # field 1000, wire type 2
    n = max(0, size - len(payload) - 8)
    length = bytearray()
    v = n
    while True:
        b = v & 0x7F
        v >>= 7
        length.append(b | (0x80 if v else 0))
        if not v:
            break
    return payload + tag + bytes(length) + b"\0" * n


class HostileServer(Server):
    """The agent's ttrpc server, with attacks in place of some answers."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)  # the real agent's options (sessions=True: agent protocol 8)
        self.by_container: dict[str, dict[str, str]] = {}
        self.by_exec: dict[tuple[str, str], dict[str, str]] = {}
        self.learnt = asyncio.Event()

    def _learn(self, method: str, req: Any) -> None:
        found: dict[str, str] = {}
        if method == "CreateContainer":
            try:
                found = parse_attacks(json.loads(req.oci_spec_json).get("process", {}).get("args", []))
            except (ValueError, AttributeError):
                found = {}
            if found:
                self.by_container[req.container_id] = found
        elif method == "ExecProcess":
            found = parse_attacks(req.process.args)
            if found:
                self.by_exec[(req.container_id, req.exec_id)] = found
        if found:
            log.warning("hostile: %s %s", method, found)
            self.learnt.set()
            self.learnt = asyncio.Event()

    def _every_attack(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for m in (*self.by_container.values(), *self.by_exec.values()):
            out.update(m)
        return out

    def _attack_for(self, method: str, req: Any) -> str | None:
        cid = getattr(req, "container_id", None)
        if cid is None:
            return self._every_attack().get(method)
        eid = getattr(req, "exec_id", "")
        table = self.by_exec.get((cid, eid), {}) if eid else self.by_container.get(cid, {})
        return table.get(method)

    async def _dispatch(self, proto: Any, ev: Any, route: Any) -> None:
        if ev.service != AGENT_SERVICE.name:
            return await super()._dispatch(proto, ev, route)
        req = route.request_type()
        try:
            req.ParseFromString(ev.payload)
        except Exception:
            return await super()._dispatch(proto, ev, route)
        self._learn(ev.method, req)
        kind = self._attack_for(ev.method, req)
        if kind is None and ev.method == "GetOOMEvent":
            kind = await self._oom_until_attack(proto, ev, route)
            if kind is None:
                return None
        if kind is None:
            return await super()._dispatch(proto, ev, route)
        log.warning("hostile: answering %s with %s", ev.method, kind)
        await self._attack(kind, proto, ev, route, req)
        return None

    async def _oom_until_attack(self, proto: Any, ev: Any, route: Any) -> str | None:
        """The host's GetOOMEvent call waits from the start: answer it honestly, unless a container
        with a GetOOMEvent attack is created first (then return that attack)."""
        honest = asyncio.ensure_future(super()._dispatch(proto, ev, route))
        try:
            while True:
                learnt = asyncio.ensure_future(self.learnt.wait())
                done, _ = await asyncio.wait({honest, learnt}, return_when=asyncio.FIRST_COMPLETED)
                if honest in done:
                    learnt.cancel()
                    return None
                kind = self._every_attack().get("GetOOMEvent")
                if kind is not None:
                    honest.cancel()
                    return kind
        except BaseException:
            honest.cancel()
            raise

    async def _attack(self, kind: str, proto: Any, ev: Any, route: Any, req: Any) -> None:
        sid = ev.stream_id
        conn = proto.conn
        if kind == "hang":
            await asyncio.Event().wait()
        elif kind == "ignore":
            proto.write(conn.send_response(sid, b""))
        elif kind == "errtext":
            proto.write(conn.send_response(sid, code=Code.INTERNAL, message=_ERRTEXT))
        elif kind == "trickle":
            length = min(1, len(getattr(req, "data", b"")))
            proto.write(conn.send_response(sid, agent_pb2.WriteStreamResponse(length=length).SerializeToString()))
        elif kind == "malformed":
            proto.write(conn.send_response(sid, b"\xff\xff\xff\xff\x0f" * 8))
        elif kind == "bigframe":
            proto.write(HEADER.pack(64 << 20, sid, FrameType.RESPONSE, 0) + b"\xee" * (64 << 10))
        elif kind == "wrongid":
            honest = route.response_type()
            proto.write(encode_frame(sid + 200, FrameType.RESPONSE, Flags.NONE, _response(honest.SerializeToString())))
            await asyncio.Event().wait()
        elif kind == "flood":
            if ev.method == "GetOOMEvent":
                cid = next(iter(self.by_container), "")
                proto.write(conn.send_response(sid, agent_pb2.OOMEvent(container_id=cid).SerializeToString()))
                return
            frame = encode_frame(sid, FrameType.DATA, Flags.NONE, b"\xaa" * (64 << 10))
            for _ in range(4096):  # 256 MiB
                proto.write(frame)
                await proto.drain()
        elif kind in ("oversize", "outofrange"):
            payload = (_oversize if kind == "oversize" else _out_of_range)(ev.method, req, self)
            proto.write(conn.send_response(sid, payload))


def _response(payload: bytes) -> bytes:
    from pykata.ttrpc._pb import ttrpc_pb2

    return ttrpc_pb2.Response(payload=payload).SerializeToString()


def _oversize(method: str, req: Any, server: HostileServer) -> bytes:
    if method in ("ReadStdout", "ReadStderr"):
        return agent_pb2.ReadStreamResponse(data=b"A" * _BIG).SerializeToString()
    if method == "StatsContainer":
        resp = agent_pb2.StatsContainerResponse()
        resp.cgroup_stats.cgroup_version = 2
        resp.cgroup_stats.cpu.per_cpu_ns.extend(range(1 << 40, (1 << 40) + 500_000))
        return resp.SerializeToString()
    if method == "GetOOMEvent":
        return agent_pb2.OOMEvent(container_id="c" * _BIG).SerializeToString()
    if method == "GetGuestDetails":
        return agent_pb2.GuestDetailsResponse(kernel_release="k" * _BIG).SerializeToString()
    if method == "ListInterfaces":
        resp_i = agent_pb2.Interfaces()
        for i in range(60_000):
            resp_i.interfaces.add(name=f"eth{i}")
        return resp_i.SerializeToString()
    if method == "ListRoutes":
        resp_r = agent_pb2.Routes()
        for i in range(60_000):
            resp_r.routes.add(dest=f"10.{i >> 8 & 255}.{i & 255}.0/24")
        return resp_r.SerializeToString()
    honest = {"CreateContainer": agent_pb2.CreateContainerResponse(pid=100),
              "StartContainer": agent_pb2.StartContainerResponse(pid=100),
              "ExecProcess": agent_pb2.ExecProcessResponse(pid=101),
              "WaitProcess": agent_pb2.WaitProcessResponse(exit_status=0),
              "WriteStdin": agent_pb2.WriteStreamResponse(length=len(getattr(req, "data", b"")))}.get(method)
    return _pad(honest.SerializeToString() if honest is not None else b"")


def _out_of_range(method: str, req: Any, server: HostileServer) -> bytes:
    if method in ("CreateContainer", "StartContainer", "ExecProcess"):
        # a pid no Linux has; as a host pid it would be some other process's
        return agent_pb2.ExecProcessResponse(pid=0xFFFF_FFF0).SerializeToString()
    if method == "WaitProcess":
        return agent_pb2.WaitProcessResponse(exit_status=70_000).SerializeToString()
    if method == "WriteStdin":
        return agent_pb2.WriteStreamResponse(length=0).SerializeToString()  # "took nothing": no progress
    if method in ("ReadStdout", "ReadStderr"):
        return agent_pb2.ReadStreamResponse(data=b"", eof=False).SerializeToString()  # no data, no end
    if method == "StatsContainer":
        resp = agent_pb2.StatsContainerResponse()
        resp.cgroup_stats.cgroup_version = 99
        return resp.SerializeToString()
    if method == "GetOOMEvent":
        # an id of a container of some other pod on the host
        return agent_pb2.OOMEvent(container_id="another-pods-container").SerializeToString()
    if method in ("ReadFileToDisk", "WriteFileFromDisk"):
        # more bytes than asked for, of a file bigger than any disk: nothing was copied at all
        return agent_pb2.DiskFileResponse(length=getattr(req, "length", 0) + (1 << 30), file_size=1 << 62,
                                          mode=0o7777, uid=0, gid=0).SerializeToString()
    if method == "GetGuestDetails":
        return agent_pb2.GuestDetailsResponse(kernel_release="\0" * 5000).SerializeToString()
    return _pad(b"", 64)


def main() -> int:
    # The real agent's build_server, with this server class in place of pykata.ttrpc's.
    agent_main.Server = HostileServer  # type: ignore[misc]
    return agent_main.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
