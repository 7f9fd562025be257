//! The data behind the `kv` capability: one namespace per plugin name (so a
//! new version of a plugin sees what the old one stored), per-key expiry
//! and a per-plugin key cap.
//!
//! Plugins read and write it synchronously, from inside a wasm call, so the
//! live copy is in memory. It is made durable behind their back: every key
//! written is marked dirty, and [`persist`] writes the current value of the
//! dirty keys to the store in batches (at most every [`FLUSH_EVERY`], and
//! once more at shutdown). The dirty set holds at most one entry per live
//! key, so it is bounded by the same caps as the data.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::kv::{KvChange, KvRow};
use crate::store::{Store, wall_ms};

/// Writes reach the store at most this long after they were made.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
pub struct KvStore {
    namespaces: DashMap<String, Mutex<HashMap<String, KvEntry>>>,
    dirty: Mutex<Dirty>,
    changed: Notify,
}

/// What changed since the last flush.
#[derive(Default)]
struct Dirty {
    /// Namespaces dropped whole, written before the keys below.
    cleared: BTreeSet<String>,
    keys: BTreeSet<(String, String)>,
}

struct KvEntry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl KvEntry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl KvStore {
    pub fn get(&self, plugin: &str, key: &str) -> Option<Vec<u8>> {
        let namespace = self.namespaces.get(plugin)?;
        let entries = lock(&namespace);
        entries
            .get(key)
            .filter(|entry| entry.live(Instant::now()))
            .map(|entry| entry.value.clone())
    }

    pub fn set(
        &self,
        plugin: &str,
        key: String,
        value: Vec<u8>,
        ttl: Option<Duration>,
        max_keys: usize,
    ) -> Result<(), String> {
        let now = Instant::now();
        let namespace = self.namespaces.entry(plugin.to_owned()).or_default();
        let mut entries = lock(&namespace);
        if !entries.contains_key(&key) && entries.len() >= max_keys {
            entries.retain(|_, entry| entry.live(now));
            if entries.len() >= max_keys {
                return Err(format!("limits.kv_max_keys ({max_keys}) reached"));
            }
        }
        self.mark(plugin, &key);
        entries.insert(
            key,
            KvEntry {
                value,
                expires: ttl.map(|ttl| now + ttl),
            },
        );
        Ok(())
    }

    pub fn delete(&self, plugin: &str, key: &str) -> bool {
        let Some(namespace) = self.namespaces.get(plugin) else {
            return false;
        };
        let mut entries = lock(&namespace);
        let removed = entries.remove(key);
        if removed.is_some() {
            self.mark(plugin, key);
        }
        removed.is_some_and(|entry| entry.live(Instant::now()))
    }

    /// Drops a plugin's namespace (when the plugin is removed).
    pub fn clear(&self, plugin: &str) {
        self.namespaces.remove(plugin);
        let mut dirty = lock(&self.dirty);
        dirty.keys.retain(|(namespace, _)| namespace != plugin);
        dirty.cleared.insert(plugin.to_owned());
        drop(dirty);
        self.changed.notify_one();
    }

    fn mark(&self, plugin: &str, key: &str) {
        lock(&self.dirty)
            .keys
            .insert((plugin.to_owned(), key.to_owned()));
        self.changed.notify_one();
    }

    /// Puts back what the store held (at start, before any plugin runs);
    /// wall-clock expiry becomes a deadline on this process's clock.
    pub fn restore(&self, rows: Vec<KvRow>) {
        let (now, wall) = (Instant::now(), wall_ms());
        for row in rows {
            let expires = row
                .expires_at_ms
                .map(|at| now + Duration::from_millis(at.saturating_sub(wall).max(0) as u64));
            let namespace = self.namespaces.entry(row.namespace).or_default();
            lock(&namespace).insert(
                row.key,
                KvEntry {
                    value: row.value,
                    expires,
                },
            );
        }
    }

