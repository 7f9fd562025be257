//! File bytes on disk under `<data_dir>/files`: an upload in progress is
//! `uploads/{id}`, a finished file `blobs/{id}`. A file moves to `blobs/`
//! only once every byte is written, fsynced and its SHA-256 computed, so a
//! partial file is never served as complete. The store's row (`store::files`)
//! holds how far an upload has got; bytes past it on disk (a crash between
//! the write and the row) are cut off before the next write.
//!
//! Quotas are reservations: an upload's whole declared length counts
//! against its owner's and the relay's limits from its creation, so one
//! that was accepted never runs out of room half-way. One writer at a time
//! per upload; a second is refused, not interleaved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::{Stream, StreamExt};
use sha2::Digest;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::protocol::{ErrorCode, Unfinished};
use crate::store::files::{self as rows, FileRow};
use crate::store::{Store, StoreError, wall_ms};

/// Limits on what is stored.
#[derive(Debug, Clone)]
pub struct FileLimits {
    pub max_file_bytes: u64,
    /// Bytes one user's files may take (their declared lengths).
    pub user_bytes: u64,
    /// Bytes all files may take.
    pub total_bytes: u64,
    /// An upload untouched this long is abandoned and removed.
    pub upload_ttl_ms: i64,
    /// A finished file is kept this long.
    pub file_ttl_ms: i64,
    /// Uploads one user may have in progress at once.
    pub max_uploads_per_user: u64,
}

/// Why a file operation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("no such file")]
    NotFound,
    #[error("{length} bytes is more than the largest file allowed ({max})")]
    TooLarge { length: u64, max: u64 },
    #[error("{length} more bytes would exceed the {scope} quota of {limit} bytes ({used} in use)")]
    QuotaExceeded {
        scope: &'static str,
        length: u64,
        used: u64,
        limit: u64,
    },
    #[error("the upload is at offset {at}, not {given}")]
    OffsetMismatch { at: u64, given: u64 },
    #[error("another request is writing this upload")]
    Busy,
    #[error("the chunk does not match its {0} checksum; it was discarded")]
    ChecksumMismatch(&'static str),
    #[error(
        "the whole file's SHA-256 is {actual}, not the {expected} declared; the upload starts over at offset 0"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error("{0} uploads in progress already; finish or delete one first")]
    TooManyUploads(u64),
    #[error("the body runs past the upload's length of {0} bytes")]
    BeyondLength(u64),
    #[error("the body stopped: {0}")]
    Body(String),
    #[error("metadata `sha256` must be 64 hex digits, not {0:?}")]
    BadDigest(String),
    #[error("file storage failed")]
    Io(#[from] std::io::Error),
    #[error("the store failed")]
    Store(#[from] StoreError),
}

impl FileError {
    /// The documented error code a client is told.
    pub fn code(&self) -> ErrorCode {
        match self {
            FileError::NotFound => ErrorCode::NotFound,
            FileError::TooLarge { .. } | FileError::BeyondLength(_) => ErrorCode::TooLarge,
            FileError::QuotaExceeded { .. } | FileError::TooManyUploads(_) => {
                ErrorCode::QuotaExceeded
            }
            FileError::OffsetMismatch { .. } => ErrorCode::OffsetMismatch,
            FileError::Busy => ErrorCode::FileBusy,
            FileError::ChecksumMismatch(_) | FileError::DigestMismatch { .. } => {
                ErrorCode::ChecksumMismatch
            }
            FileError::Body(_) => ErrorCode::BadFrame,
            FileError::BadDigest(_) => ErrorCode::BadMessage,
            FileError::Io(_) | FileError::Store(_) => ErrorCode::Internal,
        }
    }
}

/// A chunk's checksum as a client declares it (tus `Upload-Checksum`:
/// `<algorithm> <base64 digest>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: Algorithm,
    pub digest: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha1,
    Sha256,
    Crc32c,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [Algorithm::Sha1, Algorithm::Sha256, Algorithm::Crc32c];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
            Algorithm::Crc32c => "crc32c",
        }
    }
}

