//! The embedded store: one SQLite database, `<data_dir>/wasmrelay.db`, so a
//! single node keeps its state across restarts with nothing to install.
//!
//! One thread owns the connection and runs every query, in order: async
//! callers hand it a closure and await the answer ([`Store::call`]), so no
//! tokio worker ever waits on SQLite's I/O or locks. The schema is migrated
//! forward at open ([`MIGRATIONS`], tracked in `PRAGMA user_version`); a
//! database from a newer relay is refused rather than guessed at. Each
//! feature keeps its queries in a module of its own ([`kv`], [`plugins`],
//! [`tasks`], [`files`], [`offers`]).

pub mod files;
pub mod history;
pub mod kv;
pub mod offers;
pub mod plugins;
pub mod tasks;

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

/// The schema, one step per entry; entry N takes the database from version
/// N to N + 1. Never edit an entry once released: add one.
pub const MIGRATIONS: &[&str] = &[
    // 1: plugin key-value data, namespaced per plugin name. Expiry is wall
    // clock (milliseconds since the Unix epoch) so it survives a restart.
    "CREATE TABLE kv (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        expires_at_ms INTEGER,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID;",
    // 2: plugins uploaded through the operator API, with the version each
    // replaced (what a rollback returns to).
    "CREATE TABLE plugins (
        name TEXT PRIMARY KEY,
        wasm BLOB NOT NULL,
        manifest TEXT NOT NULL,
        previous_wasm BLOB,
        previous_manifest TEXT,
        updated_at_ms INTEGER NOT NULL
    );",
    // 3: tasks, their runs and run logs; deleting a task deletes its runs,
    // deleting a run its log.
    "CREATE TABLE tasks (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        source TEXT NOT NULL,
        anchor_ms INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        task_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        attempt INTEGER NOT NULL,
        state TEXT NOT NULL,
        scheduled_at_ms INTEGER NOT NULL,
        started_at_ms INTEGER,
        ended_at_ms INTEGER,
        outcome TEXT
    );
    CREATE INDEX runs_by_task ON runs (task_id, id);
    CREATE INDEX runs_by_state ON runs (state);
    CREATE TABLE run_logs (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        at_ms INTEGER NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX run_logs_by_run ON run_logs (run_id, id);",
    // 4: files: uploads in progress and finished files (bytes under
    // <data_dir>/files; see transfer::storage).
    "CREATE TABLE files (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        length INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        metadata TEXT NOT NULL,
        sha256 TEXT,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    CREATE INDEX files_by_owner ON files (owner);
    CREATE INDEX files_by_expiry ON files (expires_at_ms);",
    // 5: offers: files pushed to users, channels and sessions, with their
    // delivery state (see transfer::offers).
    "CREATE TABLE offers (
        id TEXT PRIMARY KEY,
        file TEXT NOT NULL,
        from_user TEXT NOT NULL,
        target_kind TEXT NOT NULL,
        target TEXT NOT NULL,
        to_user TEXT NOT NULL,
        state TEXT NOT NULL,
        pulls INTEGER NOT NULL DEFAULT 0,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        reason TEXT
    );
    CREATE INDEX offers_by_target ON offers (target_kind, target, state);
    CREATE INDEX offers_by_file ON offers (file);
    CREATE INDEX offers_by_state ON offers (state, expires_at_ms);",
    // 6: channel history (channels whose rule says `persist`): each
    // channel's epoch and last seq, its kept messages, and whether the
    // relay stopped cleanly (written last at shutdown) so a restart after
    // a crash does not reuse seqs clients may already have seen.
    "CREATE TABLE channel_meta (
        channel TEXT PRIMARY KEY,
        epoch TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    );
    CREATE TABLE channel_history (
        channel TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (channel, seq)
    ) WITHOUT ROWID;
    CREATE TABLE relay_flags (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );",
];

/// Queries waiting for the store's thread; callers wait for room beyond it.
const QUEUED_JOBS: usize = 256;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Why the store could not open or answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot open the store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot migrate the store at {path} to schema version {version}")]
    Migrate {
        path: PathBuf,
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the store at {path} is at schema version {found}, newer than this relay knows ({known}): it was written by a newer wasmrelay"
    )]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("cannot start the store's thread")]
    Thread(#[source] std::io::Error),
    #[error("store query failed")]
    Query(#[from] rusqlite::Error),
    #[error("the store has stopped")]
    Stopped,
}

/// A handle to the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
}

