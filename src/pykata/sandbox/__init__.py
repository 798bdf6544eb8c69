"""Host side of a sandbox: the VM, its agent, shared directory, containers and persisted state."""

from pykata.sandbox.ocispec import SpecError, Volume, build_spec
from pykata.sandbox.process import Process
from pykata.sandbox.sandbox import Container, Sandbox, sandboxes_dir

__all__ = ["Container", "Process", "Sandbox", "SpecError", "Volume",
           "build_spec", "sandboxes_dir"]
