//! Spaces against a real relay: registration, request/progress/response over
//! WebSocket and HTTP, load spreading, deadlines, lost instances, and the
//! errors for requests that cannot be served.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use wasmrelay_examples::service_app::{self, Options};
use wasmrelay_tests::{TestRelay, WsTester, get_json, wait_json};

async fn register(relay: &TestRelay, space: &str) -> WsTester {
    let mut instance = WsTester::greeted(&relay.ws_url()).await.unwrap();
    instance
        .send(json!({"type": "register", "space": space}))
        .await
        .unwrap();
    let registered = instance.recv().await.unwrap();
    assert_eq!(registered["type"], "registered", "{registered}");
    instance
}

fn start_service(relay: &TestRelay, space: &str, work_ms: u64) -> CancellationToken {
    let stop = CancellationToken::new();
    let options = Options {
        relay: relay.ws_url(),
        trust: Default::default(),
        token: None,
        space: space.to_owned(),
        work_ms,
        steps: 2,
    };
    tokio::spawn(service_app::run(options, stop.clone()));
    stop
}

async fn wait_connected(relay: &TestRelay, space: &str, instances: u64) {
    let url = relay.url(&format!("/spaces/{space}"));
    wait_json(
        "the space to be connected",
        &url,
        Duration::from_secs(10),
        |info| info["instances"] == instances,
    )
    .await;
}

