"""One pod life cycle through CRI, as kubelet drives it, shared by tests/cri and bench/churn.py."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import psutil

from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd, wait_gone
from tests.shim.harness import SHIM

# What a fault in the loop kills with SIGKILL (matched on the first words of a pod's process's command line)
FAULT_MARKERS = ("qemu-system", SHIM.name)
# ... and of a pod on virtio-fs (its own virtiofsd: VIRTIO_FS_ANNOTATIONS)
VIRTIO_FS_FAULT_MARKERS = (*FAULT_MARKERS, "virtiofsd")
# A pod that boots cold with virtio-fs (the admin must list shared_fs in hypervisor.qemu.enable_annotations)
VIRTIO_FS_ANNOTATIONS = {"io.katacontainers.config.hypervisor.shared_fs": "virtio-fs"}
# How the cycle ends a pod: "stops" (3 concurrent StopPodSandbox, 1 more, RemovePodSandbox: the seed
# churn), "remove-race" (2 StopPodSandbox concurrent with a RemovePodSandbox, as kubelet's pod workers and
# its garbage collector may send them; then StopPodSandbox and RemovePodSandbox until the pod is gone)
STOP_MODES = ("stops", "remove-race")


class CycleError(AssertionError):
    """A step of the pod cycle gave a wrong answer."""


@dataclass
class CycleResult:
    pod_id: str
    seconds: float
    hang: bool = False  # some call hit its deadline
    leftovers: list[str] = field(default_factory=list)
    stop_errors: list[str] = field(default_factory=list)  # racing StopPodSandbox replies that were errors
    remove_retries: int = 0  # RemovePodSandbox retried after a fault (STILL_RUNNING)


def containerd_stop_race(error: str) -> bool:
    """Whether a racing duplicate StopPodSandbox failed with one of containerd 1.6's own races."""
    return "failed to destroy network" in error or ("failed to kill" in error and "ttrpc: closed" in error)


def pod_cycle(ctd: CriContainerd, cri: Cri, handler: str,
              fault: Callable[[str], None] | None = None, *, annotations: dict[str, str] | None = None,
              stop_mode: str = "stops", name: str = "") -> CycleResult:
    """RunPodSandbox, two busybox containers created and started, ExecSync `echo foo`, ContainerStatus,
    then 3 concurrent StopPodSandbox, 1 more, RemovePodSandbox; check the pod is gone and left nothing.

    Raises CycleError when an answer is wrong, grpc.RpcError when a call fails (a DEADLINE_EXCEEDED one
    is a hang). containerd's CNI teardown error on racing StopPodSandbox calls is tolerated (the issue allows
    it) when the StopPodSandbox after them succeeds. `fault`, when given, is called with the pod id between
    the exec and the stops (to kill a process of the pod, say; or to restart containerd). `annotations`
    are the pod's; `stop_mode` one of STOP_MODES; `name` the pod's (default: a new churn-<handler>-<hex>).
    """
    start = time.monotonic()
    pod_id, pod_config = cri.run_pod(name or pod_name(handler), handler, annotations)
    result = CycleResult(pod_id, 0.0)
    try:
        ids = [cri.create_container(pod_id, pod_config, f"c{i}", BUSYBOX_IMAGE, ["sleep", "3600"])
               for i in range(2)]
        for cid in ids:
            cri.start_container(cid)
        reply = cri.exec_sync(ids[0], ["echo", "foo"])
        if reply.stdout != b"foo\n" or reply.exit_code != 0:
            raise CycleError(f"ExecSync echo foo -> {reply.stdout!r} exit {reply.exit_code}: {reply.stderr!r}")
        for cid in ids:
            if (state := cri.container_state(cid)) != "CONTAINER_RUNNING":
                raise CycleError(f"container {cid} is {state}, not running")
        netns = cri.pod_netns(pod_id)
        if netns is None or not os.path.exists(netns):
            raise CycleError(f"pod {pod_id} has no network namespace: {netns}")
        if not ctd.pod_leftovers(pod_id):  # the leak check below must see a live pod's parts
            raise CycleError(f"no shim process or directory of the running pod {pod_id} found")
        if fault is not None:
            fault(pod_id)
        if stop_mode == "remove-race":
            _stop_remove_race(cri, pod_id, result)
        else:
            _stops_then_remove(cri, pod_id, result, retry=fault is not None)
    except grpc.RpcError as e:
        result.hang = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        raise
    finally:
        result.seconds = time.monotonic() - start
    if any(p.id == pod_id for p in cri.list_pods()):
        raise CycleError(f"pod {pod_id} still listed after RemovePodSandbox")
    result.leftovers = wait_gone(ctd, pod_id)
    if os.path.exists(netns):
        result.leftovers.append(f"netns {netns}")
    result.seconds = time.monotonic() - start
    return result