impl Checksum {
    /// Reads `sha1 <base64>` (also `sha256`, `crc32c`, big-endian 4 bytes).
    pub fn parse(header: &str) -> Result<Self, String> {
        use base64::Engine;
        let (name, digest) = header
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("expected \"<algorithm> <base64 digest>\", got {header:?}"))?;
        let algorithm = Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| {
                format!("unsupported checksum algorithm {name:?} (sha1, sha256, crc32c)")
            })?;
        let digest = base64::engine::general_purpose::STANDARD
            .decode(digest.trim())
            .map_err(|e| format!("the digest is not base64: {e}"))?;
        let expected = match algorithm {
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
            Algorithm::Crc32c => 4,
        };
        if digest.len() != expected {
            return Err(format!(
                "a {name} digest is {expected} bytes, not {}",
                digest.len()
            ));
        }
        Ok(Self { algorithm, digest })
    }
}

enum Hasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Crc32c(u32),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Crc32c => Hasher::Crc32c(0),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Crc32c(crc) => *crc = crc32c::crc32c_append(*crc, bytes),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Crc32c(crc) => crc.to_be_bytes().to_vec(),
        }
    }
}

pub struct Storage {
    uploads: PathBuf,
    blobs: PathBuf,
    store: Store,
    limits: FileLimits,
    /// Uploads being written now: one writer each.
    writing: DashMap<String, ()>,
    /// Uploads connections left unfinished, by the session that left them
    /// (for `hello.resume`); forgotten after the upload TTL.
    unfinished: DashMap<String, Left>,
}

/// What one session left unfinished.
struct Left {
    user: String,
    uploads: Vec<Unfinished>,
    at_ms: i64,
}

/// Holds an upload's single-writer place until dropped.
struct Writing<'a>(&'a DashMap<String, ()>, String);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

/// A file's SHA-256, hex (blocking: read on a blocking thread).
fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes gathered before a write to an upload's file.
const WRITE_BUFFER: usize = 256 * 1024;

/// The metadata key under which an uploader may declare the whole file's
/// hex SHA-256, checked before the file is complete.
pub const DIGEST_KEY: &str = "sha256";

/// How finishing an upload went.
enum Finished {
    Digest(String),
    /// Not the declared digest: this one.
    Mismatch(String),
}

