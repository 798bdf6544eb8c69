"""Typed, frozen configuration sections.

Each dataclass is one TOML table. Field defaults are the defaults of a missing key; the types (with
`Literal` for enumerations) drive parsing in `pykata.config.parse`, so adding a key is adding a field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MachineType = Literal["microvm", "q35"]
SharedFs = Literal["virtio-fs", "virtio-9p", "none"]
Accelerator = Literal["auto", "kvm", "tcg"]
AgentChannel = Literal["auto", "vsock", "virtio-serial"]
VirtioFsCache = Literal["auto", "always", "none"]
Virtio9pCache = Literal["none", "mmap"]
InternetworkingModel = Literal["tcfilter", "macvtap", "none"]
RootfsUpper = Literal["guest", "host"]
UserNetwork = Literal["slirp", "passt"]

DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
DEFAULT_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


@dataclass(frozen=True)
class QemuConfig:
    """`[hypervisor.qemu]`: how to build and run the VM."""

    path: str = DEFAULT_QEMU
    # Empty kernel/initrd/image mean "the cached build" (resolved through pykata.guestimage).
    kernel: str = ""
    initrd: str = ""
    image: str = ""
    machine_type: MachineType = "microvm"
    accelerator: Accelerator = "auto"
    # Empty: `host` under KVM, `max` under TCG (max gives the guest RDRAND, so early entropy).
    cpu_model: str = ""
    default_vcpus: int = 1
    # 0: the number of host CPUs.
    default_maxvcpus: int = 0
    default_memory: int = 2048
    # The most memory a running VM may grow to. q35: hot-added DIMMs up to this (0: the host's
    # memory). microvm with memory_balloon: the VM boots with max(default_memory, default_maxmemory)
    # and a balloon holds back what it is not sized to (0: no room to grow, only to shrink).
    default_maxmemory: int = 0
    memory_slots: int = 10
    # microvm: a virtio-balloon (deflate-on-oom off, so the guest's MemTotal follows it) sizes the VM
    # below its boot memory; resize_memory moves it both ways while the VM runs.
    memory_balloon: bool = True
    # The guest reports pages it freed and QEMU drops them, so the host gets freed guest memory back.
    free_page_reporting: bool = True
    shared_fs: SharedFs = "virtio-fs"
    virtio_fs_daemon: str = DEFAULT_VIRTIOFSD
    virtio_fs_extra_args: tuple[str, ...] = ()
    virtio_fs_cache: VirtioFsCache = "auto"
    virtio_fs_queue_size: int = 1024
    # The guest's 9p cache mode (templated VMs): "mmap" a page cache for mappings only, so a writable
    # MAP_SHARED works; "none" no page cache (writable shared mappings fail). configuration.toml says more.
    virtio_9p_cache: Virtio9pCache = "mmap"
    kernel_params: str = ""
    agent_channel: AgentChannel = "auto"
    entropy_source: str = "/dev/urandom"
    enable_annotations: tuple[str, ...] = ()
    # Seconds a trial boot under KVM may take before pykata decides KVM cannot run guests here.
    kvm_probe_timeout: float = 5.0
    # Seconds from QEMU start until the guest must be ready.
    boot_timeout: float = 30.0
    # KiB of the guest's serial console kept on the host (console.log + console.log.1 in the VM's
    # directory on /run); older output is dropped.
    console_log_max_kib: int = 1024
    enable_debug: bool = False
    # MiB of QEMU's TCG translation cache (`-accel tcg,tb-size=`); 0: QEMU's default (up to 1 GiB,
    # filled as the guest runs new code). Ignored under KVM. bench/ctr_bench.py --tb-size measures it.
    tcg_tb_size: int = 0
    # Whether the host's KSM may merge this VM's memory with other processes': guest RAM (`-machine
    # mem-merge`) and QEMU's own (PR_SET_MEMORY_MERGE, pykata.hypervisor.ksm).
    # Off: merged pages let one VM learn what another holds (timing of copy-on-write faults).
    mem_merge: bool = False
    # The VMM's jail (each layer on by default; turn one off only to debug): QEMU's seccomp filter
    # (-sandbox), an unprivileged uid/gid of its own per VM taken from
    # [jail_uid_base, jail_uid_base + jail_uid_count) with no capabilities left (-runas), an empty
    # root directory (-chroot) and a private mount namespace.
    jail_seccomp: bool = True
    jail_user: bool = True
    jail_uid_base: int = 1_500_000_000
    jail_uid_count: int = 65536
    jail_chroot: bool = True
    jail_mount_namespace: bool = True
    # The user-mode network stack of an egress NIC (the SDK's network="egress"): "slirp", libslirp
    # inside QEMU, which then keeps the host's network namespace; "passt", passt in a process of its
    # own and QEMU in an empty network namespace (no port forwards: configuration.toml says why).
    user_network: UserNetwork = "slirp"

    def resolved_maxvcpus(self) -> int:
        """`default_maxvcpus`, with 0 meaning the number of host CPUs (never below default_vcpus)."""
        if self.default_maxvcpus:
            return self.default_maxvcpus
        return max(os.cpu_count() or 1, self.default_vcpus)

    def balloon_memory(self) -> int:
        """MiB a microvm boots with when it has a balloon (its ceiling): max(default_memory,
        default_maxmemory); 0 when it has none (q35, or memory_balloon off)."""
        if self.machine_type != "microvm" or not self.memory_balloon:
            return 0
        return max(self.default_memory, self.default_maxmemory)

    def largest_vm_memory(self) -> int:
        """The most memory any VM may have (MiB): q35's resolved_maxmemory; on microvm the host's memory
        (a VM larger than its balloon's ceiling boots at its size)."""
        if self.machine_type == "q35":
            return self.resolved_maxmemory()
        host_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
        return max(host_mib, self.default_memory, self.default_maxmemory)

    def resolved_maxmemory(self) -> int:
        """`default_maxmemory` in MiB, with 0 meaning the host's memory (never below default_memory)."""
        if self.default_maxmemory:
            return self.default_maxmemory
        host_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
        return max(host_mib, self.default_memory)


@dataclass(frozen=True)
class HypervisorSection:
    """`[hypervisor]`: one table per hypervisor; only QEMU exists."""

    qemu: QemuConfig = field(default_factory=QemuConfig)


@dataclass(frozen=True)
class PykataAgentConfig:
    """`[agent.pykata]`: the guest agent."""

    debug: bool = False
    # Seconds the runtime waits for the agent to answer after the VM started.
    dial_timeout: float = 30.0
    # Seconds the runtime waits for the answer to an agent request that has an end (not the ones
    # that wait for a process, its output or an OOM kill): a guest that never answers cannot hang
    # the runtime longer than this.
    request_timeout: float = 30.0
    kernel_modules: tuple[str, ...] = ()
    # Allow `pykata sandbox exec` (a shell in the guest): told to the agent in CreateSandbox. Not in
    # pykata.config.annotations.ANNOTATABLE_AGENT_KEYS: a pod cannot turn it on.
    debug_console_enabled: bool = False
    # The agent policy (docs/policy.md): a TOML or JSON file, or the document itself in `policy`
    # (which wins). Empty: no policy, the agent serves every RPC.
    policy_file: str = ""
    policy: str = ""
    # Let a pod give its own policy with the annotation io.katacontainers.config.agent.policy
    # (base64 of the document), replacing the configured one.
    enable_policy_annotation: bool = False


@dataclass(frozen=True)
class AgentSection:
    """`[agent]`: one table per agent; only pykata's exists."""

    pykata: PykataAgentConfig = field(default_factory=PykataAgentConfig)


@dataclass(frozen=True)
class RuntimeConfig:
    """`[runtime]`: host-side behaviour of the runtime."""

    internetworking_model: InternetworkingModel = "tcfilter"
    # True: QEMU, virtiofsd and the shim run in the pod's cgroup (the sandbox spec's linux.cgroupsPath);
    # False: in a per-sandbox cgroup under pykata_overhead/ (pykata.resources.cgroups).
    sandbox_cgroup_only: bool = False
    # False (Kata's behaviour): a pod whose host cgroup cannot be made, or capped at the VM's size (the
    # pykata_overhead one), fails. True: it runs anyway, in the shim's own cgroup or an uncapped one,
    # with a warning: its VM is then charged to no limit of its size.
    allow_uncharged_sandbox: bool = False
    # Where the host's cgroup hierarchies are mounted (cgroup v2, or v1 controllers as subdirectories).
    cgroup_root: str = "/sys/fs/cgroup"
    runtime_dir: str = "/run/pykata"
    # Pods' shims are forked by one long-lived process per containerd that did their imports once
    # (pykata.shim.forkserver): they share those pages (~18 MiB) copy-on-write. False: each `start` forks.
    shim_fork_server: bool = True
    # The fork server and the shims it forks offer all their pages to the host's KSM (prctl
    # PR_SET_MEMORY_MERGE), which, when the admin runs it, merges the shims' alike private copies of the
    # server's pages (pykata.hypervisor.ksm). configuration.toml says what it saves and risks.
    shim_mem_merge: bool = False
    cache_dir: str = "/var/cache/pykata"
    enable_debug: bool = False
    # Directories from which a pod may pick its configuration file with io.katacontainers.config_path;
    # empty: the annotation is refused.
    valid_config_paths: tuple[str, ...] = ()
    # `pykata run`'s stdout.log/stderr.log: rotated at this size (MiB), keeping this many old files.
    run_log_max_size: int = 10
    run_log_backups: int = 2
    # Where a container's writable root layer lives: "guest" (an overlay made in the guest over the
    # image's layers, exposed read-only; its upper layer on a guest tmpfs) or "host" (an overlay on
    # the host, written through the shared file system).
    rootfs_upper: RootfsUpper = "guest"
    # The guest tmpfs of one container's upper layer (MiB of VM memory at most, used as written);
    # 0: the kernel's default, half the guest's memory.
    rootfs_upper_size: int = 0
    # OpenTelemetry spans of the pod lifecycle (pykata.tracing), exported to an OTLP/HTTP collector
    # (`tracing_endpoint`, e.g. http://127.0.0.1:4318/v1/traces) or appended to a JSON-lines file.
    enable_tracing: bool = False
    tracing_endpoint: str = ""
    tracing_file: str = ""
    # How the image's read-only layers reach the guest when rootfs_upper = "guest": as a read-only ext4
    # disk built once per image and cached (pykata.resources.rootimage), in one of this many read-only
    # virtio-blk slots every VM has (a template carries them; a clone is given the image at run time).
    # 0: through the shared directory (9p / virtio-fs), as before. Containers beyond the free slots of
    # their VM also use the shared directory.
    rootfs_block_slots: int = 4
    # The largest image (MiB) a slot takes: the size of every slot's disk (sparse: it costs nothing).
    rootfs_block_max_mib: int = 4096
    # The cache of built images under <cache_dir>/rootimages/: least recently used ones are removed
    # once their allocated size passes this (MiB).
    rootfs_block_cache_mib: int = 8192
    # Entries of an image disk the guest looks up ahead, at idle priority, once a container's root is
    # mounted (its dentries and inodes then exist when the container first walks them); 0: none.
    rootfs_prewarm: int = 50_000
    # Only images whose disk uses at least this many inodes are prewarmed; 0: every image.
    rootfs_prewarm_min_inodes: int = 1000
    # The data disk: a writable virtio-blk device every VM has, through which the SDK's files API moves
    # files (write/read/upload/download) in pieces of at most this many MiB; 0: no disk, files go
    # through the agent's stdio channel (several times slower under TCG).
    data_disk_mib: int = 64
    # A CRI pod's emptyDir volumes (kubelet's <kubelet_root_dir>/pods/<uid>/volumes/kubernetes.io~empty-dir/
    # <name>) are made in the guest, a tmpfs each of at most emptydir_size MiB (0: rootfs_upper_size, the
    # writable layer's bound, or if that is 0 too half the VM's memory),
    # shared by the pod's containers, gone with the pod (pykata.resources.emptydir). True: shared from the
    # host directory like a hostPath (9p / virtio-fs), as before. (Kata's disable_guest_empty_dir.)
    disable_guest_empty_dir: bool = False
    kubelet_root_dir: str = "/var/lib/kubelet"
    emptydir_size: int = 0
    # A CRI pod's configmap, secret, downwardAPI and projected volumes (kubelet's <kubelet_root_dir>/pods/
    # <uid>/volumes/kubernetes.io~{configmap,secret,downward-api,projected}/<name>, mounted read-only)
    # are copied into a guest tmpfs when first mounted and kept in step with kubelet's updates (the shim
    # watches the host directory with inotify; pykata.resources.watchable), when the volume has at most
    # watchable_max_files regular files and watchable_max_kib KiB; a bigger one is shared from the host.
    # 0 files: every such volume is shared from the host (9p / virtio-fs), as before.
    watchable_max_files: int = 64
    watchable_max_kib: int = 1024
    # A CRI pod's sandbox (pause) container runs no process in the guest: the VM holds the pod's
    # namespaces, and the shim answers for the sandbox task itself (pykata.shim.tasks.pause); a real
    # pause is started in the guest only when something needs it (a container that shares the pod's
    # pid namespace, an exec into the sandbox). True: every pod runs its pause in the guest, as before.
    sandbox_pause_in_guest: bool = False

    @property
    def root_slots(self) -> int:
        """How many read-only image slots a VM gets (0 when images go through the shared directory)."""
        return self.rootfs_block_slots if self.rootfs_upper == "guest" else 0

    @property
    def runtime_path(self) -> Path:
        return Path(self.runtime_dir)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)


