//! Channel history in the store, for channels whose rule says `persist`:
//! each channel's epoch and last seq, its kept messages, and the flag that
//! says the relay stopped cleanly. `channels::persist` decides what to
//! write and when; this module only reads and writes rows.

use rusqlite::{Connection, OptionalExtension, params};

/// One kept message.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRow {
    pub seq: u64,
    pub at_ms: i64,
    pub data: Vec<u8>,
}

/// One channel as stored: its sequence and kept messages, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelRow {
    pub channel: String,
    pub epoch: String,
    pub last_seq: u64,
    pub messages: Vec<MessageRow>,
}

/// A change to write.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryWrite {
    /// The channel's sequence now, its new messages, and the first seq
    /// still kept (rows below it go).
    Changed {
        channel: String,
        epoch: String,
        last_seq: u64,
        first_kept: u64,
        added: Vec<MessageRow>,
    },
    /// The channel was forgotten: all its rows go.
    Forgotten { channel: String },
}

const CLEAN: &str = "history_clean";

/// What a start finds.
#[derive(Debug, Clone, PartialEq)]
pub enum Loaded {
    /// The last stop was clean: the channels as they were.
    Clean(Vec<ChannelRow>),
    /// The relay did not stop cleanly: seqs after the last write may have
    /// reached clients, so the stored history of this many channels was
    /// discarded (their epochs change).
    Discarded(usize),
}

/// Reads the stored history and marks the store "running" (not clean)
/// until [`mark_clean`].
pub fn load(conn: &mut Connection) -> rusqlite::Result<Loaded> {
    let tx = conn.transaction()?;
    let clean: Option<i64> = tx
        .query_row(
            "SELECT value FROM relay_flags WHERE name = ?1",
            params![CLEAN],
            |row| row.get(0),
        )
        .optional()?;
    let count: i64 = tx.query_row("SELECT COUNT(*) FROM channel_meta", [], |row| row.get(0))?;
    let loaded = if clean == Some(1) || count == 0 {
        let mut channels: Vec<ChannelRow> = {
            let mut statement =
                tx.prepare("SELECT channel, epoch, last_seq FROM channel_meta ORDER BY channel")?;
            let rows = statement.query_map([], |row| {
                Ok(ChannelRow {
                    channel: row.get(0)?,
                    epoch: row.get(1)?,
                    last_seq: row.get::<_, i64>(2)? as u64,
                    messages: Vec::new(),
                })
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        {
            let mut statement = tx.prepare(
                "SELECT seq, at_ms, data FROM channel_history WHERE channel = ?1 ORDER BY seq",
            )?;
            for channel in &mut channels {
                let rows = statement.query_map(params![channel.channel], |row| {
                    Ok(MessageRow {
                        seq: row.get::<_, i64>(0)? as u64,
                        at_ms: row.get(1)?,
                        data: row.get(2)?,
                    })
                })?;
                channel.messages = rows.collect::<rusqlite::Result<_>>()?;
            }
        }
        Loaded::Clean(channels)
    } else {
        tx.execute("DELETE FROM channel_history", [])?;
        tx.execute("DELETE FROM channel_meta", [])?;
        Loaded::Discarded(count as usize)
    };
    tx.execute(
        "INSERT INTO relay_flags (name, value) VALUES (?1, 0)
         ON CONFLICT (name) DO UPDATE SET value = 0",
        params![CLEAN],
    )?;
    tx.commit()?;
    Ok(loaded)
}

/// Writes `writes` in order, in one transaction.
pub fn apply(conn: &mut Connection, writes: &[HistoryWrite], now_ms: i64) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut meta = tx.prepare_cached(
            "INSERT INTO channel_meta (channel, epoch, last_seq, updated_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (channel) DO UPDATE
             SET epoch = excluded.epoch, last_seq = excluded.last_seq, updated_at_ms = excluded.updated_at_ms",
        )?;
        let mut add = tx.prepare_cached(
            "INSERT OR REPLACE INTO channel_history (channel, seq, at_ms, data) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut trim =
            tx.prepare_cached("DELETE FROM channel_history WHERE channel = ?1 AND seq < ?2")?;
        let mut forget_meta = tx.prepare_cached("DELETE FROM channel_meta WHERE channel = ?1")?;
        let mut forget_history =
            tx.prepare_cached("DELETE FROM channel_history WHERE channel = ?1")?;
        for write in writes {
            match write {
                HistoryWrite::Changed {
                    channel,
                    epoch,
                    last_seq,
                    first_kept,
                    added,
                } => {
                    meta.execute(params![channel, epoch, *last_seq as i64, now_ms])?;
                    trim.execute(params![channel, *first_kept as i64])?;
                    for message in added {
                        add.execute(params![
                            channel,
                            message.seq as i64,
                            message.at_ms,
                            message.data
                        ])?;
                    }
                }
                HistoryWrite::Forgotten { channel } => {
                    forget_meta.execute(params![channel])?;
                    forget_history.execute(params![channel])?;
                }
            }
        }
    }
    tx.commit()
}

/// Marks the stop clean: every write before this one reached the store.
pub fn mark_clean(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO relay_flags (name, value) VALUES (?1, 1)
         ON CONFLICT (name) DO UPDATE SET value = 1",
        params![CLEAN],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(crate::store::Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        (dir, conn)
    }

    fn changed(seq: u64, first_kept: u64) -> HistoryWrite {
        HistoryWrite::Changed {
            channel: "chat/a".into(),
            epoch: "e1".into(),
            last_seq: seq,
            first_kept,
            added: vec![MessageRow {
                seq,
                at_ms: 5,
                data: format!("m{seq}").into_bytes(),
            }],
        }
    }

    #[test]
    fn a_clean_stop_keeps_history_and_a_crash_discards_it() {
        let (_dir, mut conn) = store();
        assert_eq!(load(&mut conn).unwrap(), Loaded::Clean(Vec::new()));
        apply(&mut conn, &[changed(1, 1), changed(2, 1), changed(3, 2)], 9).unwrap();
        mark_clean(&mut conn).unwrap();
        let Loaded::Clean(channels) = load(&mut conn).unwrap() else {
            panic!("clean stop");
        };
        assert_eq!(channels.len(), 1);
        assert_eq!(channels[0].epoch, "e1");
        assert_eq!(channels[0].last_seq, 3);
        let seqs: Vec<u64> = channels[0].messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [2, 3], "1 was trimmed");
        // No mark_clean this time: a crash.
        assert_eq!(load(&mut conn).unwrap(), Loaded::Discarded(1));
        assert_eq!(load(&mut conn).unwrap(), Loaded::Clean(Vec::new()));
    }

    #[test]
    fn a_forgotten_channel_loses_its_rows() {
        let (_dir, mut conn) = store();
        load(&mut conn).unwrap();
        apply(&mut conn, &[changed(1, 1)], 9).unwrap();
        apply(
            &mut conn,
            &[HistoryWrite::Forgotten {
                channel: "chat/a".into(),
            }],
            9,
        )
        .unwrap();
        mark_clean(&mut conn).unwrap();
        assert_eq!(load(&mut conn).unwrap(), Loaded::Clean(Vec::new()));
    }
}
