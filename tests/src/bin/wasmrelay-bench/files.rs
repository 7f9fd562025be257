//! Scenario 7, files: one file uploaded and downloaded over HTTP (tus and
//! GET), WebSocket and QUIC, beside a plain TCP copy of the same bytes
//! through a forwarder process and a TCP copy written to a file and
//! fsynced (what an upload must also do); the cost of resuming an upload;
//! and the relay's memory per active download.

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use wasmrelay_client::protocol::{Data, Msg};
use wasmrelay_client::{Client, Encoding, Options, Trust};
use wasmrelay_tests::RelayProcess;

use super::stats::{PeakRss, median};
use super::tasks::cpu_seconds;
use super::{Failures, MIB, TOKEN, helper, ratio, relay_with};

pub struct FileSettings {
    pub bytes: usize,
    pub rounds: usize,
    /// Downloads at once for the memory table.
    pub concurrent: usize,
}

impl FileSettings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                bytes: 16 << 20,
                rounds: 1,
                concurrent: 4,
            }
        } else {
            Self {
                bytes: 256 << 20,
                rounds: 3,
                concurrent: 100,
            }
        }
    }
}

/// Chunks a client sends: the relay's largest by default.
const CHUNK: usize = 256 * 1024;

#[derive(Clone, Copy, PartialEq)]
enum Via {
    Ws,
    Quic,
}

pub async fn files(settings: &FileSettings, failures: &mut Failures) {
    println!(
        "## 7. Files: one {} MiB file up and down\n",
        settings.bytes >> 20
    );
    println!(
        "Client in the driver process, relay in its own; HTTP is one tus PATCH up and one GET down; WebSocket (binary frames) and QUIC move 256 KiB chunks with CRC-32C both ways (the memory table uses the relay's default, 64 KiB). Every upload ends with the relay's fsync, SHA-256 of the whole file and rename; the second baseline pays the same fsync. Median of {} rounds.\n",
        settings.rounds
    );
    let gib = (settings.bytes as u64 * 8).max(4 << 30);
    let relay = relay_with(&format!(
        "[files]\nmax_file_bytes = {gib}\nuser_bytes = {gib}\ntotal_bytes = {gib}\nmax_uploads_per_user = 1000\nmax_transfers_per_connection = 8\n"
    ))
    .await;
    let data = Bytes::from(wasmrelay_tests::pattern(
        settings.bytes,
        0x9e37_79b9_7f4a_7c15,
    ));
    let forwarder = match helper(&["__forward"]).await {
        Ok(forwarder) => Some(forwarder),
        Err(e) => {
            failures.note("files forwarder", &e);
            None
        }
    };
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("TCP copy through a forwarder (baseline)", Vec::new()),
        ("TCP copy into a file + fsync (baseline)", Vec::new()),
        ("HTTP upload (tus PATCH)", Vec::new()),
        ("HTTP download (GET)", Vec::new()),
        ("WebSocket upload", Vec::new()),
        ("WebSocket download", Vec::new()),
        ("QUIC upload", Vec::new()),
        ("QUIC download", Vec::new()),
    ];
    let mb = |seconds: f64| settings.bytes as f64 / 1e6 / seconds;
    // CPU seconds per GB moved: the server side (the forwarder for the
    // baselines, the relay otherwise) and this client process.
    let forwarder_pid = forwarder.as_ref().and_then(|(child, _)| child.id());
    let relay_pid = relay.process.pid();
    let client_pid = std::process::id();
    let cpu = |pid: Option<u32>| pid.and_then(cpu_seconds).unwrap_or(f64::NAN);
    let gb = settings.bytes as f64 / 1e9;
    let mut server_cpu: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    let mut client_cpu: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    for _ in 0..settings.rounds {
        let mut measured: Vec<anyhow::Result<f64>> = Vec::new();
        let mut marks = vec![(
            cpu(forwarder_pid),
            cpu(Some(relay_pid)),
            cpu(Some(client_pid)),
        )];
        let mark = |marks: &mut Vec<(f64, f64, f64)>| {
            marks.push((
                cpu(forwarder_pid),
                cpu(Some(relay_pid)),
                cpu(Some(client_pid)),
            ))
        };
        if let Some((_, port)) = &forwarder {
            measured.push(tcp_copy(*port, &data, false).await);
            mark(&mut marks);
            measured.push(tcp_copy(*port, &data, true).await);
            mark(&mut marks);
        } else {
            for _ in 0..2 {
                measured.push(Err(anyhow::anyhow!("no forwarder")));
                mark(&mut marks);
            }
        }
        let uploaded = http_upload(&relay, &data).await;
        mark(&mut marks);
        let file = uploaded.as_ref().ok().map(|(file, _)| file.clone());
        measured.push(uploaded.map(|(_, seconds)| seconds));
        measured.push(match &file {
            Some(file) => http_download(&relay, file, data.len()).await,
            None => Err(anyhow::anyhow!("no file uploaded")),
        });
        mark(&mut marks);
        for via in [Via::Ws, Via::Quic] {
            let uploaded = upload(&relay, via, &data).await;
            mark(&mut marks);
            let file = uploaded.as_ref().ok().map(|(file, _)| file.clone());
            measured.push(uploaded.map(|(_, seconds)| seconds));
            measured.push(match &file {
                Some(file) => download(&relay, via, file, data.len())
                    .await
                    .map(|(s, _)| s),
                None => Err(anyhow::anyhow!("no file uploaded")),
            });
            mark(&mut marks);
        }
        for (i, ((label, rates), result)) in rows.iter_mut().zip(measured).enumerate() {
            let (before, after) = (marks[i], marks[i + 1]);
            let server = if i < 2 {
                after.0 - before.0
            } else {
                after.1 - before.1
            };
            server_cpu[i].push(server / gb);
            client_cpu[i].push((after.2 - before.2) / gb);
            match result {
                Ok(seconds) => rates.push(mb(seconds)),
                Err(e) => {
                    failures.note(&format!("files {label}"), &e);
                }
            }
        }
    }
    let tcp = median(&rows[0].1);
    println!("| path | MB/s | × TCP copy | server CPU s/GB | client CPU s/GB |");
    println!("|---|---:|---:|---:|---:|");
    for (i, (label, rates)) in rows.iter().enumerate() {
        let rate = median(rates);
        println!(
            "| {label} | {rate:.0} | {} | {:.2} | {:.2} |",
            ratio(rate, tcp),
            median(&server_cpu[i]),
            median(&client_cpu[i])
        );
    }
    println!();
    resume(settings, &relay, &data, failures).await;
    memory(settings, &relay, &data, failures).await;
}

