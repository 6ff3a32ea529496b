//! API errors: one type for every handler, answered as the reference JSON body
//! `{"error":{"code":"…","message":"…"}}` (or E2B's `{"code":<status>,"message":"…"}`
//! on the E2B routes, see [`crate::e2b`]).

use crate::agent::HostError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use wrenn_db::DbError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds the client should wait (429).
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_state", message)
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("upload exceeds the limit of {limit} bytes"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn rate_limited(retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this API key; retry later",
            )
        }
    }

    fn headers(&self, resp: &mut Response) {
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = self.code, message = %self.message, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        self.headers(&mut resp);
        resp
    }
}

/// The same error in E2B's shape: `{"code": <HTTP status>, "message": "…"}`.
#[derive(Debug)]
pub struct E2bError(pub ApiError);

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct E2bErrorBody {
    pub code: u16,
    pub message: String,
}

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> Self {
        E2bError(e)
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let e = self.0;
        if e.status.is_server_error() {
            tracing::warn!(status = %e.status, code = e.code, message = %e.message, "request failed");
        }
        let body = E2bErrorBody {
            code: e.status.as_u16(),
            message: e.message.clone(),
        };
        let mut resp = (e.status, axum::Json(body)).into_response();
        e.headers(&mut resp);
        resp
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match &e {
            DbError::NotFound { what } => ApiError::not_found(what),
            DbError::Conflict { what } => {
                ApiError::conflict("conflict", format!("{what} already exists"))
            }
            DbError::InvalidInput { .. } => ApiError::invalid(e.to_string()),
            DbError::Unavailable { .. } => {
                tracing::warn!(error = %wrenn_core::manager::error_chain(&e), "database unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the database is unavailable; retry shortly",
                )
            }
            _ => {
                tracing::error!(error = %wrenn_core::manager::error_chain(&e), "database error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "db_error",
                    "database error",
                )
            }
        }
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        use crate::agent::HostErrorKind as K;
        let (status, code) = match e.kind {
            K::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            K::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request"),
            K::InvalidState => (StatusCode::CONFLICT, "invalid_state"),
            K::Conflict => (StatusCode::CONFLICT, "conflict"),
            K::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "host_unavailable"),
            K::InsufficientStorage => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
            K::Timeout => (StatusCode::GATEWAY_TIMEOUT, "agent_error"),
            K::Guest => (StatusCode::BAD_GATEWAY, "agent_error"),
            K::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        ApiError::new(status, code, e.message)
    }
}

/// Turns axum's JSON extraction failures into the reference 400 body.
pub fn json_rejection(e: axum::extract::rejection::JsonRejection) -> ApiError {
    ApiError::invalid(e.body_text())
}

/// Turns axum's query string extraction failures into the reference 400 body.
pub fn query_rejection(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::invalid(e.body_text())
}
