//! Transport benchmark: what one connection moves through the relay over
//! plain WebSocket, WebSocket over TLS and QUIC, beside bare TCP through a
//! plain tokio forwarder, all measured in the same run. A program that prints
//! a table, not a timed test; figures go in BENCHMARKS.md.
//!
//!     cargo bench -p wasmrelay-tests --bench transports            # full run
//!     cargo bench -p wasmrelay-tests --bench transports -- --quick # smoke run
//!
//! - **bulk**: one caller sends 1 MiB request bodies to a service instance
//!   through a space (4 in flight); the instance answers each with a tiny
//!   response. Over QUIC every body travels on its own stream.
//! - **small**: one publisher sends 64-byte payloads on a channel with one
//!   subscriber, at most 512 unreceived at a time (under the relay's
//!   per-connection queue, so nothing is dropped and every message counts).
//!
//! The relay and the forwarder run as their own processes (this program is
//! only the load generator). Baseline frames are the same size as the relay's.
#![allow(clippy::print_stdout)] // a benchmark prints its table

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::{self, Message};
use wasmrelay::protocol::{Data, Msg, Request, Response, VERSION, codec};
use wasmrelay::transport::quic::{self, FrameError};
use wasmrelay_examples::client::{QuicFrame, quic_inbox};
use wasmrelay_tests::{ChildProcess, RelayProcess, quic_client};

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");
/// argv[1] that turns this program into the bare forwarder process.
const FORWARDER: &str = "__forwarder";
const SMALL_PAYLOAD: usize = 64;
const BULK_BODY: usize = 1024 * 1024;
const BULK_IN_FLIGHT: usize = 4;
const WINDOW: u64 = 512;
const FLUSH_EVERY: u64 = 64;
const COPY_BUFFER: usize = 256 * 1024;

struct Settings {
    bulk_requests: usize,
    small_messages: u64,
    rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    Tcp,
    Ws,
    Wss,
    Quic,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Tcp => "bare TCP via tokio forwarder",
            Path::Ws => "relay, ws",
            Path::Wss => "relay, wss (TLS 1.3)",
            Path::Quic => "relay, QUIC (TLS 1.3)",
        }
    }
}

type WsSink = Pin<Box<dyn Sink<Message, Error = tungstenite::Error> + Send>>;
type WsSource = Pin<Box<dyn Stream<Item = Result<Message, tungstenite::Error>> + Send>>;

/// The sending half of a protocol connection.
enum Tx {
    Ws(WsSink),
    Quic {
        connection: quinn::Connection,
        control: quinn::SendStream,
    },
}

/// The receiving half: yields binary messages.
enum Rx {
    Ws(WsSource),
    Quic(mpsc::Receiver<Result<QuicFrame, FrameError>>),
}

