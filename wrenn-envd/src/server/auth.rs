//! Access-token enforcement and signed file URLs.

use super::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::sync::Arc;

pub const TOKEN_HEADER: &str = "x-access-token";

/// An error of envd's HTTP routes: `{"code": <status>, "message": "…"}`.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

pub fn http_error(status: StatusCode, message: impl Into<String>) -> HttpError {
    HttpError {
        status,
        message: message.into(),
    }
}

/// Compares without an early exit, so timing does not reveal the matching prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn header_token(headers: &HeaderMap) -> Option<&str> {
    headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok())
}

/// Once `/init` has set a token, every route except `/health`, `/files` (which may
/// use signatures instead) and `/init` (which checks for itself) needs it.
pub async fn require_token(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if path == "/health" || path == "/files" || path == "/init" {
        return next.run(req).await;
    }
    if let Some(token) = state.access_token() {
        match header_token(req.headers()) {
            Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => {}
            Some(_) => {
                return http_error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized access, invalid access token",
                )
                .into_response()
            }
            None => {
                return http_error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized access, please provide a valid access token",
                )
                .into_response()
            }
        }
    }
    next.run(req).await
}

/// Checks a request that changes the token (`/init`): it must carry the current one.
pub fn check_token_header(state: &AppState, headers: &HeaderMap) -> Result<(), HttpError> {
    match state.access_token() {
        None => Ok(()),
        Some(token) => match header_token(headers) {
            Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
            _ => Err(http_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized access, invalid access token",
            )),
        },
    }
}

/// The v1 signature of a file URL.
pub fn sign(
    path: &str,
    operation: &str,
    username: &str,
    token: &str,
    expiration: Option<i64>,
) -> String {
    let mut input = format!("{path}:{operation}:{username}:{token}");
    if let Some(exp) = expiration {
        input.push_str(&format!(":{exp}"));
    }
    let digest = Sha256::digest(input.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// Query parameters that authorise a `/files` request.
#[derive(Debug, Default, serde::Deserialize)]
pub struct FileQuery {
    pub path: Option<String>,
    pub username: Option<String>,
    pub signature: Option<String>,
    pub signature_expiration: Option<String>,
}

/// `/files` auth: the token header, or a valid, unexpired signature.
pub fn check_file_access(
    state: &AppState,
    headers: &HeaderMap,
    q: &FileQuery,
    operation: &str,
) -> Result<(), HttpError> {
    let Some(token) = state.access_token() else {
        return Ok(());
    };
    if let Some(given) = header_token(headers) {
        return if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(http_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized access, invalid access token",
            ))
        };
    }
    let Some(signature) = q.signature.as_deref() else {
        return Err(http_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized access, please provide a valid access token or signature",
        ));
    };
    let expiration =
        match q.signature_expiration.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(s.parse::<i64>().map_err(|_| {
                http_error(StatusCode::UNAUTHORIZED, "invalid signature expiration")
            })?),
        };
    let expected = sign(
        q.path.as_deref().unwrap_or(""),
        operation,
        q.username.as_deref().unwrap_or(""),
        &token,
        expiration,
    );
    if !constant_time_eq(signature.as_bytes(), expected.as_bytes()) {
        return Err(http_error(StatusCode::UNAUTHORIZED, "invalid signature"));
    }
    if let Some(exp) = expiration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        if exp < now {
            return Err(http_error(
                StatusCode::UNAUTHORIZED,
                "signature is already expired",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_sdk_formula() {
        // sha256("/home/user/a.txt:read::tok") computed independently with Python's hashlib.
        let s = sign("/home/user/a.txt", "read", "", "tok", None);
        assert_eq!(s, "v1_Zkbb3914oLJLvMBzCAHQhm2ydBLxbSx2eQUR/kLdvIY");
        assert_ne!(s, sign("/home/user/a.txt", "write", "", "tok", None));
        assert_ne!(s, sign("/home/user/a.txt", "read", "", "tok", Some(1)));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
