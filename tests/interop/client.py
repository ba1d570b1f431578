"""A Python grpcio client generated from proto/ at run time, driven by tests/interop.rs.

Prints one JSON object describing what the server answered, so the Rust test asserts on it.
"""

import argparse
import json
import os
import sys

import grpc
import grpc_tools
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from grpc_tools import protoc
from google.rpc import error_details_pb2


def generate(proto_dir: str, out: str) -> None:
    wkt = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "lmx/v1/admin.proto",
        "lmx/v1/inference.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on proto/")
    sys.path.insert(0, out)


def describe_error(err: grpc.RpcError) -> dict:
    result = {"code": err.code().name, "message": err.details()}
    status = rpc_status.from_call(err)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                result["reason"] = info.reason
                result["domain"] = info.domain
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    generate(args.proto_dir, args.out)
    from lmx.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

    report = {"health": {}, "calls": {}, "enums": {}}
    with grpc.insecure_channel(args.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "lmx.v1.ModelAdmin", "lmx.v1.Inference"]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            report["health"][service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

        admin = admin_pb2_grpc.ModelAdminStub(channel)
        try:
            reply = admin.ListModels(admin_pb2.ListModelsRequest(), timeout=10)
            report["calls"]["ListModels"] = {"code": "OK", "models": len(reply.models)}
        except grpc.RpcError as err:
            report["calls"]["ListModels"] = describe_error(err)

        try:
            for _ in admin.DownloadModel(admin_pb2.DownloadModelRequest(model_id="../not-a-repo"), timeout=10):
                pass
            report["calls"]["DownloadModel"] = {"code": "OK"}
        except grpc.RpcError as err:
            report["calls"]["DownloadModel"] = describe_error(err)

        try:
            reply = admin.VerifyModel(
                admin_pb2.VerifyModelRequest(model_id="org/missing", mode=admin_pb2.VERIFY_MODE_FULL), timeout=10
            )
            report["calls"]["VerifyModel"] = {"code": "OK", "complete": reply.complete}
        except grpc.RpcError as err:
            report["calls"]["VerifyModel"] = describe_error(err)

        inference = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(
            model_id="m",
            prompt="hello",
            parameters=inference_pb2.GenerationParameters(max_tokens=4, temperature=0.0, stop=["\n"]),
        )
        try:
            for _ in inference.Generate(request, timeout=10):
                pass
            report["calls"]["Generate"] = {"code": "OK"}
        except grpc.RpcError as err:
            report["calls"]["Generate"] = describe_error(err)

    report["enums"]["DOWNLOAD_ERROR_CODE_INCOMPLETE_DOWNLOAD"] = admin_pb2.DownloadErrorCode.Value(
        "DOWNLOAD_ERROR_CODE_INCOMPLETE_DOWNLOAD"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
