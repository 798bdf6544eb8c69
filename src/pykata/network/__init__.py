"""Pod networking on the host: taps and tc filters in a pod's network namespace (Kata's tcfilter model),
and the host filter of an SDK sandbox's egress network (egress)."""

from pykata.network.egress import EgressError, EgressPolicy
from pykata.network.holding import PoolMismatch
from pykata.network.tap import NetworkError, guest_mac, nic_id, open_tap
from pykata.network.tcfilter import Endpoint, PodNetwork, attach, detach, spec_netns

__all__ = ["EgressError", "EgressPolicy", "Endpoint", "NetworkError", "PodNetwork", "PoolMismatch", "attach", "detach",
           "guest_mac", "nic_id", "open_tap", "spec_netns"]