impl Tx {
    /// Queues `message`; WebSocket frames leave on `flush`.
    async fn feed(&mut self, message: Bytes) -> anyhow::Result<()> {
        match self {
            Tx::Ws(sink) => sink.feed(Message::Binary(message)).await?,
            Tx::Quic {
                connection,
                control,
            } => {
                if message.len() >= quic::BULK_THRESHOLD {
                    let mut stream = connection.open_uni().await?;
                    stream.write_all(&quic::frame(&message)).await?;
                    stream.finish()?;
                } else {
                    control.write_all(&quic::frame(&message)).await?;
                }
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if let Tx::Ws(sink) = self {
            sink.flush().await?;
        }
        Ok(())
    }
}

impl Rx {
    async fn recv(&mut self) -> anyhow::Result<Bytes> {
        match self {
            Rx::Ws(source) => loop {
                match source.next().await.context("connection ended")?? {
                    Message::Binary(message) => return Ok(message),
                    Message::Text(text) => bail!("unexpected text frame: {text}"),
                    Message::Close(close) => bail!("closed: {close:?}"),
                    _ => continue,
                }
            },
            Rx::Quic(inbox) => Ok(inbox.recv().await.context("connection ended")??.message),
        }
    }

    /// The next message of type `kind`, decoded.
    async fn recv_msg(&mut self, kind: &str) -> anyhow::Result<Msg> {
        loop {
            let msg = codec::decode_binary(&self.recv().await?)?;
            if let Msg::Error { code, message, .. } = &msg {
                bail!("relay error {code}: {message}");
            }
            if msg.kind() == kind {
                return Ok(msg);
            }
        }
    }
}

/// Whether a binary message is of type `kind`, read from its header's start
/// (the relay writes `type` first), without decoding it.
fn is_kind(message: &[u8], kind: &str) -> bool {
    let header = message.get(4..).unwrap_or_default();
    let prefix = format!("{{\"type\":\"{kind}\"");
    header.starts_with(prefix.as_bytes())
}

fn binary(msg: &Msg) -> Bytes {
    codec::encode_binary(msg)
}

fn trusted_roots(cert_pem: &std::path::Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert_pem)? {
        roots.add(cert?)?;
    }
    Ok(roots)
}

/// Connects to the relay over `path` and completes `hello`.
async fn connect(relay: &RelayProcess, path: Path) -> anyhow::Result<(Tx, Rx)> {
    let (mut tx, mut rx) = match path {
        Path::Tcp => bail!("bare TCP does not speak the protocol"),
        Path::Ws => {
            // Nagle off, as the relay and the TLS client below have it.
            let (ws, _) =
                tokio_tungstenite::connect_async_with_config(relay.ws_url(), None, true).await?;
            let (sink, source) = ws.split();
            (Tx::Ws(Box::pin(sink)), Rx::Ws(Box::pin(source)))
        }
        Path::Wss => {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(trusted_roots(&relay.cert_pem())?)
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            let tcp = TcpStream::connect(("127.0.0.1", relay.tls_port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(ServerName::try_from("localhost")?, tcp)
                .await?;
            let url = format!("wss://localhost:{}/ws", relay.tls_port);
            let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
            let (sink, source) = ws.split();
            (Tx::Ws(Box::pin(sink)), Rx::Ws(Box::pin(source)))
        }
        Path::Quic => {
            let endpoint = quic_client(&relay.cert_pem(), b"wasmrelay/1")?;
            let connection = endpoint.connect(relay.quic_addr(), "localhost")?.await?;
            let (control, recv) = connection.open_bi().await?;
            let inbox = quic_inbox(connection.clone(), recv);
            // The endpoint must outlive the connection: keep it running.
            std::mem::forget(endpoint);
            (
                Tx::Quic {
                    connection,
                    control,
                },
                Rx::Quic(inbox),
            )
        }
    };
    tx.feed(binary(&Msg::Hello {
        v: VERSION,
        client: Some("bench".into()),
        token: None,
    }))
    .await?;
    tx.flush().await?;
    rx.recv_msg("welcome").await?;
    Ok((tx, rx))
}

/// Small messages through the relay: messages per second.
async fn relay_small(relay: &RelayProcess, path: Path, count: u64) -> anyhow::Result<f64> {
    let (mut sub_tx, mut sub_rx) = connect(relay, path).await?;
    sub_tx
        .feed(binary(&Msg::Subscribe {
            channel: "bench".into(),
        }))
        .await?;
    sub_tx.flush().await?;
    sub_rx.recv_msg("subscribed").await?;
    let (mut tx, _rx) = connect(relay, path).await?;
    let publish = binary(&Msg::Publish {
        channel: "bench".into(),
        id: None,
        data: Data(Bytes::from(vec![b'x'; SMALL_PAYLOAD])),
    });
    let (progress, received) = watch::channel(0u64);
    let subscriber = tokio::spawn(async move {
        let mut seen = 0u64;
        while seen < count {
            if is_kind(&sub_rx.recv().await?, "message") {
                seen += 1;
                if seen.is_multiple_of(FLUSH_EVERY) || seen == count {
                    progress.send_replace(seen);
                }
            }
        }
        anyhow::Ok(sub_tx)
    });
    let started = Instant::now();
    send_windowed(count, received, &mut tx, &publish).await?;
    subscriber.await??;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Sends `message` `count` times with at most [`WINDOW`] unreceived, as
/// reported through `received`.
async fn send_windowed(
    count: u64,
    mut received: watch::Receiver<u64>,
    tx: &mut Tx,
    message: &Bytes,
) -> anyhow::Result<()> {
    for i in 0..count {
        if i >= *received.borrow() + WINDOW {
            tx.flush().await?;
            received.wait_for(|r| i < *r + WINDOW).await?;
        }
        tx.feed(message.clone()).await?;
        if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
            tx.flush().await?;
        }
    }
    tx.flush().await
}

/// Bulk bodies through a space: megabytes per second of request bodies.
async fn relay_bulk(relay: &RelayProcess, path: Path, requests: usize) -> anyhow::Result<f64> {
    let (mut instance_tx, mut instance_rx) = connect(relay, path).await?;
    instance_tx
        .feed(binary(&Msg::Register {
            space: "sink".into(),
        }))
        .await?;
    instance_tx.flush().await?;
    instance_rx.recv_msg("registered").await?;
    let instance = tokio::spawn(async move {
        for _ in 0..requests {
            let Msg::Request(request) = instance_rx.recv_msg("request").await? else {
                unreachable!("recv_msg returns the kind asked for");
            };
            if request.data.len() != BULK_BODY {
                bail!("body of {} bytes arrived", request.data.len());
            }
            let response = Msg::Response(Response {
                id: request.id,
                status: 200,
                headers: Vec::new(),
                data: Data::from("ok"),
            });
            instance_tx.feed(binary(&response)).await?;
            instance_tx.flush().await?;
        }
        anyhow::Ok(())
    });

    let (mut tx, mut rx) = connect(relay, path).await?;
    let body = Bytes::from(vec![b'b'; BULK_BODY]);
    let slots = Arc::new(Semaphore::new(BULK_IN_FLIGHT));
    let responses = {
        let slots = slots.clone();
        tokio::spawn(async move {
            for _ in 0..requests {
                rx.recv_msg("response").await?;
                slots.add_permits(1);
            }
            anyhow::Ok(())
        })
    };
    let started = Instant::now();
    for i in 0..requests {
        slots.acquire().await?.forget();
        let request = Msg::Request(Request {
            id: i.to_string(),
            space: "sink".into(),
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            headers: Vec::new(),
            timeout_ms: None,
            stream: false,
            data: Data(body.clone()),
        });
        tx.feed(binary(&request)).await?;
        tx.flush().await?;
    }
    responses.await??;
    let elapsed = started.elapsed();
    instance.await??;
    Ok((requests * BULK_BODY) as f64 / elapsed.as_secs_f64() / 1e6)
}

/// The bare forwarder: a separate process copying bytes between each
/// accepted connection and a new connection to `target`.
async fn run_forwarder(target: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    // The parent reads the port from the first line.
    println!("{}", listener.local_addr()?.port());
    loop {
        let (mut inbound, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut outbound = TcpStream::connect(target).await?;
            inbound.set_nodelay(true)?;
            outbound.set_nodelay(true)?;
            // tokio's default 8 KiB buffers would make the baseline, not the
            // relay, the bottleneck.
            tokio::io::copy_bidirectional_with_sizes(
                &mut inbound,
                &mut outbound,
                COPY_BUFFER,
                COPY_BUFFER,
            )
            .await?;
            anyhow::Ok(())
        });
    }
}

/// A forwarder process in front of a sink listener of our own.
struct Forwarder {
    _process: ChildProcess,
    addr: SocketAddr,
    sink: TcpListener,
}

async fn start_forwarder() -> anyhow::Result<Forwarder> {
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let target = sink.local_addr()?.to_string();
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args([FORWARDER, &target])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("forwarder stdout")?;
    let process = ChildProcess { child };
    let mut line = String::new();
    BufReader::new(tokio::process::ChildStdout::from_std(stdout)?)
        .read_line(&mut line)
        .await?;
    let port: u16 = line.trim().parse().context("forwarder port")?;
    Ok(Forwarder {
        _process: process,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        sink,
    })
}

/// Bulk bytes through the forwarder: megabytes per second.
async fn tcp_bulk(forwarder: &Forwarder, requests: usize) -> anyhow::Result<f64> {
    let total = requests * BULK_BODY;
    let mut client = TcpStream::connect(forwarder.addr).await?;
    client.set_nodelay(true)?;
    let (mut sink, _) = forwarder.sink.accept().await?;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut seen = 0;
        while seen < total {
            let n = sink.read(&mut buf).await?;
            if n == 0 {
                bail!("sink closed early");
            }
            seen += n;
        }
        anyhow::Ok(())
    });
    let body = vec![b'b'; BULK_BODY];
    let started = Instant::now();
    for _ in 0..requests {
        client.write_all(&body).await?;
    }
    reader.await??;
    Ok(total as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// Small frames (the relay's publish message, length-prefixed) through the
/// forwarder with the same window: messages per second.
async fn tcp_small(forwarder: &Forwarder, count: u64) -> anyhow::Result<f64> {
    let message = binary(&Msg::Publish {
        channel: "bench".into(),
        id: None,
        data: Data(Bytes::from(vec![b'x'; SMALL_PAYLOAD])),
    });
    let frame = quic::frame(&message);
    let client = TcpStream::connect(forwarder.addr).await?;
    client.set_nodelay(true)?;
    let (sink, _) = forwarder.sink.accept().await?;
    let (progress, mut received) = watch::channel(0u64);
    let reader = tokio::spawn(async move {
        let mut sink = BufReader::new(sink);
        let mut body = Vec::new();
        for seen in 1..=count {
            let length = sink.read_u32().await? as usize;
            body.resize(length, 0);
            sink.read_exact(&mut body).await?;
            if seen.is_multiple_of(FLUSH_EVERY) || seen == count {
                progress.send_replace(seen);
            }
        }
        anyhow::Ok(())
    });
    let mut client = BufWriter::new(client);
    let started = Instant::now();
    for i in 0..count {
        if i >= *received.borrow() + WINDOW {
            client.flush().await?;
            received.wait_for(|r| i < *r + WINDOW).await?;
        }
        client.write_all(&frame).await?;
        if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
            client.flush().await?;
        }
    }
    client.flush().await?;
    reader.await??;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.get(1).map(String::as_str) == Some(FORWARDER) {
        let target = args.get(2).context("forwarder target")?.parse()?;
        return runtime.block_on(run_forwarder(target));
    }
    let quick = args.iter().any(|a| a == "--quick");
    let settings = if quick {
        Settings {
            bulk_requests: 16,
            small_messages: 5_000,
            rounds: 1,
        }
    } else {
        Settings {
            bulk_requests: 256,
            small_messages: 200_000,
            rounds: 5,
        }
    };
    runtime.block_on(run(settings, quick))
}

async fn run(settings: Settings, quick: bool) -> anyhow::Result<()> {
    // Transports only: no plugins, so no policy rates or filters in the way
    // (the plugins benchmark measures those).
    let relay = RelayProcess::start_configured(
        RELAY,
        wasmrelay_tests::free_port(),
        "bundled = []",
        &["--max-message-bytes", "4194304"],
    )
    .await;
    let forwarder = start_forwarder().await?;
    let paths = [Path::Tcp, Path::Ws, Path::Wss, Path::Quic];
    let mut bulk: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut small: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    // Rounds interleave the paths so drift on a shared machine hits them all.
    for _ in 0..settings.rounds {
        for (i, path) in paths.iter().enumerate() {
            let (mb_s, msg_s) = match path {
                Path::Tcp => (
                    tcp_bulk(&forwarder, settings.bulk_requests).await?,
                    tcp_small(&forwarder, settings.small_messages).await?,
                ),
                _ => (
                    relay_bulk(&relay, *path, settings.bulk_requests).await?,
                    relay_small(&relay, *path, settings.small_messages).await?,
                ),
            };
            bulk[i].push(mb_s);
            small[i].push(msg_s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bulk: Vec<f64> = bulk.iter_mut().map(|v| median(v)).collect();
    let small: Vec<f64> = small.iter_mut().map(|v| median(v)).collect();

    println!(
        "\nTransport benchmark{}: one connection each way, medians of {} rounds",
        if quick {
            " (--quick: smoke run, figures meaningless)"
        } else {
            ""
        },
        settings.rounds
    );
    println!(
        "bulk: {} x 1 MiB request bodies, {BULK_IN_FLIGHT} in flight; small: {} x {SMALL_PAYLOAD}-byte publishes, window {WINDOW}\n",
        settings.bulk_requests, settings.small_messages
    );
    println!("| path | bulk MB/s | x bare TCP | small msg/s | x bare TCP |");
    println!("|---|---:|---:|---:|---:|");
    for (i, path) in paths.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} |",
            path.label(),
            bulk[i],
            bulk[i] / bulk[0],
            small[i],
            small[i] / small[0]
        );
    }
    Ok(())
}
