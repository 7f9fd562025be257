//! The example service app: a backend behind NAT that connects *out* to the
//! relay, registers under a space, and serves requests — each gets progress
//! events and then a response whose body is the request body upper-cased.
//! When the relay goes away it reconnects with exponential backoff and jitter.

use std::collections::HashMap;
use std::time::Duration;

use clap::Parser;
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wasmrelay::protocol::{Data, ErrorCode, Msg, Request, Response};

use crate::client::{Client, Trust};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "service-app",
    about = "Example service: registers under a space and upper-cases request bodies"
)]
pub struct Options {
    /// The relay: ws://HOST:PORT/ws or quic://HOST:PORT.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub relay: String,
    #[command(flatten)]
    pub trust: Trust,
    /// A token for the relay's admission policy, sent in `hello` (the demo
    /// policy's backends use service-demo-token).
    #[arg(long)]
    pub token: Option<String>,
    /// The space to register under.
    #[arg(long, default_value = "demo")]
    pub space: String,
    /// Simulated work per request, in milliseconds, spread over the progress steps.
    #[arg(long, default_value_t = 600)]
    pub work_ms: u64,
    /// Progress events before each response.
    #[arg(long, default_value_t = 3)]
    pub steps: u32,
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Serves until `stop` is cancelled, reconnecting whenever the relay is lost.
pub async fn run(options: Options, stop: CancellationToken) {
    let mut backoff = BACKOFF_START;
    while !stop.is_cancelled() {
        match serve_once(&options, &stop).await {
            Ok(()) => backoff = BACKOFF_START,
            Err(e) if e.is::<Refused>() => {
                // Retrying cannot help: the relay will say no again.
                tracing::error!(error = %format!("{e:#}"), "registration refused; stopping");
                return;
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "relay connection lost"),
        }
        if stop.is_cancelled() {
            break;
        }
        // Jitter keeps a fleet of instances from reconnecting in lockstep.
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        let wait = backoff + Duration::from_millis(jitter);
        tracing::info!(wait_ms = wait.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The relay refused to let this app serve the space (`forbidden`,
/// `unknown_space`, `invalid_name`): a matter of configuration, not of retrying.
#[derive(Debug, thiserror::Error)]
#[error("the relay refused to register space {space:?}: {code}: {message}{hint}")]
pub struct Refused {
    space: String,
    code: ErrorCode,
    message: String,
    hint: &'static str,
}

/// One connection's life: connect, register, serve until it drops.
async fn serve_once(options: &Options, stop: &CancellationToken) -> anyhow::Result<()> {
    let mut client = Client::connect(
        &options.relay,
        "service-app",
        &options.trust,
        options.token.as_deref(),
    )
    .await?;
    client
        .send(&Msg::Register {
            space: options.space.clone(),
        })
        .await?;
    // Workers report through this queue so one slow request never blocks another.
    let (out_tx, mut out_rx) = mpsc::channel::<Msg>(256);
    let mut workers: HashMap<String, JoinHandle<()>> = HashMap::new();
    // Streamed requests whose body is still arriving in `body` messages.
    let mut arriving: HashMap<String, Request> = HashMap::new();
    // Over QUIC an idle instance pings, so a vanished one is noticed in seconds.
    let ping_every = client.instance_ping_every();
    let mut ping = tokio::time::interval(ping_every.unwrap_or(Duration::from_secs(3600)));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = ping.tick(), if ping_every.is_some() => client.send(&Msg::Ping { id: None }).await?,
            Some(msg) = out_rx.recv() => {
                if let Msg::Response(Response { id, .. }) = &msg {
                    workers.remove(id);
                }
                client.send(&msg).await?;
            }
            inbound = client.recv() => match inbound? {
                None => break Err(anyhow::anyhow!("the relay closed the connection")),
                Some(Msg::Registered { space, instance }) => {
                    tracing::info!(%space, %instance, "registered");
                }
                Some(Msg::Request(request)) if request.stream => {
                    arriving.insert(request.id.clone(), request);
                }
                Some(Msg::Request(request)) => {
                    let id = request.id.clone();
                    let worker = tokio::spawn(work(request, options.clone(), out_tx.clone()));
                    workers.insert(id, worker);
                }
                Some(Msg::Body { id, last, data }) => {
                    let Some(request) = arriving.get_mut(&id) else { continue };
                    let mut body = std::mem::take(&mut request.data.0).try_into_mut()
                        .unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
                    body.extend_from_slice(data.as_bytes());
                    request.data = Data(body.freeze());
                    if last && let Some(request) = arriving.remove(&id) {
                        let worker = tokio::spawn(work(request, options.clone(), out_tx.clone()));
                        workers.insert(id, worker);
                    }
                }
                Some(Msg::Cancel { id, reason }) => {
                    tracing::info!(%id, %reason, "request cancelled");
                    arriving.remove(&id);
                    if let Some(worker) = workers.remove(&id) {
                        worker.abort();
                    }
                }
                Some(Msg::Goaway { reason, .. }) => tracing::info!(%reason, "relay going away"),
                Some(Msg::Error { code, message, id: None, .. })
                    if matches!(code, ErrorCode::Forbidden | ErrorCode::UnknownSpace | ErrorCode::InvalidName) =>
                {
                    let hint = match (code, &options.token) {
                        (ErrorCode::Forbidden, None) => " (give --token with a token the relay's policy lets register, e.g. service-demo-token for the demo)",
                        _ => "",
                    };
                    break Err(Refused { space: options.space.clone(), code, message, hint }.into());
                }
                Some(Msg::Error { code, message, .. }) => tracing::warn!(%code, %message, "relay error"),
                Some(_) => {}
            },
        }
    };
    for (_, worker) in workers {
        worker.abort();
    }
    if stop.is_cancelled() {
        // Said goodbye, the relay fails this instance's requests over now.
        client.close().await?;
    }
    result
}

async fn work(request: Request, options: Options, out: mpsc::Sender<Msg>) {
    let steps = options.steps.max(1);
    let pause = Duration::from_millis(options.work_ms / u64::from(steps));
    for step in 1..=options.steps {
        tokio::time::sleep(pause).await;
        let percent = 100.0 * step as f32 / steps as f32;
        let progress = Msg::Progress {
            id: request.id.clone(),
            percent: Some(percent),
            data: Data::from(format!("step {step} of {steps}")),
        };
        if out.send(progress).await.is_err() {
            return;
        }
    }
    if options.steps == 0 {
        tokio::time::sleep(pause).await;
    }
    let body = match std::str::from_utf8(request.data.as_bytes()) {
        Ok(text) => Data::from(text.to_uppercase()),
        Err(_) => Data::from(request.data.as_bytes().to_ascii_uppercase()),
    };
    let response = Msg::Response(Response {
        id: request.id,
        status: 200,
        headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
        data: body,
    });
    let _ = out.send(response).await;
}

/// Entry point of the `service-app` binary.
pub fn main() -> std::process::ExitCode {
    let options = Options::parse();
    crate::init_tracing();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let stop = CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            crate::stop_signal().await;
            on_signal.cancel();
        });
        run(options, stop).await;
    });
    std::process::ExitCode::SUCCESS
}