impl Store {
    /// Opens (creating if need be) the database at `path`, migrates it, and
    /// starts the thread that owns it. The thread ends when every handle is
    /// dropped.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_error)?;
        // WAL: readers never block the writer; NORMAL: durable across a
        // process crash, at most the last transactions lost on power loss.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_error)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_error)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_error)?;
        migrate(&mut conn, path)?;
        // Checkpoints copy the WAL into the database file and fsync it,
        // which can take tens of milliseconds: not on the writer's thread,
        // where every query would wait behind it (a task's run waits for its
        // row), but on a thread of their own (see `checkpoint`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(open_error)?;
        let checkpointer = Connection::open(path).map_err(open_error)?;
        let (stopped, stop) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("wasmrelay-store-checkpoint".into())
            .spawn(move || checkpoint(checkpointer, stop))
            .map_err(StoreError::Thread)?;
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUED_JOBS);
        std::thread::Builder::new()
            .name("wasmrelay-store".into())
            .spawn(move || {
                while let Some(job) = queue.blocking_recv() {
                    job(&mut conn);
                }
                // Ends the checkpointer; closing `conn` checkpoints what is left.
                drop(stopped);
            })
            .map_err(StoreError::Thread)?;
        Ok(Self { jobs })
    }

    /// Runs `query` on the store's thread and returns its answer.
    pub async fn call<R, F>(&self, query: F) -> Result<R, StoreError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = answer.send(query(conn));
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Stopped)?;
        // Unit tests run the scheduler on tokio's paused clock, which jumps
        // to the next timer whenever every task waits — also while the
        // store's thread works. A blocking wait holds the clock still.
        #[cfg(test)]
        let answered = async move {
            tokio::task::spawn_blocking(move || answered.blocking_recv())
                .await
                .map_err(|_| StoreError::Stopped)?
                .map_err(|_| StoreError::Stopped)
        };
        #[cfg(not(test))]
        let answered = async move { answered.await.map_err(|_| StoreError::Stopped) };
        answered.await?.map_err(StoreError::Query)
    }
}

/// How often the WAL is copied into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Copies the WAL into the database file every [`CHECKPOINT_EVERY`] until
/// the store closes. PASSIVE: it never blocks the writer (it copies what no
/// reader still needs), and once a pass copied everything the writer starts
/// the WAL over, so it stays at about one second of writes.
fn checkpoint(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "store checkpoint failed; retrying");
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch: how the store keeps times
/// that must mean the same after a restart.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Brings the schema up to [`MIGRATIONS`]' length, each step in a
/// transaction of its own.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: usize = conn
        .pragma_query_value(None, "user_version", |row| row.get::<_, i64>(0))
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })? as usize;
    if found > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found,
            known: MIGRATIONS.len(),
        });
    }
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(found) {
        let version = step + 1;
        let migrate_error = |source| StoreError::Migrate {
            path: path.to_owned(),
            version,
            source,
        };
        let tx = conn.transaction().map_err(migrate_error)?;
        tx.execute_batch(sql).map_err(migrate_error)?;
        tx.pragma_update(None, "user_version", version as i64)
            .map_err(migrate_error)?;
        tx.commit().map_err(migrate_error)?;
        tracing::info!(version, "store schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_store_is_migrated_and_reopening_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmrelay.db");
        let store = Store::open(&path).unwrap();
        let version: i64 = store
            .call(|conn| conn.pragma_query_value(None, "user_version", |row| row.get(0)))
            .await
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        store
            .call(|conn| {
                conn.execute(
                    "INSERT INTO kv (namespace, key, value) VALUES ('p', 'k', x'01')",
                    [],
                )
            })
            .await
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let count: i64 = store
            .call(|conn| conn.query_row("SELECT count(*) FROM kv", [], |row| row.get(0)))
            .await
            .unwrap();
        assert_eq!(count, 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_wal_is_checkpointed_off_the_writer_and_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmrelay.db");
        let store = Store::open(&path).unwrap();
        // 4 MiB written as four 1 MiB transactions, each after a checkpoint
        // had time to run: the WAL starts over instead of growing.
        for batch in 0..4 {
            store
                .call(move |conn| {
                    let tx = conn.transaction()?;
                    for key in 0..64 {
                        tx.execute(
                            "INSERT OR REPLACE INTO kv (namespace, key, value) VALUES ('p', ?1, zeroblob(16384))",
                            [format!("{batch}-{key}")],
                        )?;
                    }
                    tx.commit()
                })
                .await
                .unwrap();
            tokio::time::sleep(CHECKPOINT_EVERY + std::time::Duration::from_millis(300)).await;
        }
        let wal = std::fs::metadata(dir.path().join("wasmrelay.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(wal < 2 * 1024 * 1024, "the WAL grew to {wal} bytes");
    }

    #[tokio::test]
    async fn a_database_from_a_newer_relay_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmrelay.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
        drop(conn);
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::TooNew { found: 999, .. }),
            "{err}"
        );
    }
}
