#!/usr/bin/env python3
"""ttrpc vs grpcio: unary echo round trips over a unix socket, measured in one run.

For each (concurrency, payload) the server runs in its own process and the client issues calls for
a fixed time; prints calls/s and MiB/s for pykata's ttrpc and grpcio's asyncio stack, and the ratio.

    .venv/bin/python bench/ttrpc_bench.py [--seconds 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.ttrpc.echo_pb import ECHO_SERVICE, Echo

METHOD = "/pykata.test.EchoService/Echo"


# -- servers (each in a child process) --------------------------------------------------------------

def _serve_ttrpc(path: str, ready: Any) -> None:
    from pykata.ttrpc import Server

    class Handler:
        async def Echo(self, req: Any, ctx: Any) -> Any:
            return req

    async def main() -> None:
        server = Server()
        methods = {"Echo": ECHO_SERVICE.methods["Echo"]}
        server.register(type(ECHO_SERVICE)(ECHO_SERVICE.name, methods), Handler())
        await server.serve_unix(path)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _serve_grpc(path: str, ready: Any) -> None:
    import grpc

    async def echo(req: Any, ctx: Any) -> Any:
        return req

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler("pykata.test.EchoService", {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo, request_deserializer=Echo.FromString, response_serializer=Echo.SerializeToString)})
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


# -- clients ----------------------------------------------------------------------------------------

async def _drive(call: Any, concurrency: int, payload: bytes, seconds: float) -> int:
    msg = Echo(data=payload)
    count = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            resp = await call(msg)
            assert len(resp.data) == len(payload)
            count += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count


async def _client_ttrpc(path: str, concurrency: int, payload: bytes, seconds: float) -> int:
    from pykata.ttrpc import connect_unix

    client = await connect_unix(path)
    try:
        stub = client.stub(ECHO_SERVICE)
        await _drive(stub.Echo, concurrency, payload, 0.2)  # warm-up
        return await _drive(stub.Echo, concurrency, payload, seconds)
    finally:
        await client.close()


async def _client_grpc(path: str, concurrency: int, payload: bytes, seconds: float) -> int:
    import grpc

    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        call = channel.unary_unary(METHOD, request_serializer=Echo.SerializeToString,
                                   response_deserializer=Echo.FromString)
        await _drive(call, concurrency, payload, 0.2)
        return await _drive(call, concurrency, payload, seconds)


def measure(kind: str, concurrency: int, size: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.sock")
        ready = ctx.Event()
        target = _serve_ttrpc if kind == "ttrpc" else _serve_grpc
        proc = ctx.Process(target=target, args=(path, ready), daemon=True)
        proc.start()
        try:
            if not ready.wait(30):
                raise RuntimeError(f"{kind} server did not start")
            client = _client_ttrpc if kind == "ttrpc" else _client_grpc
            n = asyncio.run(client(path, concurrency, os.urandom(size), seconds))
        finally:
            proc.terminate()
            proc.join(10)
    return n / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for concurrency in (1, 64):
        for size in (64, 64 * 1024):
            t = measure("ttrpc", concurrency, size, args.seconds)
            g = measure("grpc", concurrency, size, args.seconds)
            rows.append({"concurrency": concurrency, "payload": size, "ttrpc_calls_s": round(t),
                         "grpcio_calls_s": round(g), "ratio": round(t / g, 2),
                         "ttrpc_mib_s": round(t * size * 2 / 2**20, 1)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'conc':>4} {'payload':>8} {'ttrpc calls/s':>14} {'grpcio calls/s':>15} {'ratio':>6} {'ttrpc MiB/s':>11}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['payload']:>8} {r['ttrpc_calls_s']:>14} {r['grpcio_calls_s']:>15} "
              f"{r['ratio']:>6} {r['ttrpc_mib_s']:>11}")


if __name__ == "__main__":
    main()
