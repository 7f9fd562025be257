//! `wasmrelay push FILE --to user:NAME|channel:NAME|session:ID`: puts a
//! file on a running relay as the operator and offers it (notify, then the
//! recipients pull); `wasmrelay offers`: offers and their delivery states.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{AdminTarget, call_json, format_table, get_json};

#[derive(Debug, Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The file to offer.
    pub file: PathBuf,
    /// Who is offered it: user:NAME, channel:NAME or session:ID (repeatable).
    #[arg(long, required = true)]
    pub to: Vec<String>,
    /// How long the offer stays open, in milliseconds (the relay's
    /// files.offer_ttl_ms when left out).
    #[arg(long)]
    pub ttl_ms: Option<u64>,
}

#[derive(Debug, Args)]
pub struct OffersArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Only offers of this file.
    #[arg(long)]
    pub file: Option<String>,
    /// Only offers in this state: offered, pulling, done, expired, failed.
    #[arg(long)]
    pub state: Option<String>,
}

/// `user:bob` → `{"user": "bob"}`.
fn target(to: &str) -> anyhow::Result<serde_json::Value> {
    match to.split_once(':') {
        Some((kind @ ("user" | "channel" | "session"), name)) if !name.is_empty() => {
            Ok(serde_json::json!({ kind: name }))
        }
        _ => bail!("--to {to:?}: expected user:NAME, channel:NAME or session:ID"),
    }
}

pub async fn push(args: PushArgs) -> anyhow::Result<()> {
    let base = args.target.base().to_owned();
    let token = args.target.token()?;
    let targets: Vec<serde_json::Value> = args
        .to
        .iter()
        .map(|to| target(to))
        .collect::<anyhow::Result<_>>()?;
    let name = args
        .file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file")
        .to_owned();
    let file = upload(&base, token.as_deref(), &args.file, &name).await?;
    let id = file["id"].as_str().unwrap_or_default().to_owned();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{name}: file {id}, {} bytes, sha256 {}",
        file["size"],
        file["sha256"].as_str().unwrap_or("?")
    )?;
    for (to, target) in args.to.iter().zip(targets) {
        let mut offer = serde_json::json!({ "file": id, "to": target });
        if let Some(ttl) = args.ttl_ms {
            offer["ttl_ms"] = ttl.into();
        }
        let body = Some(("application/json".to_owned(), serde_json::to_vec(&offer)?));
        let made = call_json(
            http::Method::POST,
            &format!("{base}/admin/offers"),
            token.as_deref(),
            body,
        )
        .await?;
        writeln!(
            out,
            "offered to {to}: offer {}, {} connection(s) told now",
            made["offer"]["id"].as_str().unwrap_or("?"),
            made["delivered"]
        )?;
    }
    Ok(())
}

/// Streams the file to `POST /admin/files` (never all of it in memory).
async fn upload(
    base: &str,
    token: Option<&str>,
    path: &PathBuf,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let length = file.metadata().await?.len();
    let frames = futures_util::TryStreamExt::map_ok(
        tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024),
        hyper::body::Frame::data,
    );
    let body = StreamBody::new(frames).boxed_unsync();
    let encoded: String =
        percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC).collect();
    let url = format!("{base}/admin/files?name={encoded}");
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(&url)
        .header(http::header::CONTENT_LENGTH, length);
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(request.body(body)?)
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !status.is_success() {
        bail!(
            "{status}: {} ({})",
            json["error"]["message"]
                .as_str()
                .unwrap_or("the relay refused the file"),
            json["error"]["code"].as_str().unwrap_or("?")
        );
    }
    Ok(json)
}

pub async fn offers(args: OffersArgs) -> anyhow::Result<()> {
    let token = args.target.token()?;
    let mut query = Vec::new();
    if let Some(file) = &args.file {
        query.push(format!("file={file}"));
    }
    if let Some(state) = &args.state {
        query.push(format!("state={state}"));
    }
    let url = format!("{}/admin/offers?{}", args.target.base(), query.join("&"));
    let list = get_json(&url, token.as_deref()).await?;
    let mut rows = vec![
        ["OFFER", "FILE", "TO", "FROM", "STATE", "PULLS", "EXPIRES"]
            .map(String::from)
            .to_vec(),
    ];
    for offer in list["offers"].as_array().into_iter().flatten() {
        let text = |key: &str| offer[key].as_str().unwrap_or("").to_owned();
        rows.push(vec![
            text("id"),
            text("file"),
            format!("{}:{}", text("target_kind"), text("target")),
            text("from"),
            text("state"),
            offer["pulls"].to_string(),
            offer["expires_at_ms"].to_string(),
        ]);
    }
    std::io::stdout().write_all(format_table(&rows).as_bytes())?;
    Ok(())
}
