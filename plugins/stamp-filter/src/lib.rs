//! stamp-filter: marks each message with `[name@version]` (so a hot swap is
//! visible in the data itself), either as a prefix or as a field of a JSON
//! object, and drops messages that contain a blocked word.

use std::sync::OnceLock;

use serde::Deserialize;
use wasmrelay_plugin_sdk::filter::{self, Verdict};
use wasmrelay_plugin_sdk::{identity, parse_config};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    mode: Mode,
    #[serde(default = "default_field")]
    field: String,
    #[serde(default)]
    blocked_words: Vec<String>,
    #[serde(rename = "_plugin", default)]
    _plugin: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Prefix,
    Json,
}

fn default_field() -> String {
    "stamp".into()
}

struct State {
    config: Config,
    stamp: String,
}

static STATE: OnceLock<State> = OnceLock::new();

struct StampFilter;

impl filter::Guest for StampFilter {
    fn init(config_json: String) -> Result<(), String> {
        let config: Config = parse_config(&config_json)?;
        let me = identity(&config_json);
        let stamp = format!("{}@{}", me.name, me.version);
        let _ = STATE.set(State { config, stamp });
        Ok(())
    }

    fn self_check() -> Result<(), String> {
        match Self::on_message("self-check".into(), b"{}".to_vec()) {
            Verdict::Replace(_) => Ok(()),
            _ => Err("stamping a test message failed".into()),
        }
    }

    fn on_message(_channel: String, data: Vec<u8>) -> Verdict {
        let Some(state) = STATE.get() else {
            return Verdict::Keep;
        };
        if let Ok(text) = std::str::from_utf8(&data)
            && let Some(word) = state
                .config
                .blocked_words
                .iter()
                .find(|w| text.contains(w.as_str()))
        {
            return Verdict::Drop(format!("message contains the blocked word {word:?}"));
        }
        match state.config.mode {
            Mode::Prefix => {
                let mut out = format!("[{}] ", state.stamp).into_bytes();
                out.extend_from_slice(&data);
                Verdict::Replace(out)
            }
            Mode::Json => match serde_json::from_slice::<serde_json::Value>(&data) {
                Ok(serde_json::Value::Object(mut object)) => {
                    object.insert(
                        state.config.field.clone(),
                        serde_json::Value::String(state.stamp.clone()),
                    );
                    serde_json::to_vec(&object).map_or(Verdict::Keep, Verdict::Replace)
                }
                _ => Verdict::Keep,
            },
        }
    }
}

wasmrelay_plugin_sdk::filter::export_filter!(StampFilter);