/// Seconds to send `data` through the forwarder to a sink in this process
/// that reads it all (and, with `to_disk`, writes it to a file and fsyncs).
async fn tcp_copy(forwarder: u16, data: &Bytes, to_disk: bool) -> anyhow::Result<f64> {
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let port = sink.local_addr()?.port();
    let length = data.len();
    let receiving = tokio::spawn(async move {
        let (mut socket, _) = sink.accept().await?;
        let mut file = if to_disk {
            Some(tokio::fs::File::from_std(tempfile::tempfile()?))
        } else {
            None
        };
        let mut buffer = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < length {
            let n = socket.read(&mut buffer).await?;
            if n == 0 {
                bail!("the copy ended after {got} bytes");
            }
            if let Some(file) = &mut file {
                file.write_all(&buffer[..n]).await?;
            }
            got += n;
        }
        if let Some(file) = &mut file {
            file.sync_all().await?;
        }
        anyhow::Ok(Instant::now())
    });
    let started = Instant::now();
    let mut socket = TcpStream::connect(("127.0.0.1", forwarder)).await?;
    socket.set_nodelay(true)?;
    socket.write_u16(port).await?;
    socket.write_all(data).await?;
    let done = receiving.await??;
    Ok(done.duration_since(started).as_secs_f64())
}

async fn http_upload(relay: &RelayProcess, data: &Bytes) -> anyhow::Result<(String, f64)> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let created = client
        .post(relay.url("/files/"))
        .bearer_auth(TOKEN)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", data.len().to_string())
        .header("Content-Type", "application/offset+octet-stream")
        .body(data.clone())
        .send()
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    if created.status() != 201 {
        bail!("POST /files/ answered {}", created.status());
    }
    let offset: usize = created.headers()["upload-offset"].to_str()?.parse()?;
    if offset != data.len() {
        bail!("the upload stopped at {offset}");
    }
    let location = created.headers()["location"].to_str()?;
    Ok((location.trim_start_matches("/files/").to_owned(), seconds))
}

