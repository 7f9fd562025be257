//! Plugins uploaded through the operator API, kept so they serve again
//! after a restart: per name, the active version's wasm and manifest and the
//! one before it (what a rollback returns to). Bundled plugins come from the
//! binary and folder plugins from their folder, so neither is stored.

use rusqlite::{Connection, OptionalExtension, params};

/// One stored version.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub wasm: Vec<u8>,
    pub manifest: String,
}

/// A stored plugin: what serves, and what served before it (if uploaded too).
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub name: String,
    pub active: Version,
    pub previous: Option<Version>,
}

/// Records an upload that now serves as `name`; the version it replaced (if
/// it was an upload) becomes the previous one.
pub fn uploaded(conn: &mut Connection, name: &str, version: &Version) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO plugins (name, wasm, manifest, previous_wasm, previous_manifest, updated_at_ms)
         VALUES (?1, ?2, ?3, NULL, NULL, ?4)
         ON CONFLICT (name) DO UPDATE SET
             previous_wasm = plugins.wasm,
             previous_manifest = plugins.manifest,
             wasm = excluded.wasm,
             manifest = excluded.manifest,
             updated_at_ms = excluded.updated_at_ms",
        params![name, version.wasm, version.manifest, super::wall_ms()],
    )?;
    Ok(())
}

/// Records a rollback: the previous version serves again and the active one
/// becomes previous. Without a stored previous (it was bundled or from the
/// folder, which come back by themselves) the upload is forgotten.
pub fn rolled_back(conn: &mut Connection, name: &str) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let has_previous: Option<bool> = tx
        .query_row(
            "SELECT previous_wasm IS NOT NULL FROM plugins WHERE name = ?1",
            params![name],
            |row| row.get(0),
        )
        .optional()?;
    match has_previous {
        Some(true) => {
            tx.execute(
                "UPDATE plugins SET
                     wasm = previous_wasm, manifest = previous_manifest,
                     previous_wasm = wasm, previous_manifest = manifest,
                     updated_at_ms = ?2
                 WHERE name = ?1",
                params![name, super::wall_ms()],
            )?;
        }
        Some(false) => {
            tx.execute("DELETE FROM plugins WHERE name = ?1", params![name])?;
        }
        None => {}
    }
    tx.commit()
}

/// Forgets `name` (removed through the operator API).
pub fn removed(conn: &mut Connection, name: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM plugins WHERE name = ?1", params![name])?;
    Ok(())
}

/// The stored active version of `name`, if it was uploaded.
pub fn active(conn: &mut Connection, name: &str) -> rusqlite::Result<Option<Version>> {
    conn.query_row(
        "SELECT wasm, manifest FROM plugins WHERE name = ?1",
        params![name],
        |row| {
            Ok(Version {
                wasm: row.get(0)?,
                manifest: row.get(1)?,
            })
        },
    )
    .optional()
}

/// Every stored plugin, by name.
pub fn all(conn: &mut Connection) -> rusqlite::Result<Vec<Saved>> {
    let mut statement = conn.prepare(
        "SELECT name, wasm, manifest, previous_wasm, previous_manifest FROM plugins ORDER BY name",
    )?;
    let rows = statement.query_map([], |row| {
        let previous = match (row.get::<_, Option<Vec<u8>>>(3)?, row.get(4)?) {
            (Some(wasm), Some(manifest)) => Some(Version { wasm, manifest }),
            _ => None,
        };
        Ok(Saved {
            name: row.get(0)?,
            active: Version {
                wasm: row.get(1)?,
                manifest: row.get(2)?,
            },
            previous,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn version(tag: &str) -> Version {
        Version {
            wasm: tag.as_bytes().to_vec(),
            manifest: format!("version = {tag:?}"),
        }
    }

    #[tokio::test]
    async fn uploads_keep_one_previous_version_and_rollbacks_swap_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("wasmrelay.db")).unwrap();
        let saved = |store: &Store| {
            let store = store.clone();
            async move { store.call(all).await }
        };
        store
            .call(|c| uploaded(c, "p", &version("1")))
            .await
            .unwrap();
        assert_eq!(saved(&store).await.unwrap()[0].previous, None);
        store
            .call(|c| uploaded(c, "p", &version("2")))
            .await
            .unwrap();
        store
            .call(|c| uploaded(c, "p", &version("3")))
            .await
            .unwrap();
        let now = &saved(&store).await.unwrap()[0];
        assert_eq!(
            (&now.active, &now.previous),
            (&version("3"), &Some(version("2")))
        );
        store.call(|c| rolled_back(c, "p")).await.unwrap();
        let now = &saved(&store).await.unwrap()[0];
        assert_eq!(
            (&now.active, &now.previous),
            (&version("2"), &Some(version("3")))
        );
        store.call(|c| removed(c, "p")).await.unwrap();
        assert!(saved(&store).await.unwrap().is_empty());
        // A rollback to a version that was not uploaded forgets the upload.
        store
            .call(|c| uploaded(c, "q", &version("1")))
            .await
            .unwrap();
        store.call(|c| rolled_back(c, "q")).await.unwrap();
        assert!(saved(&store).await.unwrap().is_empty());
    }
}
