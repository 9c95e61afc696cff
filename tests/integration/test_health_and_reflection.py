"""Every service answers grpc.health.v1 Check and server reflection, with the stock clients."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

pytestmark = pytest.mark.slow

SERVICES = {
    "gateway": ["tandem.v1.Gateway"],
    "tokenizer": ["tandem.v1.Tokenizer"],
    "prefill-0": ["tandem.v1.Prefill", "tandem.v1.Worker"],
    "decode-0": ["tandem.v1.Decode", "tandem.v1.Worker"],
}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_health_check_says_serving(cluster, name):
    with grpc.insecure_channel(cluster.service(name).address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ["", *SERVICES[name]]:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="tandem.v1.NoSuchService"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_reflection_lists_and_describes_the_services(cluster, name):
    with grpc.insecure_channel(cluster.service(name).address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert set(SERVICES[name]) | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        for full_name in SERVICES[name]:
            proto = db.FindFileContainingSymbol(full_name)
            assert proto.package == "tandem.v1"
            assert full_name.split(".")[-1] in [s.name for s in proto.service]
