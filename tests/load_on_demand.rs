//! Load on demand over gRPC against the real server: inference on a cached, unloaded model
//! loads it (concurrent first requests share one load), the model unloads after the on-demand
//! keep-alive, and with load on demand off the request fails as before.

mod common;

use std::time::Duration;

use common::TestServer;
use lmx::{pb, testing};
use tokio_stream::StreamExt;
use tonic::{transport::Channel, Code};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_types::StatusExt;

const COMMIT: &str = "6666666666666666666666666666666666666666";

type Admin = pb::model_admin_client::ModelAdminClient<Channel>;
type Inference = pb::inference_client::InferenceClient<Channel>;

fn put(server: &TestServer, repo: &str) {
    testing::write_hf_cache(
        &server.cache_dir(),
        repo,
        COMMIT,
        Some("main"),
        &testing::tiny_repo("llama", 1),
    );
}

async fn generate(mut inference: Inference, model_id: &str) -> Result<String, tonic::Status> {
    common::greedy_text(&mut inference, model_id).await
}

async fn next_status(watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> i32 {
    watch.next().await.unwrap().unwrap().status
}

#[tokio::test]
async fn inference_on_a_cached_model_loads_it_once_and_it_unloads_when_idle() {
    let server = TestServer::start_with(|c| {
        c.engine.load_on_demand = true;
        c.engine.on_demand_keep_alive = Some(Duration::from_secs(2));
    })
    .await;
    put(&server, "tiny/llama");
    let channel = server.channel().await;
    let mut admin = Admin::new(channel.clone());
    let inference = Inference::new(channel.clone());
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "lmx.v1.Inference".into(),
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(
        next_status(&mut watch).await,
        ServingStatus::NotServing as i32
    );

    // Three first requests at once: one load, three answers, all the same (greedy).
    let answers =
        futures::future::join_all((0..3).map(|_| generate(inference.clone(), "tiny/llama"))).await;
    let answers: Vec<String> = answers.into_iter().map(Result::unwrap).collect();
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving as i32);
    let loaded = admin
        .list_models(pb::ListModelsRequest { loaded_only: true })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(loaded.len(), 1, "{loaded:?}");
    assert_eq!(loaded[0].request_count, 3, "one load served all three");
    assert_eq!(loaded[0].keep_alive.unwrap().seconds, 2);

    // Idle past the on-demand keep-alive: unloaded, and readiness follows.
    assert_eq!(
        next_status(&mut watch).await,
        ServingStatus::NotServing as i32
    );
    assert!(admin
        .list_models(pb::ListModelsRequest { loaded_only: true })
        .await
        .unwrap()
        .into_inner()
        .models
        .is_empty());

    // Tokenize loads it too; an unknown model is still NOT_FOUND.
    let tokens = Inference::new(server.channel().await)
        .tokenize(pb::TokenizeRequest {
            model_id: "tiny/llama".into(),
            text: "Hi".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(tokens.len(), 2);
    let err = generate(inference.clone(), "tiny/absent")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn with_load_on_demand_off_an_unloaded_model_is_refused() {
    let server = TestServer::start_with(|c| c.engine.load_on_demand = false).await;
    put(&server, "tiny/llama");
    let err = generate(Inference::new(server.channel().await), "tiny/llama")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "MODEL_NOT_LOADED"
    );
    server.stop().await.unwrap();
}
