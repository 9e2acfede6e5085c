"""Serializes log events in Confluent's wire format with confluent-kafka's own serializers and a
Schema Registry, for tests/schema_registry.rs; prints one line per event: key, a tab, the
value in hex. The test produces them itself, when it chooses (before or while the registry is
down).

    python sr_serialize.py REGISTRY_URL SUBJECT_TOPIC avro|avro-region|protobuf FIRST_ID COUNT

avro:        the Avro schema registered as SUBJECT_TOPIC-value beforehand (through the REST API),
             used as the latest version (auto.register.schemas off).
avro-region: the same, for the schema with a `region` field.
protobuf:    the message LogEvent below, registered by the serializer itself (as the Python
             client registers Protobuf: a base64 FileDescriptorProto).
Event `id` has level error, warning or info for id % 3 = 0, 1, 2.
"""

import importlib
import os
import subprocess
import sys
import tempfile

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.serialization import MessageField, SerializationContext

PROTO = """
syntax = "proto3";
package logbridge.test;
import "google/protobuf/timestamp.proto";

message LogEvent {
  enum Level { INFO = 0; WARN = 1; ERROR = 2; }
  message Origin { string service = 1; int32 pid = 2; }
  int64 id = 1;
  Level level = 2;
  string message = 3;
  Origin origin = 4;
  google.protobuf.Timestamp at = 5;
}
"""

LEVELS = ["error", "warning", "info"]


def main():
    url, topic, form, first, count = sys.argv[1:6]
    first, count = int(first), int(count)
    client = SchemaRegistryClient({"url": url, "timeout": 20})
    context = SerializationContext(topic, MessageField.VALUE)
    out = []
    if form.startswith("avro"):
        from confluent_kafka.schema_registry.avro import AvroSerializer

        serializer = AvroSerializer(
            client,
            None,
            conf={"auto.register.schemas": False, "use.latest.version": True},
        )
        for id in range(first, first + count):
            event = {
                "id": id,
                "level": LEVELS[id % 3],
                "service": None if id % 5 == 0 else "checkout",
                "message": f"request {id} done",
            }
            if form == "avro-region":
                event["region"] = "eu-1"
            out.append((id, serializer(event, context)))
    else:
        from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
        from grpc_tools import protoc

        folder = tempfile.mkdtemp()
        with open(os.path.join(folder, "logevent.proto"), "w") as proto:
            proto.write(PROTO)
        include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        status = protoc.main(
            ["protoc", f"-I{folder}", f"-I{include}", f"--python_out={folder}", "logevent.proto"]
        )
        if status != 0:
            sys.exit(f"protoc failed: {status}")
        sys.path.insert(0, folder)
        module = importlib.import_module("logevent_pb2")
        serializer = ProtobufSerializer(
            module.LogEvent, client, conf={"use.deprecated.format": False}
        )
        levels = {"error": 2, "warning": 1, "info": 0}
        for id in range(first, first + count):
            event = module.LogEvent(
                id=id,
                level=levels[LEVELS[id % 3]],
                message=f"request {id} done",
                origin=module.LogEvent.Origin(service="payments", pid=4242),
            )
            event.at.FromSeconds(1796000000 + id)
            out.append((id, serializer(event, context)))
    for id, value in out:
        print(f"key-{id % 7}\t{value.hex()}")


if __name__ == "__main__":
    main()
