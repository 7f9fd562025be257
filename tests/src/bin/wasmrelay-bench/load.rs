//! The load generator: a process of its own (so the relay's figures are not
//! its client's), given one job as JSON on its command line, printing one
//! JSON result line. Publishers stamp each payload with the time it was
//! sent; subscribers in the same process read the stamp back, so latency is
//! publish → delivery on one clock.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use wasmrelay::protocol::{Data, Msg, Request, Response, VERSION, codec};
use wasmrelay_tests::wire::{Rx, Target, Tx, connect, connect_with, is_kind, payload};

use crate::stats::Percentiles;

pub const SMALL_PAYLOAD: usize = 64;
/// After the last publish, how long subscribers wait for stragglers.
const DRAIN: Duration = Duration::from_secs(2);
/// How long any wait may see no progress before the job fails: a job that
/// hangs would hang the whole suite.
const STALL: Duration = Duration::from_secs(30);

/// `future`, or an error naming `what` once it made no progress for [`STALL`].
async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(STALL, future)
        .await
        .map_err(|_| anyhow::anyhow!("no progress for {STALL:?} waiting for {what}"))
}
const FLUSH_EVERY: u64 = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Job {
    Small(SmallJob),
    Requests(RequestsJob),
    Idle(IdleJob),
    Bulk(BulkJob),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub enum Topology {
    /// One publisher, this many subscribers.
    FanOut(usize),
    /// This many members, each publishing and subscribed to one channel.
    Room(usize),
}

impl Topology {
    pub fn label(self) -> String {
        match self {
            Topology::FanOut(n) => format!("fan-out 1→{n}"),
            Topology::Room(n) => format!("room {n}↔{n}"),
        }
    }

    pub fn subscribers(self) -> usize {
        match self {
            Topology::FanOut(n) | Topology::Room(n) => n,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmallJob {
    pub target: Target,
    pub token: Option<String>,
    pub topology: Topology,
    pub channel: String,
    /// Publishes in all (each delivered to every subscriber).
    pub publishes: u64,
    /// Offered publishes per second; `None`: flat out, at most `window`
    /// publishes ahead of the slowest subscriber (no window: as fast as the
    /// system reads them).
    pub rate: Option<f64>,
    pub window: Option<u64>,
    /// Ask the relay for batched frames (`hello.batch`).
    pub batch: bool,
    /// Fan-out: where the subscribers connect (another node of a cluster);
    /// `None`: `target`, like the publisher.
    #[serde(default)]
    pub subscribe_at: Option<Target>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmallResult {
    pub delivered: u64,
    pub expected: u64,
    pub seconds: f64,
    pub latency_us: Percentiles,
}

impl SmallResult {
    pub fn deliveries_per_s(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }

    pub fn lost(&self) -> u64 {
        self.expected - self.delivered
    }
}

/// Nanoseconds since the load generator started: the stamp in payloads.
fn stamp(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

fn stamped_payload(epoch: Instant, size: usize) -> Bytes {
    let mut payload = BytesMut::with_capacity(size.max(8));
    payload.put_u64(stamp(epoch));
    payload.resize(size.max(8), b'x');
    payload.freeze()
}

fn read_stamp(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// Progress shared by the publishers and subscribers of one small job.
struct Progress {
    published: AtomicU64,
    /// Each subscriber's count of messages seen.
    seen: Vec<AtomicU64>,
    advanced: Notify,
}

impl Progress {
    fn slowest(&self) -> u64 {
        self.seen
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }
}

pub async fn small(job: SmallJob) -> anyhow::Result<SmallResult> {
    let subscribers = job.topology.subscribers();
    let subscribe_at = match job.topology {
        Topology::FanOut(_) => job.subscribe_at.as_ref().unwrap_or(&job.target),
        Topology::Room(_) => &job.target,
    };
    let mut members = Vec::new();
    for _ in 0..subscribers {
        let (mut tx, mut rx) = connect_with(subscribe_at, job.token.as_deref(), job.batch).await?;
        tx.subscribe(&job.channel).await?;
        tx.flush().await?;
        rx.subscribed().await?;
        members.push((tx, rx));
    }
    let mut publishers: Vec<Tx> = Vec::new();
    let mut receivers: Vec<(Rx, Option<Tx>)> = Vec::new();
    match job.topology {
        Topology::FanOut(_) => {
            let (tx, _rx) = connect_with(&job.target, job.token.as_deref(), job.batch).await?;
            publishers.push(tx);
            receivers.extend(members.into_iter().map(|(tx, rx)| (rx, Some(tx))));
            // The publisher's receiving half is dropped: it subscribes to nothing.
        }
        Topology::Room(_) => {
            for (tx, rx) in members {
                publishers.push(tx);
                receivers.push((rx, None));
            }
        }
    }
    let progress = Arc::new(Progress {
        published: AtomicU64::new(0),
        seen: (0..subscribers).map(|_| AtomicU64::new(0)).collect(),
        advanced: Notify::new(),
    });
    let epoch = Instant::now();
    let expected_each = job.publishes;
    // Keep at most ~2 million latency samples whatever the job's size.
    let stride = ((expected_each * subscribers as u64) / 2_000_000).max(1);
    let mut receiving = Vec::new();
    for (index, (mut rx, keep)) in receivers.into_iter().enumerate() {
        let progress = progress.clone();
        receiving.push(tokio::spawn(async move {
            let _keep = keep;
            let mut samples = Vec::new();
            let mut seen = 0u64;
            let mut last = Instant::now();
            while seen < expected_each {
                let delivery = match tokio::time::timeout(DRAIN, rx.next_delivery()).await {
                    Ok(delivery) => delivery?,
                    // Nothing for a while: what did not come was lost.
                    Err(_) => break,
                };
                let Some(payload) = delivery else { continue };
                seen += 1;
                last = Instant::now();
                if seen.is_multiple_of(stride)
                    && let Some(sent) = read_stamp(&payload)
                {
                    samples.push(stamp(epoch).saturating_sub(sent));
                }
                if seen.is_multiple_of(FLUSH_EVERY) || seen == expected_each {
                    progress.seen[index].store(seen, Ordering::Release);
                    progress.advanced.notify_waiters();
                }
            }
            anyhow::Ok((seen, last, samples))
        }));
    }

    let started = Instant::now();
    let share = job.publishes / publishers.len() as u64;
    let extra = job.publishes % publishers.len() as u64;
    let mut sending = Vec::new();
    for (p, mut tx) in publishers.into_iter().enumerate() {
        let count = share + u64::from((p as u64) < extra);
        // Each publisher offers its share of the rate.
        let rate = job.rate.map(|r| r * count as f64 / job.publishes as f64);
        let progress = progress.clone();
        let channel = job.channel.clone();
        let window = job.window;
        sending.push(tokio::spawn(async move {
            for i in 0..count {
                match rate {
                    Some(rate) => {
                        // Paced: never ahead of the schedule; catch up in bursts.
                        let due = started + Duration::from_secs_f64(i as f64 / rate);
                        if due > Instant::now() {
                            tx.flush().await?;
                            tokio::time::sleep_until(due.into()).await;
                        }
                    }
                    None => {
                        while let Some(window) = window {
                            let waiting = progress.advanced.notified();
                            if progress.published.load(Ordering::Acquire)
                                < progress.slowest() + window
                            {
                                break;
                            }
                            tx.flush().await?;
                            bounded("subscribers to catch up", waiting).await?;
                        }
                    }
                }
                tx.publish(&channel, stamped_payload(epoch, SMALL_PAYLOAD))
                    .await?;
                progress.published.fetch_add(1, Ordering::AcqRel);
                if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
                    tx.flush().await?;
                }
            }
            tx.flush().await?;
            anyhow::Ok(tx)
        }));
    }
    let mut keep_open = Vec::new();
    for sender in sending {
        keep_open.push(sender.await??);
    }
    let mut delivered = 0;
    let mut finished = started;
    let mut samples = Vec::new();
    for receiver in receiving {
        let (seen, last, mut some) = receiver.await??;
        delivered += seen;
        finished = finished.max(last);
        samples.append(&mut some);
    }
    drop(keep_open);
    Ok(SmallResult {
        delivered,
        expected: expected_each * subscribers as u64,
        seconds: finished.duration_since(started).as_secs_f64(),
        latency_us: Percentiles::of_nanos(samples),
    })
}

/// Where requests come from: protocol callers, or HTTP ingress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Caller {
    Protocol,
    /// `http://host:port/spaces/SPACE/`.
    Http {
        url: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestsJob {
    pub target: Target,
    pub token: Option<String>,
    pub caller: Caller,
    pub space: String,
    pub instances: usize,
    pub requests: u64,
    pub concurrency: usize,
    /// Where the instances register (another node of a cluster), and the
    /// `GET /spaces/SPACE` URL of the callers' node that must list them
    /// before requests start; `None`: `target`.
    #[serde(default)]
    pub instances_at: Option<(Target, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestsResult {
    pub completed: u64,
    pub seconds: f64,
    pub latency_us: Percentiles,
}

/// Service instances that answer every request with its own body.
async fn echo_instances(job: &RequestsJob) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let at = job.instances_at.as_ref().map_or(&job.target, |(at, _)| at);
    for _ in 0..job.instances {
        let (mut tx, mut rx) = connect(at, job.token.as_deref()).await?;
        tx.send_msg(&Msg::Register {
            space: job.space.clone(),
        })
        .await?;
        rx.recv_msg("registered").await?;
        tasks.push(tokio::spawn(async move {
            while let Ok(message) = rx.recv().await {
                if !is_kind(&message, "request") {
                    continue;
                }
                let Ok(Msg::Request(request)) = codec::decode_binary(&message) else {
                    continue;
                };
                let response = Msg::Response(Response {
                    id: request.id,
                    status: 200,
                    headers: Vec::new(),
                    stream: false,
                    data: request.data,
                });
                if tx.feed(codec::encode_binary(&response)).await.is_err() {
                    break;
                }
                // Answer a burst with one flush.
                if tx.flush().await.is_err() {
                    break;
                }
            }
        }));
    }
    Ok(tasks)
}

pub async fn requests(job: RequestsJob) -> anyhow::Result<RequestsResult> {
    let instances = echo_instances(&job).await?;
    if let Some((_, listed)) = &job.instances_at {
        // The callers' node learns of them from the cluster's registry.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: serde_json::Value = reqwest::get(listed).await?.json().await?;
            if info["instances"].as_u64() >= Some(job.instances as u64) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the callers' node never listed the instances: {info}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let epoch = Instant::now();
    let (completed, seconds, samples) = match &job.caller {
        Caller::Protocol => protocol_requests(&job, epoch).await?,
        Caller::Http { url } => http_requests(&job, url, epoch).await?,
    };
    for instance in instances {
        instance.abort();
    }
    Ok(RequestsResult {
        completed,
        seconds,
        latency_us: Percentiles::of_nanos(samples),
    })
}

/// `POST /` to `space` with `data`, as request `id`.
fn post(id: impl ToString, space: &str, data: Data) -> Msg {
    Msg::Request(Request {
        id: id.to_string(),
        space: space.to_owned(),
        method: "POST".into(),
        path: "/".into(),
        query: String::new(),
        headers: Vec::new(),
        timeout_ms: None,
        stream: false,
        data,
    })
}

async fn protocol_requests(
    job: &RequestsJob,
    epoch: Instant,
) -> anyhow::Result<(u64, f64, Vec<u64>)> {
    let (mut tx, mut rx) = connect(&job.target, job.token.as_deref()).await?;
    let slots = Arc::new(Semaphore::new(job.concurrency));
    let total = job.requests;
    let answers = {
        let slots = slots.clone();
        tokio::spawn(async move {
            let mut samples = Vec::with_capacity(total as usize);
            while (samples.len() as u64) < total {
                let message = rx.recv().await?;
                if is_kind(&message, "error") {
                    bail!("request failed: {:?}", codec::decode_binary(&message));
                }
                if !is_kind(&message, "response") {
                    continue;
                }
                let sent = read_stamp(payload(&message)).context("echoed stamp")?;
                samples.push(stamp(epoch).saturating_sub(sent));
                slots.add_permits(1);
            }
            anyhow::Ok(samples)
        })
    };
    let started = Instant::now();
    for i in 0..total {
        bounded("a response", slots.acquire()).await??.forget();
        let request = post(i, &job.space, Data(stamped_payload(epoch, SMALL_PAYLOAD)));
        tx.send_msg(&request).await?;
    }
    let samples = answers.await??;
    Ok((total, started.elapsed().as_secs_f64(), samples))
}

async fn http_requests(
    job: &RequestsJob,
    url: &str,
    epoch: Instant,
) -> anyhow::Result<(u64, f64, Vec<u64>)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(job.concurrency)
        .tcp_nodelay(true)
        .build()?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..job.concurrency {
        let (client, next, url) = (client.clone(), next.clone(), url.to_owned());
        let (total, token) = (job.requests, job.token.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let mut request = client
                    .post(&url)
                    .body(stamped_payload(epoch, SMALL_PAYLOAD));
                if let Some(token) = &token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().await?;
                let status = response.status();
                let body = response.bytes().await?;
                if !status.is_success() {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
                }
                let sent = read_stamp(&body).context("echoed stamp")?;
                samples.push(stamp(epoch).saturating_sub(sent));
            }
            anyhow::Ok(samples)
        }));
    }
    let mut samples = Vec::new();
    for worker in workers {
        samples.append(&mut worker.await??);
    }
    Ok((
        samples.len() as u64,
        started.elapsed().as_secs_f64(),
        samples,
    ))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleJob {
    /// The relay's HTTP address; connections go to `/ws` on it.
    pub addr: SocketAddr,
    pub token: Option<String>,
    pub connections: usize,
    /// Handshakes in progress at once.
    pub concurrency: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleResult {
    pub opened: usize,
    pub seconds: f64,
}

/// Source addresses: 127.0.0.1, .2, ... so no single address runs out of ports.
fn source(index: usize) -> IpAddr {
    const PER_ADDRESS: usize = 20_000;
    let host = 1 + (index / PER_ADDRESS) as u8;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, host))
}

/// Opens the connections (each says `hello`), reports, then holds them —
/// answering the relay's pings — until its standard input closes.
pub async fn idle(job: IdleJob) -> anyhow::Result<()> {
    let url = match &job.token {
        Some(token) => format!("ws://{}/ws?token={token}", job.addr),
        None => format!("ws://{}/ws", job.addr),
    };
    // A client that holds thousands of sockets should not hold 128 KiB of
    // read buffer for each.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let slots = Arc::new(Semaphore::new(job.concurrency));
    let started = Instant::now();
    let mut opening = Vec::with_capacity(job.connections);
    for index in 0..job.connections {
        let permit = slots.clone().acquire_owned().await?;
        let url = url.clone();
        opening.push(tokio::spawn(async move {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source(index), 0))?;
            let stream = socket.connect(job.addr).await?;
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
            let hello = codec::encode_binary(&Msg::Hello {
                v: VERSION,
                client: None,
                token: None,
                batch: false,
                resume: None,
            });
            futures_util::SinkExt::send(
                &mut ws,
                tokio_tungstenite::tungstenite::Message::Binary(hello),
            )
            .await?;
            loop {
                match ws.next().await.context("closed before welcome")?? {
                    tokio_tungstenite::tungstenite::Message::Binary(m)
                        if is_kind(&m, "welcome") =>
                    {
                        break;
                    }
                    tokio_tungstenite::tungstenite::Message::Binary(m) => {
                        bail!("expected welcome: {:?}", codec::decode_binary(&m))
                    }
                    _ => continue,
                }
            }
            drop(permit);
            // Held open: reading answers the relay's pings.
            anyhow::Ok(tokio::spawn(async move {
                while let Some(Ok(_)) = ws.next().await {}
            }))
        }));
    }
    let mut held = Vec::with_capacity(job.connections);
    let mut failures = 0;
    let mut first_error = None;
    for task in opening {
        match task.await? {
            Ok(reader) => held.push(reader),
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        bail!(
            "{failures} of {} connections failed: {e:#}",
            job.connections
        );
    }
    let result = IdleResult {
        opened: held.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    crate::emit(&result)?;
    let mut line = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    let still_open = held.iter().filter(|h| !h.is_finished()).count();
    if still_open != held.len() {
        bail!(
            "{} idle connections were closed while held",
            held.len() - still_open
        );
    }
    Ok(())
}

/// One large transfer: through a space (caller → relay → instance) in
/// request bodies, or over plain TCP through a forwarder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BulkPath {
    Relay {
        target: Target,
        token: Option<String>,
    },
    /// Connect to `forwarder`, name the port of a sink this job listens on,
    /// and the forwarder copies everything after that to the sink.
    Tcp { forwarder: SocketAddr },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BulkJob {
    pub path: BulkPath,
    pub bodies: usize,
    pub body_bytes: usize,
    pub in_flight: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BulkResult {
    pub bytes: u64,
    pub seconds: f64,
}

pub async fn bulk(job: BulkJob) -> anyhow::Result<BulkResult> {
    let bytes = (job.bodies * job.body_bytes) as u64;
    let seconds = match &job.path {
        BulkPath::Relay { target, token } => relay_bulk(&job, target, token.as_deref()).await?,
        BulkPath::Tcp { forwarder } => tcp_bulk(&job, *forwarder).await?,
    };
    Ok(BulkResult { bytes, seconds })
}

async fn relay_bulk(job: &BulkJob, target: &Target, token: Option<&str>) -> anyhow::Result<f64> {
    let (mut instance_tx, mut instance_rx) = connect(target, token).await?;
    instance_tx
        .send_msg(&Msg::Register {
            space: "bulk".into(),
        })
        .await?;
    instance_rx.recv_msg("registered").await?;
    let (bodies, body_bytes) = (job.bodies, job.body_bytes);
    let instance = tokio::spawn(async move {
        for _ in 0..bodies {
            let Msg::Request(request) = instance_rx.recv_msg("request").await? else {
                unreachable!("recv_msg returns the kind asked for");
            };
            if request.data.len() != body_bytes {
                bail!("a body of {} bytes arrived", request.data.len());
            }
            let response = Msg::Response(Response {
                id: request.id,
                status: 200,
                headers: Vec::new(),
                stream: false,
                data: Data::from("ok"),
            });
            instance_tx.send_msg(&response).await?;
        }
        anyhow::Ok(())
    });
    let (mut tx, mut rx) = connect(target, token).await?;
    let body = Bytes::from(vec![b'b'; job.body_bytes]);
    let slots = Arc::new(Semaphore::new(job.in_flight));
    let responses = {
        let slots = slots.clone();
        tokio::spawn(async move {
            for _ in 0..bodies {
                rx.recv_msg("response").await?;
                slots.add_permits(1);
            }
            anyhow::Ok(())
        })
    };
    let started = Instant::now();
    for i in 0..job.bodies {
        bounded("a response", slots.acquire()).await??.forget();
        let request = post(i, "bulk", Data(body.clone()));
        tx.send_msg(&request).await?;
    }
    responses.await??;
    let seconds = started.elapsed().as_secs_f64();
    instance.await??;
    Ok(seconds)
}

async fn tcp_bulk(job: &BulkJob, forwarder: SocketAddr) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let total = job.bodies * job.body_bytes;
    let mut client = TcpStream::connect(forwarder).await?;
    client.set_nodelay(true)?;
    client.write_u16(listener.local_addr()?.port()).await?;
    let (mut sink, _) = listener.accept().await?;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut seen = 0;
        while seen < total {
            let n = sink.read(&mut buf).await?;
            if n == 0 {
                bail!("the sink closed early");
            }
            seen += n;
        }
        anyhow::Ok(())
    });
    let body = vec![b'b'; job.body_bytes];
    let started = Instant::now();
    for _ in 0..job.bodies {
        client.write_all(&body).await?;
    }
    reader.await??;
    Ok(started.elapsed().as_secs_f64())
}
