import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IPFamily(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IP_FAMILY_UNSPECIFIED: _ClassVar[IPFamily]
    IP_FAMILY_V4: _ClassVar[IPFamily]
    IP_FAMILY_V6: _ClassVar[IPFamily]
IP_FAMILY_UNSPECIFIED: IPFamily
IP_FAMILY_V4: IPFamily
IP_FAMILY_V6: IPFamily

class CreateSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id", "hostname", "dns", "storages", "sandbox_pidns", "kernel_modules", "debug_console")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DNS_FIELD_NUMBER: _ClassVar[int]
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_PIDNS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_MODULES_FIELD_NUMBER: _ClassVar[int]
    DEBUG_CONSOLE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    hostname: str
    dns: _containers.RepeatedScalarFieldContainer[str]
    storages: _containers.RepeatedCompositeFieldContainer[Storage]
    sandbox_pidns: bool
    kernel_modules: _containers.RepeatedCompositeFieldContainer[KernelModule]
    debug_console: bool
    def __init__(self, sandbox_id: _Optional[str] = ..., hostname: _Optional[str] = ..., dns: _Optional[_Iterable[str]] = ..., storages: _Optional[_Iterable[_Union[Storage, _Mapping]]] = ..., sandbox_pidns: _Optional[bool] = ..., kernel_modules: _Optional[_Iterable[_Union[KernelModule, _Mapping]]] = ..., debug_console: _Optional[bool] = ...) -> None: ...

class DestroySandboxRequest(_message.Message):
    __slots__ = ("timeout_seconds",)
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: int
    def __init__(self, timeout_seconds: _Optional[int] = ...) -> None: ...

class KernelModule(_message.Message):
    __slots__ = ("name", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    parameters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., parameters: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateContainerRequest(_message.Message):
    __slots__ = ("container_id", "oci_spec_json", "storages", "devices", "sandbox_pidns", "terminal", "pid_ns_container")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    OCI_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_PIDNS_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    PID_NS_CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    oci_spec_json: str
    storages: _containers.RepeatedCompositeFieldContainer[Storage]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    sandbox_pidns: bool
    terminal: bool
    pid_ns_container: str
    def __init__(self, container_id: _Optional[str] = ..., oci_spec_json: _Optional[str] = ..., storages: _Optional[_Iterable[_Union[Storage, _Mapping]]] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., sandbox_pidns: _Optional[bool] = ..., terminal: _Optional[bool] = ..., pid_ns_container: _Optional[str] = ...) -> None: ...

class CreateContainerResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class StartContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class StartContainerResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class RemoveContainerRequest(_message.Message):
    __slots__ = ("container_id", "timeout_seconds")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    timeout_seconds: int
    def __init__(self, container_id: _Optional[str] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class ExecProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "process", "stdin", "close_stdin")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STDIN_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    process: Process
    stdin: bytes
    close_stdin: bool
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., process: _Optional[_Union[Process, _Mapping]] = ..., stdin: _Optional[bytes] = ..., close_stdin: _Optional[bool] = ...) -> None: ...

class ExecProcessResponse(_message.Message):
    __slots__ = ("pid", "stdin_written", "stdin_closed")
    PID_FIELD_NUMBER: _ClassVar[int]
    STDIN_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    STDIN_CLOSED_FIELD_NUMBER: _ClassVar[int]
    pid: int
    stdin_written: int
    stdin_closed: bool
    def __init__(self, pid: _Optional[int] = ..., stdin_written: _Optional[int] = ..., stdin_closed: _Optional[bool] = ...) -> None: ...

class SignalProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "signal", "all")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    signal: int
    all: bool
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ..., all: _Optional[bool] = ...) -> None: ...

class WaitProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "output_limit", "output_wait_ms")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    output_limit: int
    output_wait_ms: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., output_limit: _Optional[int] = ..., output_wait_ms: _Optional[int] = ...) -> None: ...

class WaitProcessResponse(_message.Message):
    __slots__ = ("exit_status", "exited_at", "output", "stdout", "stderr", "stdout_eof", "stderr_eof", "running")
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDOUT_EOF_FIELD_NUMBER: _ClassVar[int]
    STDERR_EOF_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    exit_status: int
    exited_at: _timestamp_pb2.Timestamp
    output: bool
    stdout: bytes
    stderr: bytes
    stdout_eof: bool
    stderr_eof: bool
    running: bool
    def __init__(self, exit_status: _Optional[int] = ..., exited_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., output: _Optional[bool] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., stdout_eof: _Optional[bool] = ..., stderr_eof: _Optional[bool] = ..., running: _Optional[bool] = ...) -> None: ...

