"""Finding the agent's virtio-serial port by its name: the guest's PID 1 (pykata.agent.pid1) waits
for it before the agent's channel code (asyncio, ttrpc) is imported."""

from __future__ import annotations

from pathlib import Path

DEFAULT_PORT_NAME = "agent.channel.0"
VIRTIO_PORTS = Path("/sys/class/virtio-ports")


def find_serial_port(name: str = DEFAULT_PORT_NAME, sysfs: Path = VIRTIO_PORTS) -> str | None:
    """The /dev path of the virtio-serial port called `name`, or None."""
    if not sysfs.is_dir():
        return None
    for entry in sorted(sysfs.iterdir()):
        try:
            if (entry / "name").read_text().strip() == name:
                return f"/dev/{entry.name}"
        except OSError:
            continue
    return None
