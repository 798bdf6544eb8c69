from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OwnerMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RpcStats(_message.Message):
    __slots__ = ("method", "calls", "errors", "seconds")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    method: str
    calls: int
    errors: int
    seconds: float
    def __init__(self, method: _Optional[str] = ..., calls: _Optional[int] = ..., errors: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class OwnerMetrics(_message.Message):
    __slots__ = ("served", "agent_calls", "events_sent", "events_dropped")
    SERVED_FIELD_NUMBER: _ClassVar[int]
    AGENT_CALLS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_SENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    served: _containers.RepeatedCompositeFieldContainer[RpcStats]
    agent_calls: _containers.RepeatedCompositeFieldContainer[RpcStats]
    events_sent: int
    events_dropped: int
    def __init__(self, served: _Optional[_Iterable[_Union[RpcStats, _Mapping]]] = ..., agent_calls: _Optional[_Iterable[_Union[RpcStats, _Mapping]]] = ..., events_sent: _Optional[int] = ..., events_dropped: _Optional[int] = ...) -> None: ...
