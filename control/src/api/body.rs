//! Request bodies: JSON (and YAML for imports) parsed with the path of a bad field, so
//! that a refusal names it. Size limits are set per route (`DefaultBodyLimit`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Bodies of single records.
pub const RECORD_LIMIT: usize = 1 << 20;
/// Bodies of `/v1/import`: a whole configuration (100,000 users is ~15 MiB of JSON).
pub const IMPORT_LIMIT: usize = 64 << 20;

/// A JSON body of type `T`.
pub struct JsonBody<T>(pub T);

/// A JSON or YAML (by `Content-Type`) body of type `T`.
pub struct DocBody<T>(pub T);

fn read_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge { limit }
    } else {
        ApiError::field("body", e.body_text())
    }
}

fn field_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ApiError {
    let path = e.path().to_string();
    let message = e.into_inner().to_string();
    // YAML errors repeat their own idea of the path before the message.
    let message = match message.split_once(": ") {
        Some((head, tail)) if !head.contains(' ') && !head.is_empty() => tail.to_owned(),
        _ => message,
    };
    // A missing field is reported at its parent; name the field itself.
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|m| m.split_once('`'))
        .map(|(f, _)| f.to_owned());
    // `?` marks a place the parser never reached (the body ended early).
    let parent = match path.as_str() {
        "." | "?" => None,
        p => Some(p.trim_end_matches(".?").to_owned()),
    };
    let field = match (parent, missing) {
        (Some(p), Some(m)) => format!("{p}.{m}"),
        (None, Some(m)) => m,
        (Some(p), None) => p,
        (None, None) => "body".to_owned(),
    };
    ApiError::field(field, message)
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut de).map_err(field_error)?;
    de.end()
        .map_err(|e| ApiError::field("body", e.to_string()))?;
    Ok(v)
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| read_error(e, RECORD_LIMIT))?;
        parse_json(&bytes).map(JsonBody)
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for DocBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let yaml = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("yaml"));
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| read_error(e, IMPORT_LIMIT))?;
        if !yaml {
            return parse_json(&bytes).map(DocBody);
        }
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ApiError::field("body", "YAML must be UTF-8"))?;
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de)
            .map(DocBody)
            .map_err(field_error)
    }
}
