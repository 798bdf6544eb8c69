"""pykata-agent: the process inside the VM that the host talks to over ttrpc.

It runs as PID 1 of the guest (/init sets the VM up in that process first: pykata.agent.pid1) and
may import only the standard library, protobuf, `pykata.ttrpc`, `pykata.protocols` and its own
modules: the guest carries nothing else.

For now it serves the Health service; containers, processes and IO come with the full agent.
"""
