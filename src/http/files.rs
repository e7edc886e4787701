//! Files in rooms over HTTP: the resumable upload protocol (create, offset,
//! append, cancel; a room member's ticket in `Authorization: Bearer`) and
//! downloads with Range, a strong ETag (the BLAKE3) and safe headers. These
//! routes have their own body and time limits (see [`routes`]); the protocol
//! is in docs/chat-protocol.md, "Files".

use std::io::SeekFrom;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::AppState;
use super::api::api_error;
use super::files_fetch::{FETCH_HEADER, fetch_missing};
use crate::chat::files::names::{SNIFF_LEN, content_disposition, served_type, sniff};
use crate::chat::files::{FileError, FileStore, Progress, StoredFile, Upload};
use crate::chat::hub::{HubError, TicketError, Uploader};
use crate::chat::protocol::{FileRef, valid_room};

/// The header that carries an upload's offset, both ways.
const UPLOAD_OFFSET: &str = "upload-offset";
/// The header that carries an upload's declared size.
const UPLOAD_LENGTH: &str = "upload-length";

/// The file routes, without the request timeout and the body limit of the
/// JSON API: an upload is as long as its file, and a stall is caught per
/// chunk (`--file-stall-timeout`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/rooms/{room}/files", post(create))
        .route(
            "/api/rooms/{room}/uploads/{id}",
            get(status).patch(append).delete(cancel),
        )
        .route("/files/{room}/{hash}/{name}", get(download))
        .route("/thumbs/{room}/{file}", get(thumbnail))
}

/// Query of `POST /api/rooms/{room}/files`.
#[derive(Debug, Deserialize)]
pub struct CreateQuery {
    /// The file's name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The file store, or a 404 when files are off.
fn store(app: &AppState) -> Result<Arc<FileStore>, Box<Response>> {
    app.config.files.clone().ok_or_else(|| {
        Box::new(api_error(
            StatusCode::NOT_FOUND,
            "files_off",
            "this server does not take files".into(),
        ))
    })
}

/// The room member whose ticket (`Authorization: Bearer …`) the request carries.
fn uploader(app: &AppState, headers: &HeaderMap, room: &str) -> Result<Uploader, Box<Response>> {
    if !valid_room(room) {
        return Err(Box::new(api_error(
            StatusCode::BAD_REQUEST,
            "bad_room",
            "invalid room name: use 1–32 letters, digits, '-' or '_'".into(),
        )));
    }
    let ticket = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    app.hub.file_uploader(ticket.trim(), room).map_err(|e| {
        let status = match e {
            TicketError::Invalid | TicketError::Expired => StatusCode::UNAUTHORIZED,
            TicketError::OtherRoom(_) | TicketError::Gone(_) => StatusCode::FORBIDDEN,
        };
        Box::new(api_error(status, "bad_ticket", e.to_string()))
    })
}

/// The store and the ticket's holder of a request about `room`.
fn gate(
    app: &AppState,
    headers: &HeaderMap,
    room: &str,
) -> Result<(Arc<FileStore>, Uploader), Box<Response>> {
    Ok((store(app)?, uploader(app, headers, room)?))
}

/// The store, the ticket's holder and the upload `id` of a request about `room`.
fn upload_of(
    app: &AppState,
    headers: &HeaderMap,
    room: &str,
    id: &str,
) -> Result<(Arc<FileStore>, Uploader, Arc<Upload>), Box<Response>> {
    let (files, by) = gate(app, headers, room)?;
    let up = files
        .upload(room, id)
        .map_err(|e| Box::new(file_error(e)))?;
    Ok((files, by, up))
}

/// The status and JSON code a file store error is answered with.
pub(super) fn file_error_status(e: &FileError) -> (StatusCode, &'static str) {
    match e {
        FileError::RoomClosed(_) => (StatusCode::FORBIDDEN, "files_off"),
        FileError::BadName(_) => (StatusCode::BAD_REQUEST, "bad_name"),
        FileError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        FileError::OverQuota { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "over_quota"),
        FileError::OverUserQuota { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "over_user_quota"),
        FileError::DiskFull { .. } => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
        FileError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        FileError::NoSuchUpload(_) | FileError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        FileError::InUse => (StatusCode::CONFLICT, "in_use"),
        FileError::Offset { .. } => (StatusCode::CONFLICT, "bad_offset"),
        FileError::SizeLie { .. } => (StatusCode::BAD_REQUEST, "size_mismatch"),
        FileError::Stalled(..) => (StatusCode::REQUEST_TIMEOUT, "stalled"),
        FileError::Cut(_) => (StatusCode::BAD_REQUEST, "cut"),
        FileError::Io(e) if is_disk_full(e) => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
        FileError::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_failed"),
    }
}

/// Whether `e` is the disk (or the user's disk quota) running full while
/// writing: the upload is gone and its part removed, as for a refusal up front.
fn is_disk_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
}