def pod_name(handler: str) -> str:
    """A new pod name for the cycle (reap_pod finds the pod by it after a failure)."""
    return f"churn-{handler}-{uuid.uuid4().hex[:6]}"


REAP_FOR = 180.0  # seconds reap_pod keeps trying (kubelet's runtime-request-timeout is 2 min a call)


def reap_pod(ctd: CriContainerd, cri: Cri, name: str) -> list[str]:
    """After a failed cycle, end pod `name` as kubelet would (StopPodSandbox and RemovePodSandbox until
    it is unlisted; a pod whose RunPodSandbox timed out may appear later) and return what it left, or
    why it could not be removed."""
    deadline = time.monotonic() + REAP_FOR
    ids: set[str] = set()
    error = ""
    while True:
        try:
            pods = [p.id for p in cri.list_pods() if p.metadata.name == name]
            ids.update(pods)
            if not pods:
                break
            for pod_id in pods:
                cri.stop_pod(pod_id)
                cri.remove_pod(pod_id)
        except grpc.RpcError as e:
            error = f"{e.code().name}: {e.details()}"
            time.sleep(1.0)
        if time.monotonic() > deadline:
            return [f"pod {name} not removed within {REAP_FOR:.0f} s{f': {error}' if error else ''}"]
    left: list[str] = []
    for pod_id in sorted(ids):
        left += wait_gone(ctd, pod_id)
    return left


def stray_shims(ctd: CriContainerd, cri: Cri, within: float = 20.0) -> list[str]:
    """Shims started by `ctd` for a pod it no longer lists, once they stop shrinking (a shim exits
    shortly after its pod's removal): what a pod whose id the loop never learnt (its RunPodSandbox
    failed) left. A claimed pooled shim's command line names neither, so only booting shims are seen."""
    deadline = time.monotonic() + within
    while True:
        listed = {p.id for p in cri.list_pods()}
        stray = []
        for p in ctd.shims():
            with contextlib.suppress(psutil.Error):
                cmd = p.cmdline()
                if "-id" in cmd[:-1] and cmd[cmd.index("-id") + 1] not in listed:
                    stray.append(f"shim {p.pid} of {cmd[cmd.index('-id') + 1][:12]}")
        if not stray or time.monotonic() > deadline:
            return stray
        time.sleep(0.2)


