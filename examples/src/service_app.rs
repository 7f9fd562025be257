//! The example service app: a backend behind NAT that connects *out* to the
//! relay, registers under a space, and serves requests — each gets progress
//! events and then a response whose body is the request body upper-cased.
//! When the relay goes away it reconnects with exponential backoff and jitter.

use std::time::Duration;

use clap::Parser;
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use wasmrelay_client::protocol::{Data, ErrorCode, Request};
use wasmrelay_client::serve::{Responder, serve};
use wasmrelay_client::{Client, Error, Options as ClientOptions, Trust};

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
            Err(e) if !e.is_retryable() => {
                // Retrying cannot help: the relay will say no again.
                let hint = match (&e, &options.token) {
                    (
                        Error::Refused {
                            code: ErrorCode::Forbidden,
                            ..
                        },
                        None,
                    ) => {
                        " (give --token with a token the relay's policy lets register, e.g. service-demo-token for the demo)"
                    }
                    _ => "",
                };
                tracing::error!(error = %report(&e), hint, "registration refused; stopping");
                return;
            }
            Err(e) => tracing::warn!(error = %report(&e), "relay connection lost"),
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

/// One connection's life: connect, register, serve until it drops.
async fn serve_once(options: &Options, stop: &CancellationToken) -> Result<(), Error> {
    let client_options = Options::client(options);
    let client = Client::connect(&options.relay, client_options).await?;
    let work_options = options.clone();
    serve(
        client,
        &options.space,
        move |request, responder| work(request, work_options.clone(), responder),
        stop.cancelled(),
    )
    .await
}

impl Options {
    fn client(&self) -> ClientOptions {
        ClientOptions::named("service-app")
            .token(self.token.clone())
            .trust(self.trust.clone())
    }
}

/// Simulated work: `steps` progress events spread over `work_ms`, then the
/// body upper-cased.
async fn work(request: Request, options: Options, responder: Responder) {
    let steps = options.steps.max(1);
    let pause = Duration::from_millis(options.work_ms / u64::from(steps));
    for step in 1..=options.steps {
        tokio::time::sleep(pause).await;
        let percent = 100.0 * step as f32 / steps as f32;
        if !responder
            .progress(Some(percent), format!("step {step} of {steps}"))
            .await
        {
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
    let headers = vec![("content-type".into(), "text/plain; charset=utf-8".into())];
    responder.respond(200, headers, body).await;
}

/// An error with its chain of causes, `a: b: c`.
fn report(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
