//! Sends a finished file, from an offset, as `download_ready` and then
//! `chunk`s (each with its offset, a sequence number and its CRC-32C, the
//! last one marked) through a [`TransferSink`]. The file is read a chunk
//! at a time, only as fast as the sink takes chunks.

use std::io::SeekFrom;
use std::path::PathBuf;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::sink::TransferSink;
use crate::protocol::{Data, Msg};
use crate::store::files::FileRow;

/// What to send.
pub struct Outgoing {
    /// The transfer's id on the connection.
    pub id: String,
    pub file: FileRow,
    pub path: PathBuf,
    pub name: String,
    pub offset: u64,
    pub chunk_size: u32,
}

/// Why a download stopped early.
#[derive(Debug)]
pub enum Stopped {
    /// The peer went, or stopped taking the transfer.
    Peer(String),
    /// The file could not be read.
    Disk(std::io::Error),
}

/// Sends it.
pub async fn send(outgoing: Outgoing, sink: &mut dyn TransferSink) -> Result<(), Stopped> {
    let Outgoing {
        id,
        file,
        path,
        name,
        offset,
        chunk_size,
    } = outgoing;
    let sha256 = file.sha256.clone().unwrap_or_default();
    let mut blob = tokio::fs::File::open(&path).await.map_err(Stopped::Disk)?;
    blob.seek(SeekFrom::Start(offset))
        .await
        .map_err(Stopped::Disk)?;
    sink.send(Msg::DownloadReady {
        id: id.clone(),
        file: file.id.clone(),
        name,
        size: file.length,
        sha256,
        offset,
        chunk_size,
    })
    .await
    .map_err(Stopped::Peer)?;
    let mut at = offset;
    let mut seq = 0;
    loop {
        let want = (file.length - at).min(u64::from(chunk_size)) as usize;
        let mut buffer = BytesMut::zeroed(want);
        blob.read_exact(&mut buffer).await.map_err(Stopped::Disk)?;
        let data = buffer.freeze();
        let last = at + want as u64 == file.length;
        sink.send(Msg::Chunk {
            id: id.clone(),
            seq,
            offset: at,
            crc32c: crc32c::crc32c(&data),
            last,
            data: Data(data),
        })
        .await
        .map_err(Stopped::Peer)?;
        if last {
            return sink.finish().await.map_err(Stopped::Peer);
        }
        at += want as u64;
        seq += 1;
    }
}