    /// The writes that bring the store up to date with memory, clearing the
    /// dirty set: each dirty key's current value, or its deletion.
    pub fn take_changes(&self) -> Vec<KvChange> {
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        let (now, wall) = (Instant::now(), wall_ms());
        let mut changes: Vec<KvChange> = dirty
            .cleared
            .into_iter()
            .map(|namespace| KvChange::Clear { namespace })
            .collect();
        for (namespace, key) in dirty.keys {
            let current = self.namespaces.get(&namespace).and_then(|entries| {
                lock(&entries)
                    .get(&key)
                    .filter(|entry| entry.live(now))
                    .map(|entry| {
                        let expires_at_ms = entry
                            .expires
                            .map(|at| wall + at.saturating_duration_since(now).as_millis() as i64);
                        (entry.value.clone(), expires_at_ms)
                    })
            });
            changes.push(match current {
                Some((value, expires_at_ms)) => KvChange::Put(KvRow {
                    namespace,
                    key,
                    value,
                    expires_at_ms,
                }),
                None => KvChange::Delete { namespace, key },
            });
        }
        changes
    }
}

/// Keeps `store` up to date with `kv` until `stop`, then writes what is
/// left. A failed write is logged (the data stays in memory and is written
/// again with the key's next change).
pub async fn persist(kv: Arc<KvStore>, store: Store, stop: CancellationToken) {
    loop {
        let stopping = tokio::select! {
            _ = kv.changed.notified() => false,
            _ = stop.cancelled() => true,
        };
        if !stopping {
            // Let a burst of writes gather into one transaction.
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
                _ = stop.cancelled() => {}
            }
        }
        let changes = kv.take_changes();
        if !changes.is_empty() {
            let count = changes.len();
            let written = store
                .call(move |conn| crate::store::kv::apply(conn, &changes))
                .await;
            if let Err(e) = written {
                tracing::warn!(error = %e, count, "plugin kv not persisted; it stays in memory");
            }
        }
        if stopping || stop.is_cancelled() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_is_namespaced_bounded_and_expires() {
        let kv = KvStore::default();
        kv.set("a", "k".into(), b"1".to_vec(), None, 2).unwrap();
        assert_eq!(kv.get("a", "k"), Some(b"1".to_vec()));
        assert_eq!(kv.get("b", "k"), None, "namespaces are separate");
        kv.set("a", "k2".into(), b"2".to_vec(), None, 2).unwrap();
        let err = kv
            .set("a", "k3".into(), b"3".to_vec(), None, 2)
            .unwrap_err();
        assert!(err.contains("kv_max_keys"), "{err}");
        kv.set("a", "k".into(), b"again".to_vec(), None, 2)
            .expect("overwriting an existing key is not a new key");
        kv.set("b", "t".into(), b"x".to_vec(), Some(Duration::ZERO), 2)
            .unwrap();
        assert_eq!(kv.get("b", "t"), None, "expired at once");
        assert!(kv.delete("a", "k"));
        assert!(!kv.delete("a", "k"));
    }

    #[tokio::test]
    async fn what_plugins_store_survives_a_new_process_with_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmrelay.db");
        let (kv, store, stop) = (
            Arc::new(KvStore::default()),
            Store::open(&path).unwrap(),
            CancellationToken::new(),
        );
        let persister = tokio::spawn(persist(kv.clone(), store.clone(), stop.clone()));
        kv.set("p", "kept".into(), b"1".to_vec(), None, 10).unwrap();
        kv.set(
            "p",
            "ttl".into(),
            b"2".to_vec(),
            Some(Duration::from_secs(3600)),
            10,
        )
        .unwrap();
        kv.set("p", "deleted".into(), b"3".to_vec(), None, 10)
            .unwrap();
        kv.delete("p", "deleted");
        kv.set("q", "cleared".into(), b"4".to_vec(), None, 10)
            .unwrap();
        kv.clear("q");
        stop.cancel();
        persister.await.unwrap();
        drop(store);

        let store = Store::open(&path).unwrap();
        let rows = store
            .call(|conn| crate::store::kv::load(conn, wall_ms()))
            .await
            .unwrap();
        let restored = KvStore::default();
        restored.restore(rows);
        assert_eq!(restored.get("p", "kept"), Some(b"1".to_vec()));
        assert_eq!(restored.get("p", "ttl"), Some(b"2".to_vec()));
        assert_eq!(restored.get("p", "deleted"), None);
        assert_eq!(restored.get("q", "cleared"), None);
        let expires = restored.namespaces.get("p").unwrap();
        let ttl = lock(&expires)["ttl"].expires.unwrap() - Instant::now();
        assert!(
            ttl > Duration::from_secs(3590) && ttl <= Duration::from_secs(3600),
            "{ttl:?}"
        );
    }
}
