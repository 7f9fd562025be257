//! Offers in the store: one row per file pushed to a user, a channel or a
//! session, with its delivery state (`transfer::offers` owns the rules).

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OfferRow {
    pub id: String,
    pub file: String,
    /// Who offered it (a user, or `operator`, or `task:NAME`).
    pub from: String,
    /// `user`, `channel` or `session`.
    pub target_kind: String,
    pub target: String,
    /// For a session: the user it belonged to (empty if anonymous). For a
    /// user: that user.
    pub to_user: String,
    /// `offered`, `pulling`, `done`, `expired`, `failed`.
    pub state: String,
    /// Downloads started with this offer.
    pub pulls: u64,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

const COLUMNS: &str = "id, file, from_user, target_kind, target, to_user, state, pulls, \
     created_at_ms, expires_at_ms, updated_at_ms, reason";

fn offer_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<OfferRow> {
    Ok(OfferRow {
        id: row.get(0)?,
        file: row.get(1)?,
        from: row.get(2)?,
        target_kind: row.get(3)?,
        target: row.get(4)?,
        to_user: row.get(5)?,
        state: row.get(6)?,
        pulls: row.get::<_, i64>(7)? as u64,
        created_at_ms: row.get(8)?,
        expires_at_ms: row.get(9)?,
        updated_at_ms: row.get(10)?,
        reason: row.get(11)?,
    })
}

pub fn insert(conn: &mut Connection, offer: &OfferRow) -> rusqlite::Result<()> {
    conn.execute(
        &format!(
            "INSERT INTO offers ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
        ),
        params![
            offer.id,
            offer.file,
            offer.from,
            offer.target_kind,
            offer.target,
            offer.to_user,
            offer.state,
            offer.pulls as i64,
            offer.created_at_ms,
            offer.expires_at_ms,
            offer.updated_at_ms,
            offer.reason
        ],
    )?;
    Ok(())
}

pub fn get(conn: &mut Connection, id: &str) -> rusqlite::Result<Option<OfferRow>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM offers WHERE id = ?1"),
        params![id],
        offer_row,
    )
    .optional()
}

/// Offers of `kind` to `target` still open (offered or pulling) at `now_ms`.
pub fn open_for(
    conn: &mut Connection,
    kind: &str,
    target: &str,
    now_ms: i64,
) -> rusqlite::Result<Vec<OfferRow>> {
    let mut statement = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM offers WHERE target_kind = ?1 AND target = ?2 \
         AND state IN ('offered', 'pulling') AND expires_at_ms > ?3 ORDER BY created_at_ms"
    ))?;
    let rows = statement.query_map(params![kind, target, now_ms], offer_row)?;
    rows.collect()
}

/// The users and sessions with offers open at `now_ms`, as `kind:target`.
pub fn open_targets(conn: &mut Connection, now_ms: i64) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare(
        "SELECT DISTINCT target_kind || ':' || target FROM offers \
         WHERE state IN ('offered', 'pulling') AND expires_at_ms > ?1 AND target_kind != 'channel'",
    )?;
    let rows = statement.query_map(params![now_ms], |row| row.get::<_, String>(0))?;
    rows.collect()
}

/// Moves an offer on: a pull started (`pulling`, counted; a `done` offer
/// stays done) or finished (`done`). Whether it was still pullable.
pub fn advance(
    conn: &mut Connection,
    id: &str,
    state: &str,
    now_ms: i64,
) -> rusqlite::Result<bool> {
    let counted = if state == "pulling" { 1 } else { 0 };
    Ok(conn.execute(
        "UPDATE offers SET state = CASE WHEN state = 'done' THEN 'done' ELSE ?2 END, \
         pulls = pulls + ?3, updated_at_ms = ?4 \
         WHERE id = ?1 AND state IN ('offered', 'pulling', 'done')",
        params![id, state, counted, now_ms],
    )? > 0)
}

/// Ends an open offer as `failed` with `reason` (its file is gone).
pub fn fail(conn: &mut Connection, id: &str, reason: &str, now_ms: i64) -> rusqlite::Result<bool> {
    Ok(conn.execute(
        "UPDATE offers SET state = 'failed', reason = ?2, updated_at_ms = ?3 \
         WHERE id = ?1 AND state IN ('offered', 'pulling')",
        params![id, reason, now_ms],
    )? > 0)
}

/// Expires the open offers whose time is up and forgets offers whose TTL
/// ended more than `keep_ms` ago; how many expired.
pub fn expire(conn: &mut Connection, now_ms: i64, keep_ms: i64) -> rusqlite::Result<usize> {
    let expired = conn.execute(
        "UPDATE offers SET state = 'expired', updated_at_ms = ?1 \
         WHERE state IN ('offered', 'pulling') AND expires_at_ms <= ?1",
        params![now_ms],
    )?;
    conn.execute(
        "DELETE FROM offers WHERE state IN ('done', 'expired', 'failed') AND expires_at_ms <= ?1",
        params![now_ms - keep_ms],
    )?;
    Ok(expired)
}

/// The newest offers, of one file and/or in one state, at most `limit`.
pub fn list(
    conn: &mut Connection,
    file: Option<&str>,
    state: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<OfferRow>> {
    let mut statement = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM offers WHERE (?1 IS NULL OR file = ?1) AND (?2 IS NULL OR state = ?2) \
         ORDER BY created_at_ms DESC, id LIMIT ?3"
    ))?;
    let rows = statement.query_map(params![file, state, limit as i64], offer_row)?;
    rows.collect()
}
