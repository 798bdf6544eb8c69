"""How a waiting pool VM reads a claim (pykata.factory.pool.serve_claim) and how the shims' fork server reads
a request (pykata.shim.forkserver._handle): the message after the fds' first read, up to the end or the
cap, through fsutil.read_all. Unit tests on socket pairs (no VM, nothing forked): a claim sent in pieces
with its socket, a bad claim closes what it carried, an unreadable request is refused with the reason."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from pykata.factory import pool
from pykata.shim import forkserver


def _send_in_pieces(sock: socket.socket, data: bytes, fds: list[int]) -> threading.Thread:
    def run() -> None:
        socket.send_fds(sock, [data[:5]], fds)
        for i in range(5, len(data), 7):
            sock.sendall(data[i : i + 7])
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_claim_in_pieces_is_read_whole_with_its_socket() -> None:
    ours, theirs = socket.socketpair()
    carried, kept = socket.socketpair()
    try:
        claim = json.dumps({"id": "pod-1", "hostname": "h" * 300}).encode()
        sender = _send_in_pieces(theirs, claim, [carried.fileno()])
        message, fds = pool.serve_claim(ours)
        sender.join()
        assert message == json.loads(claim) and len(fds) == 1
        os.close(fds[0])
    finally:
        for s in (ours, theirs, carried, kept):
            s.close()


def test_a_bad_claim_closes_what_it_carried() -> None:
    ours, theirs = socket.socketpair()
    carried, kept = socket.socketpair()
    try:
        sender = _send_in_pieces(theirs, b'["not", "an", "object"]', [carried.fileno()])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ValueError, match="one JSON object"):
            pool.serve_claim(ours)
        sender.join()
        assert set(os.listdir("/proc/self/fd")) <= before  # the received copy of the socket is closed
    finally:
        for s in (ours, theirs, carried, kept):
            s.close()


def test_an_unreadable_request_is_refused_with_the_reason() -> None:
    ours, theirs = socket.socketpair()
    try:
        sender = _send_in_pieces(theirs, b'{"argv": ["containerd-shim', [])
        assert forkserver._handle(ours, [], (0, 1, 2)) is None
        sender.join()
        reply = json.loads(theirs.recv(4096))
        assert reply["ok"] is False and reply["error"].startswith("unreadable request"), reply
    finally:
        ours.close()
        theirs.close()
