//! The service foundation over real gRPC: reflection (v1 and v1alpha), health, errors with
//! ErrorInfo, and the graceful shutdown of the real binary on SIGTERM.

mod common;

use std::time::Duration;

use common::TestServer;
use lmx::pb;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_types::StatusExt;

const EXPECTED_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "lmx.v1.Inference",
    "lmx.v1.ModelAdmin",
];

macro_rules! list_services {
    ($module:path, $channel:expr) => {{
        use $module as r;
        let mut client = r::server_reflection_client::ServerReflectionClient::new($channel);
        let request = r::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(r::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::once(request))
            .await
            .expect("reflection call")
            .into_inner();
        let response = responses.next().await.expect("one response").expect("ok");
        match response.message_response {
            Some(r::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("unexpected reflection response {other:?}"),
        }
    }};
}

#[tokio::test]
async fn reflection_lists_every_service_in_v1_and_v1alpha() {
    let server = TestServer::start().await;
    let v1 = list_services!(tonic_reflection::pb::v1, server.channel().await);
    let v1alpha = list_services!(tonic_reflection::pb::v1alpha, server.channel().await);
    for services in [&v1, &v1alpha] {
        for want in EXPECTED_SERVICES {
            assert!(
                services.iter().any(|s| s == want),
                "{want} missing from {services:?}"
            );
        }
    }
    server.stop().await.unwrap();
}

/// Asks reflection (v1) for one file and returns the names of the files it answered with.
async fn reflection_files(
    channel: tonic::transport::Channel,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> Vec<String> {
    use prost::Message;
    use tonic_reflection::pb::v1 as r;
    let mut client = r::server_reflection_client::ServerReflectionClient::new(channel);
    let request = r::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(r::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        response.message_response
    else {
        panic!(
            "expected file descriptors, got {:?}",
            response.message_response
        );
    };
    files
        .file_descriptor_proto
        .iter()
        .map(|bytes| {
            prost_types::FileDescriptorProto::decode(&bytes[..])
                .unwrap()
                .name()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn reflection_serves_our_descriptors_and_their_imports() {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let server = TestServer::start().await;
    let by_symbol = reflection_files(
        server.channel().await,
        MessageRequest::FileContainingSymbol("lmx.v1.DownloadProgress".into()),
    )
    .await;
    assert_eq!(by_symbol, ["lmx/v1/admin.proto"]);
    // Clients then fetch the imports by name: they must be served too.
    for import in [
        "google/protobuf/timestamp.proto",
        "google/protobuf/duration.proto",
    ] {
        let files = reflection_files(
            server.channel().await,
            MessageRequest::FileByFilename(import.into()),
        )
        .await;
        assert_eq!(files, [import]);
    }
    server.stop().await.unwrap();
}

async fn check(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> ServingStatus {
    let status = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

#[tokio::test]
async fn health_serves_server_and_admin_but_not_inference_without_a_model() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    assert_eq!(check(&mut health, "").await, ServingStatus::Serving);
    assert_eq!(
        check(&mut health, "lmx.v1.ModelAdmin").await,
        ServingStatus::Serving
    );
    assert_eq!(
        check(&mut health, "lmx.v1.Inference").await,
        ServingStatus::NotServing
    );
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn errors_carry_error_info_with_a_stable_reason() {
    let server = TestServer::start().await;
    let mut admin = pb::model_admin_client::ModelAdminClient::new(server.channel().await);
    let status = admin
        .get_download(pb::GetDownloadRequest {
            download_id: "dl-unknown".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "DOWNLOAD_NOT_FOUND");
    assert_eq!(info.domain, "lmx.v1");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn in_process_shutdown_turns_health_not_serving_and_returns() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    server.stop().await.unwrap();
    let last = watch.next().await.unwrap().unwrap();
    assert_eq!(last.status, ServingStatus::NotServing as i32);
    let end = watch.next().await.expect("a final status").unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
}

/// Starts the real binary on 127.0.0.1:0 and returns it with the address it logged.
async fn spawn_binary(drain_timeout: &str) -> (tokio::process::Child, std::net::SocketAddr) {
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--drain-timeout",
        drain_timeout,
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ];
    let spawned = common::spawn_serve(&args).await;
    (spawned.child, spawned.addr)
}

#[tokio::test]
async fn sigterm_flips_health_for_watchers_and_exits_zero_within_the_drain_timeout() {
    let drain_timeout = Duration::from_secs(10);
    let (mut child, addr) = spawn_binary("10s").await;
    let mut health = HealthClient::new(common::connect(addr).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    let started = std::time::Instant::now();
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());

    let next = tokio::time::timeout(drain_timeout, watch.next())
        .await
        .expect("watch update");
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );

    let status = tokio::time::timeout(drain_timeout, child.wait())
        .await
        .expect("lmx exits within the drain timeout")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(started.elapsed() < drain_timeout);
}