def wait_cri_ready(cri: Cri, within: float = 60.0) -> None:
    """Until containerd's CRI plugin answers (a restarted containerd serves `ctr version` first, and
    answers CRI calls with "server is not initialized yet" until it has recovered its pods)."""
    deadline = time.monotonic() + within
    while True:
        try:
            cri.list_pods()
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _race(calls: list[Callable[[], object]], result: CycleResult) -> None:
    """Make the CRI calls at once, as kubelet's duplicates come; a hang (DEADLINE_EXCEEDED) raises, any
    other error is recorded in result.stop_errors for the caller to judge."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        for f in futures:
            try:
                f.result()
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                result.stop_errors.append(f"{e.code().name}: {e.details()}")


def _stops_then_remove(cri: Cri, pod_id: str, result: CycleResult, retry: bool) -> None:
    """3 concurrent StopPodSandbox, 1 more, RemovePodSandbox (the seed churn's end of a pod)."""
    _race([lambda: cri.stop_pod(pod_id)] * 3, result)
    # containerd 1.6's own races may fail any of the racing duplicates (kubelet retries them):
    # its CNI teardown, and a duplicate's Kill of a container's or the sandbox's task sent on
    # containerd's client to the shim that the winner's task delete has just closed (shimTask.delete
    # closes it, waits for the shim's `delete`, and only then removes the task; the container or
    # sandbox still looks running until then); any other error is ours, and the retry below must
    # succeed either way
    other = [e for e in result.stop_errors if not containerd_stop_race(e)]
    if other:
        raise CycleError(f"racing StopPodSandbox failed: {other}")
    cri.stop_pod(pod_id)
    _remove(cri, pod_id, result, retry=retry)


def _stop_remove_race(cri: Cri, pod_id: str, result: CycleResult) -> None:
    """2 StopPodSandbox concurrent with a RemovePodSandbox (containerd's RemovePodSandbox stops a ready
    pod itself), then StopPodSandbox and RemovePodSandbox again until the pod is gone, as kubelet retries.
    Any error of the racing calls but a hang is tolerated (recorded in stop_errors); the retries must end
    it within REMOVE_RETRY_FOR."""
    _race([lambda: cri.stop_pod(pod_id), lambda: cri.remove_pod(pod_id), lambda: cri.stop_pod(pod_id)], result)
    deadline = time.monotonic() + REMOVE_RETRY_FOR
    while any(p.id == pod_id for p in cri.list_pods()):
        try:
            cri.stop_pod(pod_id)
            cri.remove_pod(pod_id)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED or time.monotonic() > deadline:
                raise
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return
            result.remove_retries += 1
            time.sleep(0.2)


# After a fault, containerd 1.6's CRI plugin may still be handling the killed tasks' exits when
# RemovePodSandbox comes: StopPodSandbox returns at once for a container whose task is already gone
# (cri stopContainer: task NotFound -> nil) without waiting for that container's exit handler, and the
# handler's task.Delete waits in runtime/v2 shimTask.delete -> shim.delete -> UserOnCloseWait for
# cleanupAfterDeadShim, which runs the shim binary's `delete` once per task. RemovePodSandbox then
# answers "container is still running" and kubelet simply retries; so does the loop.
STILL_RUNNING = "container is still running"
REMOVE_RETRY_FOR = 10.0


def _remove(cri: Cri, pod_id: str, result: CycleResult, retry: bool) -> None:
    deadline = time.monotonic() + REMOVE_RETRY_FOR
    while True:
        try:
            cri.remove_pod(pod_id)
            return
        except grpc.RpcError as e:
            if not retry or STILL_RUNNING not in (e.details() or "") or time.monotonic() > deadline:
                raise
            result.remove_retries += 1
            time.sleep(0.2)


def kill_pod_process(pod_id: str, marker: str, ctd: CriContainerd | None = None) -> None:
    """SIGKILL the one process of pod `pod_id` whose command starts with `marker` (QEMU, the shim,
    virtiofsd: the first of its two) and wait for it to be gone (a pod on a pooled VM: found through
    `ctd`'s pod_parts). Raises CycleError when there is not exactly one."""
    names, pids = ctd.pod_parts(pod_id) if ctd is not None else (set(), set())
    names = {pod_id, *names}
    victims = [p for p in psutil.process_iter(["cmdline"])
               if marker in " ".join((p.info["cmdline"] or [])[:2])
               and (p.pid in pids or any(n in " ".join(p.info["cmdline"] or []) for n in names))]
    # one that forks itself (virtiofsd's sandboxed child) is killed through its first process
    pids_found = {p.pid for p in victims}
    victims = [p for p in victims if p.ppid() not in pids_found]
    if len(victims) != 1:
        raise CycleError(f"expected one {marker} process of pod {pod_id}, found {len(victims)}")
    victims[0].kill()
    victims[0].wait(10)


def fault_for(iteration: int, every: int, markers: tuple[str, ...] = FAULT_MARKERS) -> str | None:
    """The loop's fault schedule: every `every`-th iteration kills one of `markers` (QEMU, the shim,
    and virtiofsd for a virtio-fs pod), in turn (None: no fault; `every` 0 turns faults off)."""
    if every <= 0 or iteration % every != every - 1:
        return None
    return markers[(iteration // every) % len(markers)]
