"""containerd shim v2 for pykata (`containerd-shim-pykata-v2`, runtime type io.containerd.pykata.v2).

containerd runs the executable with `start` (bootstrap.start: spawn or reuse the long-lived shim),
talks ttrpc to the long-lived shim (daemon + service.TaskService over one pykata sandbox), receives
task events from it (events.EventPublisher), and runs it with `delete` after a shim is gone
(bootstrap.delete: clean up what it left).
"""
