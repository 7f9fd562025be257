//! The operators' view against a real relay: health, the connection table,
//! stats, Prometheus metrics, the admin token, and draining.

use std::time::Duration;

use serde_json::json;
use wasmrelay_tests::{TestRelay, WsTester, admin_client, get_json, wait_json};

#[tokio::test]
async fn health_and_unknown_endpoints() {
    let relay = TestRelay::start().await;
    let response = reqwest::get(relay.url("/healthz")).await.unwrap();
    assert_eq!(response.status(), 200);
    let response = reqwest::get(relay.url("/nope")).await.unwrap();
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    // /ws without an upgrade is refused with a reason, not a hang.
    let response = reqwest::get(relay.url("/ws")).await.unwrap();
    assert_eq!(response.status(), 426);
    let page = reqwest::get(relay.url("/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Spaces"));
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn connection_table_shows_each_connection_with_its_figures() {
    let relay = TestRelay::start().await;
    let mut member = WsTester::greeted(&relay.ws_url()).await.unwrap();
    member
        .send(json!({"type": "subscribe", "channel": "ops"}))
        .await
        .unwrap();
    member.recv_type("subscribed").await.unwrap();
    let mut instance = WsTester::greeted(&relay.ws_url()).await.unwrap();
    instance
        .send(json!({"type": "register", "space": "svc"}))
        .await
        .unwrap();
    instance.recv_type("registered").await.unwrap();

    let table = get_json(&relay.url("/admin/connections")).await.unwrap();
    let rows = table["connections"].as_array().unwrap();
    let ws_rows: Vec<_> = rows.iter().filter(|r| r["transport"] == "ws").collect();
    assert_eq!(ws_rows.len(), 2, "{table}");
    for row in &ws_rows {
        for field in [
            "id",
            "transport",
            "state",
            "peer",
            "local",
            "age_ms",
            "bytes_in",
            "bytes_out",
            "msgs_in",
            "msgs_out",
            "queue_depth",
            "dropped",
        ] {
            assert!(row.get(field).is_some(), "missing {field} in {row}");
        }
        assert_eq!(row["state"], "open");
        assert!(row["bytes_in"].as_u64().unwrap() > 0);
        assert!(row["msgs_in"].as_u64().unwrap() >= 2);
        assert!(row["msgs_out"].as_u64().unwrap() >= 2);
    }
    assert!(ws_rows.iter().any(|r| r["channels"] == json!(["ops"])));
    assert!(ws_rows.iter().any(|r| r["spaces"] == json!(["svc"])));
    // The admin request itself is an HTTP connection in the table.
    assert!(rows.iter().any(|r| r["transport"] == "http"));

    let stats = get_json(&relay.url("/admin/stats")).await.unwrap();
    assert_eq!(stats["connections"]["by_transport"]["ws"], 2, "{stats}");
    assert_eq!(stats["spaces_connected"], 1);
    assert_eq!(stats["channels"], 1);
    assert!(stats["memory_rss_bytes"].as_u64().unwrap() > 0);

    drop(member);
    drop(instance);
    wait_json(
        "closed connections to leave the table",
        &relay.url("/admin/stats"),
        Duration::from_secs(5),
        |stats| stats["connections"]["by_transport"]["ws"] == 0 && stats["channels"] == 0,
    )
    .await;
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_documented_series() {
    let relay = TestRelay::start().await;
    let mut instance = WsTester::greeted(&relay.ws_url()).await.unwrap();
    instance
        .send(json!({"type": "register", "space": "m"}))
        .await
        .unwrap();
    instance.recv_type("registered").await.unwrap();
    let url = relay.url("/spaces/m/");
    let call = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .send()
            .await
            .unwrap()
            .status()
    });
    let req = instance.recv_type("request").await.unwrap();
    instance
        .send(json!({"type": "response", "id": req["id"], "data": "ok"}))
        .await
        .unwrap();
    assert_eq!(call.await.unwrap(), 200);

    let text = admin_client()
        .get(relay.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "wasmrelay_connections{transport=\"ws\",state=\"open\"} 1",
        "wasmrelay_messages_total{direction=\"in\"}",
        "wasmrelay_bytes_total{direction=\"out\"}",
        "wasmrelay_request_duration_seconds_bucket",
        "wasmrelay_requests_total{outcome=\"ok\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn admin_token_guards_admin_and_metrics_only() {
    let relay =
        TestRelay::start_with(|c| c.admin.token = Some("t0ken-0123456789abcdef".into())).await;
    let client = reqwest::Client::new();
    for path in ["/admin/connections", "/admin/stats", "/metrics"] {
        let response = client.get(relay.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        let response = client
            .get(relay.url(path))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path}");
        let response = client
            .get(relay.url(path))
            .bearer_auth("t0ken-0123456789abcdef")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    // Public endpoints stay public.
    for path in ["/healthz", "/spaces", "/"] {
        let response = client.get(relay.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn draining_refuses_new_work_and_finishes_old_work() {
    let relay = TestRelay::start_with(|c| c.server.shutdown_grace_ms = 5_000).await;
    let mut instance = WsTester::greeted(&relay.ws_url()).await.unwrap();
    instance
        .send(json!({"type": "register", "space": "d"}))
        .await
        .unwrap();
    instance.recv_type("registered").await.unwrap();
    let mut caller = WsTester::greeted(&relay.ws_url()).await.unwrap();
    caller
        .send(json!({"type": "request", "id": "old", "space": "d"}))
        .await
        .unwrap();
    let req = instance.recv_type("request").await.unwrap();

    relay.begin_shutdown();
    assert_eq!(caller.recv_type("goaway").await.unwrap()["type"], "goaway");
    instance.recv_type("goaway").await.unwrap();
    caller
        .send(json!({"type": "request", "id": "new", "space": "d"}))
        .await
        .unwrap();
    let err = caller.recv_type("error").await.unwrap();
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("shutting_down"), Some("new"))
    );
    // New connections are no longer accepted.
    assert!(
        WsTester::connect(&relay.ws_url()).await.is_err()
            || reqwest::get(relay.url("/healthz")).await.is_err()
    );

    instance
        .send(json!({"type": "response", "id": req["id"], "data": "done"}))
        .await
        .unwrap();
    assert_eq!(caller.recv_type("response").await.unwrap()["data"], "done");
    let close = caller.expect_close().await.unwrap().expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn admin_insecure_opens_the_operator_api_on_loopback_only_when_asked() {
    let relay = TestRelay::start_with(|c| {
        c.admin.token = None;
        c.admin.insecure = true;
    })
    .await;
    let response = reqwest::get(relay.url("/admin/stats")).await.unwrap();
    assert_eq!(response.status(), 200);
    relay.stop().await.unwrap();
}
