//! Wrenn's web console, served by `wrenn serve` at `/` (same origin as the API).
//!
//! The console is a static single-page application that `dashboard/` builds with npm
//! (`./scripts/dashboard.sh`) into `dashboard/dist`; those files are embedded in the
//! binary when it is compiled (debug builds read them from `dashboard/dist` as they are
//! requested). A binary compiled before the console was built serves a page that says
//! how to build it, and everything else works without it.
//!
//! Only `/`, `/assets/…` and the console's other top-level files are routes here; the
//! console navigates with `#/…` fragments, so no API path can ever be shadowed by it.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rust_embed::{EmbeddedFile, RustEmbed};
use tower_http::compression::CompressionLayer;

#[derive(RustEmbed)]
#[folder = "../dashboard/dist"]
#[allow_missing = true]
struct Assets;

/// What every console page is sent with: no framing by other sites, no sniffing, and
/// scripts, styles and connections only from this origin ('self' covers the terminal's
/// WebSocket; xterm.js needs inline styles).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data: blob:; connect-src 'self'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// Whether this binary carries the console (it was built before the binary was).
pub fn built() -> bool {
    Assets::get("index.html").is_some()
}

/// The names of the embedded files (`index.html`, `assets/index-….js`, …).
pub fn files() -> Vec<String> {
    Assets::iter().map(|n| n.into_owned()).collect()
}

/// The console's routes: `/`, `/assets/{path}` and each other top-level file of the build.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut r = Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/assets/{*path}", get(asset));
    for name in Assets::iter() {
        if name.contains('/') || name == "index.html" {
            continue;
        }
        let path = format!("/{name}");
        let name = name.into_owned();
        r = r.route(
            &path,
            get(move |headers: HeaderMap| async move { file(&name, &headers) }),
        );
    }
    r.layer(CompressionLayer::new())
}

async fn index(headers: HeaderMap) -> Response {
    if built() {
        file("index.html", &headers)
    } else {
        not_built()
    }
}

async fn asset(
    axum::extract::Path(path): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    file(&format!("assets/{path}"), &headers)
}

/// One embedded file, with its type, a strong ETag (its SHA-256) and caching: the
/// hashed files under `assets/` forever, the rest revalidated on every load.
fn file(name: &str, headers: &HeaderMap) -> Response {
    let Some(f) = Assets::get(name) else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "not found",
        )
            .into_response();
    };
    let etag = etag(&f);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let cache = if name.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        // A release build's files are borrowed from the binary: sent without a copy.
        let mut res = Response::new(Body::from(f.data));
        if let Ok(v) = HeaderValue::from_str(f.metadata.mimetype()) {
            res.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        res
    };
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    secure(h);
    res
}

fn etag(f: &EmbeddedFile) -> String {
    let hex: String = f
        .metadata
        .sha256_hash()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("\"{hex}\"")
}

fn secure(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The page a binary without the console serves at `/`.
fn not_built() -> Response {
    let mut res = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        NOT_BUILT,
    )
        .into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(res.headers_mut());
    res
}

const NOT_BUILT: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Wrenn: the dashboard is not built</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem; line-height: 1.5">
<h1>Wrenn is running; its dashboard was not built</h1>
<p>This <code>wrenn</code> binary was compiled without the web dashboard, so only the API is served
(see <a href="/docs">/docs</a>). To add the dashboard, build it (this needs Node.js and npm) and then
<code>wrenn</code> again, from the repository:</p>
<pre style="background: #eee; padding: 0.75rem">./scripts/dashboard.sh
cargo build --release -p wrenn-server</pre>
<p><code>./scripts/setup.sh</code> does both.</p>
</body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str) -> Response {
        let app: Router = router();
        let req = Request::get(path)
            .body(Body::empty())
            .expect("a request with a literal path");
        app.oneshot(req).await.expect("the router is infallible")
    }

    #[tokio::test]
    async fn root_serves_the_console_or_says_how_to_build_it() {
        let res = get("/").await;
        assert_eq!(res.status(), StatusCode::OK);
        let csp = res.headers().get(header::CONTENT_SECURITY_POLICY);
        assert!(csp.is_some_and(|v| v
            .to_str()
            .is_ok_and(|s| s.contains("frame-ancestors 'none'"))));
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("the body is in memory");
        let text = String::from_utf8_lossy(&body);
        if built() {
            assert!(text.contains("<div id=\"app\">"), "{text}");
        } else {
            assert!(text.contains("./scripts/dashboard.sh"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_binary_without_the_console_says_how_to_build_it() {
        let res = not_built();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("the body is in memory");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("./scripts/dashboard.sh") && text.contains("cargo build"));
    }

    #[tokio::test]
    async fn unknown_assets_are_404_and_known_ones_revalidate() {
        assert_eq!(get("/assets/nope.js").await.status(), StatusCode::NOT_FOUND);
        if let Some(name) = Assets::iter().find(|n| n.starts_with("assets/")) {
            let res = get(&format!("/{name}")).await;
            assert_eq!(res.status(), StatusCode::OK);
            let cache = res.headers().get(header::CACHE_CONTROL).cloned();
            assert_eq!(
                cache,
                Some(HeaderValue::from_static(
                    "public, max-age=31536000, immutable"
                ))
            );
            let tag = res.headers().get(header::ETAG).cloned().expect("an etag");
            let app: Router = router();
            let req = Request::get(format!("/{name}"))
                .header(header::IF_NONE_MATCH, tag)
                .body(Body::empty())
                .expect("a request");
            let res = app.oneshot(req).await.expect("infallible");
            assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
        }
    }
}
