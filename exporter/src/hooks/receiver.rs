//! The webhook's HTTP side: authenticate (constant-time), cap the body, hand it to
//! [`Hooks::receive`], map the result to a status. Bad input is a 4xx (over the cap 413, cut
//! short 400; Alertmanager does not retry it); a journal failure is a 500 (it retries).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use futures::StreamExt;
use subtle::ConstantTimeEq;

use super::config::Auth;
use super::{HookError, Hooks};
use crate::routes::WEBHOOK_PATH;

/// The webhook route, to serve on its own listener or merge into the main router.
pub fn routes(hooks: Arc<Hooks>) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(alertmanager))
        .with_state(hooks)
}

/// Whether the request carries the configured credentials. Compared in constant time so the
/// answer's timing says nothing about how much of a guess was right.
fn authorized(auth: &Auth, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) else {
        return false;
    };
    match auth {
        Auth::Bearer(token) => value
            .strip_prefix(b"Bearer ")
            .is_some_and(|given| bool::from(given.ct_eq(token.expose().as_bytes()))),
        Auth::Basic { username, password } => {
            let Some(encoded) = value.strip_prefix(b"Basic ") else {
                return false;
            };
            let Ok(given) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
                return false;
            };
            let expected = format!("{username}:{}", password.expose());
            bool::from(given.ct_eq(expected.as_bytes()))
        }
    }
}

/// A body read that failed: over the cap (413), or cut short, e.g. fewer bytes than its
/// `Content-Length` (400: the request itself is wrong).
fn body_error(e: axum::Error) -> HookError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return HookError::TooLarge;
        }
        source = err.source();
    }
    HookError::Incomplete(e.to_string())
}

async fn alertmanager(State(hooks): State<Arc<Hooks>>, request: Request) -> Response {
    let result = async {
        let limit = hooks.config().max_body_bytes;
        if !authorized(&hooks.config().auth, request.headers()) {
            // Read the body (up to the cap, without keeping it) before answering: a reply sent
            // while the client is still writing closes the connection under it, and the
            // client sees a broken pipe instead of a clear 401.
            let mut body = request.into_body().into_data_stream();
            let mut read = 0;
            while let Some(Ok(chunk)) = body.next().await {
                read += chunk.len();
                if read > limit {
                    break;
                }
            }
            return Err(HookError::Unauthorized);
        }
        let body = axum::body::to_bytes(request.into_body(), limit)
            .await
            .map_err(body_error)?;
        hooks.receive(body).await
    }
    .await;
    match result {
        Ok(receipt) => (StatusCode::OK, Json(receipt)).into_response(),
        Err(e) => {
            hooks.count_rejected(&e);
            let status = match &e {
                HookError::Unauthorized => StatusCode::UNAUTHORIZED,
                HookError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                HookError::BadRequest(_) | HookError::Incomplete(_) => StatusCode::BAD_REQUEST,
                HookError::Journal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            // The full reason goes to the log; the client gets its kind only.
            match &e {
                HookError::Journal(_) => {
                    tracing::error!(error = %e, "webhook notification not stored")
                }
                _ => {
                    tracing::warn!(reason = e.status(), error = %e, "webhook notification refused")
                }
            }
            let mut response =
                Response::new(Body::from(format!("{}\n", e.status().replace('_', " "))));
            *response.status_mut() = status;
            if status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer, Basic realm=\"clusterwatch hooks\""),
                );
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[tokio::test]
    async fn a_short_body_is_a_bad_request_and_a_long_one_too_large() {
        let cut: Body = Body::from_stream(futures::stream::iter(vec![
            Ok(bytes::Bytes::from_static(b"{\"version\"")),
            Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before message completed",
            )),
        ]));
        let e = axum::body::to_bytes(cut, 1024).await.unwrap_err();
        assert!(matches!(body_error(e), HookError::Incomplete(_)));
        let long = Body::from(vec![b'x'; 2048]);
        let e = axum::body::to_bytes(long, 1024).await.unwrap_err();
        assert!(matches!(body_error(e), HookError::TooLarge));
    }

    #[test]
    fn auth_checks() {
        let bearer = Auth::Bearer(Secret::new("s3cret"));
        let mut h = HeaderMap::new();
        assert!(!authorized(&bearer, &h));
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(authorized(&bearer, &h));
        h.insert(header::AUTHORIZATION, "Bearer s3cre".parse().unwrap());
        assert!(!authorized(&bearer, &h));
        let basic = Auth::Basic {
            username: "am".into(),
            password: Secret::new("pw"),
        };
        h.insert(header::AUTHORIZATION, "Basic YW06cHc=".parse().unwrap());
        assert!(authorized(&basic, &h));
        assert!(!authorized(&bearer, &h));
        h.insert(header::AUTHORIZATION, "Basic YW06cHg=".parse().unwrap());
        assert!(!authorized(&basic, &h));
    }
}