/// An error of the file store as a response.
fn file_error(e: FileError) -> Response {
    let (status, code) = file_error_status(&e);
    let offset = match &e {
        FileError::Offset { have, .. } => Some(*have),
        FileError::Stalled(_, at) | FileError::Cut(at) => Some(*at),
        _ => None,
    };
    let mut resp = api_error(status, code, e.to_string());
    if let Some(at) = offset {
        resp.headers_mut()
            .insert(UPLOAD_OFFSET, HeaderValue::from(at));
    }
    resp
}

/// `POST /api/rooms/{room}/files?name=NAME&size=N`: starts an upload; a body
/// is its first bytes (or all of them). 201 with `Location` and
/// `Upload-Offset`; the JSON says `upload` (the id) and, once complete, `file`.
pub async fn create(
    State(app): State<AppState>,
    Path(room): Path<String>,
    Query(q): Query<CreateQuery>,
    headers: HeaderMap,
    req: Request,
) -> Response {
    let (files, by) = match gate(&app, &headers, &room) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    if let Some(n) = content_length(&headers)
        && n > q.size
    {
        return file_error(FileError::SizeLie { size: q.size });
    }
    let up = match files.create(&room, &by.nick, &q.name, q.size) {
        Ok(up) => up,
        Err(e) => return file_error(e),
    };
    tracing::info!(%room, id = %up.id, size = q.size, by = %by.nick, "files: upload started");
    receive(&app, &files, &by, &up, None, req.into_body()).await
}

/// `GET` (or `HEAD`) `/api/rooms/{room}/uploads/{id}`: where the upload stands.
pub async fn status(
    State(app): State<AppState>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    match upload_of(&app, &headers, &room, &id) {
        Ok((_, _, up)) => progress_response(StatusCode::OK, &up, up.offset(), None),
        Err(r) => *r,
    }
}

/// `PATCH /api/rooms/{room}/uploads/{id}` with `Upload-Offset: N`: the next
/// bytes, from where the upload stands.
pub async fn append(
    State(app): State<AppState>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
    req: Request,
) -> Response {
    let Some(offset) = header_u64(&headers, UPLOAD_OFFSET) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_offset",
            "PATCH needs an Upload-Offset header: where the upload stands (HEAD tells)".into(),
        );
    };
    let (files, by, up) = match upload_of(&app, &headers, &room, &id) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    if let Some(n) = content_length(&headers)
        && n > up.size.saturating_sub(offset)
    {
        files.cancel(&up);
        return file_error(FileError::SizeLie { size: up.size });
    }
    receive(&app, &files, &by, &up, Some(offset), req.into_body()).await
}

