//! File transfers for the example client (PROTOCOL §6.4): upload a file in
//! checksummed chunks, resuming a previous attempt; and receive files the
//! relay offers (push), pulling each with resume and checking its SHA-256
//! before it takes its final name.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use wasmrelay_client::Client;
use wasmrelay_client::protocol::{Data, Msg};

const CHUNK: u32 = 256 * 1024;

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a file on disk, hex.
async fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).await?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}

/// Where an upload's relay-side id is kept, so a rerun resumes it.
fn sidecar(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".upload");
    PathBuf::from(name)
}

/// Uploads `path`; a previous attempt (its id in `PATH.upload`) resumes
/// where the relay says it stopped.
pub async fn upload(client: &mut Client, path: &Path) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    let size = tokio::fs::metadata(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let digest = sha256_of(path).await?;
    let previous = tokio::fs::read_to_string(sidecar(path)).await.ok();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file")
        .to_owned();
    client
        .send(&Msg::Upload {
            id: "up".into(),
            file: previous.map(|id| id.trim().to_owned()),
            name,
            size,
            sha256: Some(digest.clone()),
            chunk_size: Some(CHUNK),
        })
        .await?;
    let (file, offset, chunk_size) = loop {
        match client.recv().await? {
            Some(Msg::UploadReady {
                file,
                offset,
                chunk_size,
                ..
            }) => break (file, offset, chunk_size),
            Some(Msg::UploadDone { file, sha256, .. }) => {
                writeln!(out, "already uploaded: file {file}, sha256 {sha256}")?;
                return Ok(());
            }
            Some(Msg::Error { code, message, .. }) => bail!("{code}: {message}"),
            Some(_) => {}
            None => bail!("the relay closed the connection"),
        }
    };
    tokio::fs::write(sidecar(path), &file).await?;
    if offset > 0 {
        writeln!(out, "resuming file {file} at byte {offset} of {size}")?;
    }
    let mut source = tokio::fs::File::open(path).await?;
    source.seek(std::io::SeekFrom::Start(offset)).await?;
    let (mut at, mut seq) = (offset, 0);
    while at < size {
        let mut buffer = vec![0u8; (size - at).min(u64::from(chunk_size)) as usize];
        source.read_exact(&mut buffer).await?;
        let next = at + buffer.len() as u64;
        client
            .send(&Msg::Chunk {
                id: "up".into(),
                seq,
                offset: at,
                crc32c: crc32c::crc32c(&buffer),
                last: next == size,
                data: Data::from(buffer),
            })
            .await?;
        (at, seq) = (next, seq + 1);
    }
    loop {
        match client.recv().await? {
            Some(Msg::UploadDone { file, sha256, .. }) => {
                let _ = tokio::fs::remove_file(sidecar(path)).await;
                writeln!(out, "uploaded: file {file}, {size} bytes, sha256 {sha256}")?;
                return Ok(());
            }
            Some(Msg::Error { code, message, .. }) => bail!("{code}: {message}"),
            Some(_) => {}
            None => bail!("the relay closed the connection; run again to resume"),
        }
    }
}

/// Waits for offered files and pulls each into `dir` (as NAME.part, with
/// resume, until its SHA-256 checks out, then renamed), `count` of them or
/// forever.
pub async fn receive(client: &mut Client, dir: &Path, count: Option<u64>) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    tokio::fs::create_dir_all(dir).await?;
    writeln!(out, "waiting for files (session {})", client.session())?;
    let mut received = 0;
    while count.is_none_or(|c| received < c) {
        let (offer, file, name, size, sha256, from) = match client.recv().await? {
            Some(Msg::FileOffer {
                offer,
                file,
                name,
                size,
                sha256,
                from,
                ..
            }) => (offer, file, name, size, sha256, from),
            Some(Msg::Error { code, message, .. }) => bail!("{code}: {message}"),
            Some(_) => continue,
            None => bail!("the relay closed the connection"),
        };
        // Only the last path component: a sender cannot write elsewhere.
        let name = Path::new(&name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone());
        let target = dir.join(&name);
        if tokio::fs::try_exists(&target).await? && sha256_of(&target).await? == sha256 {
            writeln!(out, "{name}: already here")?;
            received += 1;
            continue;
        }
        let partial = dir.join(format!("{name}.part"));
        let have = tokio::fs::metadata(&partial)
            .await
            .map_or(0, |m| m.len())
            .min(size);
        writeln!(
            out,
            "{name}: {size} bytes from {from}, pulling from byte {have}"
        )?;
        pull(client, &offer, &file, &partial, have).await?;
        let got = sha256_of(&partial).await?;
        if got != sha256 {
            tokio::fs::remove_file(&partial).await?;
            bail!("{name}: SHA-256 {got} is not the offered {sha256}; removed, pull again");
        }
        tokio::fs::rename(&partial, &target).await?;
        writeln!(out, "{name}: done, sha256 {sha256}")?;
        received += 1;
    }
    Ok(())
}

async fn pull(
    client: &mut Client,
    offer: &str,
    file: &str,
    partial: &Path,
    from: u64,
) -> anyhow::Result<()> {
    client
        .send(&Msg::Download {
            id: format!("pull-{offer}"),
            file: file.to_owned(),
            offset: from,
            chunk_size: Some(CHUNK),
            offer: Some(offer.to_owned()),
        })
        .await?;
    let mut sink = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(partial)
        .await?;
    sink.set_len(from).await?;
    sink.seek(std::io::SeekFrom::Start(from)).await?;
    loop {
        match client.recv().await? {
            Some(Msg::DownloadReady { .. }) => {}
            Some(Msg::Chunk {
                offset,
                crc32c,
                last,
                data,
                ..
            }) => {
                if crc32c::crc32c(data.as_bytes()) != crc32c {
                    bail!("chunk at {offset} failed its CRC-32C; run again to resume");
                }
                sink.write_all(data.as_bytes()).await?;
                if last {
                    sink.flush().await?;
                    return Ok(());
                }
            }
            Some(Msg::Error { code, message, .. }) => bail!("{code}: {message}"),
            Some(_) => {}
            None => {
                sink.flush().await?;
                bail!("the relay closed the connection; run again to resume");
            }
        }
    }
}
