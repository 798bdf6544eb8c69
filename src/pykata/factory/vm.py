"""Which VM a sandbox gets: a clone of a template when the configuration allows it and the VM is one a
template can carry, else a cold boot. The policy lives here, above the driver (Kata's
virtcontainers/factory); the driver is only handed the template's `restore_source`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from pykata.config.schema import Config
from pykata.factory.template import (
    Template,
    agent_readiness,
    discard_template,
    ensure_template,
    templated_config,
)
from pykata.hypervisor.base import Hypervisor, ReadinessProbe
from pykata.hypervisor.devices import Device, NetDevice
from pykata.hypervisor.errors import RestoreError
from pykata.hypervisor.qemu.driver import QemuHypervisor
from pykata.network.tap import guest_mac, nic_id

log = logging.getLogger("pykata.factory")


def template_nics(devices: Sequence[Device]) -> int | None:
    """How many NICs a template for a VM with `devices` (cold-plugged) has, or None when the devices
    are not ones a template carries: only NICs on taps, pykata.network's net0, net1, ... with its guest
    MACs. (A user-mode network NIC cannot restore a tap template's NIC: the saved virtio-net state
    requires the tap's vnet headers; `user_net_nic` picks the template made for it.)"""
    for i, dev in enumerate(devices):
        if not isinstance(dev, NetDevice) or dev.user_net or dev.id != nic_id(i) or dev.mac != guest_mac(i):
            return None
    return len(devices)


def user_net_nic(devices: Sequence[Device]) -> bool:
    """Whether `devices` is the one user-mode network NIC (net0) of an egress sandbox."""
    return (len(devices) == 1 and isinstance(dev := devices[0], NetDevice) and dev.user_net
            and dev.id == nic_id(0) and dev.mac == guest_mac(0))


async def choose_template(vm_id: str, config: Config, devices: Sequence[Device]) -> Template | None:
    """The template a VM of `config` with `devices` starts from (made now if needed), or None to boot
    cold (`factory.enable_template` off, or devices a template cannot carry).

    Raises:
        HypervisorError: the template cannot be made, or it does not fit `config`.
    """
    if not config.factory.enable_template:
        return None
    if user_net_nic(devices):
        template = await ensure_template(config, nics=1, user_net=True)
        template.check_fits(config, 1, user_net=True)
        return template
    nics = template_nics(devices)
    if nics is None:
        log.info("VM %s: booting cold: its devices are not ones a template can carry", vm_id)
        return None
    template = await ensure_template(config, nics=nics)
    template.check_fits(config, nics)
    return template


async def start_vm(
    vm_id: str,
    config: Config,
    *,
    shared_dir: Path,
    devices: Sequence[Device] = (),
    readiness: ReadinessProbe | None = None,
    guest_shutdown: Callable[[], Awaitable[None]] | None = None,
    vm_dir: Path | None = None,
    die_with_owner: bool = False,
    prepared: Callable[[Hypervisor], Awaitable[None]] | None = None,
    defer: bool = False,
) -> Hypervisor:
    """A started VM for a sandbox, restored from a template or booted (the caller then awaits
    `wait_ready()`). `devices` (the pod's NICs, as plain device values) are cold-plugged. A restored VM
    without a `readiness` probe is ready when its agent answers a health check. `prepared` runs after
    the VM is prepared (its jail uid known) and before QEMU starts: host rules for its traffic.

    `defer`: the VM is returned before its guest runs, and the caller's `start()` runs it: a clone's
    QEMU is already started and waits for the template's state (QemuHypervisor.launch, a pre-started
    VMM), so `start()` only loads the state; a VM that boots cold is only prepared. (A failing deferred
    `start()` stops the VM, but only start_vm discards a template whose state QEMU cannot load.)

    On any failure the VM is stopped; a template whose state QEMU cannot load is discarded (useless for
    every later VM too), so the next VM makes a fresh one.

    Raises:
        HypervisorError: the VM could not be made, prepared or started.
    """
    template = await choose_template(vm_id, config, devices)
    if template is not None:
        config = templated_config(config)
        readiness = readiness or agent_readiness
    vm = QemuHypervisor(vm_id, config, shared_dir=shared_dir, readiness=readiness, guest_shutdown=guest_shutdown,
                        vm_dir=vm_dir, restore=template.restore_source if template is not None else None,
                        die_with_owner=die_with_owner)
    try:
        for dev in devices:
            await vm.add_device(dev)
        await vm.prepare()
        if prepared is not None:
            await prepared(vm)
        if not defer:
            await vm.start()
        elif template is not None:
            await vm.launch()
    except BaseException as exc:
        if isinstance(exc, RestoreError) and template is not None:
            discard_template(template, str(exc))
        await vm.stop()
        raise
    return vm