/// `DELETE /api/rooms/{room}/uploads/{id}`: cancels the upload (its part is removed).
pub async fn cancel(
    State(app): State<AppState>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    match upload_of(&app, &headers, &room, &id) {
        Ok((files, _, up)) => {
            files.cancel(&up);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(r) => *r,
    }
}

/// Streams `body` into `up` from `offset` (`None`: the creating request,
/// from 0); a completed file is posted into the room as the uploader's
/// message (only once it is stored).
async fn receive(
    app: &AppState,
    files: &FileStore,
    by: &Uploader,
    up: &Arc<Upload>,
    offset: Option<u64>,
    body: Body,
) -> Response {
    let progress = files
        .write(
            up,
            offset.unwrap_or(0),
            body.into_data_stream(),
            &app.shutdown,
        )
        .await;
    let stored = match progress {
        Ok(Progress::Partial(at)) => {
            let status = if offset.is_none() {
                StatusCode::CREATED
            } else {
                StatusCode::NO_CONTENT
            };
            return progress_response(status, up, at, None);
        }
        Ok(Progress::Complete(stored)) => stored,
        Err(e) => {
            tracing::info!(room = %up.room, id = %up.id, "files: upload refused: {e}");
            return file_error(e);
        }
    };
    let file = file_ref(app, &stored);
    match app.hub.post_file(by, file.clone()).await {
        Ok(id) => {
            tracing::info!(room = %up.room, blake3 = %stored.blake3, size = stored.size,
                by = %by.nick, "files: stored and posted");
            progress_response(
                StatusCode::CREATED,
                up,
                stored.size,
                Some(json!({"file": file, "message_id": id, "deduplicated": stored.deduplicated})),
            )
        }
        Err(e) => {
            let status = match e {
                HubError::NotMember(_) => StatusCode::FORBIDDEN,
                HubError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            api_error(
                status,
                e.code(),
                format!("the file is stored but was not posted: {e}"),
            )
        }
    }
}

/// The upload's state as headers (`Upload-Offset`, `Upload-Length`,
/// `Location`) and JSON, plus `extra` fields.
fn progress_response(
    status: StatusCode,
    up: &Upload,
    offset: u64,
    extra: Option<serde_json::Value>,
) -> Response {
    let location = format!("/api/rooms/{}/uploads/{}", up.room, up.id);
    let mut body = json!({"upload": up.id, "url": location, "offset": offset, "size": up.size});
    if let (Some(obj), Some(serde_json::Value::Object(more))) = (body.as_object_mut(), extra) {
        obj.extend(more);
    }
    let mut resp = (status, axum::Json(body)).into_response();
    let h = resp.headers_mut();
    h.insert(UPLOAD_OFFSET, HeaderValue::from(offset));
    h.insert(UPLOAD_LENGTH, HeaderValue::from(up.size));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if status == StatusCode::NO_CONTENT {
        *resp.body_mut() = Body::empty();
    }
    resp
}

/// The message's view of a stored file, with its absolute download URL.
fn file_ref(app: &AppState, f: &StoredFile) -> FileRef {
    let base = app
        .config
        .files
        .as_ref()
        .and_then(|s| s.limits().public_url.clone())
        .unwrap_or_else(|| own_base(app));
    f.file_ref(&base)
}

/// `http(s)://ADDRESS` of this door, by its bound address (an unspecified
/// one as loopback).
fn own_base(app: &AppState) -> String {
    crate::chat::files::door_url(app.config.bound, app.config.door.is_tls())
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_u64(headers, header::CONTENT_LENGTH.as_str())
}

/// `GET /files/{room}/{blake3}/{name}`: the file, as an attachment.
pub async fn download(
    State(app): State<AppState>,
    Path((room, hash, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let files = match store(&app) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let path = match files.stored(&room, &hash) {
        Ok(p) => p,
        // Held by another hub of the cluster, perhaps: fetched once, then
        // served from here (a hub's own fetch never fetches further).
        Err(FileError::NotFound) if !headers.contains_key(FETCH_HEADER) => {
            if let Err(f) = fetch_missing(&app, &files, &room, &hash, &name).await {
                return f.response();
            }
            match files.stored(&room, &hash) {
                Ok(p) => p,
                Err(e) => return file_error(e),
            }
        }
        Err(e) => return file_error(e),
    };
    match serve_file(&path, &hash, &name, &headers).await {
        Ok(resp) => resp,
        Err(e) => file_error(FileError::Io(e)),
    }
}

/// `GET /thumbs/{room}/{blake3}.png`: the thumbnail the server made of an
/// image (its own PNG, so shown inline), while the file is kept.
pub async fn thumbnail(
    State(app): State<AppState>,
    Path((room, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let files = match store(&app) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let Some(hash) = file.strip_suffix(".png") else {
        return file_error(FileError::NotFound);
    };
    // A file another hub of the cluster holds is fetched first, as for a
    // download; its thumbnail is then made here.
    if matches!(files.stored(&room, hash), Err(FileError::NotFound))
        && !headers.contains_key(FETCH_HEADER)
        && let Err(f) = fetch_missing(&app, &files, &room, hash, hash).await
    {
        return f.response();
    }
    let path = match files.thumbnail_or_make(&room, hash).await {
        Ok(p) => p,
        Err(e) => return file_error(e),
    };
    let etag = format!("\"thumb-{hash}\"");
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex is a valid header"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    if none_match(&headers, &etag) {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return resp;
    }
    match tokio::fs::read(&path).await {
        Ok(png) => {
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
            *resp.body_mut() = Body::from(png);
            resp
        }
        Err(e) => file_error(FileError::Io(e)),
    }
}

/// True when `If-None-Match` names `etag` (or is `*`): the client has it.
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|inm| inm.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}

/// The response for a stored file: 304 when `If-None-Match` names it, 206
/// for one satisfiable `Range` (honoured only while `If-Range` matches),
/// 416 for an unsatisfiable one, else 200 with everything.
async fn serve_file(
    path: &std::path::Path,
    hash: &str,
    name: &str,
    headers: &HeaderMap,
) -> std::io::Result<Response> {
    let etag = format!("\"{hash}\"");
    let mut file = tokio::fs::File::open(path).await?;
    let size = file.metadata().await?.len();
    let mut head = Vec::with_capacity(SNIFF_LEN);
    (&mut file)
        .take(SNIFF_LEN as u64)
        .read_to_end(&mut head)
        .await?;
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex is a valid header"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    if none_match(headers, &etag) {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(resp);
    }
    let h = resp.headers_mut();
    let disposition = content_disposition(name);
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&disposition).unwrap_or(HeaderValue::from_static("attachment")),
    );
    let mime = served_type(&sniff(&head));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&mime).expect("a known media type"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Even opened directly, the file is no document of this origin.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_ok)
        .map(|r| parse_range(r, size));
    let (start, len) = match range {
        None | Some(RangeAsk::Ignore) => (0, size),
        Some(RangeAsk::Unsatisfiable) => {
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("digits"),
            );
            return Ok(resp);
        }
        Some(RangeAsk::Bytes(a, b)) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")).expect("digits"),
            );
            (a, b - a + 1)
        }
    };
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    file.seek(SeekFrom::Start(start)).await?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024);
    *resp.body_mut() = Body::from_stream(stream);
    Ok(resp)
}

