//! heartbeat: a task that counts its runs (in kv, so the count survives a
//! restart) and publishes each beat — count, run id, attempt, when it was
//! scheduled and when it ran, and the relay's figures (connections,
//! channels, spaces, messages, uptime) — to a channel.

use std::sync::OnceLock;

use serde::Deserialize;
use wasmrelay_plugin_sdk::task::wasmrelay::plugin::types::{Outcome, RunContext};
use wasmrelay_plugin_sdk::{clock, kv, log, parse_config, publish, stats};

#[derive(Debug, Deserialize)]
struct Config {
    #[serde(default = "default_channel")]
    channel: String,
    #[serde(rename = "_plugin", default)]
    _plugin: Option<serde::de::IgnoredAny>,
}

fn default_channel() -> String {
    "tasks/heartbeat".into()
}

static CONFIG: OnceLock<Config> = OnceLock::new();

const COUNT_KEY: &str = "count";

struct Heartbeat;

impl wasmrelay_plugin_sdk::task::Guest for Heartbeat {
    fn init(config_json: String) -> Result<(), String> {
        let config: Config = parse_config(&config_json)?;
        if config.channel.is_empty() {
            return Err("config.channel must name a channel".into());
        }
        let _ = CONFIG.set(config);
        Ok(())
    }

    fn self_check() -> Result<(), String> {
        Ok(())
    }

    fn run(context: RunContext) -> Outcome {
        let channel = CONFIG
            .get()
            .map_or_else(default_channel, |c| c.channel.clone());
        let count = kv::get(COUNT_KEY)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| text.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        if let Err(e) = kv::set(COUNT_KEY, count.to_string().as_bytes(), None) {
            return Outcome::Failure(format!("cannot keep the count: {e}"));
        }
        let figures = stats::figures();
        let beat = serde_json::json!({
            "task": context.task,
            "count": count,
            "run": context.run_id,
            "attempt": context.attempt,
            "scheduled_at_ms": context.scheduled_at_ms,
            "ran_at_ms": clock::now_ms(),
            "relay": {
                "connections": figures.connections,
                "channels": figures.channels,
                "spaces": figures.spaces,
                "spaces_connected": figures.spaces_connected,
                "requests_pending": figures.requests_pending,
                "messages_in": figures.messages_in,
                "messages_out": figures.messages_out,
                "uptime_ms": figures.uptime_ms,
            },
        });
        let seq = publish::publish(&channel, beat.to_string().as_bytes());
        log::log(
            log::Level::Info,
            &format!("beat {count} published to {channel}"),
        );
        Outcome::Success(format!("beat {count} (seq {seq})"))
    }
}

wasmrelay_plugin_sdk::task::export_task!(Heartbeat);
