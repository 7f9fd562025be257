//! One connection's file transfers (PROTOCOL §6.4): the uploads it sends
//! (`upload`, then `chunk`s) and the downloads it asks for (`download`).
//! Each runs on a task of its own, so the connection loop never waits on
//! the disk or the store: an upload's chunks reach its task through a small
//! bounded channel (a full one holds the connection's reading, which is
//! the uploader's backpressure), and a download's task reads the file only
//! as fast as the transport's sink takes chunks.
//!
//! Ending the connection ends its transfers: an upload keeps every byte
//! written and is listed for `hello.resume`; a download just stops.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::Context;
use crate::delivery::queue::{OutboundQueue, Overflow};
use crate::delivery::table::ConnInfo;
use crate::delivery::{Outbound, Pressure, deliver};
use crate::metrics::Metrics;
use crate::protocol::{Data, ErrorCode, Msg, Target, Unfinished};
use crate::transfer::access::{self, Who};
use crate::transfer::download::{self, Outgoing, Stopped};
use crate::transfer::offers;
use crate::transfer::sink::TransferStreams;
use crate::transfer::storage::{DIGEST_KEY, FileError};
use crate::transfer::upload::{self, Piece};

/// Chunks waiting for an upload's writer: a little slack for the disk.
const UPLOAD_BUFFER: usize = 2;
/// The chunk size of a transfer whose client named none.
const DEFAULT_CHUNK: u32 = 64 * 1024;
/// The smallest chunk size a client may ask for.
const MIN_CHUNK: u32 = 4 * 1024;

pub(super) struct Transfers {
    uploads: HashMap<String, mpsc::Sender<Piece>>,
    downloads: HashMap<String, tokio::task::AbortHandle>,
    streams: Arc<dyn TransferStreams>,
}

/// What a client asked for in `upload`.
pub(super) struct UploadAsk {
    pub id: String,
    pub file: Option<String>,
    pub name: String,
    pub size: u64,
    pub sha256: Option<String>,
    pub chunk_size: Option<u32>,
}

/// What a client asked for in `download`.
pub(super) struct DownloadAsk {
    pub id: String,
    pub file: String,
    pub offset: u64,
    pub chunk_size: Option<u32>,
    pub offer: Option<String>,
}

/// What a client asked for in `offer`.
pub(super) struct OfferAsk {
    pub id: String,
    pub file: String,
    pub to: Target,
    pub ttl_ms: Option<u64>,
}

/// Tells the client something about a transfer, through its own queue.
#[derive(Clone)]
struct Teller {
    conn: Arc<ConnInfo>,
    queue: Arc<OutboundQueue>,
    metrics: Arc<Metrics>,
}

impl Teller {
    fn tell(&self, msg: Msg) {
        // A client too far behind to take its transfer's answers is closed,
        // as a caller that does not read its responses is.
        deliver(
            &self.conn,
            &self.queue,
            Outbound::new(msg),
            Overflow::Disconnect,
            &self.metrics,
        );
    }

    fn fail(&self, id: &str, error: &FileError) {
        if error.code() == ErrorCode::Internal {
            tracing::warn!(
                error = error as &dyn std::error::Error,
                "file transfer failed"
            );
        }
        self.tell(Msg::error(
            error.code(),
            error.to_string(),
            Some(id.to_owned()),
        ));
    }
}

impl Transfers {
    pub fn new(streams: Arc<dyn TransferStreams>) -> Self {
        Self {
            uploads: HashMap::new(),
            downloads: HashMap::new(),
            streams,
        }
    }

    /// Forgets transfers whose tasks have ended.
    fn prune(&mut self) {
        self.uploads.retain(|_, chunks| !chunks.is_closed());
        self.downloads.retain(|_, task| !task.is_finished());
    }

    /// Checks a new transfer's `id` against those open; the refusal if any.
    fn refusal(&mut self, relay: &Context, id: &str) -> Option<Msg> {
        self.prune();
        if id.is_empty() {
            return Some(Msg::error(
                ErrorCode::BadMessage,
                "a transfer needs an `id`",
                None,
            ));
        }
        if self.uploads.contains_key(id) || self.downloads.contains_key(id) {
            return Some(Msg::error(
                ErrorCode::DuplicateId,
                "a transfer with this id is open on this connection",
                Some(id.to_owned()),
            ));
        }
        let limit = relay.config.files.max_transfers_per_connection;
        if self.uploads.len() + self.downloads.len() >= limit {
            return Some(Msg::error(
                ErrorCode::Overloaded,
                format!("at most {limit} transfers per connection at once"),
                Some(id.to_owned()),
            ));
        }
        None
    }

