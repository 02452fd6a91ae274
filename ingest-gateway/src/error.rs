//! Every way a webhook request can fail, and the one place that turns a failure into a status
//! and a short JSON reason. Internal error text never reaches the sender.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("unknown stream")]
    UnknownStream,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    #[error("empty payload")]
    EmptyPayload,
    #[error("idempotency key longer than 255 bytes")]
    IdempotencyKeyTooLong,
    #[error("idempotency key must be visible ASCII")]
    IdempotencyKeyNotAscii,
    #[error("could not read request body")]
    BodyRead,
    #[error("request body not received in time")]
    BodyTimeout,
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The stream is over its `rate_limit`; retry after this many seconds.
    #[error("rate limit exceeded for this stream, retry later")]
    RateLimited(u64),
    /// The broker could not take the message in time; the sender should retry.
    #[error("{0}")]
    Unavailable(&'static str),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::UnknownStream | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotUtf8
            | ApiError::EmptyPayload
            | ApiError::BodyRead
            | ApiError::IdempotencyKeyTooLong
            | ApiError::IdempotencyKeyNotAscii => StatusCode::BAD_REQUEST,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// Seconds a sender should wait after a 503. Short: the usual cause (a broker leader election,
/// a full queue) passes in seconds.
pub const RETRY_AFTER_SECS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unavailable(_) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
            }
            ApiError::RateLimited(secs) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            ApiError::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::BodyTimeout => {
                // The rest of the body was not read: the connection cannot be reused.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            // Not for a 413: its body is read to the end and thrown away (see
            // `http::discard`), and where it is not (declared far too large, or held back by
            // `Expect: 100-continue`) hyper closes the connection after the answer itself.
            _ => {}
        }
        response
    }
}