@dataclass(frozen=True)
class FactoryConfig:
    """`[factory]`: VM templating."""

    enable_template: bool = True
    template_path: str = "/run/pykata/template"
    # Warm pool (pykata.factory.pool): VMs restored from the template ahead of time, each held paused
    # by a waiting shim process, handed whole to the next pod that fits. 0: off.
    pool_size: int = 0
    # NICs of each pooled VM: 0 serves pods without a network namespace (`ctr run`); 1 serves CRI pods
    # (Kubernetes), whose one CNI interface is wired to the pooled VM's tap at hand-out
    # (pykata.network.holding). Pods of the other kind start without the pool.
    pool_nics: int = 0
    # The pool is not refilled while the host has less memory available than this, MiB.
    pool_min_free_mib: int = 2048
    # A pooled VM runs a throwaway container before it waits (agent WarmUp), so its pod's first
    # container starts on code QEMU has already translated (TCG).
    pool_warm_up: bool = True
    # A pooled VM puts the image disk of the latest pooled pod's first container in a free image slot
    # before it waits (tentatively: emptied before any container of another image runs).
    pool_prefill_image: bool = True
    # A VM being made for the pool (restore, reseed, warm-up) runs at idle priority (SCHED_IDLE) for up
    # to pykata.factory.pool.IDLE_FILL_LIMIT seconds, so refilling never slows the pod starts.
    pool_fill_idle: bool = True