    /// The chunk size a transfer uses: what the client asked for, up to
    /// `files.max_chunk_bytes`; 64 KiB when it did not ask (a download then
    /// holds about 192 KiB of the relay's memory: two chunks queued, one
    /// being read).
    fn chunk_size(relay: &Context, asked: Option<u32>) -> u32 {
        let max = relay.config.chunk_limit();
        // Not tiny: a client must not make the relay send a file a few
        // bytes per message (unless messages themselves are that small).
        asked
            .unwrap_or(DEFAULT_CHUNK)
            .clamp(MIN_CHUNK.min(max), max)
    }

    /// `upload`: starts (or resumes) an upload on a task of its own, which
    /// answers `upload_ready`; the direct reply is a refusal, if any.
    pub fn upload(
        &mut self,
        relay: &Context,
        conn: &Arc<ConnInfo>,
        queue: &Arc<OutboundQueue>,
        session: String,
        ask: UploadAsk,
    ) -> Option<Msg> {
        if let Some(refusal) = self.refusal(relay, &ask.id) {
            return Some(refusal);
        }
        let id = ask.id.clone();
        let refuse = |code, reason: String| Some(Msg::error(code, reason, Some(id.clone())));
        if relay.is_draining() {
            return refuse(
                ErrorCode::ShuttingDown,
                "the relay is shutting down; upload again after reconnecting".to_owned(),
            );
        }
        let identity = conn.identity();
        let who = identity.as_ref().map(|(user, tier)| Who { user, tier });
        let start = match ask.file {
            Some(file) => Start::Resume(file),
            None => {
                if let Err(refused) =
                    access::may_upload(relay.hooks.as_ref(), who, &ask.name, ask.size)
                {
                    return refuse(refused.code, refused.reason);
                }
                let mut metadata = BTreeMap::new();
                if !ask.name.is_empty() {
                    metadata.insert("filename".to_owned(), ask.name);
                }
                if let Some(digest) = ask.sha256 {
                    metadata.insert(DIGEST_KEY.to_owned(), digest);
                }
                Start::New {
                    size: ask.size,
                    metadata,
                }
            }
        };
        let Some((user, _)) = identity else {
            return refuse(ErrorCode::NotFound, "no such file".to_owned());
        };
        let (chunks, pieces) = mpsc::channel(UPLOAD_BUFFER);
        self.uploads.insert(id.clone(), chunks);
        let task = UploadTask {
            files: relay.files.clone(),
            teller: Teller {
                conn: conn.clone(),
                queue: queue.clone(),
                metrics: relay.metrics.clone(),
            },
            session,
            user,
            id,
            chunk_size: Self::chunk_size(relay, ask.chunk_size),
        };
        tokio::spawn(task.run(start, pieces));
        None
    }

