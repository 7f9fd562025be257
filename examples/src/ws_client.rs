//! The example command-line client (`ws-client`, and `quic-client` with QUIC
//! as the default): publish to or subscribe to a channel, or send a request
//! to a space and print its progress and response.

use std::io::Write as _;

use anyhow::bail;
use clap::{Parser, Subcommand};
use wasmrelay::protocol::{Data, Msg, Request};

use crate::client::{Client, Trust};

#[derive(Debug, Parser)]
#[command(name = "ws-client", about = "Example WebSocket client for wasmrelay")]
pub struct Options {
    /// The relay: ws://HOST:PORT/ws or quic://HOST:PORT.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub relay: String,
    #[command(flatten)]
    pub trust: Trust,
    /// A token for the relay's admission policy, sent in `hello`.
    #[arg(long)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish one message to a channel.
    Publish { channel: String, text: String },
    /// Print messages from a channel until COUNT have arrived (or forever).
    Subscribe {
        channel: String,
        #[arg(long)]
        count: Option<u64>,
    },
    /// Send TEXT as a request to a space and print progress and the response.
    Request {
        space: String,
        text: String,
        #[arg(long, default_value = "/")]
        path: String,
    },
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let mut client = Client::connect(
        &options.relay,
        "ws-client",
        &options.trust,
        options.token.as_deref(),
    )
    .await?;
    let mut out = std::io::stdout();
    match options.command {
        Command::Publish { channel, text } => {
            client
                .send(&Msg::Publish {
                    channel,
                    id: Some("1".into()),
                    data: Data::from(text),
                })
                .await?;
            match client.recv().await? {
                Some(Msg::Ack { channel, seq, .. }) => {
                    writeln!(out, "published to {channel} as #{seq}")?
                }
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Command::Subscribe { channel, count } => {
            client.send(&Msg::Subscribe { channel }).await?;
            let mut seen = 0;
            while count.is_none_or(|c| seen < c) {
                match client.recv().await? {
                    Some(Msg::Subscribed {
                        channel, presence, ..
                    }) => writeln!(out, "subscribed to {channel} ({presence} here)")?,
                    Some(Msg::Message { channel, seq, data }) => {
                        seen += 1;
                        writeln!(
                            out,
                            "{channel} #{seq}: {}",
                            String::from_utf8_lossy(data.as_bytes())
                        )?;
                    }
                    Some(Msg::Presence { channel, count }) => {
                        writeln!(out, "{channel}: {count} here")?
                    }
                    Some(Msg::Error { code, message, .. }) => bail!("{code}: {message}"),
                    Some(_) => {}
                    None => bail!("the relay closed the connection"),
                }
            }
        }
        Command::Request { space, text, path } => {
            client
                .send(&Msg::Request(Request {
                    id: "1".into(),
                    space,
                    method: "POST".into(),
                    path,
                    query: String::new(),
                    headers: vec![],
                    timeout_ms: None,
                    stream: false,
                    data: Data::from(text),
                }))
                .await?;
            loop {
                match client.recv().await? {
                    Some(Msg::Progress { percent, data, .. }) => writeln!(
                        out,
                        "progress {:>5.1}% {}",
                        percent.unwrap_or(0.0),
                        String::from_utf8_lossy(data.as_bytes())
                    )?,
                    Some(Msg::Response(response)) => {
                        writeln!(
                            out,
                            "{} {}",
                            response.status,
                            String::from_utf8_lossy(response.data.as_bytes())
                        )?;
                        break;
                    }
                    Some(Msg::Error { code, message, .. }) => bail!("{code}: {message}"),
                    Some(_) => {}
                    None => bail!("the relay closed the connection"),
                }
            }
        }
    }
    client.close().await
}

/// Entry point of the `ws-client` binary.
pub fn main() -> std::process::ExitCode {
    run_main(Options::parse())
}

/// Entry point of the `quic-client` binary: the same commands, over QUIC by default.
pub fn quic_main() -> std::process::ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let command = Options::command()
        .name("quic-client")
        .about("Example QUIC client for wasmrelay")
        .mut_arg("relay", |arg| arg.default_value("quic://127.0.0.1:8443"));
    let options = Options::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    run_main(options)
}

fn run_main(options: Options) -> std::process::ExitCode {
    crate::init_tracing();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(options)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "ws-client: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
