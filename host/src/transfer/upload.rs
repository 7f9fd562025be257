//! Receives an upload as `chunk`s and writes it through the storage's one
//! writer: each chunk is checked (its offset follows the last good one, its
//! CRC-32C matches, it fits) before a byte of it is written. A bad chunk is
//! refused with an error naming the offset to resume from, and chunks after
//! it are ignored until one arrives at that offset, so a client that had
//! several in flight just sends again from there. The file completes when
//! its last byte arrives (and, if declared, its SHA-256 matches).

use bytes::Bytes;
use futures_util::stream;
use tokio::sync::mpsc;

use super::storage::{FileError, Storage};
use crate::protocol::{ErrorCode, Msg};
use crate::store::files::FileRow;

/// One received chunk.
#[derive(Debug)]
pub struct Piece {
    pub seq: u64,
    pub offset: u64,
    pub crc32c: u32,
    pub last: bool,
    pub data: Bytes,
}

/// Writes the chunks `pieces` brings to upload `file` from its offset until
/// the file is complete or `pieces` ends (the connection went, the client
/// cancelled), keeping what was written. `refuse` is told of each refused
/// chunk (an `error` for the client).
pub async fn receive(
    storage: &Storage,
    id: String,
    file: &FileRow,
    chunk_size: u32,
    pieces: mpsc::Receiver<Piece>,
    refuse: impl Fn(Msg) + Send + 'static,
) -> Result<FileRow, FileError> {
    let checked = Checked {
        id,
        at: file.offset,
        size: file.length,
        chunk_size,
        resyncing: false,
        pieces,
    };
    let bytes = Box::pin(stream::unfold(
        (checked, refuse),
        |(mut checked, refuse)| async move {
            let data = checked.next(&refuse).await?;
            Some((Ok::<_, std::convert::Infallible>(data), (checked, refuse)))
        },
    ));
    storage.append(&file.id, file.offset, None, bytes).await
}

struct Checked {
    id: String,
    /// Where the next good chunk starts.
    at: u64,
    size: u64,
    chunk_size: u32,
    /// A chunk was refused: later ones are ignored until one comes at `at`.
    resyncing: bool,
    pieces: mpsc::Receiver<Piece>,
}

impl Checked {
    /// The next good chunk's bytes; `None` once the file is complete or
    /// no more chunks will come.
    async fn next(&mut self, refuse: &impl Fn(Msg)) -> Option<Bytes> {
        if self.at == self.size {
            return None;
        }
        loop {
            let piece = self.pieces.recv().await?;
            let problem = if piece.offset != self.at {
                if self.resyncing {
                    // Already told where to resume; this one was in flight.
                    continue;
                }
                Some((
                    ErrorCode::OffsetMismatch,
                    format!(
                        "chunk {} is at offset {}, not {}",
                        piece.seq, piece.offset, self.at
                    ),
                ))
            } else if piece.data.len() > self.chunk_size as usize {
                Some((
                    ErrorCode::TooLarge,
                    format!(
                        "chunk {} has {} bytes; chunk_size is {}",
                        piece.seq,
                        piece.data.len(),
                        self.chunk_size
                    ),
                ))
            } else if self.at + piece.data.len() as u64 > self.size {
                Some((
                    ErrorCode::TooLarge,
                    format!(
                        "chunk {} runs past the file's {} bytes",
                        piece.seq, self.size
                    ),
                ))
            } else if crc32c::crc32c(&piece.data) != piece.crc32c {
                Some((
                    ErrorCode::ChecksumMismatch,
                    format!(
                        "chunk {} does not match its crc32c; it was discarded",
                        piece.seq
                    ),
                ))
            } else if piece.last && self.at + piece.data.len() as u64 != self.size {
                Some((
                    ErrorCode::BadMessage,
                    format!(
                        "chunk {} is marked last but ends at {} of {} bytes",
                        piece.seq,
                        self.at + piece.data.len() as u64,
                        self.size
                    ),
                ))
            } else {
                None
            };
            if let Some((code, message)) = problem {
                self.resyncing = true;
                refuse(Msg::error(
                    code,
                    format!("{message}; send again from offset {}", self.at),
                    Some(self.id.clone()),
                ));
                continue;
            }
            self.resyncing = false;
            self.at += piece.data.len() as u64;
            if piece.data.is_empty() && self.at != self.size {
                continue;
            }
            return Some(piece.data);
        }
    }
}
