//! A task as an operator writes it (JSON through the API, or one TOML file
//! per task): which `task` plugin runs, when, and how a run is held to
//! account. Checked whole before anything is stored; every refusal names
//! the field.

use serde::{Deserialize, Serialize};

use super::schedule::{Schedule, ScheduleError, ScheduleSpec};

/// What to do when a run is due while the previous one still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Concurrency {
    /// Start it anyway.
    Allow,
    /// Skip it (recorded as `skipped`).
    #[default]
    Forbid,
    /// Stop the running one (`cancelled`), then start.
    Replace,
}

/// What to do with firings missed while the relay was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// Forget them; wait for the next firing.
    #[default]
    Skip,
    /// Run once at start for all of them.
    RunOnce,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    /// The `task`-role plugin that runs.
    pub plugin: String,
    /// When it fires; absent: only when asked (`POST /admin/tasks/{id}/run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleSpec>,
    /// A run still going after this long is stopped (`timed_out`).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts after a failure or timeout, each after `retry_delay_ms`
    /// doubled per attempt.
    #[serde(default)]
    pub retries: u32,
    #[serde(default = "default_retry_delay_ms")]
    pub retry_delay_ms: u64,
    #[serde(default)]
    pub concurrency: Concurrency,
    #[serde(default)]
    pub missed: Missed,
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Handed to the plugin as JSON in every run.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub config: serde_json::Value,
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_retry_delay_ms() -> u64 {
    1_000
}

fn enabled() -> bool {
    true
}

/// Names the task API uses for its own paths (`/admin/tasks/events`,
/// `/admin/tasks/batch/...`).
pub const RESERVED_NAMES: [&str; 2] = ["events", "batch"];

/// Bounds on what a task may ask for.
pub const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;
pub const MAX_RETRIES: u32 = 100;
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// Why a task was refused; `field` names what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

impl From<ScheduleError> for SpecError {
    fn from(e: ScheduleError) -> Self {
        SpecError {
            field: e.field.to_owned(),
            reason: e.reason,
        }
    }
}

fn refuse(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

impl TaskSpec {
    /// Reads a task from JSON (the API's body); unknown fields are refused.
    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        serde_json::from_str(text).map_err(|e| refuse(&field_of(&e.to_string()), e.to_string()))
    }

    /// Reads a task from TOML (a file in `<data_dir>/tasks/`).
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        toml::from_str(text).map_err(|e| refuse(&field_of(e.message()), e.message().to_owned()))
    }

    /// Checks every field; returns the compiled schedule.
    pub fn validate(&self) -> Result<Schedule, SpecError> {
        crate::protocol::names::validate_space_name(&self.name)
            .map_err(|reason| refuse("name", reason))?;
        if self.name.bytes().all(|b| b.is_ascii_digit()) {
            // The API takes a task's id or name in one place.
            return Err(refuse("name", "must not be all digits"));
        }
        if RESERVED_NAMES.contains(&self.name.as_str()) {
            return Err(refuse(
                "name",
                format!("{:?} is an endpoint of the task API", self.name),
            ));
        }
        if self.plugin.is_empty() {
            return Err(refuse("plugin", "must name a task plugin"));
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(refuse(
                "timeout_ms",
                format!("must be between 1 and {MAX_TIMEOUT_MS}"),
            ));
        }
        if self.retries > MAX_RETRIES {
            return Err(refuse("retries", format!("must be at most {MAX_RETRIES}")));
        }
        if self.retries > 0 && self.retry_delay_ms == 0 {
            return Err(refuse(
                "retry_delay_ms",
                "must be greater than 0 when retrying",
            ));
        }
        let config = serde_json::to_string(&self.config).unwrap_or_default();
        if config.len() > MAX_CONFIG_BYTES {
            return Err(refuse(
                "config",
                format!("{} bytes of JSON; at most {MAX_CONFIG_BYTES}", config.len()),
            ));
        }
        Ok(Schedule::parse(self.schedule.as_ref())?)
    }

    /// The delay before retry `attempt` (2 for the first retry): doubled each
    /// time, capped at an hour.
    pub fn retry_delay(&self, attempt: u32) -> std::time::Duration {
        let doublings = attempt.saturating_sub(2).min(20);
        let delay = self.retry_delay_ms.saturating_mul(1 << doublings);
        std::time::Duration::from_millis(delay.min(60 * 60 * 1000))
    }
}

/// The field a serde error is about, when its message names one
/// (`unknown field `x``, `missing field `x``); else the task as a whole.
fn field_of(message: &str) -> String {
    for marker in ["unknown field `", "missing field `"] {
        if let Some(rest) = message.split(marker).nth(1)
            && let Some(field) = rest.split('`').next()
        {
            return field.to_owned();
        }
    }
    "task".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issues_example_reads_with_defaults_for_the_rest() {
        let spec = TaskSpec::from_json(
            r#"{"name":"probe","plugin":"http-probe","schedule":{"cron":"*/10 * * * * *","tz":"UTC"},
                "timeout_ms":5000,"retries":2,"retry_delay_ms":1000,"concurrency":"forbid",
                "enabled":true,"config":{"urls":["http://127.0.0.1:8080/healthz"]}}"#,
        )
        .unwrap();
        assert_eq!(spec.concurrency, Concurrency::Forbid);
        assert_eq!(spec.missed, Missed::Skip);
        spec.validate().unwrap();
        let manual = TaskSpec::from_toml("name = \"nightly\"\nplugin = \"heartbeat\"\n").unwrap();
        assert_eq!((manual.timeout_ms, manual.enabled), (30_000, true));
        assert!(matches!(manual.validate().unwrap(), Schedule::Manual));
    }

    #[test]
    fn refusals_name_the_field() {
        let field = |json: &str| match TaskSpec::from_json(json) {
            Err(e) => e.field,
            Ok(spec) => spec.validate().unwrap_err().field,
        };
        assert_eq!(field(r#"{"name":"a","plugin":"p","colour":1}"#), "colour");
        assert_eq!(field(r#"{"plugin":"p"}"#), "name");
        assert_eq!(field(r#"{"name":"no spaces","plugin":"p"}"#), "name");
        assert_eq!(field(r#"{"name":"events","plugin":"p"}"#), "name");
        assert_eq!(
            field(r#"{"name":"a","plugin":"p","timeout_ms":0}"#),
            "timeout_ms"
        );
        assert_eq!(
            field(r#"{"name":"a","plugin":"p","retries":1000}"#),
            "retries"
        );
        assert_eq!(
            field(r#"{"name":"a","plugin":"p","schedule":{"every_ms":1}}"#),
            "schedule.every_ms"
        );
        assert_eq!(
            field(r#"{"name":"a","plugin":"p","schedule":{"cron":"nope"}}"#),
            "schedule.cron"
        );
    }

    #[test]
    fn retry_delays_double_and_stop_at_an_hour() {
        let spec =
            TaskSpec::from_json(r#"{"name":"a","plugin":"p","retry_delay_ms":500}"#).unwrap();
        let delays: Vec<u64> = (2..=5)
            .map(|a| spec.retry_delay(a).as_millis() as u64)
            .collect();
        assert_eq!(delays, [500, 1_000, 2_000, 4_000]);
        assert_eq!(spec.retry_delay(40).as_secs(), 3600);
    }
}