@dataclass(frozen=True)
class ImageSection:
    """`[image]`: caps on unpacking untrusted images (OCI layouts, OCI and docker-save tarballs).

    Exceeding one stops the unpack with an `ImageLimitError` naming the key; nothing is kept.
    """

    # Layers in one image (Docker refuses more than 125).
    max_layers: int = 128
    # Uncompressed bytes of all layers of one image (tar headers included), MiB: what a gzip bomb hits.
    max_unpacked_mib: int = 4096
    # Tar entries (files, directories, links, whiteouts, implied directories) in all layers of one image.
    max_entries: int = 100_000
    # Bytes of one pax extended header or GNU long name/link record (Go's archive/tar allows 1 MiB).
    max_pax_header_bytes: int = 1 << 20
    # Bytes of an entry's path or link target (Linux's PATH_MAX).
    max_path_length: int = 4096
    # Unpacking stops when the cache file system's free space would drop below this, MiB.
    min_free_mib: int = 512


@dataclass(frozen=True)
class Config:
    """The whole configuration.toml. `source` is the file it was read from (None: built-in defaults)."""

    hypervisor: HypervisorSection = field(default_factory=HypervisorSection)
    agent: AgentSection = field(default_factory=AgentSection)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)
    image: ImageSection = field(default_factory=ImageSection)
    source: str | None = None

    @property
    def qemu(self) -> QemuConfig:
        return self.hypervisor.qemu


