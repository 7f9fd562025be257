//! path-router: routes publishes and requests by prefix rules from its
//! manifest's `[config]`, and decides which channels keep history. The
//! first matching rule decides; no match passes (or, for history, leaves
//! the relay's `channels.history` to decide).
//!
//! ```toml
//! [[config.rules]]
//! channel_prefix = "legacy/"   # publishes to channels starting with this...
//! rewrite = "chat/"            # ...go to the channel with the prefix replaced
//!
//! [[config.rules]]
//! space = "tts"                # requests to this space...
//! path_prefix = "/admin"       # ...whose path starts with this (optional)...
//! reject = "not from here"     # ...are refused
//!
//! [[config.history]]
//! channel_prefix = "news/"     # new channels starting with this...
//! size = 20                    # ...keep their last 20 messages (0: none)
//! ttl_ms = 3600000             # ...for an hour
//! persist = false              # ...in memory only
//! ```

use std::sync::OnceLock;

use serde::Deserialize;
use wasmrelay_plugin_sdk::router_channels::wasmrelay::plugin::types::Rejection;
use wasmrelay_plugin_sdk::router_channels::{
    self as router, ChannelHistory, Decision, RequestInfo,
};
use wasmrelay_plugin_sdk::{log, parse_config};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    history: Vec<HistoryRule>,
    #[serde(rename = "_plugin", default)]
    _plugin: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    channel_prefix: Option<String>,
    space: Option<String>,
    path_prefix: Option<String>,
    rewrite: Option<String>,
    reject: Option<String>,
}

/// How channels under a prefix keep history; `size = 0` keeps none.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryRule {
    channel_prefix: String,
    size: u32,
    #[serde(default = "default_ttl_ms")]
    ttl_ms: u64,
    #[serde(default)]
    persist: bool,
}

fn default_ttl_ms() -> u64 {
    300_000
}

static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
static HISTORY: OnceLock<Vec<HistoryRule>> = OnceLock::new();

fn rules() -> &'static [Rule] {
    RULES.get().map(Vec::as_slice).unwrap_or(&[])
}

fn validate(rule: &Rule, index: usize) -> Result<(), String> {
    match (&rule.channel_prefix, &rule.space) {
        (Some(_), None) | (None, Some(_)) => {}
        _ => {
            return Err(format!(
                "rules[{index}]: give exactly one of channel_prefix or space"
            ));
        }
    }
    if rule.path_prefix.is_some() && rule.space.is_none() {
        return Err(format!("rules[{index}]: path_prefix needs space"));
    }
    match (&rule.rewrite, &rule.reject) {
        (Some(_), None) | (None, Some(_)) => Ok(()),
        _ => Err(format!(
            "rules[{index}]: give exactly one of rewrite or reject"
        )),
    }
}

fn decide(rule: &Rule, rewritten: impl FnOnce(&str) -> String) -> Decision {
    match (&rule.rewrite, &rule.reject) {
        (Some(target), _) => Decision::Rewrite(rewritten(target)),
        (_, Some(reason)) => Decision::Reject(Rejection {
            code: "rejected".into(),
            reason: reason.clone(),
        }),
        _ => Decision::Pass,
    }
}

struct PathRouter;

impl router::Guest for PathRouter {
    fn init(config: String) -> Result<(), String> {
        let config: Config = parse_config(&config)?;
        for (index, rule) in config.rules.iter().enumerate() {
            validate(rule, index)?;
        }
        for (index, rule) in config.history.iter().enumerate() {
            if rule.size > 10_000 || rule.ttl_ms == 0 {
                return Err(format!(
                    "history[{index}]: size must be 0 to 10000 and ttl_ms greater than 0"
                ));
            }
        }
        log::log(
            log::Level::Info,
            &format!(
                "path-router ready with {} rules and {} history rules",
                config.rules.len(),
                config.history.len()
            ),
        );
        let _ = RULES.set(config.rules);
        let _ = HISTORY.set(config.history);
        Ok(())
    }

    fn self_check() -> Result<(), String> {
        Ok(())
    }

    fn route_publish(channel: String) -> Decision {
        for rule in rules() {
            if let Some(prefix) = &rule.channel_prefix
                && let Some(rest) = channel.strip_prefix(prefix.as_str())
            {
                return decide(rule, |target| format!("{target}{rest}"));
            }
        }
        Decision::Pass
    }

    fn route_request(request: RequestInfo) -> Decision {
        for rule in rules() {
            let space_matches = rule.space.as_deref() == Some(request.space.as_str());
            let path_matches = rule
                .path_prefix
                .as_deref()
                .is_none_or(|p| request.path.starts_with(p));
            if space_matches && path_matches {
                return decide(rule, str::to_owned);
            }
        }
        Decision::Pass
    }

    fn channel_history(
        channel: String,
        configured: Option<ChannelHistory>,
    ) -> Option<ChannelHistory> {
        let rules = HISTORY.get().map(Vec::as_slice).unwrap_or(&[]);
        match rules
            .iter()
            .find(|rule| channel.starts_with(rule.channel_prefix.as_str()))
        {
            Some(rule) if rule.size == 0 => None,
            Some(rule) => Some(ChannelHistory {
                size: rule.size,
                ttl_ms: rule.ttl_ms,
                persist: rule.persist,
            }),
            None => configured,
        }
    }
}

wasmrelay_plugin_sdk::router_channels::export_router_channels!(PathRouter);
