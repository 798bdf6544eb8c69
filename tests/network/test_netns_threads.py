"""pykata.network.tap's namespace threads: new_netns makes a namespace in a thread of its own (the caller's
stays in the host's), in_netns runs a function in a thread that entered one; results and errors come
back to the caller (an OSError as a NetworkError naming the namespace). Real namespaces, nothing left."""

from __future__ import annotations

import os

import pytest

from pykata.network.tap import NetworkError, in_netns, netlink_socket, new_netns, ns_path


def _here() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def test_a_new_namespace_is_entered_by_a_thread_only() -> None:
    host = _here()
    fd = new_netns()
    try:
        inside = in_netns(ns_path(fd), _here)
        assert inside != host and inside == os.readlink(ns_path(fd)), inside
        assert _here() == host  # the caller's thread never left the host's namespace
        sock = netlink_socket(ns_path(fd))
        os.close(sock)

        def fails_with(exc: BaseException) -> None:
            raise exc

        with pytest.raises(NetworkError, match=f"^network namespace {ns_path(fd)}: No such file"):
            in_netns(ns_path(fd), lambda: fails_with(FileNotFoundError(2, "No such file or directory")))
        with pytest.raises(ValueError, match="its own"):
            in_netns(ns_path(fd), lambda: fails_with(ValueError("its own")))
    finally:
        os.close(fd)
    with pytest.raises(NetworkError, match=r"^network namespace /no/such/netns: No such file"):
        in_netns("/no/such/netns", _here)
    with pytest.raises(NetworkError, match=r"^cannot enter network namespace /proc/self/ns/mnt: Invalid argument"):
        in_netns("/proc/self/ns/mnt", _here)  # not a network namespace: setns refuses it