class UpdateContainerRequest(_message.Message):
    __slots__ = ("container_id", "linux_resources_json")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    LINUX_RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    linux_resources_json: str
    def __init__(self, container_id: _Optional[str] = ..., linux_resources_json: _Optional[str] = ...) -> None: ...

class PauseContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ResumeContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class Process(_message.Message):
    __slots__ = ("args", "env", "cwd", "user", "terminal", "console_height", "console_width", "no_new_privileges", "capabilities", "rlimits", "apparmor_profile", "selinux_label", "oom_score_adj")
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    NO_NEW_PRIVILEGES_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    RLIMITS_FIELD_NUMBER: _ClassVar[int]
    APPARMOR_PROFILE_FIELD_NUMBER: _ClassVar[int]
    SELINUX_LABEL_FIELD_NUMBER: _ClassVar[int]
    OOM_SCORE_ADJ_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    user: User
    terminal: bool
    console_height: int
    console_width: int
    no_new_privileges: bool
    capabilities: Capabilities
    rlimits: _containers.RepeatedCompositeFieldContainer[Rlimit]
    apparmor_profile: str
    selinux_label: str
    oom_score_adj: int
    def __init__(self, args: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[str]] = ..., cwd: _Optional[str] = ..., user: _Optional[_Union[User, _Mapping]] = ..., terminal: _Optional[bool] = ..., console_height: _Optional[int] = ..., console_width: _Optional[int] = ..., no_new_privileges: _Optional[bool] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., rlimits: _Optional[_Iterable[_Union[Rlimit, _Mapping]]] = ..., apparmor_profile: _Optional[str] = ..., selinux_label: _Optional[str] = ..., oom_score_adj: _Optional[int] = ...) -> None: ...

class User(_message.Message):
    __slots__ = ("uid", "gid", "additional_gids", "umask", "username")
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_GIDS_FIELD_NUMBER: _ClassVar[int]
    UMASK_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    uid: int
    gid: int
    additional_gids: _containers.RepeatedScalarFieldContainer[int]
    umask: int
    username: str
    def __init__(self, uid: _Optional[int] = ..., gid: _Optional[int] = ..., additional_gids: _Optional[_Iterable[int]] = ..., umask: _Optional[int] = ..., username: _Optional[str] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("bounding", "effective", "inheritable", "permitted", "ambient")
    BOUNDING_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    INHERITABLE_FIELD_NUMBER: _ClassVar[int]
    PERMITTED_FIELD_NUMBER: _ClassVar[int]
    AMBIENT_FIELD_NUMBER: _ClassVar[int]
    bounding: _containers.RepeatedScalarFieldContainer[str]
    effective: _containers.RepeatedScalarFieldContainer[str]
    inheritable: _containers.RepeatedScalarFieldContainer[str]
    permitted: _containers.RepeatedScalarFieldContainer[str]
    ambient: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bounding: _Optional[_Iterable[str]] = ..., effective: _Optional[_Iterable[str]] = ..., inheritable: _Optional[_Iterable[str]] = ..., permitted: _Optional[_Iterable[str]] = ..., ambient: _Optional[_Iterable[str]] = ...) -> None: ...

class Rlimit(_message.Message):
    __slots__ = ("type", "hard", "soft")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    HARD_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    type: str
    hard: int
    soft: int
    def __init__(self, type: _Optional[str] = ..., hard: _Optional[int] = ..., soft: _Optional[int] = ...) -> None: ...

class Storage(_message.Message):
    __slots__ = ("driver", "driver_options", "source", "fstype", "options", "mount_point")
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    DRIVER_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    driver: str
    driver_options: _containers.RepeatedScalarFieldContainer[str]
    source: str
    fstype: str
    options: _containers.RepeatedScalarFieldContainer[str]
    mount_point: str
    def __init__(self, driver: _Optional[str] = ..., driver_options: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., fstype: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ..., mount_point: _Optional[str] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "type", "vm_path", "container_path", "options")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VM_PATH_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    vm_path: str
    container_path: str
    options: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., vm_path: _Optional[str] = ..., container_path: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ...) -> None: ...

class WriteStreamRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "data")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    data: bytes
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteStreamResponse(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class ReadStreamRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "max_length")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    max_length: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., max_length: _Optional[int] = ...) -> None: ...

class ReadStreamResponse(_message.Message):
    __slots__ = ("data", "eof")
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    eof: bool
    def __init__(self, data: _Optional[bytes] = ..., eof: _Optional[bool] = ...) -> None: ...

class CloseStdinRequest(_message.Message):
    __slots__ = ("container_id", "exec_id")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class TtyWinResizeRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "rows", "columns")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    rows: int
    columns: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., rows: _Optional[int] = ..., columns: _Optional[int] = ...) -> None: ...

class StatsContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class StatsContainerResponse(_message.Message):
    __slots__ = ("cgroup_stats", "network_stats")
    CGROUP_STATS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_STATS_FIELD_NUMBER: _ClassVar[int]
    cgroup_stats: CgroupStats
    network_stats: _containers.RepeatedCompositeFieldContainer[NetworkStats]
    def __init__(self, cgroup_stats: _Optional[_Union[CgroupStats, _Mapping]] = ..., network_stats: _Optional[_Iterable[_Union[NetworkStats, _Mapping]]] = ...) -> None: ...

class CgroupStats(_message.Message):
    __slots__ = ("cgroup_version", "cpu", "memory", "pids", "io", "hugetlb")
    CGROUP_VERSION_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    IO_FIELD_NUMBER: _ClassVar[int]
    HUGETLB_FIELD_NUMBER: _ClassVar[int]
    cgroup_version: int
    cpu: CpuStats
    memory: MemoryStats
    pids: PidsStats
    io: IoStats
    hugetlb: _containers.RepeatedCompositeFieldContainer[HugetlbStats]
    def __init__(self, cgroup_version: _Optional[int] = ..., cpu: _Optional[_Union[CpuStats, _Mapping]] = ..., memory: _Optional[_Union[MemoryStats, _Mapping]] = ..., pids: _Optional[_Union[PidsStats, _Mapping]] = ..., io: _Optional[_Union[IoStats, _Mapping]] = ..., hugetlb: _Optional[_Iterable[_Union[HugetlbStats, _Mapping]]] = ...) -> None: ...

class CpuStats(_message.Message):
    __slots__ = ("usage_total_ns", "usage_user_ns", "usage_kernel_ns", "per_cpu_ns", "throttling_periods", "throttled_periods", "throttled_time_ns")
    USAGE_TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    USAGE_USER_NS_FIELD_NUMBER: _ClassVar[int]
    USAGE_KERNEL_NS_FIELD_NUMBER: _ClassVar[int]
    PER_CPU_NS_FIELD_NUMBER: _ClassVar[int]
    THROTTLING_PERIODS_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_PERIODS_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    usage_total_ns: int
    usage_user_ns: int
    usage_kernel_ns: int
    per_cpu_ns: _containers.RepeatedScalarFieldContainer[int]
    throttling_periods: int
    throttled_periods: int
    throttled_time_ns: int
    def __init__(self, usage_total_ns: _Optional[int] = ..., usage_user_ns: _Optional[int] = ..., usage_kernel_ns: _Optional[int] = ..., per_cpu_ns: _Optional[_Iterable[int]] = ..., throttling_periods: _Optional[int] = ..., throttled_periods: _Optional[int] = ..., throttled_time_ns: _Optional[int] = ...) -> None: ...

class MemoryStats(_message.Message):
    __slots__ = ("usage", "max_usage", "limit", "failcnt", "swap_usage", "swap_limit", "cache", "rss", "stat", "oom_kill")
    class StatEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_USAGE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FAILCNT_FIELD_NUMBER: _ClassVar[int]
    SWAP_USAGE_FIELD_NUMBER: _ClassVar[int]
    SWAP_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    RSS_FIELD_NUMBER: _ClassVar[int]
    STAT_FIELD_NUMBER: _ClassVar[int]
    OOM_KILL_FIELD_NUMBER: _ClassVar[int]
    usage: int
    max_usage: int
    limit: int
    failcnt: int
    swap_usage: int
    swap_limit: int
    cache: int
    rss: int
    stat: _containers.ScalarMap[str, int]
    oom_kill: int
    def __init__(self, usage: _Optional[int] = ..., max_usage: _Optional[int] = ..., limit: _Optional[int] = ..., failcnt: _Optional[int] = ..., swap_usage: _Optional[int] = ..., swap_limit: _Optional[int] = ..., cache: _Optional[int] = ..., rss: _Optional[int] = ..., stat: _Optional[_Mapping[str, int]] = ..., oom_kill: _Optional[int] = ...) -> None: ...