#[tokio::test]
async fn request_over_websocket_gets_progress_and_its_own_response() {
    let relay = TestRelay::start().await;
    let stop = start_service(&relay, "tts", 100);
    wait_connected(&relay, "tts", 1).await;

    let mut a = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let mut b = WsTester::greeted(&relay.ws_url()).await.unwrap();
    // Both use the same request id: ids are per connection.
    a.send(json!({"type": "request", "id": "1", "space": "tts", "data": "from a"}))
        .await
        .unwrap();
    b.send(json!({"type": "request", "id": "1", "space": "tts", "data": "from b"}))
        .await
        .unwrap();
    for (client, expected) in [(&mut a, "FROM A"), (&mut b, "FROM B")] {
        let progress = client.recv().await.unwrap();
        assert_eq!(progress["type"], "progress", "{progress}");
        assert_eq!(progress["id"], "1");
        let mut last = client.recv().await.unwrap();
        while last["type"] == "progress" {
            last = client.recv().await.unwrap();
        }
        assert_eq!(last["type"], "response", "{last}");
        assert_eq!(last["id"], "1");
        assert_eq!(last["status"], 200);
        assert_eq!(last["data"], expected);
    }
    stop.cancel();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn http_ingress_relays_method_path_query_headers_and_body() {
    let relay = TestRelay::start().await;
    let mut instance = register(&relay, "echo").await;
    let url = relay.url("/spaces/echo/some/path?x=1&y=2");
    let call = tokio::spawn(async move {
        reqwest::Client::new()
            .put(url)
            .header("x-custom", "yes")
            .body("payload")
            .send()
            .await
            .unwrap()
    });
    let req = instance.recv_type("request").await.unwrap();
    assert_eq!(req["space"], "echo");
    assert_eq!(req["method"], "PUT");
    assert_eq!(req["path"], "/some/path");
    assert_eq!(req["query"], "x=1&y=2");
    assert_eq!(req["data"], "payload");
    let headers = req["headers"].as_array().unwrap();
    assert!(headers.contains(&json!(["x-custom", "yes"])), "{headers:?}");
    assert!(
        !headers.iter().any(|h| h[0] == "host"),
        "host is not forwarded"
    );
    instance
        .send(json!({"type": "response", "id": req["id"], "status": 201,
                     "headers": [["x-answer", "42"]], "data": "made"}))
        .await
        .unwrap();
    let response = call.await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-answer"], "42");
    assert_eq!(response.text().await.unwrap(), "made");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn requests_spread_over_instances_by_least_in_flight() {
    let relay = TestRelay::start().await;
    let mut one = register(&relay, "pool").await;
    let mut two = register(&relay, "pool").await;
    let mut caller = WsTester::greeted(&relay.ws_url()).await.unwrap();
    for i in 0..4 {
        caller
            .send(json!({"type": "request", "id": format!("r{i}"), "space": "pool", "data": "x"}))
            .await
            .unwrap();
    }
    // Nobody answers yet, so in-flight counts decide: two each.
    let mut got: HashMap<&str, Vec<String>> = HashMap::new();
    for (name, instance) in [("one", &mut one), ("two", &mut two)] {
        for _ in 0..2 {
            let req = instance.recv_type("request").await.unwrap();
            got.entry(name)
                .or_default()
                .push(req["id"].as_str().unwrap().to_owned());
        }
    }
    let info = get_json(&relay.url("/spaces/pool")).await.unwrap();
    assert_eq!(info["in_flight"], 4);
    // A fifth goes to whichever answers first.
    let first = got["one"][0].clone();
    one.send(json!({"type": "response", "id": first, "data": "ok"}))
        .await
        .unwrap();
    caller.recv_type("response").await.unwrap();
    caller
        .send(json!({"type": "request", "id": "r4", "space": "pool"}))
        .await
        .unwrap();
    one.recv_type("request").await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn unservable_requests_get_their_error_codes() {
    let relay = TestRelay::start_with(|c| c.spaces.declared = vec!["empty".into()]).await;
    let mut caller = WsTester::greeted(&relay.ws_url()).await.unwrap();

    caller
        .send(json!({"type": "request", "id": "a", "space": "nowhere"}))
        .await
        .unwrap();
    let err = caller.recv().await.unwrap();
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("unknown_space"), Some("a"))
    );

    caller
        .send(json!({"type": "request", "id": "b", "space": "empty"}))
        .await
        .unwrap();
    let err = caller.recv().await.unwrap();
    assert_eq!(err["code"], "no_instance");

    // HTTP: the same conditions, at once, as JSON with the mapped status.
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(relay.url("/spaces/empty/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(1));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_instance");
    let response = reqwest::get(relay.url("/spaces/nowhere/x")).await.unwrap();
    assert_eq!(response.status(), 404);
    let response = reqwest::get(relay.url("/spaces/nowhere")).await.unwrap();
    assert_eq!(response.status(), 404);

    // Duplicate ids on one connection, and responses nobody is waiting for.
    let mut instance = register(&relay, "empty").await;
    caller
        .send(json!({"type": "request", "id": "dup", "space": "empty"}))
        .await
        .unwrap();
    let forwarded = instance.recv_type("request").await.unwrap();
    caller
        .send(json!({"type": "request", "id": "dup", "space": "empty"}))
        .await
        .unwrap();
    let err = caller.recv().await.unwrap();
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("duplicate_id"), Some("dup"))
    );

    instance
        .send(json!({"type": "response", "id": "999999", "data": "stray"}))
        .await
        .unwrap();
    let err = instance.recv().await.unwrap();
    assert_eq!(err["code"], "unknown_request");
    instance
        .send(json!({"type": "progress", "id": "not-a-number"}))
        .await
        .unwrap();
    assert_eq!(instance.recv().await.unwrap()["code"], "unknown_request");
    // A caller cannot answer a request it did not receive.
    caller
        .send(json!({"type": "response", "id": forwarded["id"], "data": "forged"}))
        .await
        .unwrap();
    assert_eq!(caller.recv().await.unwrap()["code"], "unknown_request");

    // The real answer still gets through; after it, the id is free again.
    instance
        .send(json!({"type": "response", "id": forwarded["id"], "data": "real"}))
        .await
        .unwrap();
    let response = caller.recv().await.unwrap();
    assert_eq!(
        (response["type"].as_str(), response["data"].as_str()),
        (Some("response"), Some("real"))
    );
    caller
        .send(json!({"type": "request", "id": "dup", "space": "empty"}))
        .await
        .unwrap();
    instance.recv_type("request").await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn deadlines_give_504_and_cancel_the_instance() {
    let relay = TestRelay::start().await;
    let mut instance = register(&relay, "slow").await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(relay.url("/spaces/slow/"))
        .header("x-wasmrelay-timeout-ms", "300")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
    let req = instance.recv_type("request").await.unwrap();
    assert_eq!(req["timeout_ms"], 300);
    let cancel = instance.recv_type("cancel").await.unwrap();
    assert_eq!(cancel["id"], req["id"]);

    // Over WebSocket: error `timeout` with the caller's id.
    let mut caller = WsTester::greeted(&relay.ws_url()).await.unwrap();
    caller
        .send(json!({"type": "request", "id": "t", "space": "slow", "timeout_ms": 200}))
        .await
        .unwrap();
    let err = caller.recv().await.unwrap();
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("timeout"), Some("t"))
    );
    // A late answer is refused: the request is no longer pending.
    let late = instance.recv_type("request").await.unwrap();
    instance.recv_type("cancel").await.unwrap();
    instance
        .send(json!({"type": "response", "id": late["id"], "data": "late"}))
        .await
        .unwrap();
    assert_eq!(instance.recv().await.unwrap()["code"], "unknown_request");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn lost_instance_fails_pending_requests_at_once_and_reregistration_heals() {
    let relay = TestRelay::start().await;
    let instance = register(&relay, "flaky").await;
    let mut caller = WsTester::greeted(&relay.ws_url()).await.unwrap();
    caller
        .send(json!({"type": "request", "id": "w", "space": "flaky"}))
        .await
        .unwrap();
    let url = relay.url("/spaces/flaky/");
    let http_call =
        tokio::spawn(async move { reqwest::Client::new().post(url).send().await.unwrap() });
    let info_url = relay.url("/spaces/flaky");
    wait_json(
        "two requests in flight",
        &info_url,
        Duration::from_secs(5),
        |info| info["in_flight"] == 2,
    )
    .await;

    let lost_at = Instant::now();
    drop(instance);
    let err = caller.recv().await.unwrap();
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("instance_lost"), Some("w"))
    );
    let response = http_call.await.unwrap();
    assert_eq!(response.status(), 502);
    assert!(
        lost_at.elapsed() < Duration::from_secs(1),
        "failed within a second"
    );
    let info = get_json(&relay.url("/spaces/flaky")).await.unwrap();
    assert_eq!(info["connected"], false);

    let mut instance = register(&relay, "flaky").await;
    caller
        .send(json!({"type": "request", "id": "w2", "space": "flaky", "data": "again"}))
        .await
        .unwrap();
    let req = instance.recv_type("request").await.unwrap();
    instance
        .send(json!({"type": "response", "id": req["id"], "data": "healed"}))
        .await
        .unwrap();
    assert_eq!(
        caller.recv_type("response").await.unwrap()["data"],
        "healed"
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn caller_leaving_cancels_its_requests() {
    let relay = TestRelay::start().await;
    let mut instance = register(&relay, "work").await;
    let mut caller = WsTester::greeted(&relay.ws_url()).await.unwrap();
    caller
        .send(json!({"type": "request", "id": "bye", "space": "work"}))
        .await
        .unwrap();
    let req = instance.recv_type("request").await.unwrap();
    drop(caller);
    let cancel = instance.recv_type("cancel").await.unwrap();
    assert_eq!(cancel["id"], req["id"]);
    assert_eq!(cancel["reason"], "caller disconnected");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn spaces_api_lists_declared_and_registered_spaces() {
    let relay = TestRelay::start_with(|c| c.spaces.declared = vec!["declared".into()]).await;
    let _instance = register(&relay, "dynamic").await;
    let list = get_json(&relay.url("/spaces")).await.unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["name"], "declared");
    assert_eq!(list[0]["connected"], false);
    assert_eq!(list[0]["instances"], 0);
    assert_eq!(list[1]["name"], "dynamic");
    assert_eq!(list[1]["connected"], true);
    assert_eq!(list[1]["instances"], 1);

    let mut bad = WsTester::greeted(&relay.ws_url()).await.unwrap();
    bad.send(json!({"type": "register", "space": "no spaces allowed"}))
        .await
        .unwrap();
    assert_eq!(bad.recv().await.unwrap()["code"], "invalid_name");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn http_caller_hanging_up_cancels_the_request() {
    let relay = TestRelay::start().await;
    let mut instance = register(&relay, "hangup").await;
    let url = relay.url("/spaces/hangup/");
    let call = tokio::spawn(async move { reqwest::Client::new().post(url).send().await });
    let req = instance.recv_type("request").await.unwrap();
    call.abort();
    let cancel = instance.recv_type("cancel").await.unwrap();
    assert_eq!(cancel["id"], req["id"]);
    let stats = get_json(&relay.url("/admin/stats")).await.unwrap();
    assert_eq!(stats["requests"]["pending"], 0);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn bad_deadlines_and_bad_statuses_are_refused() {
    let relay = TestRelay::start().await;
    let mut instance = register(&relay, "odd").await;
    let mut caller = WsTester::greeted(&relay.ws_url()).await.unwrap();
    caller
        .send(json!({"type": "request", "id": "z", "space": "odd", "timeout_ms": 0}))
        .await
        .unwrap();
    assert_eq!(caller.recv().await.unwrap()["code"], "bad_message");
    let response = reqwest::Client::new()
        .post(relay.url("/spaces/odd/"))
        .header("x-wasmrelay-timeout-ms", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    let url = relay.url("/spaces/odd/");
    let call = tokio::spawn(async move { reqwest::Client::new().post(url).send().await.unwrap() });
    let req = instance.recv_type("request").await.unwrap();
    instance
        .send(json!({"type": "response", "id": req["id"], "status": 101}))
        .await
        .unwrap();
    let response = call.await.unwrap();
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_response");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn requests_wait_for_a_busy_instance_boundedly_then_get_overloaded() {
    let relay = TestRelay::start_with(|c| {
        c.limits.max_in_flight_per_instance = 1;
        c.limits.max_waiting_per_space = 2;
        c.limits.max_wait_ms = 1_500;
    })
    .await;
    let mut instance = WsTester::greeted(&relay.ws_url()).await.unwrap();
    instance
        .send(json!({"type": "register", "space": "busy"}))
        .await
        .unwrap();
    instance.recv_type("registered").await.unwrap();
    let mut caller = WsTester::greeted(&relay.ws_url()).await.unwrap();
    for n in 1..=4 {
        caller
            .send(json!({"type": "request", "id": format!("r{n}"), "space": "busy", "data": n.to_string()}))
            .await
            .unwrap();
    }
    // One slot: r1 goes out, r2 and r3 wait, r4 finds the waiting line full.
    let first = instance.recv_type("request").await.unwrap();
    assert_eq!(first["data"], "1");
    let refused = caller.recv_type("error").await.unwrap();
    assert_eq!(
        (refused["id"].as_str(), refused["code"].as_str()),
        (Some("r4"), Some("overloaded"))
    );
    assert!(
        instance
            .recv_within(Duration::from_millis(300))
            .await
            .is_err(),
        "nothing more reaches a busy instance"
    );
    let info = get_json(&relay.url("/spaces/busy")).await.unwrap();
    assert_eq!(
        (info["in_flight"].as_u64(), info["waiting"].as_u64()),
        (Some(1), Some(2)),
        "{info}"
    );

    // The slot frees up: the oldest waiting request gets it.
    instance
        .send(json!({"type": "response", "id": first["id"], "data": "one"}))
        .await
        .unwrap();
    assert_eq!(caller.recv_type("response").await.unwrap()["id"], "r1");
    let second = instance.recv_type("request").await.unwrap();
    assert_eq!(second["data"], "2");

    // r3 waits past max_wait_ms: overloaded, and the instance never sees it.
    let started = Instant::now();
    let expired = caller.recv_type("error").await.unwrap();
    assert_eq!(
        (expired["id"].as_str(), expired["code"].as_str()),
        (Some("r3"), Some("overloaded"))
    );
    assert!(
        expired["message"].as_str().unwrap().contains("free slot"),
        "{expired}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    instance
        .send(json!({"type": "response", "id": second["id"], "data": "two"}))
        .await
        .unwrap();
    assert_eq!(caller.recv_type("response").await.unwrap()["id"], "r2");
    assert!(
        instance
            .recv_within(Duration::from_millis(300))
            .await
            .is_err()
    );

    // Over HTTP a wait that runs out is a 503.
    let blocker = tokio::spawn({
        let url = relay.url("/spaces/busy/");
        async move {
            reqwest::Client::new()
                .post(url)
                .body("a")
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    instance.recv_type("request").await.unwrap();
    let waited = reqwest::Client::new()
        .post(relay.url("/spaces/busy/"))
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(waited.status(), 503);
    blocker.abort();
    relay.stop().await.unwrap();
}

/// `len` bytes of a recognisable ASCII pattern.
fn pattern(len: usize) -> String {
    (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

#[tokio::test]
async fn large_http_bodies_stream_to_the_instance_as_fast_as_it_reads() {
    const QUEUE_BYTES: usize = 256 * 1024;
    const BODY: usize = 8 * 1024 * 1024;
    let relay = TestRelay::start_with(|c| c.limits.outbound_queue_bytes = QUEUE_BYTES).await;
    let mut instance = register(&relay, "upload").await;
    let body = pattern(BODY);
    let upload = tokio::spawn({
        let (url, body) = (relay.url("/spaces/upload/files"), body.clone());
        async move {
            let response = reqwest::Client::new()
                .put(url)
                .body(body)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    });
    let request = instance.recv_type("request").await.unwrap();
    assert_eq!(request["stream"], true, "{request}");
    assert!(request.get("data").is_none(), "{request}");
    assert_eq!(request["method"], "PUT");

    // The instance does not read: once its queue has filled, the relay holds
    // no more than its queue bound of the body, and the upload waits.
    let most_queued = |table: &serde_json::Value| {
        table["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["queue_bytes"].as_u64().unwrap())
            .max()
            .unwrap()
    };
    let table = wasmrelay_tests::wait_json(
        "the instance's queue to fill",
        &relay.url("/admin/connections"),
        Duration::from_secs(30),
        |table| most_queued(table) >= (QUEUE_BYTES / 2) as u64,
    )
    .await;
    let queued = most_queued(&table);
    assert!(
        queued <= (QUEUE_BYTES + 64 * 1024) as u64,
        "{queued} bytes queued"
    );
    assert!(!upload.is_finished(), "the uploader is held back");

    // Reading, it gets the whole body in order, the last piece marked.
    let mut received = String::with_capacity(BODY);
    loop {
        let piece = instance.recv_type("body").await.unwrap();
        assert_eq!(piece["id"], request["id"]);
        received.push_str(piece["data"].as_str().unwrap_or(""));
        if piece["last"] == true {
            break;
        }
    }
    assert_eq!(received.len(), BODY);
    assert!(received == body, "the body arrived intact");
    instance
        .send(json!({"type": "response", "id": request["id"], "status": 201, "data": "stored"}))
        .await
        .unwrap();
    assert_eq!(upload.await.unwrap(), (201, "stored".to_owned()));
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_over_max_body_bytes_gets_413_and_the_instance_a_cancel() {
    let relay = TestRelay::start_with(|c| c.limits.max_body_bytes = 1024 * 1024).await;
    let mut instance = register(&relay, "upload").await;
    let response = reqwest::Client::new()
        .post(relay.url("/spaces/upload/"))
        .body(pattern(3 * 1024 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_large", "{body}");
    let request = instance.recv_type("request").await.unwrap();
    let cancel = instance.recv_type("cancel").await.unwrap();
    assert_eq!(cancel["id"], request["id"]);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn the_example_service_app_takes_streamed_bodies() {
    let relay = TestRelay::start().await;
    let stop = start_service(&relay, "upper", 10);
    wait_connected(&relay, "upper", 1).await;
    let body = pattern(300 * 1024);
    let response = reqwest::Client::new()
        .post(relay.url("/spaces/upper/"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), body.to_uppercase());
    stop.cancel();
    relay.stop().await.unwrap();
}

/// Many callers at once race for an instance's last slots: the limit holds
/// exactly (slots are claimed with a compare-and-swap), the rest wait in
/// line, and every one of them is served as slots free up.
#[tokio::test]
async fn concurrent_callers_never_push_an_instance_past_its_limit() {
    const CALLERS: usize = 40;
    const LIMIT: u64 = 3;
    let relay = TestRelay::start_with(|c| {
        c.limits.max_in_flight_per_instance = LIMIT as usize;
        c.limits.max_waiting_per_space = 100;
        c.limits.max_wait_ms = 20_000;
    })
    .await;
    let mut instance = register(&relay, "narrow").await;
    let client = reqwest::Client::new();
    let callers: Vec<_> = (0..CALLERS)
        .map(|n| {
            let request = client
                .post(relay.url("/spaces/narrow/"))
                .body(n.to_string())
                .send();
            tokio::spawn(async move { request.await.unwrap().text().await.unwrap() })
        })
        .collect();
    let info = wait_json(
        "all callers in flight or waiting",
        &relay.url("/spaces/narrow"),
        Duration::from_secs(10),
        |info| info["waiting"].as_u64() == Some(CALLERS as u64 - LIMIT),
    )
    .await;
    assert_eq!(info["in_flight"].as_u64(), Some(LIMIT), "{info}");
    let mut outstanding = Vec::new();
    for _ in 0..LIMIT {
        outstanding.push(instance.recv_type("request").await.unwrap());
    }
    assert_quiet(
        &mut instance,
        "no request beyond the limit reaches the instance",
    )
    .await;
    // Answer one at a time; each answer lets exactly one more in.
    let mut answered = 0;
    while answered < CALLERS {
        let request = outstanding.remove(0);
        instance
            .send(json!({"type": "response", "id": request["id"], "data": request["data"]}))
            .await
            .unwrap();
        answered += 1;
        if answered + outstanding.len() < CALLERS {
            outstanding.push(instance.recv_type("request").await.unwrap());
        }
    }
    assert_quiet(&mut instance, "each freed slot let exactly one request in").await;
    let mut bodies: Vec<String> = Vec::new();
    for caller in callers {
        bodies.push(caller.await.unwrap());
    }
    bodies.sort_by_key(|b| b.parse::<usize>().unwrap());
    let expected: Vec<String> = (0..CALLERS).map(|n| n.to_string()).collect();
    assert_eq!(bodies, expected, "every caller got its own answer");
    relay.stop().await.unwrap();
}

/// Asserts that nothing reaches `client` for 300 ms.
async fn assert_quiet(client: &mut WsTester, why: &str) {
    let arrived = client.recv_within(Duration::from_millis(300)).await;
    assert!(arrived.is_err(), "{why}: got {arrived:?}");
}
