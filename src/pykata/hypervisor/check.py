"""`pykata check`: can this host run pykata VMs? Each check passes, warns or fails, with a fix hint.

pykata can run when nothing fails; TCG instead of KVM is a warning (slow, but it works).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pykata.config import Config, load_config
from pykata.errors import PykataError
from pykata.hypervisor import accel, ksm
from pykata.hypervisor.qemu.assets import resolve_kernel, resolve_rootfs
from pykata.hypervisor.qemu.driver import VHOST_VSOCK

Status = Literal["pass", "warn", "fail"]
MIN_QEMU = (7, 2)
TUN = Path("/dev/net/tun")


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    hint: str = ""
    # Structured facts for --json (e.g. the jail's layers); left out when None.
    facts: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.facts is None:
            del out["facts"]
        return out


def cpu_virtualization(cpuinfo: str | None = None) -> CheckResult:
    """vmx (Intel) / svm (AMD) in the CPU flags."""
    try:
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    except OSError as exc:
        return CheckResult("cpu-virtualization", "warn", f"cannot read /proc/cpuinfo: {exc.strerror}")
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    found = sorted(flags & {"vmx", "svm"})
    if found:
        return CheckResult("cpu-virtualization", "pass", f"CPU flags: {', '.join(found)}")
    return CheckResult("cpu-virtualization", "warn", "no vmx/svm CPU flag: no hardware virtualization visible",
                       "VMs will run under TCG emulation; enable VT-x/AMD-V (or nested virtualization)")


def parse_qemu_version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def qemu_binary(config: Config) -> CheckResult:
    path = config.qemu.path
    if not os.access(path, os.X_OK):
        return CheckResult("qemu", "fail", f"{path} not found or not executable",
                           "apt-get install qemu-system-x86 (or set hypervisor.qemu.path)")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CheckResult("qemu", "fail", f"{path} --version failed: {exc}")
    version = parse_qemu_version(out)
    if version is None:
        return CheckResult("qemu", "fail", f"cannot read the version of {path}: {out.strip()[:80]!r}")
    shown = ".".join(map(str, version))
    if version[:2] < MIN_QEMU:
        return CheckResult("qemu", "fail", f"QEMU {shown} at {path} is older than 7.2",
                           "install QEMU 7.2 or newer (Debian 12: qemu-system-x86)")
    return CheckResult("qemu", "pass", f"QEMU {shown} at {path}")


def virtiofsd(config: Config) -> CheckResult:
    path = config.qemu.virtio_fs_daemon
    needed = config.qemu.shared_fs == "virtio-fs"
    if path and os.access(path, os.X_OK):
        return CheckResult("virtiofsd", "pass", f"{path}")
    return CheckResult("virtiofsd", "fail" if needed else "warn", f"{path or '(none)'} not found",
                       "apt-get install qemu-system-x86 (ships /usr/lib/qemu/virtiofsd), "
                       "or set hypervisor.qemu.shared_fs = \"virtio-9p\"")


def vhost_vsock() -> CheckResult:
    if VHOST_VSOCK.exists():
        return CheckResult("vhost-vsock", "pass", f"{VHOST_VSOCK} present: the agent channel uses vsock")
    return CheckResult("vhost-vsock", "warn", f"no {VHOST_VSOCK}: the agent channel uses virtio-serial",
                       "modprobe vhost_vsock for vsock (optional)")


def net_tun(config: Config) -> CheckResult:
    if TUN.exists():
        return CheckResult("tun", "pass", f"{TUN} present")
    needed = config.runtime.internetworking_model != "none"
    return CheckResult("tun", "fail" if needed else "warn", f"no {TUN}: containers get no network",
                       "mkdir -p /dev/net && mknod /dev/net/tun c 10 200 (or modprobe tun)")


def host_cgroups(config: Config, root: Path | None = None) -> CheckResult:
    """The host's cgroups, which the sandboxes' processes (shim, QEMU, virtiofsd) are charged to
    (pykata.resources.cgroups): cgroup v2, or v1 controllers (a v1 or hybrid host; either passes, so
    the item is "host-cgroups", not "cgroups-v2", and its detail says which). Containers get cgroup v2
    inside the guest whatever the host has."""
    root = Path(config.runtime.cgroup_root) if root is None else root
    where = "the pod's cgroup" if config.runtime.sandbox_cgroup_only else "pykata_overhead/<sandbox>"
    controllers = root / "cgroup.controllers"
    if controllers.exists():
        names = controllers.read_text().split()
        return CheckResult("host-cgroups", "pass", f"unified hierarchy at {root}; controllers: {' '.join(names)}; "
                                                 f"sandboxes are charged to {where}")
    v1 = sorted(d.name for d in root.iterdir() if (d / "cgroup.procs").exists()) if root.is_dir() else []
    hybrid = " (hybrid: v2 only at unified/)" if (root / "unified" / "cgroup.controllers").exists() else ""
    if [name for name in v1 if name != "unified"]:
        return CheckResult("host-cgroups", "pass", f"cgroup v1 at {root}{hybrid}: {' '.join(v1)}; sandboxes are "
                                                 f"charged to {where} in each")
    if config.runtime.allow_uncharged_sandbox:
        return CheckResult("host-cgroups", "warn",
                           f"no cgroup hierarchy at {root}{hybrid}: pods run uncharged to any host cgroup "
                           "(runtime.allow_uncharged_sandbox)",
                           "mount cgroup2 at runtime.cgroup_root, or boot with systemd.unified_cgroup_hierarchy=1")
    return CheckResult("host-cgroups", "fail",
                       f"no cgroup hierarchy at {root}{hybrid}: pods fail, since their VMs could not be charged "
                       "to a host cgroup (runtime.allow_uncharged_sandbox = true runs them uncharged)",
                       "mount cgroup2 at runtime.cgroup_root, or boot with systemd.unified_cgroup_hierarchy=1")


def guest_assets(config: Config) -> tuple[CheckResult, CheckResult, Path | None]:
    """Kernel and root filesystem (configured or built by `pykata image build`)."""
    kernel_path: Path | None = None
    try:
        kernel_path = resolve_kernel(config)
        kernel = CheckResult("guest-kernel", "pass", str(kernel_path))
    except PykataError as exc:
        kernel = CheckResult("guest-kernel", "fail", str(exc), "pykata image build")
    try:
        initrd, image = resolve_rootfs(config)
        rootfs = CheckResult("guest-image", "pass", str(initrd or image))
        if (why := _no_exec_starter(config)) is not None:
            rootfs = CheckResult("guest-image", "warn", f"{initrd or image}: no exec starter in the image, the agent "
                                 f"forks its exec children (slower execs): {why}",
                                 "install build-essential (a C compiler and libc6-dev), then `pykata image build`")
    except PykataError as exc:
        rootfs = CheckResult("guest-image", "fail", str(exc), "pykata image build")
    return kernel, rootfs, kernel_path


def _no_exec_starter(config: Config) -> str | None:
    """Why the built image (`pykata image build`'s) has no exec starter (guestimage/execstart.py), as its
    build recorded it; None when it has one, or for an image the configuration names (not ours to read)."""
    if config.qemu.initrd or config.qemu.image:
        return None
    from pykata.guestimage.rootfs import find_rootfs  # lazy, as resolve_rootfs does

    found = find_rootfs(config.runtime.cache_path)
    recorded = found.manifest.get("exec_starter") if found is not None else None
    if isinstance(recorded, dict) and recorded.get("built") is False:
        return str(recorded.get("why") or "the build did not say why")[:300]
    return None


async def kvm_boot(config: Config, kernel: Path | None, *, use_cache: bool = True) -> CheckResult:
    """Whether KVM can really boot the guest: the same trial boot the driver relies on."""
    q = config.qemu
    if q.accelerator == "tcg":
        return CheckResult("kvm", "warn", "hypervisor.qemu.accelerator = \"tcg\": KVM is not used",
                           "set accelerator = \"auto\" to use KVM where it works")
    unusable = accel.kvm_device_usable()
    if unusable:
        status: Status = "fail" if q.accelerator == "kvm" else "warn"
        return CheckResult("kvm", status, f"{unusable}; VMs use TCG emulation (slow)",
                           "enable virtualization in firmware and load kvm_intel/kvm_amd")
    if kernel is None:
        return CheckResult("kvm", "warn", "/dev/kvm is usable, but there is no guest kernel to trial-boot",
                           "pykata image build, then pykata check again")
    try:
        verdict = await accel.resolve_accelerator(dataclasses.replace(q, accelerator="auto"), kernel,
                                                  config.runtime.cache_path, use_cache=use_cache)
    except PykataError as exc:
        return CheckResult("kvm", "fail", str(exc))
    cached = " (cached verdict)" if verdict.cached else ""
    if verdict.accel == "kvm":
        return CheckResult("kvm", "pass", f"{verdict.reason}{cached}")
    status = "fail" if q.accelerator == "kvm" else "warn"
    return CheckResult("kvm", status, f"KVM cannot boot the guest: {verdict.reason}{cached}; VMs use TCG (slow)",
                       "expected on nested/paravirtual (PVM) hosts; on bare metal check the kvm module")


def vmm_jail(config: Config, *, probe_qemu: bool = True) -> CheckResult:
    """Which confinement layers QEMU runs under (pykata.hypervisor.jail): a QEMU started jailed (no
    guest) is inspected in /proc, so the layers reported are those in force (`probe_qemu`)."""
    from pykata.hypervisor import fileguard, scope
    from pykata.hypervisor.jail import configured_layers, namespace_prefix
    from pykata.hypervisor.qemu.jailprobe import probe
    from pykata.hypervisor.qemu.proxy9p import PROXY_HELPER

    q = config.qemu
    layers = configured_layers(q)
    # not a switchable layer: in force wherever the kernel has it (Linux 6.12+)
    facts: dict[str, Any] = {"layers": layers, "landlock_scope": scope.supported()}
    if q.jail_user:
        facts["uid_range"] = [q.jail_uid_base, q.jail_uid_base + q.jail_uid_count - 1]
    try:
        namespace_prefix(q.jail_mount_namespace, no_new_privs=q.jail_user)
    except PykataError as exc:
        return CheckResult("vmm-jail", "fail", str(exc), "apt-get install util-linux", facts)
    # Templated VMs share files over 9p, which a QEMU without privileges serves through the proxy helper.
    nine_p = q.shared_fs == "virtio-9p" or config.factory.enable_template
    if q.jail_user and nine_p and not os.access(PROXY_HELPER, os.X_OK):
        return CheckResult("vmm-jail", "fail", f"{PROXY_HELPER} not found: a jailed QEMU cannot serve 9p",
                           "apt-get install qemu-system-x86 (7.2 ships it), or set jail_user = false", facts)
    if probe_qemu and os.access(q.path, os.X_OK):
        # Not what is configured but what a QEMU started this way really runs under.
        try:
            found = probe(q, config.runtime.runtime_path).layers()
        except PykataError as exc:
            return CheckResult("vmm-jail", "fail", f"a jailed QEMU does not start: {exc}",
                               "set the hypervisor.qemu.jail_* key named above to false to find the layer", facts)
        active = {"seccomp": found["seccomp"], "unprivileged-uid": found["unprivileged"],
                  "no-capabilities": found["no-capabilities"], "no-new-privs": found["no-new-privs"],
                  "chroot": found["chroot"], "mount-namespace": found["mount-namespace"],
                  # the probe QEMU holds no ring (7.2 drops its own at start either way): a probe
                  # process under QEMU's filter must also be refused one
                  "no-io-uring": found["no-io-uring"] and fileguard.io_uring_refused()}
        facts["active"] = active
        missing = [name for name, wanted in layers.items() if wanted and not active[name]]
        if missing:
            return CheckResult("vmm-jail", "fail", f"configured but not in force: {', '.join(missing)}",
                               "check QEMU's seccomp support and util-linux's unshare", facts)
        layers = active
    on = [name for name, active in layers.items() if active]
    off = [name for name, active in layers.items() if not active]
    detail = "QEMU confined by " + (", ".join(on) if on else "nothing")
    detail += ("; Landlock scope: no abstract unix socket or signal out of it" if facts["landlock_scope"]
               else f"; no Landlock scope (kernel ABI {scope.abi()}, needs {scope.SCOPE_ABI})")
    if off:
        return CheckResult("vmm-jail", "warn", f"{detail}; off: {', '.join(off)}",
                           "set the hypervisor.qemu.jail_* keys back to true (off only to debug)", facts)
    return CheckResult("vmm-jail", "pass", detail, "", facts)


def user_network(config: Config) -> CheckResult:
    """Where the egress NICs' user-mode network runs (hypervisor.qemu.user_network): libslirp inside
    QEMU, which then keeps the host's network namespace, or passt beside a QEMU without network."""
    import shutil

    from pykata.hypervisor.qemu.passt import PASST

    q = config.qemu
    binary = shutil.which(PASST)
    facts: dict[str, Any] = {"user_network": q.user_network, "passt": binary}
    if q.user_network == "slirp":
        return CheckResult("user-network", "pass", "egress NICs on libslirp inside QEMU: an egress sandbox's QEMU "
                           "keeps the host's network namespace (iptables by its uid and the Landlock scope limit "
                           "it; hypervisor.qemu.user_network = \"passt\" moves it out, without port forwards)",
                           "", facts)
    if binary is None:
        return CheckResult("user-network", "fail", "hypervisor.qemu.user_network is \"passt\" and passt is "
                           "not installed", "apt-get install passt=0.0~git20230309.7c7625d-1", facts)
    return CheckResult("user-network", "pass", f"egress NICs on {binary} (own uid, confined); their QEMU has an "
                       "empty network namespace", "", facts)


def file_guard() -> CheckResult:
    """Whether the processes that write the guest's files can start under pykata.hypervisor.fileguard
    (a probe process is started under it)."""
    from pykata.hypervisor import fileguard

    facts = {"dropped_capabilities": ["CAP_MKNOD", "CAP_FSETID", "CAP_SETFCAP"],
             "seccomp_refuses": ["setuid/setgid modes", "device nodes", "openat2", "io_uring", "keyrings",
                                 "perf_event_open", "bpf", "userfaultfd", "i386/x32 calls"]}
    try:
        subprocess.run(["true"], preexec_fn=fileguard.guard_child, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return CheckResult("file-guard", "fail", f"cannot start a process under the file guard: {exc}",
                           "run pykata as root on a kernel with seccomp filters", facts)
    return CheckResult("file-guard", "pass", "virtiofsd and 9p servers: no setuid files or device nodes "
                       "for the guest", "", facts)


def template_memory(config: Config) -> CheckResult:
    """Whether a template clone's QEMU holds the template's memory file read-only
    (pykata.hypervisor.qemu.ramreadonly: a preload library built once with the host's C compiler)."""
    from pykata.hypervisor.qemu import ramreadonly

    if not config.factory.enable_template:
        return CheckResult("template-memory", "pass", "no template clones (factory.enable_template = false)")
    lib = ramreadonly.library(config.runtime.cache_path)
    if lib is None:
        return CheckResult("template-memory", "warn", "a template clone's QEMU holds the template's memory file "
                           "writable: a guest escaped into QEMU could change other pods' guests",
                           "install a C compiler (apt-get install build-essential) for pykata's preload library")
    return CheckResult("template-memory", "pass", "template clones hold the template's memory read-only", "",
                       {"library": str(lib)})


def memory_merging(config: Config, *, ksm_running: bool | None = None,
                   process_merge: bool | None = None) -> CheckResult:
    """The KSM opt-ins (runtime.shim_mem_merge, hypervisor.qemu.mem_merge) against the host: whether ksmd
    runs (the admin's switch) and the kernel can mark whole processes (pykata.hypervisor.ksm)."""
    running = ksm.running() if ksm_running is None else ksm_running
    whole = ksm.merges_supported() if process_merge is None else process_merge
    asked = [name for name, on in (("runtime.shim_mem_merge", config.runtime.shim_mem_merge),
                                   ("hypervisor.qemu.mem_merge", config.qemu.mem_merge)) if on]
    facts = {"ksmd_running": running, "whole_process": whole, "asked": asked}
    if not asked:
        return CheckResult("memory-merging", "pass", "off: pykata offers no memory to KSM", facts=facts)
    if not running:
        return CheckResult("memory-merging", "warn", f"{', '.join(asked)} on, but ksmd does not run: nothing is merged",
                           "echo 1 > /sys/kernel/mm/ksm/run (and set its pages_to_scan)", facts)
    if not whole:
        return CheckResult("memory-merging", "warn", "this kernel cannot mark whole processes "
                           "(PR_SET_MEMORY_MERGE across exec: Linux 6.7): shims unmerged, QEMU's guest RAM only",
                           "a newer kernel", facts)
    if config.qemu.mem_merge:
        return CheckResult("memory-merging", "warn", "guest RAM and QEMU's memory are merged across VMs: a side "
                           "channel between pods", "hypervisor.qemu.mem_merge = false unless the pods trust each other",
                           facts)
    return CheckResult("memory-merging", "pass", "the shims' memory is merged by ksmd", facts=facts)


def containerd() -> CheckResult:
    found = shutil.which("containerd")
    if found:
        return CheckResult("containerd", "pass", found)
    return CheckResult("containerd", "warn", "containerd not found: only the pykata CLI can run containers",
                       "apt-get install containerd")


async def run_checks(config_loader: Callable[[], Config] = load_config, *,
                     use_cache: bool = True) -> list[CheckResult]:
    """Run every check; never raises for a failing host (a failure is a result)."""
    results: list[CheckResult] = []
    try:
        config = config_loader()
        results.append(CheckResult("config", "pass", config.source or "(built-in defaults)"))
    except PykataError as exc:
        results.append(CheckResult("config", "fail", str(exc), "fix the configuration file named above"))
        config = Config()
    results.append(cpu_virtualization())
    results.append(qemu_binary(config))
    qemu_ok = results[-1].status == "pass"
    kernel, rootfs, kernel_path = guest_assets(config)
    results.append(await kvm_boot(config, kernel_path if qemu_ok else None, use_cache=use_cache))
    results.append(virtiofsd(config))
    results.append(vhost_vsock())
    results.append(net_tun(config))
    results.append(host_cgroups(config))
    results.append(vmm_jail(config))
    results.append(user_network(config))
    results.append(file_guard())
    results.append(template_memory(config))
    results += [kernel, rootfs]
    results.append(memory_merging(config))
    results.append(containerd())
    return results


def can_run(results: list[CheckResult]) -> bool:
    return all(r.status != "fail" for r in results)


def run_checks_sync(config_loader: Callable[[], Config] = load_config, *,
                    use_cache: bool = True) -> list[CheckResult]:
    return asyncio.run(run_checks(config_loader, use_cache=use_cache))
