//! Files in the store: one row per upload, in progress (`sha256` empty,
//! `offset < length`) or finished. The bytes live on disk
//! (`transfer::storage`); the row's `offset` is what has been written and
//! made durable, so a crash between a write and its row never claims bytes
//! that are not there.

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    pub id: String,
    /// The user who uploaded it (as the policy named them).
    pub owner: String,
    pub length: u64,
    pub offset: u64,
    /// The upload's metadata (tus `Upload-Metadata`), as a JSON object.
    pub metadata: String,
    /// Hex SHA-256 of the whole file, once it is complete.
    pub sha256: Option<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

const COLUMNS: &str = "id, owner, length, offset, metadata, sha256, created_at_ms, expires_at_ms";

fn file_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<FileRow> {
    Ok(FileRow {
        id: row.get(0)?,
        owner: row.get(1)?,
        length: row.get::<_, i64>(2)? as u64,
        offset: row.get::<_, i64>(3)? as u64,
        metadata: row.get(4)?,
        sha256: row.get(5)?,
        created_at_ms: row.get(6)?,
        expires_at_ms: row.get(7)?,
    })
}

pub fn insert(conn: &mut Connection, file: &FileRow) -> rusqlite::Result<()> {
    conn.execute(
        &format!("INSERT INTO files ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
        params![
            file.id,
            file.owner,
            file.length as i64,
            file.offset as i64,
            file.metadata,
            file.sha256,
            file.created_at_ms,
            file.expires_at_ms
        ],
    )?;
    Ok(())
}

pub fn get(conn: &mut Connection, id: &str) -> rusqlite::Result<Option<FileRow>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM files WHERE id = ?1"),
        params![id],
        file_row,
    )
    .optional()
}

/// Records what has been written; `sha256` when the file is complete.
pub fn advance(
    conn: &mut Connection,
    id: &str,
    offset: u64,
    sha256: Option<&str>,
    expires_at_ms: i64,
) -> rusqlite::Result<bool> {
    Ok(conn.execute(
        "UPDATE files SET offset = ?2, sha256 = coalesce(?3, sha256), expires_at_ms = ?4 WHERE id = ?1",
        params![id, offset as i64, sha256, expires_at_ms],
    )? > 0)
}

/// Keeps a finished file at least until `until_ms`.
pub fn keep_until(conn: &mut Connection, id: &str, until_ms: i64) -> rusqlite::Result<bool> {
    Ok(conn.execute(
        "UPDATE files SET expires_at_ms = max(expires_at_ms, ?2) WHERE id = ?1 AND sha256 IS NOT NULL",
        params![id, until_ms],
    )? > 0)
}

pub fn delete(conn: &mut Connection, id: &str) -> rusqlite::Result<bool> {
    Ok(conn.execute("DELETE FROM files WHERE id = ?1", params![id])? > 0)
}

/// Bytes promised to `owner`'s files (their full lengths) and to everyone's.
pub fn committed_bytes(conn: &mut Connection, owner: &str) -> rusqlite::Result<(u64, u64)> {
    conn.query_row(
        "SELECT coalesce(sum(CASE WHEN owner = ?1 THEN length END), 0), coalesce(sum(length), 0) FROM files",
        params![owner],
        |row| Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64)),
    )
}

/// How many of `owner`'s uploads are still in progress.
pub fn uploads_in_progress(conn: &mut Connection, owner: &str) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT count(*) FROM files WHERE owner = ?1 AND sha256 IS NULL",
        params![owner],
        |row| Ok(row.get::<_, i64>(0)? as u64),
    )
}

/// Files whose time is up at `now_ms`, except those in `busy`: removed from
/// the table and returned so their bytes can be deleted.
pub fn take_expired(
    conn: &mut Connection,
    now_ms: i64,
    busy: &[String],
) -> rusqlite::Result<Vec<String>> {
    let tx = conn.transaction()?;
    let ids: Vec<String> = {
        let mut statement = tx.prepare("SELECT id FROM files WHERE expires_at_ms <= ?1")?;
        let rows = statement.query_map(params![now_ms], |row| row.get::<_, String>(0))?;
        rows.filter(|id| !matches!(id, Ok(id) if busy.contains(id)))
            .collect::<rusqlite::Result<_>>()?
    };
    for id in &ids {
        tx.execute("DELETE FROM files WHERE id = ?1", params![id])?;
    }
    tx.commit()?;
    Ok(ids)
}