/// What a `Range` header asks of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// Bytes `first..=last`.
    Bytes(u64, u64),
    /// Nothing of the file (416).
    Unsatisfiable,
    /// Not a single byte range we serve (several, or malformed): send it all.
    Ignore,
}

/// Parses `bytes=A-B`, `bytes=A-` or `bytes=-N` against a file of `size` bytes (RFC 9110 §14).
pub fn parse_range(header: &str, size: u64) -> RangeAsk {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeAsk::Ignore;
    };
    if spec.contains(',') {
        return RangeAsk::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Ignore;
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    match (a.trim().is_empty(), num(a), num(b)) {
        // A suffix: the last N bytes.
        (true, _, Some(0)) => RangeAsk::Unsatisfiable,
        (true, _, Some(_)) if size == 0 => RangeAsk::Unsatisfiable,
        (true, _, Some(n)) => RangeAsk::Bytes(size.saturating_sub(n), size - 1),
        (false, Some(a), _) if a >= size => RangeAsk::Unsatisfiable,
        (false, Some(a), None) if b.trim().is_empty() => RangeAsk::Bytes(a, size - 1),
        (false, Some(a), Some(b)) if b >= a => RangeAsk::Bytes(a, b.min(size - 1)),
        _ => RangeAsk::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_at_the_boundaries() {
        use RangeAsk::*;
        assert_eq!(parse_range("bytes=0-0", 10), Bytes(0, 0));
        assert_eq!(parse_range("bytes=9-9", 10), Bytes(9, 9));
        assert_eq!(parse_range("bytes=9-", 10), Bytes(9, 9));
        assert_eq!(parse_range("bytes=0-99", 10), Bytes(0, 9));
        assert_eq!(parse_range("bytes=-1", 10), Bytes(9, 9));
        assert_eq!(parse_range("bytes=-10", 10), Bytes(0, 9));
        assert_eq!(parse_range("bytes=-99", 10), Bytes(0, 9));
        assert_eq!(parse_range("bytes=10-", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=10-20", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-3", 10), Ignore);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), Ignore);
        assert_eq!(parse_range("items=0-1", 10), Ignore);
        assert_eq!(parse_range("bytes=x-1", 10), Ignore);
    }
}
