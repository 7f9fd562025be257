//! path-router: routes publishes and requests by prefix rules from its
//! manifest's `[config]`. The first matching rule decides; no match passes.
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
//! ```

use std::sync::OnceLock;

use serde::Deserialize;
use wasmrelay_plugin_sdk::router::{self, Decision, RequestInfo};
use wasmrelay_plugin_sdk::{Rejection, log, parse_config};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    rules: Vec<Rule>,
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

static RULES: OnceLock<Vec<Rule>> = OnceLock::new();

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
        log::log(
            log::Level::Info,
            &format!("path-router ready with {} rules", config.rules.len()),
        );
        let _ = RULES.set(config.rules);
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
}

wasmrelay_plugin_sdk::router::export_router!(PathRouter);
