//! The example command-line client (`ws-client`, and `quic-client` with QUIC
//! as the default): publish to or subscribe to a channel, send a request
//! to a space and print its progress and response, upload a file, or
//! receive the files the relay offers (both resumable).

use std::io::Write as _;

use anyhow::bail;
use clap::{Parser, Subcommand};
use wasmrelay_client::protocol::{Data, Msg, Request};
use wasmrelay_client::{Client, Options as ClientOptions, Trust};

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
    /// Upload FILE in checksummed chunks; run again after an interruption
    /// to resume.
    Upload { file: std::path::PathBuf },
    /// Wait for files offered to this client and pull each into DIR, with
    /// resume, checking its SHA-256.
    Receive {
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
        /// Stop after this many files.
        #[arg(long)]
        count: Option<u64>,
    },
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let client_options = ClientOptions::named("ws-client")
        .token(options.token)
        .trust(options.trust)
        // Files travel as raw bytes, not base64.
        .encoding(wasmrelay_client::Encoding::Binary);
    let mut client = Client::connect(&options.relay, client_options).await?;
    let mut out = std::io::stdout();
    match options.command {
        Command::Publish { channel, text } => {
            let seq = client.publish(&channel, text).await?;
            writeln!(out, "published to {channel} as #{seq}")?;
        }
        Command::Subscribe { channel, count } => {
            let subscribed = client.subscribe(&channel).await?;
            writeln!(
                out,
                "subscribed to {channel} ({} here)",
                subscribed.presence
            )?;
            let mut seen = 0;
            while count.is_none_or(|c| seen < c) {
                match client.recv().await? {
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
            let request = Request {
                id: String::new(),
                space,
                method: "POST".into(),
                path,
                query: String::new(),
                headers: vec![],
                timeout_ms: None,
                stream: false,
                data: Data::from(text),
            };
            let response = client
                .request(request, |percent, data| {
                    // Printed as it comes; a closed stdout shows at the next writeln.
                    let _ = writeln!(
                        std::io::stdout(),
                        "progress {:>5.1}% {}",
                        percent.unwrap_or(0.0),
                        String::from_utf8_lossy(data.as_bytes())
                    );
                })
                .await?;
            writeln!(
                out,
                "{} {}",
                response.status,
                String::from_utf8_lossy(response.data.as_bytes())
            )?;
        }
        Command::Upload { file } => crate::files::upload(&mut client, &file).await?,
        Command::Receive { dir, count } => crate::files::receive(&mut client, &dir, count).await?,
    }
    client.close().await?;
    Ok(())
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
