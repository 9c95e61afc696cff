"""The generated protobuf code is fresh, and the services and RPCs are the ones the design names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protos.tandem.v1 import gateway_pb2, tokenizer_pb2, worker_pb2

REPO = Path(__file__).resolve().parents[2]


def run_check(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-m", "protos.generate", "--check"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generated_code_is_up_to_date():
    result = run_check(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


@pytest.fixture
def protos_copy(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "protos", root / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_unchanged_copy_is_up_to_date(protos_copy):
    result = run_check(protos_copy, pythonpath=protos_copy)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("proto, stale", [("common.proto", "common_pb2.py"), ("tokenizer.proto", "tokenizer_pb2.py")])
def test_check_fails_when_a_proto_changed(protos_copy, proto, stale):
    path = protos_copy / "protos" / "tandem" / "v1" / proto
    path.write_text(path.read_text() + "\nmessage StalenessProbe {\n  string added = 1;\n}\n")
    result = run_check(protos_copy, pythonpath=protos_copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stale generated protobuf code" in result.stdout
    assert stale in result.stdout
    listed = result.stdout.split(": ", 1)[1].split("; ")[0].split(", ")
    assert listed == [stale, stale + "i"], result.stdout  # the module and its .pyi stub, nothing else


def test_check_fails_when_a_generated_file_is_missing(protos_copy):
    (protos_copy / "protos" / "tandem" / "v1" / "worker_pb2_grpc.py").unlink()
    result = run_check(protos_copy, pythonpath=protos_copy)
    assert result.returncode == 1
    assert "stale generated protobuf code: worker_pb2_grpc.py;" in result.stdout


# ---- services and RPCs ---------------------------------------------------------------------------------

UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI = (False, False), (False, True), (True, False), (True, True)


@pytest.mark.parametrize(
    "module, service, method, kind, request_type, response_type",
    [
        (gateway_pb2, "tandem.v1.Gateway", "Generate", SERVER_STREAM, "tandem.v1.GenerateRequest", "tandem.v1.GenerateResponse"),
        (worker_pb2, "tandem.v1.Decode", "Generate", SERVER_STREAM, "tandem.v1.WorkerGenerateRequest", "tandem.v1.GenerateResponse"),
        (worker_pb2, "tandem.v1.Prefill", "Prefill", UNARY, "tandem.v1.PrefillRequest", "tandem.v1.PrefillResponse"),
        (worker_pb2, "tandem.v1.Prefill", "ReleaseKV", UNARY, "tandem.v1.ReleaseKVRequest", "tandem.v1.ReleaseKVResponse"),
        (worker_pb2, "tandem.v1.Worker", "Watch", SERVER_STREAM, "tandem.v1.WatchRequest", "tandem.v1.WorkerEvent"),
        (worker_pb2, "tandem.v1.Worker", "GetLoad", UNARY, "tandem.v1.GetLoadRequest", "tandem.v1.LoadSnapshot"),
        (worker_pb2, "tandem.v1.Worker", "CheckIntegrity", UNARY, "tandem.v1.CheckIntegrityRequest", "tandem.v1.CheckIntegrityResponse"),
        (tokenizer_pb2, "tandem.v1.Tokenizer", "Tokenize", UNARY, "tandem.v1.TokenizeRequest", "tandem.v1.TokenizeResponse"),
        (
            tokenizer_pb2,
            "tandem.v1.Tokenizer",
            "ApplyChatTemplate",
            UNARY,
            "tandem.v1.ApplyChatTemplateRequest",
            "tandem.v1.ApplyChatTemplateResponse",
        ),
        (tokenizer_pb2, "tandem.v1.Tokenizer", "Detokenize", UNARY, "tandem.v1.DetokenizeRequest", "tandem.v1.DetokenizeResponse"),
        (
            tokenizer_pb2,
            "tandem.v1.Tokenizer",
            "DetokenizeStream",
            BIDI,
            "tandem.v1.DetokenizeStreamRequest",
            "tandem.v1.DetokenizeStreamResponse",
        ),
    ],
)
def test_service_rpcs(module, service, method, kind, request_type, response_type):
    short = service.rsplit(".", 1)[1]
    desc = module.DESCRIPTOR.services_by_name[short]
    assert desc.full_name == service
    m = desc.methods_by_name[method]
    assert (m.client_streaming, m.server_streaming) == kind
    assert m.input_type.full_name == request_type
    assert m.output_type.full_name == response_type


@pytest.mark.parametrize(
    "module, service, methods",
    [
        (gateway_pb2, "Gateway", {"Generate", "ListWorkers"}),
        (worker_pb2, "Decode", {"Generate", "GenerateMany"}),
        (worker_pb2, "Prefill", {"Prefill", "ReleaseKV"}),
        (worker_pb2, "Worker", {"GetLoad", "Watch", "CheckIntegrity"}),
        (tokenizer_pb2, "Tokenizer", {"Tokenize", "ApplyChatTemplate", "Detokenize", "DetokenizeStream", "GetInfo"}),
    ],
)
def test_service_method_sets(module, service, methods):
    assert set(module.DESCRIPTOR.services_by_name[service].methods_by_name) == methods


def test_services_per_file():
    assert set(gateway_pb2.DESCRIPTOR.services_by_name) == {"Gateway"}
    assert set(tokenizer_pb2.DESCRIPTOR.services_by_name) == {"Tokenizer"}
    assert set(worker_pb2.DESCRIPTOR.services_by_name) == {"Decode", "Prefill", "Worker"}
    assert gateway_pb2.DESCRIPTOR.package == "tandem.v1"


def test_grpc_stubs_exist():
    from protos.tandem.v1 import gateway_pb2_grpc, tokenizer_pb2_grpc, worker_pb2_grpc

    for mod, names in [
        (gateway_pb2_grpc, ["GatewayStub", "GatewayServicer", "add_GatewayServicer_to_server"]),
        (tokenizer_pb2_grpc, ["TokenizerStub", "TokenizerServicer", "add_TokenizerServicer_to_server"]),
        (worker_pb2_grpc, ["DecodeStub", "PrefillStub", "WorkerStub", "add_WorkerServicer_to_server"]),
    ]:
        for name in names:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"
