//! Register under a space and serve its requests: the loop every service
//! app behind NAT needs. Each request runs in a task of its own, so a slow
//! one never holds up another; a `cancel` from the relay aborts its task;
//! streamed bodies are gathered before the handler sees the request; over
//! QUIC an idle instance pings so the relay never takes it for gone.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wasmrelay_protocol::{Data, Msg, Request, Response};

use crate::{Client, Error, refuses_registration};

/// Answers one request: progress events to its caller, then the response.
pub struct Responder {
    id: String,
    out: mpsc::Sender<Msg>,
}

impl Responder {
    /// The relay's id for this request.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sends a progress event; `false` once the connection is gone.
    pub async fn progress(&self, percent: Option<f32>, data: impl Into<Data>) -> bool {
        let progress = Msg::Progress {
            id: self.id.clone(),
            percent,
            data: data.into(),
        };
        self.out.send(progress).await.is_ok()
    }

    /// Sends the response, which ends the request.
    pub async fn respond(self, status: u16, headers: Vec<(String, String)>, data: impl Into<Data>) {
        let response = Msg::Response(Response {
            id: self.id,
            status,
            headers,
            stream: false,
            data: data.into(),
        });
        let _ = self.out.send(response).await;
    }
}

/// Registers `client` under `space` and runs `handler` for each request until
/// `stop` resolves (then closes cleanly and returns `Ok`) or the connection
/// ends (an error: reconnect and call again). A refused registration is
/// [`Error::Refused`]; retrying cannot help.
pub async fn serve<H, F>(
    mut client: Client,
    space: &str,
    handler: H,
    stop: impl Future<Output = ()>,
) -> Result<(), Error>
where
    H: Fn(Request, Responder) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let instance = client.register(space).await?;
    tracing::info!(%space, %instance, "registered");
    // Handlers report through this queue, bounded so they wait for the link.
    let (out_tx, mut out_rx) = mpsc::channel::<Msg>(256);
    let mut workers: HashMap<String, JoinHandle<()>> = HashMap::new();
    // Streamed requests whose body is still arriving in `body` messages.
    let mut arriving: HashMap<String, (Request, BytesMut)> = HashMap::new();
    let ping_every = client.instance_ping_every();
    let mut ping = tokio::time::interval(ping_every.unwrap_or(Duration::from_secs(3600)));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = |request: Request, workers: &mut HashMap<String, JoinHandle<()>>| {
        let responder = Responder {
            id: request.id.clone(),
            out: out_tx.clone(),
        };
        let id = request.id.clone();
        workers.insert(id, tokio::spawn(handler(request, responder)));
    };
    tokio::pin!(stop);
    let result = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = ping.tick(), if ping_every.is_some() => client.send(&Msg::Ping { id: None }).await?,
            Some(msg) = out_rx.recv() => {
                if let Msg::Response(Response { id, .. }) = &msg {
                    workers.remove(id);
                }
                client.send(&msg).await?;
            }
            inbound = client.recv() => match inbound? {
                None => break Err(Error::Closed { during: "serving" }),
                Some(Msg::Request(request)) if request.stream => {
                    let id = request.id.clone();
                    arriving.insert(id, (request, BytesMut::new()));
                }
                Some(Msg::Request(request)) => start(request, &mut workers),
                Some(Msg::Body { id, last, data }) => {
                    let Some((_, body)) = arriving.get_mut(&id) else { continue };
                    body.extend_from_slice(data.as_bytes());
                    if last && let Some((mut request, body)) = arriving.remove(&id) {
                        request.data = Data(body.freeze());
                        start(request, &mut workers);
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
                Some(Msg::Error { code, message, id: None, .. }) if refuses_registration(code) => {
                    break Err(Error::Refused { space: space.to_owned(), code, message });
                }
                Some(Msg::Error { code, message, .. }) => tracing::warn!(%code, %message, "relay error"),
                Some(_) => {}
            },
        }
    };
    for (_, worker) in workers {
        worker.abort();
    }
    if result.is_ok() {
        // Said goodbye, the relay fails this instance's requests over now.
        client.close().await?;
    }
    result
}