    /// `chunk`: hands the bytes to their upload's writer; while its buffer
    /// is full the connection reads nothing more (`pressure`).
    pub fn chunk(&mut self, id: String, piece: Piece, pressure: &mut Pressure) -> Option<Msg> {
        let Some(chunks) = self.uploads.get(&id) else {
            return Some(Msg::error(
                ErrorCode::UnknownTransfer,
                "no upload with this id is open on this connection",
                Some(id),
            ));
        };
        match chunks.try_send(piece) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(piece)) => {
                let chunks = chunks.clone();
                pressure.hold(async move {
                    // A writer that ended meanwhile has said why.
                    let _ = chunks.send(piece).await;
                });
                None
            }
            // The upload ended (complete, or refused: its task said so).
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.uploads.remove(&id);
                Some(Msg::error(
                    ErrorCode::UnknownTransfer,
                    "this upload has ended; start it again with `upload` naming its `file`",
                    Some(id),
                ))
            }
        }
    }

    /// `download`: sends file `file` from `offset` on a task of its own.
    pub fn download(
        &mut self,
        relay: &Context,
        conn: &Arc<ConnInfo>,
        queue: &Arc<OutboundQueue>,
        ask: DownloadAsk,
    ) -> Option<Msg> {
        let DownloadAsk {
            id,
            file,
            offset,
            chunk_size,
            offer,
        } = ask;
        if let Some(refusal) = self.refusal(relay, &id) {
            return Some(refusal);
        }
        let chunk_size = Self::chunk_size(relay, chunk_size);
        let task = DownloadTask {
            relay: relay.clone(),
            teller: Teller {
                conn: conn.clone(),
                queue: queue.clone(),
                metrics: relay.metrics.clone(),
            },
            identity: conn.identity(),
            id: id.clone(),
            chunk_size,
        };
        let sink = self.streams.open(chunk_size);
        let handle = tokio::spawn(task.run(file, offset, offer, sink));
        self.downloads.insert(id, handle.abort_handle());
        None
    }

    /// `offer`: offers one of this client's files to others, on a task of
    /// its own, which answers `offered`.
    pub fn offer(
        &self,
        relay: &Context,
        conn: &Arc<ConnInfo>,
        queue: &Arc<OutboundQueue>,
        ask: OfferAsk,
    ) -> Option<Msg> {
        if ask.id.is_empty() {
            return Some(Msg::error(
                ErrorCode::BadMessage,
                "an offer needs an `id`",
                None,
            ));
        }
        let teller = Teller {
            conn: conn.clone(),
            queue: queue.clone(),
            metrics: relay.metrics.clone(),
        };
        let (relay, identity) = (relay.clone(), conn.identity());
        tokio::spawn(async move {
            let who = identity.as_ref().map(|(user, tier)| Who { user, tier });
            let offered = async {
                let file = relay.files.info(&ask.file).await?;
                offers::may_push(relay.hooks.as_ref(), who, &file)?;
                let from = who.map(|w| w.user).unwrap_or_default();
                relay
                    .offers
                    .offer(from, &ask.file, ask.to, ask.ttl_ms)
                    .await
            };
            match offered.await {
                Ok((offer, delivered)) => teller.tell(Msg::Offered {
                    id: ask.id,
                    offer: offer.id,
                    delivered,
                }),
                Err(e) => {
                    if e.code() == ErrorCode::Internal {
                        tracing::warn!(error = &e as &dyn std::error::Error, "offer failed");
                    }
                    teller.tell(Msg::error(e.code(), e.to_string(), Some(ask.id)));
                }
            }
        });
        None
    }

    /// `cancel_transfer`: an upload keeps what was written; a download stops.
    pub fn cancel(&mut self, id: String) -> Option<Msg> {
        if self.uploads.remove(&id).is_some() {
            return None;
        }
        if let Some(task) = self.downloads.remove(&id) {
            task.abort();
            return None;
        }
        Some(Msg::error(
            ErrorCode::UnknownTransfer,
            "no transfer with this id is open on this connection",
            Some(id),
        ))
    }
}

impl Drop for Transfers {
    fn drop(&mut self) {
        // Uploads end as their channels close (keeping what they wrote).
        for task in self.downloads.values() {
            task.abort();
        }
    }
}

enum Start {
    New {
        size: u64,
        metadata: BTreeMap<String, String>,
    },
    Resume(String),
}

struct UploadTask {
    files: Arc<crate::transfer::storage::Storage>,
    teller: Teller,
    /// The connection's `welcome.session`, under which an interrupted
    /// upload is listed for `hello.resume`.
    session: String,
    user: String,
    id: String,
    chunk_size: u32,
}

