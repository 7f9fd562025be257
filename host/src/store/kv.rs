//! Plugin key-value data in the store: rows of (namespace, key, value,
//! expiry), loaded whole at start and written back in batches. The live
//! copy that plugins read and write synchronously stays in memory
//! (`plugin::host_api::KvStore`); this module only persists it.

use rusqlite::{Connection, params};

/// One stored entry. `expires_at_ms` is wall-clock milliseconds since the
/// Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct KvRow {
    pub namespace: String,
    pub key: String,
    pub value: Vec<u8>,
    pub expires_at_ms: Option<i64>,
}

/// A change to write.
#[derive(Debug, Clone, PartialEq)]
pub enum KvChange {
    Put(KvRow),
    Delete {
        namespace: String,
        key: String,
    },
    /// Every key of a namespace (its plugin was removed).
    Clear {
        namespace: String,
    },
}

/// Every entry not expired at `now_ms`; expired ones are deleted.
pub fn load(conn: &mut Connection, now_ms: i64) -> rusqlite::Result<Vec<KvRow>> {
    conn.execute(
        "DELETE FROM kv WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1",
        params![now_ms],
    )?;
    let mut statement =
        conn.prepare("SELECT namespace, key, value, expires_at_ms FROM kv ORDER BY namespace")?;
    let rows = statement.query_map([], |row| {
        Ok(KvRow {
            namespace: row.get(0)?,
            key: row.get(1)?,
            value: row.get(2)?,
            expires_at_ms: row.get(3)?,
        })
    })?;
    rows.collect()
}

/// Writes `changes` in order, in one transaction.
pub fn apply(conn: &mut Connection, changes: &[KvChange]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO kv (namespace, key, value, expires_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (namespace, key) DO UPDATE
             SET value = excluded.value, expires_at_ms = excluded.expires_at_ms",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM kv WHERE namespace = ?1 AND key = ?2")?;
        let mut clear = tx.prepare_cached("DELETE FROM kv WHERE namespace = ?1")?;
        for change in changes {
            match change {
                KvChange::Put(row) => {
                    put.execute(params![
                        row.namespace,
                        row.key,
                        row.value,
                        row.expires_at_ms
                    ])?;
                }
                KvChange::Delete { namespace, key } => {
                    delete.execute(params![namespace, key])?;
                }
                KvChange::Clear { namespace } => {
                    clear.execute(params![namespace])?;
                }
            }
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn row(namespace: &str, key: &str, value: &[u8], expires_at_ms: Option<i64>) -> KvRow {
        KvRow {
            namespace: namespace.into(),
            key: key.into(),
            value: value.to_vec(),
            expires_at_ms,
        }
    }

    #[tokio::test]
    async fn changes_apply_in_order_and_expired_rows_do_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("wasmrelay.db")).unwrap();
        let changes = vec![
            KvChange::Put(row("a", "k", b"1", None)),
            KvChange::Put(row("a", "k", b"2", None)),
            KvChange::Put(row("a", "gone", b"x", None)),
            KvChange::Delete {
                namespace: "a".into(),
                key: "gone".into(),
            },
            KvChange::Put(row("a", "old", b"x", Some(1_000))),
            KvChange::Put(row("b", "k", b"b", None)),
            KvChange::Put(row("c", "k", b"c", None)),
            KvChange::Clear {
                namespace: "c".into(),
            },
        ];
        store.call(move |conn| apply(conn, &changes)).await.unwrap();
        let loaded = store.call(|conn| load(conn, 2_000)).await.unwrap();
        assert_eq!(
            loaded,
            vec![row("a", "k", b"2", None), row("b", "k", b"b", None)]
        );
    }
}