async fn http_download(relay: &RelayProcess, file: &str, length: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut response = reqwest::Client::new()
        .get(relay.url(&format!("/files/{file}")))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    let mut got = 0;
    while let Some(chunk) = response.chunk().await? {
        got += chunk.len();
    }
    if got != length {
        bail!("downloaded {got} of {length} bytes");
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn connect(relay: &RelayProcess, via: Via, resume: Option<String>) -> anyhow::Result<Client> {
    let url = match via {
        Via::Ws => relay.ws_url(),
        Via::Quic => format!("quic://{}", relay.quic_addr()),
    };
    let mut options = Options::named("bench-files")
        .token(Some(TOKEN))
        .encoding(Encoding::Binary)
        .trust(Trust {
            ca: Some(relay.cert_pem()),
            pin_sha256: None,
        })
        .batch(false);
    // Named at the upgrade, so the connection counts as the service user,
    // not as a guest under the guest tier's cap.
    options.token_in_url = true;
    options.resume = resume;
    Ok(Client::connect(&url, options).await?)
}

async fn next(client: &mut Client) -> anyhow::Result<Msg> {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), client.recv()).await {
            Err(_) => bail!("nothing from the relay for 60 s"),
            Ok(received) => match received?.context("the relay closed the connection")? {
                Msg::Error { code, message, .. } => bail!("{code}: {message}"),
                Msg::Ping { .. } | Msg::Pong { .. } | Msg::FileOffer { .. } => {}
                msg => return Ok(msg),
            },
        }
    }
}

/// Starts an upload; its file id.
async fn start_upload(
    client: &mut Client,
    size: usize,
    file: Option<String>,
) -> anyhow::Result<(String, u64)> {
    client
        .send(&Msg::Upload {
            id: "up".into(),
            file,
            name: "bench.bin".into(),
            size: size as u64,
            sha256: None,
            chunk_size: Some(CHUNK as u32),
        })
        .await?;
    match next(client).await? {
        Msg::UploadReady { file, offset, .. } => Ok((file, offset)),
        other => bail!("expected upload_ready, got {}", other.kind()),
    }
}

async fn send_chunks(
    client: &mut Client,
    data: &Bytes,
    from: usize,
    to: usize,
) -> anyhow::Result<()> {
    let mut at = from;
    let mut seq = 0;
    while at < to {
        let end = (at + CHUNK).min(to);
        let piece = data.slice(at..end);
        client
            .send(&Msg::Chunk {
                id: "up".into(),
                seq,
                offset: at as u64,
                crc32c: crc32c::crc32c(&piece),
                last: end == data.len(),
                data: Data(piece),
            })
            .await?;
        at = end;
        seq += 1;
    }
    Ok(())
}

/// Uploads `data`; its file id and the seconds from `upload` to `upload_done`.
async fn upload(relay: &RelayProcess, via: Via, data: &Bytes) -> anyhow::Result<(String, f64)> {
    let mut client = connect(relay, via, None).await?;
    let started = Instant::now();
    let (file, _) = start_upload(&mut client, data.len(), None).await?;
    send_chunks(&mut client, data, 0, data.len()).await?;
    match next(&mut client).await? {
        Msg::UploadDone { .. } => {}
        other => bail!("expected upload_done, got {}", other.kind()),
    }
    let seconds = started.elapsed().as_secs_f64();
    client.close().await?;
    Ok((file, seconds))
}