impl UploadTask {
    async fn run(self, start: Start, pieces: mpsc::Receiver<Piece>) {
        let opened = match start {
            Start::New { size, metadata } => self.files.create(&self.user, size, &metadata).await,
            Start::Resume(file) => match self.files.info(&file).await {
                Ok(row) if row.owner == self.user => Ok(row),
                Ok(_) => Err(FileError::NotFound),
                Err(e) => Err(e),
            },
        };
        let file = match opened {
            Ok(file) => file,
            Err(e) => return self.teller.fail(&self.id, &e),
        };
        if let Some(sha256) = &file.sha256 {
            // Resuming a file that is already complete.
            return self.teller.tell(Msg::UploadDone {
                id: self.id.clone(),
                file: file.id.clone(),
                size: file.length,
                sha256: sha256.clone(),
            });
        }
        self.teller.tell(Msg::UploadReady {
            id: self.id.clone(),
            file: file.id.clone(),
            offset: file.offset,
            size: file.length,
            chunk_size: self.chunk_size,
        });
        let refuse = {
            let teller = self.teller.clone();
            move |msg| teller.tell(msg)
        };
        let written = upload::receive(
            &self.files,
            self.id.clone(),
            &file,
            self.chunk_size,
            pieces,
            refuse,
        )
        .await;
        match written {
            Ok(done) => match done.sha256 {
                Some(sha256) => self.teller.tell(Msg::UploadDone {
                    id: self.id.clone(),
                    file: done.id,
                    size: done.length,
                    sha256,
                }),
                None => self.files.leave_unfinished(
                    &self.session,
                    &self.user,
                    Unfinished {
                        id: self.id.clone(),
                        file: done.id,
                        offset: done.offset,
                        size: done.length,
                    },
                ),
            },
            Err(e) => {
                self.teller.fail(&self.id, &e);
                if !matches!(e, FileError::NotFound) {
                    self.files.leave_unfinished(
                        &self.session,
                        &self.user,
                        Unfinished {
                            id: self.id.clone(),
                            file: file.id.clone(),
                            offset: 0,
                            size: file.length,
                        },
                    );
                }
            }
        }
    }
}

struct DownloadTask {
    relay: Context,
    teller: Teller,
    identity: Option<(String, String)>,
    id: String,
    chunk_size: u32,
}

impl DownloadTask {
    async fn run(
        self,
        file: String,
        offset: u64,
        offer: Option<String>,
        mut sink: Box<dyn crate::transfer::sink::TransferSink>,
    ) {
        let who = self
            .identity
            .as_ref()
            .map(|(user, tier)| Who { user, tier });
        let file = match self.relay.files.info(&file).await {
            Ok(file) => file,
            Err(e) => return self.teller.fail(&self.id, &e),
        };
        let offered = match &offer {
            Some(offer) => match self.relay.offers.for_recipient(offer, &file.id, who).await {
                Ok(_) => true,
                Err(refused) => {
                    return self.teller.tell(Msg::error(
                        refused.code,
                        refused.reason,
                        Some(self.id),
                    ));
                }
            },
            None => false,
        };
        if let Err(refused) = access::may_download(self.relay.hooks.as_ref(), who, &file, offered) {
            return self
                .teller
                .tell(Msg::error(refused.code, refused.reason, Some(self.id)));
        }
        let Some(path) = self.relay.files.blob_path(&file) else {
            return self.teller.tell(Msg::error(
                ErrorCode::NotFound,
                format!(
                    "the upload is not complete ({} of {} bytes)",
                    file.offset, file.length
                ),
                Some(self.id),
            ));
        };
        if offset > file.length {
            return self.teller.tell(Msg::error(
                ErrorCode::RangeNotSatisfiable,
                format!("offset {offset} is past the file's {} bytes", file.length),
                Some(self.id),
            ));
        }
        let name = access::name(&access::metadata(&file)).to_owned();
        let outgoing = Outgoing {
            id: self.id.clone(),
            file,
            path,
            name,
            offset,
            chunk_size: self.chunk_size,
        };
        if let Some(offer) = &offer {
            self.relay.offers.pulling(offer).await;
        }
        match download::send(outgoing, sink.as_mut()).await {
            Ok(()) => {
                if let Some(offer) = &offer {
                    self.relay.offers.pulled(offer).await;
                }
            }
            Err(Stopped::Peer(why)) => tracing::debug!(id = %self.id, %why, "download stopped"),
            Err(Stopped::Disk(e)) => {
                self.teller.fail(&self.id, &FileError::Io(e));
            }
        }
    }
}

/// A received `chunk` as its writer takes it.
pub(super) fn piece(seq: u64, offset: u64, crc32c: u32, last: bool, data: Data) -> Piece {
    Piece {
        seq,
        offset,
        crc32c,
        last,
        data: data.0,
    }
}
