//! http-probe: a task that checks URLs. Its task's config names them:
//!
//! ```json
//! {"urls": ["http://127.0.0.1:8080/healthz"], "expect": [200], "contains": "ok"}
//! ```
//!
//! `expect` lists the statuses that pass (default: any 2xx or 3xx);
//! `contains`, when given, must appear in each body. Every URL is checked,
//! each result logged; the run fails if any check fails, naming them.

use serde::Deserialize;
use wasmrelay_plugin_sdk::task::wasmrelay::plugin::types::{Outcome, RunContext};
use wasmrelay_plugin_sdk::{clock, http, log};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe {
    urls: Vec<String>,
    #[serde(default)]
    expect: Vec<u16>,
    #[serde(default)]
    contains: Option<String>,
    #[serde(default = "get")]
    method: String,
}

fn get() -> String {
    "GET".into()
}

/// At most this many URLs per run: a run is bounded by its timeout, and
/// each fetch by the manifest's call deadline.
const MAX_URLS: usize = 32;

struct HttpProbe;

impl HttpProbe {
    /// One URL: `Ok(summary)` when it passes, `Err(why)` when not.
    fn check(probe: &Probe, url: &str) -> Result<String, String> {
        let started = clock::now_ms();
        let response = http::fetch(&http::Request {
            method: probe.method.clone(),
            url: url.to_owned(),
            headers: vec![("user-agent".into(), "wasmrelay-http-probe/1.0".into())],
            body: Vec::new(),
        })
        .map_err(|e| format!("{url}: {e}"))?;
        let took = clock::now_ms().saturating_sub(started);
        let status_ok = if probe.expect.is_empty() {
            (200..400).contains(&response.status)
        } else {
            probe.expect.contains(&response.status)
        };
        if !status_ok {
            let expected = if probe.expect.is_empty() {
                "2xx or 3xx".to_owned()
            } else {
                format!("{:?}", probe.expect)
            };
            return Err(format!(
                "{url} answered {} (expected {expected})",
                response.status
            ));
        }
        if let Some(needle) = &probe.contains
            && !String::from_utf8_lossy(&response.body).contains(needle.as_str())
        {
            return Err(format!(
                "{url} answered {} without {needle:?}",
                response.status
            ));
        }
        Ok(format!("{url} answered {} in {took} ms", response.status))
    }
}

impl wasmrelay_plugin_sdk::task::Guest for HttpProbe {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn self_check() -> Result<(), String> {
        Ok(())
    }

    fn run(context: RunContext) -> Outcome {
        let probe: Probe = match serde_json::from_str(&context.config) {
            Ok(probe) => probe,
            Err(e) => {
                return Outcome::Failure(format!(
                    "the task's config must be {{\"urls\": [...]}}: {e}"
                ));
            }
        };
        if probe.urls.is_empty() || probe.urls.len() > MAX_URLS {
            return Outcome::Failure(format!("config.urls: give 1 to {MAX_URLS} URLs"));
        }
        let mut failures = Vec::new();
        for url in &probe.urls {
            match Self::check(&probe, url) {
                Ok(summary) => log::log(log::Level::Info, &summary),
                Err(why) => {
                    log::log(log::Level::Warn, &why);
                    failures.push(why);
                }
            }
        }
        if failures.is_empty() {
            Outcome::Success(format!("{} of {} ok", probe.urls.len(), probe.urls.len()))
        } else {
            Outcome::Failure(format!(
                "{} of {} failed: {}",
                failures.len(),
                probe.urls.len(),
                failures.join("; ")
            ))
        }
    }
}

wasmrelay_plugin_sdk::task::export_task!(HttpProbe);
