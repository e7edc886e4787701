//! The JSON API: rooms, paged message history, hub statistics, and the cluster.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use crate::chat::names::check_room;
use crate::chat::protocol::ChatMessage;

/// Query of `GET /api/rooms/{room}/messages`.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    /// Only messages with a larger id (alone: page forward from here).
    pub after: Option<u64>,
    /// Only messages with a smaller id (page backward from here).
    pub before: Option<u64>,
    /// Most messages returned (default 50, at most 500).
    pub limit: Option<usize>,
}

/// A page of `GET /api/rooms/{room}/messages`.
#[derive(Serialize)]
struct Page<'a> {
    room: &'a str,
    messages: &'a [ChatMessage],
}

/// `page` as JSON, written into a buffer sized for it at once (growing one
/// from axum's 128 bytes took a copy and a large allocation per doubling).
fn page_body(page: &Page<'_>) -> serde_json::Result<Bytes> {
    let mut body = Vec::with_capacity(
        64 + page
            .messages
            .iter()
            .map(|m| 96 + m.text.len())
            .sum::<usize>(),
    );
    serde_json::to_writer(&mut body, page)?;
    Ok(body.into())
}

fn json_response(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A JSON error: `{"error":{"code","message"}}` with `status`.
pub fn api_error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// `GET /api/rooms`: every room with members, topic and newest id.
pub async fn rooms(State(app): State<AppState>) -> Response {
    Json(json!({ "rooms": app.hub.rooms() })).into_response()
}

/// `GET /api/rooms/{room}/messages?after=ID&before=ID&limit=N`: stored messages, oldest first.
pub async fn messages(
    State(app): State<AppState>,
    Path(room): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    if let Err(why) = check_room(&room) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_room",
            format!("invalid room name: {why}"),
        );
    }
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    // The newest page (what the chat page and most clients ask for) comes
    // from the cache while nothing was committed since it was read; a store
    // error falls through to the blocking read, which reports it.
    let newest = q.after.is_none() && q.before.is_none();
    if newest
        && let Ok(version) = app.hub.history_version_now()
        && let Some(body) = app.pages.get(&room, limit, version)
    {
        return json_response(body);
    }
    let hub = app.hub.clone();
    let result = tokio::task::spawn_blocking(move || {
        let page = hub.history_versioned(&room, q.after, q.before, limit);
        (room, page)
    })
    .await;
    match result {
        // Serialised straight from the messages (not through a `json!` tree,
        // which copied every field of all of them once more).
        Ok((room, Ok((version, messages)))) => match page_body(&Page {
            room: &room,
            messages: &messages,
        }) {
            Ok(body) => {
                if newest {
                    app.pages.put(&room, limit, version, body.clone());
                }
                json_response(body)
            }
            Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        },
        Ok((_, Err(e))) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_failed",
            e.to_string(),
        ),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// `GET /api/stats`: hub counters.
pub async fn stats(State(app): State<AppState>) -> Response {
    let s = app.hub.stats();
    let rooms = app.hub.rooms();
    Json(json!({
        "clients": s.clients.load(Ordering::Relaxed),
        "connections": s.connections.load(Ordering::Relaxed),
        "rooms": rooms.len(),
        "messages": s.messages.load(Ordering::Relaxed),
        "deliveries": s.deliveries.load(Ordering::Relaxed),
        "dropped_lagging": s.dropped_lagging.load(Ordering::Relaxed),
        "write_batches": s.batches.load(Ordering::Relaxed),
        "uptime_seconds": app.started.elapsed().as_secs(),
    }))
    .into_response()
}

/// `GET /api/cluster`: this node and every member it knows, with states and
/// addresses (see docs/cluster.md).
pub async fn cluster(State(app): State<AppState>) -> Response {
    Json(app.cluster.report(app.hub.users())).into_response()
}