fn declared_digest(file: &FileRow) -> Option<String> {
    serde_json::from_str::<BTreeMap<String, String>>(&file.metadata)
        .ok()?
        .remove(DIGEST_KEY)
        .map(|d| d.to_ascii_lowercase())
}

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Ids are 32 hex digits: nothing else names a file on disk.
fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Storage {
    /// Uses (and creates) `dir/uploads` and `dir/blobs`.
    pub fn open(dir: &Path, store: Store, limits: FileLimits) -> std::io::Result<Self> {
        let uploads = dir.join("uploads");
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&uploads)?;
        std::fs::create_dir_all(&blobs)?;
        Ok(Self {
            uploads,
            blobs,
            store,
            limits,
            writing: DashMap::new(),
            unfinished: DashMap::new(),
        })
    }

    /// Starts an upload of `length` bytes for `owner`, within the limits.
    pub async fn create(
        &self,
        owner: &str,
        length: u64,
        metadata: &BTreeMap<String, String>,
    ) -> Result<FileRow, FileError> {
        if length > self.limits.max_file_bytes {
            return Err(FileError::TooLarge {
                length,
                max: self.limits.max_file_bytes,
            });
        }
        if let Some(declared) = metadata.get(DIGEST_KEY)
            && !is_sha256_hex(declared)
        {
            return Err(FileError::BadDigest(declared.clone()));
        }
        let id = crate::secrets::random_hex(16)?;
        let now = wall_ms();
        let row = FileRow {
            id: id.clone(),
            owner: owner.to_owned(),
            length,
            offset: 0,
            metadata: serde_json::to_string(metadata).expect("a map of strings serializes"),
            sha256: None,
            created_at_ms: now,
            expires_at_ms: now + self.limits.upload_ttl_ms,
        };
        tokio::fs::File::create(self.uploads.join(&id)).await?;
        let limits = self.limits.clone();
        let (owner, inserted) = (owner.to_owned(), row.clone());
        // Checked and reserved in one store call: two creations cannot both
        // take the last of a quota.
        let reserved = self
            .store
            .call(move |conn| {
                let (user, total) = rows::committed_bytes(conn, &owner)?;
                let open = rows::uploads_in_progress(conn, &owner)?;
                let refusal = if open >= limits.max_uploads_per_user {
                    Some(("uploads", open, limits.max_uploads_per_user))
                } else if user + length > limits.user_bytes {
                    Some(("user", user, limits.user_bytes))
                } else if total + length > limits.total_bytes {
                    Some(("total", total, limits.total_bytes))
                } else {
                    rows::insert(conn, &inserted)?;
                    None
                };
                Ok(refusal)
            })
            .await;
        match reserved {
            Ok(None) => Ok(row),
            Ok(Some(("uploads", _, limit))) => {
                let _ = tokio::fs::remove_file(self.uploads.join(&id)).await;
                Err(FileError::TooManyUploads(limit))
            }
            Ok(Some((scope, used, limit))) => {
                let _ = tokio::fs::remove_file(self.uploads.join(&id)).await;
                Err(FileError::QuotaExceeded {
                    scope,
                    length,
                    used,
                    limit,
                })
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(self.uploads.join(&id)).await;
                Err(e.into())
            }
        }
    }

    pub async fn info(&self, id: &str) -> Result<FileRow, FileError> {
        if !valid_id(id) {
            return Err(FileError::NotFound);
        }
        let id = id.to_owned();
        self.store
            .call(move |conn| rows::get(conn, &id))
            .await?
            .ok_or(FileError::NotFound)
    }

    /// Where a finished file's bytes are.
    pub fn blob_path(&self, file: &FileRow) -> Option<PathBuf> {
        file.sha256.as_ref().map(|_| self.blobs.join(&file.id))
    }

    /// Writes `body` at `offset` (which must be where the upload is). With a
    /// checksum, a chunk that does not match is discarded whole; without
    /// one, bytes received before the body broke off are kept, so the
    /// client resumes from there. The last chunk finishes the file.
    pub async fn append<S, E>(
        &self,
        id: &str,
        offset: u64,
        checksum: Option<Checksum>,
        mut body: S,
    ) -> Result<FileRow, FileError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.info(id).await?;
        if self.writing.insert(id.to_owned(), ()).is_some() {
            return Err(FileError::Busy);
        }
        let _writing = Writing(&self.writing, id.to_owned());
        // Read again under the writer's place: the previous writer may have
        // moved it on since.
        let mut file = self.info(id).await?;
        if file.sha256.is_none() && file.offset < file.length && self.recover(&file).await? {
            file = self.info(id).await?;
        }
        if offset != file.offset {
            return Err(FileError::OffsetMismatch {
                at: file.offset,
                given: offset,
            });
        }
        let path = self.uploads.join(id);
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .await?;
        // Bytes past the recorded offset were never acknowledged.
        out.set_len(offset).await?;
        out.seek(std::io::SeekFrom::Start(offset)).await?;
        // Small body frames are gathered into large writes: each write is a
        // trip to a blocking thread.
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, out);
        let mut hasher = checksum.as_ref().map(|c| Hasher::new(c.algorithm));
        // An upload written whole in one go is digested as it is written,
        // which saves reading the file back at the end.
        let mut whole = (offset == 0).then(sha2::Sha256::new);
        let mut written = 0u64;
        let room = file.length - offset;
        let mut broke = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    broke = Some(e.to_string());
                    break;
                }
            };
            if written + chunk.len() as u64 > room {
                // What is still buffered is dropped with it.
                out.into_inner().set_len(offset).await?;
                return Err(FileError::BeyondLength(file.length));
            }
            out.write_all(&chunk).await?;
            if let Some(hasher) = &mut hasher {
                hasher.update(&chunk);
            }
            if let Some(whole) = &mut whole {
                whole.update(&chunk);
            }
            written += chunk.len() as u64;
        }
        if let (Some(hasher), Some(checksum)) = (hasher, &checksum)
            && (broke.is_some() || hasher.finish() != checksum.digest)
        {
            out.into_inner().set_len(offset).await?;
            return Err(match broke {
                Some(why) => FileError::Body(why),
                None => FileError::ChecksumMismatch(checksum.algorithm.name()),
            });
        }
        out.flush().await?;
        let out = out.into_inner();
        out.sync_data().await?;
        drop(out);
        let reached = offset + written;
        let now = wall_ms();
        let (sha256, expires) = if reached == file.length {
            let declared = declared_digest(&file);
            let digested = whole.map(|whole| hex(&whole.finalize()));
            match self.finish(id, declared.as_deref(), digested).await? {
                Finished::Digest(digest) => (Some(digest), now + self.limits.file_ttl_ms),
                Finished::Mismatch(actual) => {
                    self.restart(id).await?;
                    return Err(FileError::DigestMismatch {
                        expected: declared.unwrap_or_default(),
                        actual,
                    });
                }
            }
        } else {
            (None, now + self.limits.upload_ttl_ms)
        };
        let (key, digest) = (id.to_owned(), sha256.clone());
        let recorded = self
            .store
            .call(move |conn| rows::advance(conn, &key, reached, digest.as_deref(), expires))
            .await?;
        if !recorded {
            // Deleted while it was being written.
            self.remove_bytes(id).await;
            return Err(FileError::NotFound);
        }
        file.offset = reached;
        file.sha256 = sha256;
        file.expires_at_ms = expires;
        match broke {
            Some(why) => Err(FileError::Body(why)),
            None => Ok(file),
        }
    }

    /// Digests a complete upload (unless `digested` already did) and, when
    /// it is what was declared (if anything was), moves it among the
    /// finished files.
    async fn finish(
        &self,
        id: &str,
        declared: Option<&str>,
        digested: Option<String>,
    ) -> Result<Finished, FileError> {
        let (from, to, blobs) = (
            self.uploads.join(id),
            self.blobs.join(id),
            self.blobs.clone(),
        );
        let declared = declared.map(str::to_owned);
        let finished = tokio::task::spawn_blocking(move || -> std::io::Result<Finished> {
            let digest = match digested {
                Some(digest) => digest,
                None => sha256_of(&from)?,
            };
            if declared.is_some_and(|declared| declared != digest) {
                return Ok(Finished::Mismatch(digest));
            }
            std::fs::rename(&from, &to)?;
            // The rename is durable once the directory is.
            std::fs::File::open(&blobs)?.sync_all()?;
            Ok(Finished::Digest(digest))
        })
        .await
        .map_err(|e| FileError::Io(std::io::Error::other(e)))??;
        Ok(finished)
    }

    /// Empties an upload whose whole-file digest did not match: which bytes
    /// are wrong cannot be known, so it starts over (its quota kept).
    async fn restart(&self, id: &str) -> Result<(), FileError> {
        tokio::fs::OpenOptions::new()
            .write(true)
            .open(self.uploads.join(id))
            .await?
            .set_len(0)
            .await?;
        let (key, expires) = (id.to_owned(), wall_ms() + self.limits.upload_ttl_ms);
        self.store
            .call(move |conn| rows::advance(conn, &key, 0, None, expires))
            .await?;
        Ok(())
    }

    /// A finished file whose row a crash left unfinished (the rename
    /// happened, the row's update did not): completes the row. Whether it
    /// did.
    async fn recover(&self, file: &FileRow) -> Result<bool, FileError> {
        let blob = self.blobs.join(&file.id);
        if tokio::fs::try_exists(self.uploads.join(&file.id)).await?
            || !tokio::fs::try_exists(&blob).await?
        {
            return Ok(false);
        }
        let digest = tokio::task::spawn_blocking(move || sha256_of(&blob))
            .await
            .map_err(|e| FileError::Io(std::io::Error::other(e)))??;
        let (key, length, expires) = (
            file.id.clone(),
            file.length,
            wall_ms() + self.limits.file_ttl_ms,
        );
        self.store
            .call(move |conn| rows::advance(conn, &key, length, Some(&digest), expires))
            .await?;
        Ok(true)
    }

    /// Keeps finished file `id` at least until `until_ms` (an offer of it
    /// is open that long).
    pub async fn keep_until(&self, id: &str, until_ms: i64) -> Result<(), FileError> {
        let key = id.to_owned();
        let kept = self
            .store
            .call(move |conn| rows::keep_until(conn, &key, until_ms))
            .await?;
        if kept {
            Ok(())
        } else {
            Err(FileError::NotFound)
        }
    }

    /// Removes a file or an upload, bytes and row.
    pub async fn delete(&self, id: &str) -> Result<(), FileError> {
        let file = self.info(id).await?;
        if self.writing.contains_key(id) {
            return Err(FileError::Busy);
        }
        let key = file.id.clone();
        self.store
            .call(move |conn| rows::delete(conn, &key))
            .await?;
        self.remove_bytes(&file.id).await;
        Ok(())
    }

    async fn remove_bytes(&self, id: &str) {
        let _ = tokio::fs::remove_file(self.uploads.join(id)).await;
        let _ = tokio::fs::remove_file(self.blobs.join(id)).await;
    }

    /// Notes that `session` (of `user`) left `upload` unfinished.
    pub fn leave_unfinished(&self, session: &str, user: &str, upload: Unfinished) {
        let mut left = self
            .unfinished
            .entry(session.to_owned())
            .or_insert_with(|| Left {
                user: user.to_owned(),
                uploads: Vec::new(),
                at_ms: wall_ms(),
            });
        left.uploads.retain(|u| u.file != upload.file);
        left.uploads.push(upload);
        left.at_ms = wall_ms();
    }

    /// The uploads `session` left unfinished, if `user` is who left them.
    pub fn take_unfinished(&self, session: &str, user: &str) -> Vec<Unfinished> {
        self.unfinished
            .remove_if(session, |_, left| left.user == user)
            .map(|(_, left)| left.uploads)
            .unwrap_or_default()
    }

    /// Removes uploads abandoned past their TTL and files past theirs; how many.
    pub async fn expire(&self) -> Result<usize, FileError> {
        let now = wall_ms();
        let ttl = self.limits.upload_ttl_ms;
        self.unfinished.retain(|_, left| now - left.at_ms < ttl);
        // An upload being written now is not abandoned, however long its
        // body takes.
        let busy: Vec<String> = self.writing.iter().map(|e| e.key().clone()).collect();
        let expired = self
            .store
            .call(move |conn| rows::take_expired(conn, now, &busy))
            .await?;
        for id in &expired {
            self.remove_bytes(id).await;
        }
        Ok(expired.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FileLimits {
        FileLimits {
            max_file_bytes: 1 << 20,
            user_bytes: 1 << 20,
            total_bytes: 3 << 19,
            upload_ttl_ms: 60_000,
            file_ttl_ms: 60_000,
            max_uploads_per_user: 4,
        }
    }

    async fn storage(dir: &Path) -> Storage {
        let store = Store::open(&dir.join("wasmrelay.db")).unwrap();
        Storage::open(&dir.join("files"), store, limits()).unwrap()
    }

    fn body(parts: &[&[u8]]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::copy_from_slice(p)))
                .collect::<Vec<_>>(),
        )
    }

    /// A body that yields what `next` gives until it gives nothing.
    fn async_stream<F>(next: F) -> impl Stream<Item = Result<Bytes, std::io::Error>>
    where
        F: std::future::Future<Output = Option<Result<Bytes, std::io::Error>>>,
    {
        futures_util::stream::once(next).filter_map(|item| async move { item })
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn checksum(algorithm: &str, digest: &[u8]) -> Checksum {
        use base64::Engine;
        Checksum::parse(&format!(
            "{algorithm} {}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn an_upload_in_chunks_resumes_and_finishes_with_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage(dir.path()).await;
        let whole = b"hello, resumable world".to_vec();
        let file = storage
            .create("ann", whole.len() as u64, &BTreeMap::new())
            .await
            .unwrap();
        // A body that breaks after 5 bytes keeps them.
        let broken = futures_util::stream::iter(vec![
            Ok(Bytes::copy_from_slice(&whole[..5])),
            Err(std::io::Error::other("connection reset")),
        ]);
        assert!(matches!(
            storage.append(&file.id, 0, None, broken).await,
            Err(FileError::Body(_))
        ));
        assert_eq!(storage.info(&file.id).await.unwrap().offset, 5);
        assert!(matches!(
            storage.append(&file.id, 0, None, body(&[b"x"])).await,
            Err(FileError::OffsetMismatch { at: 5, given: 0 })
        ));
        // A chunk whose checksum fails is discarded; the offset stays.
        let bad = checksum("sha1", &[0; 20]);
        assert!(matches!(
            storage
                .append(&file.id, 5, Some(bad), body(&[&whole[5..10]]))
                .await,
            Err(FileError::ChecksumMismatch("sha1"))
        ));
        assert_eq!(storage.info(&file.id).await.unwrap().offset, 5);
        let good = checksum("crc32c", &crc32c::crc32c(&whole[5..10]).to_be_bytes());
        let file = storage
            .append(&file.id, 5, Some(good), body(&[&whole[5..10]]))
            .await
            .unwrap();
        assert_eq!((file.offset, file.sha256.as_deref()), (10, None));
        assert!(
            storage.blob_path(&file).is_none(),
            "not served before it is complete"
        );
        let sha = sha2::Sha256::digest(&whole[10..]).to_vec();
        let file = storage
            .append(
                &file.id,
                10,
                Some(checksum("sha256", &sha)),
                body(&[&whole[10..15], &whole[15..]]),
            )
            .await
            .unwrap();
        assert_eq!(file.sha256.as_deref(), Some(sha256_hex(&whole).as_str()));
        let on_disk = std::fs::read(storage.blob_path(&file).unwrap()).unwrap();
        assert_eq!(on_disk, whole);
        assert!(!dir.path().join("files/uploads").join(&file.id).exists());
    }

    #[tokio::test]
    async fn quotas_refuse_at_creation_and_bodies_past_the_length_are_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage(dir.path()).await;
        assert!(matches!(
            storage.create("ann", (1 << 20) + 1, &BTreeMap::new()).await,
            Err(FileError::TooLarge { .. })
        ));
        let big = storage
            .create("ann", 1 << 20, &BTreeMap::new())
            .await
            .unwrap();
        assert!(matches!(
            storage.create("ann", 1, &BTreeMap::new()).await,
            Err(FileError::QuotaExceeded { scope: "user", .. })
        ));
        assert!(
            storage
                .create("bob", 1 << 19, &BTreeMap::new())
                .await
                .is_ok()
        );
        assert!(matches!(
            storage.create("cid", 1, &BTreeMap::new()).await,
            Err(FileError::QuotaExceeded { scope: "total", .. })
        ));
        assert!(matches!(
            storage
                .append(&big.id, 0, None, body(&[&vec![1; (1 << 20) + 1]]))
                .await,
            Err(FileError::BeyondLength(_))
        ));
        assert_eq!(
            storage.info(&big.id).await.unwrap().offset,
            0,
            "nothing half-written"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("files/uploads").join(&big.id))
                .unwrap()
                .len(),
            0
        );
        storage.delete(&big.id).await.unwrap();
        assert!(
            storage.create("ann", 1, &BTreeMap::new()).await.is_ok(),
            "deleting frees the quota"
        );
        assert!(matches!(
            storage.info("../../etc/passwd").await,
            Err(FileError::NotFound)
        ));
    }

    #[tokio::test]
    async fn one_writer_at_a_time_and_abandoned_uploads_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("wasmrelay.db")).unwrap();
        let storage = Storage::open(
            &dir.path().join("files"),
            store,
            FileLimits {
                upload_ttl_ms: 0,
                ..limits()
            },
        )
        .unwrap();
        let file = storage.create("ann", 4, &BTreeMap::new()).await.unwrap();
        // A first writer whose body has not arrived yet holds the upload.
        let (feed, mut waiting) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stalled = Box::pin(async_stream(async move { waiting.recv().await }));
        let first = storage.append(&file.id, 0, None, stalled);
        let second = async {
            tokio::task::yield_now().await;
            let refused = storage.append(&file.id, 0, None, body(&[b"zz"])).await;
            // Past its TTL, but being written: not abandoned.
            let expired = storage.expire().await.unwrap();
            drop(feed);
            (refused, expired)
        };
        let (first, (second, expired_while_written)) = tokio::join!(first, second);
        assert!(matches!(second, Err(FileError::Busy)), "{second:?}");
        assert_eq!(expired_while_written, 0);
        assert_eq!(first.unwrap().offset, 0);
        assert_eq!(storage.expire().await.unwrap(), 1);
        assert!(matches!(
            storage.info(&file.id).await,
            Err(FileError::NotFound)
        ));
        assert!(!dir.path().join("files/uploads").join(&file.id).exists());
    }
}
