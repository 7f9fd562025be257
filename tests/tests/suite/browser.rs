//! The browser page, driven in headless Chromium over the DevTools protocol:
//! the demo space shows "Not connected", then "Connected" once the service app
//! registers; a request submitted from the form shows progress and its result;
//! the chat recovers what it missed while its WebSocket was down.
//!
//! Needs Debian's `chromium` package. Without it the test prints SKIPPED and
//! passes, except under `CI=true`, where it fails.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tokio_util::sync::CancellationToken;
use wasmrelay_examples::service_app::{self, Options};
use wasmrelay_tests::{ChildProcess, TestRelay, require_program, wait_for};

/// A page session over the Chrome DevTools Protocol.
struct Page {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::Text(request.to_string().into()))
            .await?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .context("DevTools did not answer")?;
            let Some(Ok(Message::Text(text))) = frame else {
                bail!("DevTools connection ended");
            };
            let reply: Value = serde_json::from_str(&text)?;
            if reply["id"] == id {
                if let Some(error) = reply.get("error") {
                    bail!("{method} failed: {error}");
                }
                return Ok(reply["result"].clone());
            }
        }
    }

    /// Evaluates JavaScript in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await?;
        Ok(result["result"]["value"].clone())
    }

    async fn wait_text(&mut self, what: &str, expression: &str, expected: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let value = self.eval(expression).await.unwrap_or(Value::Null);
            if value == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: last saw {value}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts headless Chromium on `url` and attaches to its page.
async fn open_in_chromium(url: &str, profile: &std::path::Path) -> (ChildProcess, Page) {
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--remote-debugging-port=0",
            &format!("--user-data-dir={}", profile.display()),
            url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let stderr = child.stderr.take().unwrap();
    let child = ChildProcess { child };
    // Chromium prints its DevTools endpoint on stderr once it is listening.
    let devtools = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        let found = lines.by_ref().map_while(Result::ok).find_map(|line| {
            line.split_once("DevTools listening on ")
                .map(|(_, url)| url.trim().to_owned())
        });
        // Keep draining so Chromium never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        found
    });
    let devtools = tokio::time::timeout(Duration::from_secs(30), devtools)
        .await
        .expect("chromium announced DevTools in time")
        .unwrap()
        .expect("chromium printed its DevTools URL");
    let host = devtools
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let list_url = format!("http://{host}/json/list");
    let page_ws = wait_for("the page target", Duration::from_secs(15), || {
        let list_url = list_url.clone();
        async move {
            let targets: Value = reqwest::get(&list_url).await.ok()?.json().await.ok()?;
            targets.as_array()?.iter().find_map(|t| {
                (t["type"] == "page")
                    .then(|| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
                    .flatten()
            })
        }
    })
    .await;
    let (ws, _) = connect_async(&page_ws).await.expect("attach to page");
    (child, Page { ws, next_id: 0 })
}

/// A relay and its page open in headless Chromium (with the browser's
/// profile directory, kept alive with it); `None` when Chromium is missing
/// outside CI.
async fn relay_page_in_chromium() -> Option<(TestRelay, tempfile::TempDir, ChildProcess, Page)> {
    if !require_program(
        "chromium",
        "install Debian's chromium package (apt-get install chromium)",
    ) {
        return None;
    }
    let relay = TestRelay::start().await;
    let profile = tempfile::tempdir().unwrap();
    let (chromium, page) = open_in_chromium(&relay.url("/"), profile.path()).await;
    Some((relay, profile, chromium, page))
}

#[tokio::test]
async fn browser_page_shows_spaces_and_relays_a_request() {
    let Some((relay, _profile, _chromium, mut page)) = relay_page_in_chromium().await else {
        return;
    };

    let status = r#"document.querySelector('[data-space="demo"] .status')?.textContent ?? null"#;
    page.wait_text("demo shown as not connected", status, "Not connected")
        .await;

    let stop = CancellationToken::new();
    tokio::spawn(service_app::run(
        Options {
            relay: relay.ws_url(),
            trust: Default::default(),
            token: None,
            space: "demo".into(),
            work_ms: 600,
            steps: 3,
        },
        stop.clone(),
    ));
    page.wait_text("demo shown as connected", status, "Connected")
        .await;
    page.wait_text(
        "the page's WebSocket to be connected",
        "document.getElementById('ws-status').dataset.state",
        "connected",
    )
    .await;

    page.eval(
        r#"(() => {
            document.getElementById('space').value = 'demo';
            document.getElementById('input').value = 'hello from chromium';
            document.getElementById('submit').click();
            return true;
        })()"#,
    )
    .await
    .unwrap();
    page.wait_text(
        "the result",
        "document.getElementById('result').textContent",
        "HELLO FROM CHROMIUM",
    )
    .await;
    let state = page
        .eval("document.getElementById('result').dataset.state")
        .await
        .unwrap();
    assert_eq!(state, "done");
    let progress = page
        .eval("document.getElementById('progress-text').textContent")
        .await
        .unwrap();
    assert!(
        progress.as_str().is_some_and(|p| p.contains('%')),
        "progress was shown: {progress}"
    );

    // Keep a picture of the finished page for people debugging this test.
    let shot = page
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await
        .unwrap();
    if let Some(data) = shot["data"].as_str() {
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-page.png");
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
    stop.cancel();
    relay.stop().await.unwrap();
}

/// The page's chat keeps its place in `chat/lobby`: after its WebSocket
/// drops and comes back, it shows exactly the messages published meanwhile
/// (recovered from the channel's history), in order and once each.
#[tokio::test]
async fn browser_chat_recovers_what_it_missed_while_disconnected() {
    let Some((relay, _profile, _chromium, mut page)) = relay_page_in_chromium().await else {
        return;
    };
    let mut publisher = wasmrelay_client::Client::connect(
        &relay.ws_url(),
        wasmrelay_client::Options::named("browser-test"),
    )
    .await
    .unwrap();
    let note = "document.getElementById('chat-note').dataset.state";
    page.wait_text("the chat to be live", note, "live").await;
    publisher.publish("chat/lobby", "one").await.unwrap();
    let log = "[...document.querySelectorAll('#chat-log li')].map(li => li.textContent).join('|')";
    page.wait_text("the first message", log, "#1one").await;

    // The page goes offline (no automatic retry yet) ...
    page.eval("(() => { ws.onclose = null; ws.close(); return true; })()")
        .await
        .unwrap();
    wait_for(
        "the relay to see the page leave",
        Duration::from_secs(10),
        || {
            let url = relay.url("/admin/connections");
            async move {
                let rows: Value = wasmrelay_tests::admin_client()
                    .get(url)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let browsers = rows["connections"]
                    .as_array()?
                    .iter()
                    .filter(|row| row["client"] == "browser")
                    .count();
                (browsers == 0).then_some(())
            }
        },
    )
    .await;
    // ... misses two messages, and comes back.
    publisher.publish("chat/lobby", "two").await.unwrap();
    publisher.publish("chat/lobby", "three").await.unwrap();
    page.eval("(() => { connect(); return true; })()")
        .await
        .unwrap();
    page.wait_text("the page to recover", note, "recovered")
        .await;
    page.wait_text("the missed messages", log, "#1one|#2two|#3three")
        .await;
    publisher.publish("chat/lobby", "four").await.unwrap();
    page.wait_text("a live one after them", log, "#1one|#2two|#3three|#4four")
        .await;
    relay.stop().await.unwrap();
}
