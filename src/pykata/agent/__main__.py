"""`python -m pykata.agent` (the guest's init runs `pykata.agent.boot.boot()` directly)."""

from pykata.agent.boot import boot

boot()