class PidsStats(_message.Message):
    __slots__ = ("current", "limit")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    current: int
    limit: int
    def __init__(self, current: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class IoEntry(_message.Message):
    __slots__ = ("major", "minor", "op", "value")
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    MINOR_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    major: int
    minor: int
    op: str
    value: int
    def __init__(self, major: _Optional[int] = ..., minor: _Optional[int] = ..., op: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...

class IoStats(_message.Message):
    __slots__ = ("service_bytes", "serviced")
    SERVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVICED_FIELD_NUMBER: _ClassVar[int]
    service_bytes: _containers.RepeatedCompositeFieldContainer[IoEntry]
    serviced: _containers.RepeatedCompositeFieldContainer[IoEntry]
    def __init__(self, service_bytes: _Optional[_Iterable[_Union[IoEntry, _Mapping]]] = ..., serviced: _Optional[_Iterable[_Union[IoEntry, _Mapping]]] = ...) -> None: ...

class HugetlbStats(_message.Message):
    __slots__ = ("pagesize", "usage", "max_usage", "failcnt")
    PAGESIZE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_USAGE_FIELD_NUMBER: _ClassVar[int]
    FAILCNT_FIELD_NUMBER: _ClassVar[int]
    pagesize: str
    usage: int
    max_usage: int
    failcnt: int
    def __init__(self, pagesize: _Optional[str] = ..., usage: _Optional[int] = ..., max_usage: _Optional[int] = ..., failcnt: _Optional[int] = ...) -> None: ...

class NetworkStats(_message.Message):
    __slots__ = ("name", "rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    RX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    RX_ERRORS_FIELD_NUMBER: _ClassVar[int]
    RX_DROPPED_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    TX_ERRORS_FIELD_NUMBER: _ClassVar[int]
    TX_DROPPED_FIELD_NUMBER: _ClassVar[int]
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int
    def __init__(self, name: _Optional[str] = ..., rx_bytes: _Optional[int] = ..., rx_packets: _Optional[int] = ..., rx_errors: _Optional[int] = ..., rx_dropped: _Optional[int] = ..., tx_bytes: _Optional[int] = ..., tx_packets: _Optional[int] = ..., tx_errors: _Optional[int] = ..., tx_dropped: _Optional[int] = ...) -> None: ...

class GetOOMEventRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OOMEvent(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class GuestDetailsRequest(_message.Message):
    __slots__ = ("mem_block_size",)
    MEM_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    mem_block_size: bool
    def __init__(self, mem_block_size: _Optional[bool] = ...) -> None: ...

class GuestDetailsResponse(_message.Message):
    __slots__ = ("mem_block_size_bytes", "agent_details", "kernel_release", "online_cpus", "mem_total_bytes")
    MEM_BLOCK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    AGENT_DETAILS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    ONLINE_CPUS_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    mem_block_size_bytes: int
    agent_details: AgentDetails
    kernel_release: str
    online_cpus: int
    mem_total_bytes: int
    def __init__(self, mem_block_size_bytes: _Optional[int] = ..., agent_details: _Optional[_Union[AgentDetails, _Mapping]] = ..., kernel_release: _Optional[str] = ..., online_cpus: _Optional[int] = ..., mem_total_bytes: _Optional[int] = ...) -> None: ...

class AgentDetails(_message.Message):
    __slots__ = ("version", "init_daemon", "storage_drivers", "device_types", "supports_seccomp", "cgroup_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INIT_DAEMON_FIELD_NUMBER: _ClassVar[int]
    STORAGE_DRIVERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPES_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_SECCOMP_FIELD_NUMBER: _ClassVar[int]
    CGROUP_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    init_daemon: bool
    storage_drivers: _containers.RepeatedScalarFieldContainer[str]
    device_types: _containers.RepeatedScalarFieldContainer[str]
    supports_seccomp: bool
    cgroup_version: int
    def __init__(self, version: _Optional[str] = ..., init_daemon: _Optional[bool] = ..., storage_drivers: _Optional[_Iterable[str]] = ..., device_types: _Optional[_Iterable[str]] = ..., supports_seccomp: _Optional[bool] = ..., cgroup_version: _Optional[int] = ...) -> None: ...

class OnlineCPUMemRequest(_message.Message):
    __slots__ = ("wait", "nb_cpus", "cpu_only")
    WAIT_FIELD_NUMBER: _ClassVar[int]
    NB_CPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_ONLY_FIELD_NUMBER: _ClassVar[int]
    wait: bool
    nb_cpus: int
    cpu_only: bool
    def __init__(self, wait: _Optional[bool] = ..., nb_cpus: _Optional[int] = ..., cpu_only: _Optional[bool] = ...) -> None: ...

class DiskFileRequest(_message.Message):
    __slots__ = ("container_id", "process", "path", "disk", "offset", "length", "create", "mode", "uid", "gid")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    process: Process
    path: str
    disk: str
    offset: int
    length: int
    create: bool
    mode: int
    uid: int
    gid: int
    def __init__(self, container_id: _Optional[str] = ..., process: _Optional[_Union[Process, _Mapping]] = ..., path: _Optional[str] = ..., disk: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., create: _Optional[bool] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ...) -> None: ...

class DiskFileResponse(_message.Message):
    __slots__ = ("length", "file_size", "mode", "uid", "gid")
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    length: int
    file_size: int
    mode: int
    uid: int
    gid: int
    def __init__(self, length: _Optional[int] = ..., file_size: _Optional[int] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ...) -> None: ...

class VolumeEntry(_message.Message):
    __slots__ = ("path", "mode", "uid", "gid", "data", "mtime_ns")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    path: str
    mode: int
    uid: int
    gid: int
    data: bytes
    mtime_ns: int
    def __init__(self, path: _Optional[str] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., data: _Optional[bytes] = ..., mtime_ns: _Optional[int] = ...) -> None: ...

class SyncVolumeRequest(_message.Message):
    __slots__ = ("name", "size", "entries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    entries: _containers.RepeatedCompositeFieldContainer[VolumeEntry]
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[VolumeEntry, _Mapping]]] = ...) -> None: ...

class SetGuestDateTimeRequest(_message.Message):
    __slots__ = ("sec", "usec")
    SEC_FIELD_NUMBER: _ClassVar[int]
    USEC_FIELD_NUMBER: _ClassVar[int]
    sec: int
    usec: int
    def __init__(self, sec: _Optional[int] = ..., usec: _Optional[int] = ...) -> None: ...

class CopyFileRequest(_message.Message):
    __slots__ = ("path", "file_size", "file_mode", "dir_mode", "uid", "gid", "offset", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILE_MODE_FIELD_NUMBER: _ClassVar[int]
    DIR_MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    file_size: int
    file_mode: int
    dir_mode: int
    uid: int
    gid: int
    offset: int
    data: bytes
    def __init__(self, path: _Optional[str] = ..., file_size: _Optional[int] = ..., file_mode: _Optional[int] = ..., dir_mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class IPAddress(_message.Message):
    __slots__ = ("family", "address", "prefix_length")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    family: IPFamily
    address: str
    prefix_length: int
    def __init__(self, family: _Optional[_Union[IPFamily, str]] = ..., address: _Optional[str] = ..., prefix_length: _Optional[int] = ...) -> None: ...

class Interface(_message.Message):
    __slots__ = ("device", "name", "addresses", "mtu", "hw_addr", "type", "raw_flags", "current_hw_addr")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    HW_ADDR_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FLAGS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_HW_ADDR_FIELD_NUMBER: _ClassVar[int]
    device: str
    name: str
    addresses: _containers.RepeatedCompositeFieldContainer[IPAddress]
    mtu: int
    hw_addr: str
    type: str
    raw_flags: int
    current_hw_addr: str
    def __init__(self, device: _Optional[str] = ..., name: _Optional[str] = ..., addresses: _Optional[_Iterable[_Union[IPAddress, _Mapping]]] = ..., mtu: _Optional[int] = ..., hw_addr: _Optional[str] = ..., type: _Optional[str] = ..., raw_flags: _Optional[int] = ..., current_hw_addr: _Optional[str] = ...) -> None: ...

class Interfaces(_message.Message):
    __slots__ = ("interfaces",)
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[Interface]
    def __init__(self, interfaces: _Optional[_Iterable[_Union[Interface, _Mapping]]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("dest", "gateway", "device", "source", "scope", "family", "flags", "metric")
    DEST_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    dest: str
    gateway: str
    device: str
    source: str
    scope: int
    family: IPFamily
    flags: int
    metric: int
    def __init__(self, dest: _Optional[str] = ..., gateway: _Optional[str] = ..., device: _Optional[str] = ..., source: _Optional[str] = ..., scope: _Optional[int] = ..., family: _Optional[_Union[IPFamily, str]] = ..., flags: _Optional[int] = ..., metric: _Optional[int] = ...) -> None: ...

class Routes(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class UpdateInterfaceRequest(_message.Message):
    __slots__ = ("interface",)
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    interface: Interface
    def __init__(self, interface: _Optional[_Union[Interface, _Mapping]] = ...) -> None: ...

class UpdateRoutesRequest(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: Routes
    def __init__(self, routes: _Optional[_Union[Routes, _Mapping]] = ...) -> None: ...

class ListInterfacesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRoutesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class HealthCheckResponse(_message.Message):
    __slots__ = ("status", "clock_ns", "tick_clock_ns")
    class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[HealthCheckResponse.ServingStatus]
        SERVING: _ClassVar[HealthCheckResponse.ServingStatus]
        NOT_SERVING: _ClassVar[HealthCheckResponse.ServingStatus]
    UNKNOWN: HealthCheckResponse.ServingStatus
    SERVING: HealthCheckResponse.ServingStatus
    NOT_SERVING: HealthCheckResponse.ServingStatus
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_NS_FIELD_NUMBER: _ClassVar[int]
    TICK_CLOCK_NS_FIELD_NUMBER: _ClassVar[int]
    status: HealthCheckResponse.ServingStatus
    clock_ns: int
    tick_clock_ns: int
    def __init__(self, status: _Optional[_Union[HealthCheckResponse.ServingStatus, str]] = ..., clock_ns: _Optional[int] = ..., tick_clock_ns: _Optional[int] = ...) -> None: ...

class VersionCheckResponse(_message.Message):
    __slots__ = ("agent_version", "protocol_version")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    protocol_version: int
    def __init__(self, agent_version: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class ReseedRandomDevRequest(_message.Message):
    __slots__ = ("data", "boot_id")
    DATA_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    boot_id: str
    def __init__(self, data: _Optional[bytes] = ..., boot_id: _Optional[str] = ...) -> None: ...

class ReseedRandomDevResponse(_message.Message):
    __slots__ = ("rng_sample", "boot_id")
    RNG_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    rng_sample: int
    boot_id: str
    def __init__(self, rng_sample: _Optional[int] = ..., boot_id: _Optional[str] = ...) -> None: ...

class WarmUpRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("policy_json",)
    POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    policy_json: str
    def __init__(self, policy_json: _Optional[str] = ...) -> None: ...

class GuestMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GuestMetrics(_message.Message):
    __slots__ = ("memory", "load", "cpu", "interfaces", "disks", "agent", "uptime_ns", "online_cpus")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_NS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_CPUS_FIELD_NUMBER: _ClassVar[int]
    memory: GuestMemory
    load: GuestLoad
    cpu: GuestCpuTime
    interfaces: _containers.RepeatedCompositeFieldContainer[NetworkStats]
    disks: _containers.RepeatedCompositeFieldContainer[DiskStats]
    agent: AgentProcessStats
    uptime_ns: int
    online_cpus: int
    def __init__(self, memory: _Optional[_Union[GuestMemory, _Mapping]] = ..., load: _Optional[_Union[GuestLoad, _Mapping]] = ..., cpu: _Optional[_Union[GuestCpuTime, _Mapping]] = ..., interfaces: _Optional[_Iterable[_Union[NetworkStats, _Mapping]]] = ..., disks: _Optional[_Iterable[_Union[DiskStats, _Mapping]]] = ..., agent: _Optional[_Union[AgentProcessStats, _Mapping]] = ..., uptime_ns: _Optional[int] = ..., online_cpus: _Optional[int] = ...) -> None: ...

class GuestMemory(_message.Message):
    __slots__ = ("total", "free", "available", "buffers", "cached", "shmem", "swap_total", "swap_free")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    SHMEM_FIELD_NUMBER: _ClassVar[int]
    SWAP_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SWAP_FREE_FIELD_NUMBER: _ClassVar[int]
    total: int
    free: int
    available: int
    buffers: int
    cached: int
    shmem: int
    swap_total: int
    swap_free: int
    def __init__(self, total: _Optional[int] = ..., free: _Optional[int] = ..., available: _Optional[int] = ..., buffers: _Optional[int] = ..., cached: _Optional[int] = ..., shmem: _Optional[int] = ..., swap_total: _Optional[int] = ..., swap_free: _Optional[int] = ...) -> None: ...

class GuestLoad(_message.Message):
    __slots__ = ("load1", "load5", "load15", "running", "threads")
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    LOAD5_FIELD_NUMBER: _ClassVar[int]
    LOAD15_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    load1: float
    load5: float
    load15: float
    running: int
    threads: int
    def __init__(self, load1: _Optional[float] = ..., load5: _Optional[float] = ..., load15: _Optional[float] = ..., running: _Optional[int] = ..., threads: _Optional[int] = ...) -> None: ...

class GuestCpuTime(_message.Message):
    __slots__ = ("user_ns", "nice_ns", "system_ns", "idle_ns", "iowait_ns", "irq_ns", "softirq_ns", "steal_ns")
    USER_NS_FIELD_NUMBER: _ClassVar[int]
    NICE_NS_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_NS_FIELD_NUMBER: _ClassVar[int]
    IDLE_NS_FIELD_NUMBER: _ClassVar[int]
    IOWAIT_NS_FIELD_NUMBER: _ClassVar[int]
    IRQ_NS_FIELD_NUMBER: _ClassVar[int]
    SOFTIRQ_NS_FIELD_NUMBER: _ClassVar[int]
    STEAL_NS_FIELD_NUMBER: _ClassVar[int]
    user_ns: int
    nice_ns: int
    system_ns: int
    idle_ns: int
    iowait_ns: int
    irq_ns: int
    softirq_ns: int
    steal_ns: int
    def __init__(self, user_ns: _Optional[int] = ..., nice_ns: _Optional[int] = ..., system_ns: _Optional[int] = ..., idle_ns: _Optional[int] = ..., iowait_ns: _Optional[int] = ..., irq_ns: _Optional[int] = ..., softirq_ns: _Optional[int] = ..., steal_ns: _Optional[int] = ...) -> None: ...

class DiskStats(_message.Message):
    __slots__ = ("name", "reads", "read_bytes", "writes", "write_bytes", "io_time_ns")
    NAME_FIELD_NUMBER: _ClassVar[int]
    READS_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IO_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    name: str
    reads: int
    read_bytes: int
    writes: int
    write_bytes: int
    io_time_ns: int
    def __init__(self, name: _Optional[str] = ..., reads: _Optional[int] = ..., read_bytes: _Optional[int] = ..., writes: _Optional[int] = ..., write_bytes: _Optional[int] = ..., io_time_ns: _Optional[int] = ...) -> None: ...

class AgentProcessStats(_message.Message):
    __slots__ = ("cpu_user_ns", "cpu_system_ns", "resident_bytes", "threads", "open_fds", "processes")
    CPU_USER_NS_FIELD_NUMBER: _ClassVar[int]
    CPU_SYSTEM_NS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FDS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    cpu_user_ns: int
    cpu_system_ns: int
    resident_bytes: int
    threads: int
    open_fds: int
    processes: int
    def __init__(self, cpu_user_ns: _Optional[int] = ..., cpu_system_ns: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., threads: _Optional[int] = ..., open_fds: _Optional[int] = ..., processes: _Optional[int] = ...) -> None: ...

class DebugConsoleRequest(_message.Message):
    __slots__ = ("exec_id", "args", "terminal", "term", "rows", "columns")
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    exec_id: str
    args: _containers.RepeatedScalarFieldContainer[str]
    terminal: bool
    term: str
    rows: int
    columns: int
    def __init__(self, exec_id: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., terminal: _Optional[bool] = ..., term: _Optional[str] = ..., rows: _Optional[int] = ..., columns: _Optional[int] = ...) -> None: ...
