"""A tiny echo service for ttrpc tests, built with protobuf's runtime API (no generated code)."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from pykata.ttrpc import spec_from_descriptor

_fd = descriptor_pb2.FileDescriptorProto(name="pykata_test_echo.proto", package="pykata.test", syntax="proto3")
_msg = _fd.message_type.add(name="Echo")
_msg.field.add(name="data", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_msg.field.add(name="delay_ms", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_msg.field.add(name="tag", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
               label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
_svc = _fd.service.add(name="EchoService")
for name, cs, ss in [("Echo", False, False), ("Fail", False, False), ("Sleep", False, False), ("Fill", False, False),
                     ("Count", False, True), ("Sum", True, False), ("Chat", True, True),
                     ("Hold", True, False)]:
    _svc.method.add(name=name, input_type=".pykata.test.Echo", output_type=".pykata.test.Echo",
                    client_streaming=cs, server_streaming=ss)

_pool = descriptor_pool.DescriptorPool()
_file = _pool.Add(_fd)
Echo = message_factory.GetMessageClass(_pool.FindMessageTypeByName("pykata.test.Echo"))
ECHO_SERVICE = spec_from_descriptor(_pool.FindServiceByName("pykata.test.EchoService"))
