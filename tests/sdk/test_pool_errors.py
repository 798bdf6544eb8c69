"""Pool error paths, with a fake sandbox whose boot always fails (no VM: the failure is the point)."""

from __future__ import annotations

import pytest

from pykata.errors import HypervisorError
from pykata.sdk.errors import SandboxTimeoutError, SdkError
from pykata.sdk.pool import AsyncPool


class FakeFailingSandbox:
    """Stands in for AsyncSandbox: start() fails as a boot without a guest image does."""

    closed = 0

    async def start(self) -> None:
        raise HypervisorError("no guest root filesystem: run `pykata image build`")

    async def close(self) -> None:
        FakeFailingSandbox.closed += 1


async def test_wait_ready_and_acquire_raise_the_boot_error_instead_of_waiting_forever() -> None:
    pool = AsyncPool(size=2)
    pool._make = FakeFailingSandbox  # type: ignore[assignment]
    try:
        with pytest.raises(SdkError, match="no guest root filesystem") as info:
            await pool.wait_ready(timeout=30)
        assert "0 of 2 sandboxes ready" in str(info.value)
        assert not isinstance(info.value, SandboxTimeoutError)  # raised when the boot failed, not at the timeout
        with pytest.raises(SdkError, match="no guest root filesystem"):
            await pool.acquire(timeout=30)
    finally:
        await pool.close()
    assert FakeFailingSandbox.closed >= 1  # every failed boot's sandbox was closed