# `[hypervisor.qemu]` keys an annotation `io.katacontainers.config.hypervisor.<key>` may override when the
# key is listed in `enable_annotations`. Each changes only the pod's own VM, within the bounds that
# `pykata.config.parse.validate_qemu` checks.
ANNOTATABLE_HYPERVISOR_KEYS = (
    "machine_type",
    "accelerator",
    "cpu_model",
    "default_vcpus",
    "default_maxvcpus",
    "default_memory",
    "default_maxmemory",
    "memory_slots",
    "shared_fs",
    "virtio_fs_cache",
    "virtio_fs_queue_size",
    "kernel_params",
    "enable_debug",
)

# Keys that choose host binaries, host files or the arguments of host processes: a pod that could set
# one would run its own program on the host (`path`), or hand its guest the host's root
# (`virtio_fs_extra_args = ["-o", "source=/"]`). Never settable by annotation, whatever
# `enable_annotations` says: listing one there is a configuration error.
NEVER_ANNOTATABLE_HYPERVISOR_KEYS = (
    "path",
    "kernel",
    "initrd",
    "image",
    "virtio_fs_daemon",
    "virtio_fs_extra_args",
    "entropy_source",
    "enable_annotations",
    # the host-side confinement of QEMU and virtiofsd
    "jail_seccomp",
    "jail_user",
    "jail_uid_base",
    "jail_uid_count",
    "jail_chroot",
    "jail_mount_namespace",
    "user_network",
    # host memory merging across VMs is a side channel between pods (configuration.toml)
    "mem_merge",
)
