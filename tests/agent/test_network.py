"""The agent's rtnetlink handlers, run against a real kernel in a private network namespace."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from pykata.agent import network
from pykata.errors import InvalidArgument
from pykata.protocols.agent import agent_pb2
from pykata.ttrpc import Code

V4 = agent_pb2.IP_FAMILY_V4

SCRIPT = textwrap.dedent("""
    import asyncio, json
    from pyroute2 import AsyncIPRoute
    from pykata.agent import network
    from pykata.protocols.agent import agent_pb2
    from google.protobuf.json_format import MessageToDict

    async def main():
        async with AsyncIPRoute() as ipr:
            # a veth pair stands in for the guest's virtio NIC (its peer keeps the carrier up)
            await ipr.link("add", ifname="eth0", kind="veth", peer="peer0", address="02:50:4b:00:00:01")
            peer = (await ipr.link_lookup(ifname="peer0"))[0]
            await ipr.link("set", index=peer, state="up")
        iface = agent_pb2.Interface(
            current_hw_addr="02:50:4b:00:00:01", hw_addr="0a:58:0a:fe:00:07", mtu=1450, name="eth0",
            addresses=[agent_pb2.IPAddress(family=1, address="10.254.0.7", prefix_length=24)])
        got = await network.update_interface(iface)
        # twice: the second finds the link by its new MAC and replaces, not adds, the addresses
        iface.current_hw_addr = ""
        got = await network.update_interface(iface)
        routes = [agent_pb2.Route(dest="default", gateway="10.254.0.1", device="eth0"),
                  agent_pb2.Route(dest="10.99.0.0/16", gateway="10.254.0.1", device="eth0")]
        r1 = await network.update_routes(routes)
        r2 = await network.update_routes(routes[:1])
        out = {"iface": MessageToDict(got), "r1": MessageToDict(r1), "r2": MessageToDict(r2),
               "links": MessageToDict(await network.list_interfaces())}
        try:
            await network.update_interface(agent_pb2.Interface(current_hw_addr="02:00:00:00:00:99"))
        except Exception as e:
            out["missing"] = [str(e.rpc_code), str(e)]
        print(json.dumps(out))

    asyncio.run(main())
""")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_update_interface_and_routes_in_a_private_netns() -> None:
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", SCRIPT], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    iface = got["iface"]
    assert iface["hwAddr"] == "0a:58:0a:fe:00:07"
    assert iface["mtu"] == "1450"
    v4 = [a for a in iface["addresses"] if a["family"] == "IP_FAMILY_V4"]
    assert v4 == [{"family": "IP_FAMILY_V4", "address": "10.254.0.7", "prefixLength": 24}]
    assert int(iface["rawFlags"]) & 1, "link is up"
    def v4(routes: list[dict[str, str]]) -> list[str]:
        return sorted(r["dest"] for r in routes if r.get("family") == "IP_FAMILY_V4")

    dests = v4(got["r1"]["routes"])
    assert dests == ["10.254.0.0/24", "10.99.0.0/16", "default"]
    default = next(r for r in got["r1"]["routes"] if r["dest"] == "default")
    assert default["gateway"] == "10.254.0.1" and default["device"] == "eth0"
    # the complete table is replaced: the /16 is gone, the kernel's own link route stays
    assert v4(got["r2"]["routes"]) == ["10.254.0.0/24", "default"]
    assert {i["name"] for i in got["links"]["interfaces"]} >= {"lo", "eth0", "peer0"}
    assert got["missing"][0] == str(int(Code.NOT_FOUND)) and "02:00:00:00:00:99" in got["missing"][1]


@pytest.mark.parametrize(("iface", "field"), [
    (agent_pb2.Interface(), "interface"),
    (agent_pb2.Interface(hw_addr="zz:00:00:00:00:00"), "interface.hw_addr"),
    (agent_pb2.Interface(hw_addr="01:00:00:00:00:01"), "interface.hw_addr"),
    (agent_pb2.Interface(device="eth0", mtu=20), "interface.mtu"),
    (agent_pb2.Interface(device="x" * 40), "interface.device"),
    (agent_pb2.Interface(device="eth0", name="a b"), "interface.name"),
    (agent_pb2.Interface(device="eth0", addresses=[agent_pb2.IPAddress(address="10.0.0.300", prefix_length=8)]),
     "interface.addresses[0].address"),
    (agent_pb2.Interface(device="eth0", addresses=[agent_pb2.IPAddress(address="10.0.0.3", prefix_length=33)]),
     "interface.addresses[0].prefix_length"),
    (agent_pb2.Interface(device="eth0", addresses=[agent_pb2.IPAddress(family=V4, address="fd00::1",
                                                                       prefix_length=64)]),
     "interface.addresses[0].family"),
])
def test_bad_interface_names_the_field(iface: agent_pb2.Interface, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        network.check_interface(iface)
    assert info.value.rpc_code == Code.INVALID_ARGUMENT
    assert str(info.value).startswith(f"{field}:") or f" {field}:" in str(info.value)


@pytest.mark.parametrize(("route", "field"), [
    (agent_pb2.Route(dest="10.0.0.0/33"), "routes[0].dest"),
    (agent_pb2.Route(dest="default", gateway="nope"), "routes[0].gateway"),
    (agent_pb2.Route(dest="10.0.0.0/8", gateway="fd00::1"), "routes[0].gateway"),
    (agent_pb2.Route(dest="default", scope=7), "routes[0].scope"),
    (agent_pb2.Route(dest="default", device="a b"), "routes[0].device"),
])
async def test_bad_route_names_the_field(route: agent_pb2.Route, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await network.update_routes([route])
    assert info.value.rpc_code == Code.INVALID_ARGUMENT
    assert field in str(info.value)
