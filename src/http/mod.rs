//! The HTTP endpoints: `/health/live`, `/health/ready`, `/metrics` (Prometheus text) and
//! `/status` (the JSON progress report).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::runtime::workers::Workers;

#[derive(Clone)]
struct Shared {
    workers: Arc<Workers>,
}

pub fn router(workers: Arc<Workers>) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status_report))
        .with_state(Shared { workers })
}

/// Binds `address` and serves until `shutdown`; returns the bound address (useful with port 0).
pub async fn serve(
    address: SocketAddr,
    workers: Arc<Workers>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let app = router(workers);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "http server stopped");
        }
    });
    Ok((bound, task))
}

/// Alive while the loop beats (see `runtime::health`): a loop stuck in one call for longer
/// than any call may take is restarted by Kubernetes.
async fn live(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.workers.is_live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stuck: the processing loop has not made progress\n")
    }
}

async fn ready(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.workers.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn status_report(State(shared): State<Shared>) -> impl IntoResponse {
    axum::Json(shared.workers.status())
}

async fn metrics_text(State(shared): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        shared.workers.metrics_text(),
    )
}