/// Downloads file `file`; the seconds it took and the bytes.
async fn download(
    relay: &RelayProcess,
    via: Via,
    file: &str,
    length: usize,
) -> anyhow::Result<(f64, usize)> {
    let mut client = connect(relay, via, None).await?;
    let started = Instant::now();
    client
        .send(&Msg::Download {
            id: "down".into(),
            file: file.to_owned(),
            offset: 0,
            chunk_size: Some(CHUNK as u32),
            offer: None,
        })
        .await?;
    let mut got = 0;
    loop {
        match next(&mut client).await? {
            Msg::DownloadReady { .. } => {}
            Msg::Chunk { data, last, .. } => {
                got += data.len();
                if last {
                    break;
                }
            }
            other => bail!("expected chunks, got {}", other.kind()),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if got != length {
        bail!("downloaded {got} of {length} bytes");
    }
    client.close().await?;
    Ok((seconds, got))
}

/// An upload cut half-way and resumed: what the resume costs.
async fn resume(
    settings: &FileSettings,
    relay: &RelayProcess,
    data: &Bytes,
    failures: &mut Failures,
) {
    let mut handshakes = Vec::new();
    let mut totals = Vec::new();
    let mut whole = Vec::new();
    for _ in 0..settings.rounds {
        let measured = async {
            let (_, uninterrupted) = upload(relay, Via::Ws, data).await?;
            let started = Instant::now();
            let mut client = connect(relay, Via::Ws, None).await?;
            let (file, _) = start_upload(&mut client, data.len(), None).await?;
            send_chunks(&mut client, data, 0, data.len() / 2).await?;
            let session = client.session().to_owned();
            drop(client);
            // From the new connection to the upload ready to go on.
            let resumed_at = Instant::now();
            let (mut client, offset) = loop {
                let mut client = connect(relay, Via::Ws, Some(session.clone())).await?;
                let listed = matches!(client.welcome(), Msg::Welcome { transfers, .. } if !transfers.is_empty());
                if listed {
                    let (_, offset) = start_upload(&mut client, 0, Some(file.clone())).await?;
                    break (client, offset);
                }
                client.close().await?;
                if resumed_at.elapsed() > Duration::from_secs(10) {
                    bail!("the cut upload was never listed");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let handshake = resumed_at.elapsed().as_secs_f64();
            send_chunks(&mut client, data, offset as usize, data.len()).await?;
            match next(&mut client).await? {
                Msg::UploadDone { .. } => {}
                other => bail!("expected upload_done, got {}", other.kind()),
            }
            client.close().await?;
            anyhow::Ok((handshake, started.elapsed().as_secs_f64(), uninterrupted))
        };
        match measured.await {
            Ok((handshake, total, uninterrupted)) => {
                handshakes.push(handshake * 1e3);
                totals.push(total);
                whole.push(uninterrupted);
            }
            Err(e) => {
                failures.note("files resume", &e);
            }
        }
    }
    println!(
        "Resume: a WebSocket upload cut half-way (connection dropped), then a new connection presenting the old session (`hello.resume`), `upload` naming the file, and the rest from the offset the relay gives.\n"
    );
    println!("| | median |");
    println!("|---|---:|");
    println!(
        "| reconnect + resume handshake (to `upload_ready`) | {:.1} ms |",
        median(&handshakes)
    );
    println!(
        "| cut + resumed upload, end to end | {:.2} s ({} × the uninterrupted {:.2} s) |",
        median(&totals),
        ratio(median(&totals), median(&whole)),
        median(&whole)
    );
    println!();
}

/// Relay memory with many downloads running at once.
async fn memory(
    settings: &FileSettings,
    relay: &RelayProcess,
    data: &Bytes,
    failures: &mut Failures,
) {
    let measured = async {
        let (file, _) = upload(relay, Via::Ws, data).await?;
        let pid = relay.process.pid();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = wasmrelay_tests::rss_of(pid).unwrap_or(0);
        let watch = PeakRss::watch(pid);
        let mut downloads = tokio::task::JoinSet::new();
        for _ in 0..settings.concurrent {
            let (relay_url, file) = (relay.ws_url(), file.clone());
            let cert = relay.cert_pem();
            let length = data.len();
            downloads.spawn(async move {
                let mut options = Options::named("bench-files")
                    .token(Some(TOKEN))
                    .encoding(Encoding::Binary)
                    .trust(Trust {
                        ca: Some(cert),
                        pin_sha256: None,
                    })
                    .batch(false);
                options.token_in_url = true;
                let mut client = Client::connect(&relay_url, options).await?;
                client
                    .send(&Msg::Download {
                        id: "m".into(),
                        file,
                        offset: 0,
                        chunk_size: None,
                        offer: None,
                    })
                    .await?;
                let mut got = 0;
                loop {
                    match next(&mut client).await? {
                        Msg::Chunk { data, last, .. } => {
                            got += data.len();
                            if last {
                                break;
                            }
                        }
                        Msg::DownloadReady { .. } => {}
                        other => bail!("expected chunks, got {}", other.kind()),
                    }
                }
                if got != length {
                    bail!("downloaded {got} of {length}");
                }
                client.close().await?;
                anyhow::Ok(())
            });
        }
        let started = Instant::now();
        while let Some(done) = downloads.join_next().await {
            done??;
        }
        let seconds = started.elapsed().as_secs_f64();
        let peak = watch.peak_bytes().await;
        anyhow::Ok((before, peak, seconds))
    };
    match measured.await {
        Ok((before, peak, seconds)) => {
            let per = peak.saturating_sub(before) as f64 / settings.concurrent as f64 / 1024.0;
            println!(
                "Memory: {} WebSocket downloads of the file at once, each reading as fast as it can ({:.0} MB/s together).\n",
                settings.concurrent,
                (settings.concurrent * data.len()) as f64 / 1e6 / seconds
            );
            println!("| relay RSS before | peak during | per active transfer |");
            println!("|---:|---:|---:|");
            println!(
                "| {:.1} MiB | {:.1} MiB | {per:.0} KiB |",
                before as f64 / MIB,
                peak as f64 / MIB
            );
            println!();
        }
        Err(e) => {
            failures.note("files memory", &e);
        }
    }
}
