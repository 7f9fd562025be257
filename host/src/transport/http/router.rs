//! Routing: which endpoint a request goes to — the browser page, health,
//! the WebSocket upgrade, the spaces API and ingress, files, the operator API —
//! and, on a connection over a cap, the refusal for all but health and
//! authorized operators.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use hyper::body::Incoming;
use serde::Serialize;

use super::admin;
use super::files;
use super::ingress::ingress;
use super::tasks;
use crate::delivery::table::{ConnGuard, ConnState};
use crate::protocol::ErrorCode;
use crate::quota::Refusal;
use crate::state::Relay;
use crate::transport::reply::{Body, json, json_error, refusal_response};

/// The browser page served at `/` (also an example people copy).
const INDEX_HTML: &str = include_str!("../../../../examples/browser/index.html");

pub(super) async fn route(
    relay: Arc<Relay>,
    guard: Arc<ConnGuard>,
    refusal: Option<Arc<Refusal>>,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(3, '/').collect();
    if path != "/ws" {
        guard.info().set_state(ConnState::Open);
    }
    let method = req.method().clone();
    if let Some(refusal) = refusal {
        let operator = matches!(segments.as_slice(), ["admin", ..] | ["metrics"])
            && admin::authorize(&relay, req.headers()).is_ok();
        if !operator && segments.as_slice() != ["healthz"] {
            let mut response = refusal_response(&refusal);
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(response);
        }
    }
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, [""]) => html(INDEX_HTML),
        (&Method::GET, ["healthz"]) => health(&relay),
        (_, ["ws"]) => crate::transport::ws::upgrade(relay, guard, req),
        (&Method::GET, ["spaces"]) => json(StatusCode::OK, &relay.directory.list()),
        (&Method::GET, ["spaces", name]) => match relay.directory.info(name) {
            Some(info) => json(StatusCode::OK, &info),
            None => json_error(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownSpace,
                &format!("no space named {name:?}"),
            ),
        },
        (_, ["spaces", name]) => {
            let name = (*name).to_owned();
            ingress(relay, guard, name, "/".to_owned(), req).await
        }
        (_, ["spaces", name, rest]) => {
            let (name, rest) = ((*name).to_owned(), format!("/{rest}"));
            ingress(relay, guard, name, rest, req).await
        }
        (_, ["files"] | ["files", ""]) => files::route(relay, guard, None, req).await,
        (_, ["files", id]) => {
            let id = (*id).to_owned();
            files::route(relay, guard, Some(id), req).await
        }
        (_, ["admin", "files" | "offers", ..]) => {
            if let Err(denied) = admin::authorize(&relay, req.headers()) {
                denied
            } else {
                files::operator(relay, req).await
            }
        }
        (_, ["admin", "plugins", ..]) => {
            if let Err(denied) = admin::authorize(&relay, req.headers()) {
                denied
            } else {
                // The path is split in three at most; the last piece holds the rest.
                let rest: Vec<&str> = path.trim_start_matches('/').split('/').skip(2).collect();
                match rest.as_slice() {
                    [] | [""] => admin::plugins(&relay, req, None, None).await,
                    [name] => admin::plugins(&relay, req, Some(name), None).await,
                    [name, action] => admin::plugins(&relay, req, Some(name), Some(action)).await,
                    _ => json_error(
                        StatusCode::NOT_FOUND,
                        ErrorCode::NotFound,
                        "no such plugin endpoint",
                    ),
                }
            }
        }
        (_, ["admin", "tasks" | "logs" | "export" | "config", ..]) => {
            if let Err(denied) = admin::authorize(&relay, req.headers()) {
                denied
            } else {
                tasks::route(relay, guard, req).await
            }
        }
        (_, ["admin", ..]) | (_, ["metrics"]) => {
            if let Err(denied) = admin::authorize(&relay, req.headers()) {
                denied
            } else {
                admin::route(&relay, &method, &segments).await
            }
        }
        _ => json_error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no endpoint {method} {path}"),
        ),
    };
    Ok(response)
}

fn health(relay: &Relay) -> hyper::Response<Body> {
    #[derive(Serialize)]
    struct Health {
        status: &'static str,
    }
    if relay.is_draining() {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Health { status: "draining" },
        )
    } else {
        json(StatusCode::OK, &Health { status: "ok" })
    }
}

fn html(page: &'static str) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(crate::transport::reply::full(Bytes::from_static(
        page.as_bytes(),
    )));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}
