//! The task folder (`<data_dir>/tasks` by default): one `NAME.toml` per
//! task, applied without a restart. A new or changed file defines the task;
//! a removed file deletes it; a file that does not read or check is refused
//! with its name and the field, and the task keeps its previous definition.
//! Polled, like the plugin folder, so it behaves the same on every
//! filesystem.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Origin;
use super::manager::{Define, TaskError, Tasks};
use super::spec::{SpecError, TaskSpec};

/// Why a file in the folder was refused, as the API lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Refusal {
    pub file: String,
    pub field: String,
    pub reason: String,
}

/// The folder's current refusals, by file name.
pub type Refusals = Arc<Mutex<BTreeMap<String, Refusal>>>;

/// Scans `dir` every `interval` until `stop`.
pub async fn watch(
    tasks: Tasks,
    dir: PathBuf,
    interval: Duration,
    refusals: Refusals,
    stop: CancellationToken,
) {
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot create the task folder; not watching it");
        return;
    }
    tracing::info!(dir = %dir.display(), "watching the task folder");
    let mut seen: HashMap<String, (SystemTime, u64)> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if scan(&tasks, &dir, &mut seen, &refusals).await.is_err() {
            return;
        }
    }
}

/// One pass over the folder. Errs only when the manager has stopped.
async fn scan(
    tasks: &Tasks,
    dir: &Path,
    seen: &mut HashMap<String, (SystemTime, u64)>,
    refusals: &Refusals,
) -> Result<(), TaskError> {
    let mut present = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return Ok(());
    };
    let mut listed_all = true;
    loop {
        let file = match entries.next_entry().await {
            Ok(Some(file)) => file,
            Ok(None) => break,
            Err(e) => {
                // A partial listing must not read as files removed.
                tracing::warn!(dir = %dir.display(), error = %e, "task folder not fully read");
                listed_all = false;
                break;
            }
        };
        let path = file.path();
        let Some(name) = toml_stem(&path) else {
            continue;
        };
        present.push(name.clone());
        let Ok(meta) = file.metadata().await else {
            continue;
        };
        let fingerprint = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if seen.get(&name) == Some(&fingerprint) {
            continue;
        }
        seen.insert(name.clone(), fingerprint);
        let file_name = format!("{name}.toml");
        let applied = match tokio::fs::read_to_string(&path).await {
            Ok(text) => match read(&name, &text) {
                Ok(spec) => tasks
                    .define(spec, Origin::File, Define::Upsert)
                    .await
                    .map(|_| ()),
                Err(e) => Err(TaskError::Invalid(e)),
            },
            Err(e) => Err(TaskError::Invalid(SpecError {
                field: "task".to_owned(),
                reason: format!("cannot read it: {e}"),
            })),
        };
        let mut refused = refusals.lock().unwrap_or_else(|e| e.into_inner());
        match applied {
            Ok(()) => {
                refused.remove(&file_name);
                tracing::info!(file = %path.display(), "task file applied");
            }
            Err(TaskError::Stopped) => return Err(TaskError::Stopped),
            Err(e) => {
                let (field, reason) = match &e {
                    TaskError::Invalid(e) => (e.field.clone(), e.reason.clone()),
                    other => ("task".to_owned(), other.to_string()),
                };
                // A plugin not loaded yet (the plugin folder is read at the
                // same time) or a store failure may pass later: tried again
                // next scan, told once.
                let passing = field == "plugin" || !matches!(e, TaskError::Invalid(_));
                if passing {
                    seen.remove(&name);
                }
                let told = refused
                    .get(&file_name)
                    .is_some_and(|r| r.field == field && r.reason == reason);
                if !told {
                    tracing::warn!(file = %path.display(), %field, %reason, "task file refused; the task keeps its previous definition");
                }
                refused.insert(
                    file_name.clone(),
                    Refusal {
                        file: file_name,
                        field,
                        reason,
                    },
                );
            }
        }
    }
    if !listed_all {
        return Ok(());
    }
    seen.retain(|name, _| present.contains(name));
    refusals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|file, _| present.iter().any(|name| file == &format!("{name}.toml")));
    // A task whose file is gone (also while the relay was down) goes with it.
    for view in tasks.views().await? {
        if view.origin == Origin::File && !present.contains(&view.name) {
            match tasks.delete(&view.name, Origin::File).await {
                Ok(()) => tracing::info!(task = %view.name, "task file removed; task deleted"),
                Err(TaskError::Stopped) => return Err(TaskError::Stopped),
                Err(e) => tracing::warn!(task = %view.name, error = %e, "task not deleted"),
            }
        }
    }
    Ok(())
}

fn toml_stem(path: &Path) -> Option<String> {
    if path.extension()? != "toml" {
        return None;
    }
    Some(path.file_stem()?.to_str()?.to_owned())
}

/// Reads a task file: `name` may be left out (the file's name is used) but
/// must match it when given.
fn read(file_stem: &str, text: &str) -> Result<TaskSpec, SpecError> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| SpecError {
        field: "task".to_owned(),
        reason: e.message().to_owned(),
    })?;
    match table.get("name") {
        None => {
            table.insert("name".to_owned(), toml::Value::String(file_stem.to_owned()));
        }
        Some(toml::Value::String(name)) if name == file_stem => {}
        Some(other) => {
            return Err(SpecError {
                field: "name".to_owned(),
                reason: format!("{other} differs from the file's name {file_stem:?}"),
            });
        }
    }
    TaskSpec::from_toml(&toml::to_string(&table).map_err(|e| SpecError {
        field: "task".to_owned(),
        reason: e.to_string(),
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_names_its_task_or_agrees_with_its_name() {
        let spec = read("nightly", "plugin = \"heartbeat\"\n").unwrap();
        assert_eq!(spec.name, "nightly");
        assert_eq!(
            read("nightly", "name = \"daily\"\nplugin = \"heartbeat\"\n")
                .unwrap_err()
                .field,
            "name"
        );
        assert_eq!(
            read(
                "nightly",
                "plugin = \"heartbeat\"\nschedule = { every_ms = 5 }\n"
            )
            .and_then(|spec| spec.validate().map(|_| spec))
            .unwrap_err()
            .field,
            "schedule.every_ms"
        );
    }
}
