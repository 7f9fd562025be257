//! tiered-policy: admission by tier. A known token gives its user and tier; no
//! token gives the anonymous tier (keyed by the peer's IP address) or a
//! refusal; an unknown token is refused with 401. The tier's limits go back to
//! the relay, which enforces them natively. A tier's `register` list says
//! which spaces its users may serve (none unless listed); its `files` list
//! which of `upload`, `download`, `push` its users may do (none unless
//! listed; downloads are further limited by the relay to a client's own
//! files and those offered to it).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;
use wasmrelay_plugin_sdk::policy_files::{
    self, Admission, ClassRate, Denial, FileInfo, Grant, Handshake, Limits, Rate, Rejection,
    TransferAction,
};
use wasmrelay_plugin_sdk::{log, parse_config};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    anonymous_tier: Option<String>,
    tiers: BTreeMap<String, Tier>,
    #[serde(default)]
    tokens: BTreeMap<String, Identity>,
    #[serde(rename = "_plugin", default)]
    _plugin: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tier {
    max_connections: u32,
    messages: RateConfig,
    #[serde(default)]
    classes: Vec<ClassConfig>,
    /// Spaces this tier's users may register instances of: exact names, or
    /// prefixes ending in `*` (`"*"` for any).
    #[serde(default)]
    register: Vec<String>,
    /// What this tier's users may do with files: `upload`, `download`, `push`.
    #[serde(default)]
    files: Vec<FileRight>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FileRight {
    Upload,
    Download,
    Push,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateConfig {
    per_second: u32,
    burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassConfig {
    name: String,
    per_second: u32,
    burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Identity {
    user: String,
    tier: String,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

fn limits(tier: &Tier) -> Limits {
    Limits {
        max_connections: tier.max_connections,
        messages: Rate {
            per_second: tier.messages.per_second,
            burst: tier.messages.burst,
        },
        classes: tier
            .classes
            .iter()
            .map(|c| ClassRate {
                name: c.name.clone(),
                rate: Rate {
                    per_second: c.per_second,
                    burst: c.burst,
                },
            })
            .collect(),
    }
}

/// The token from `?token=` or `Authorization: Bearer`.
fn token(handshake: &Handshake) -> Option<String> {
    let from_query = handshake.query.split('&').find_map(|pair| {
        pair.strip_prefix("token=")
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
    });
    from_query.or_else(|| {
        handshake
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
            .and_then(|(_, value)| value.strip_prefix("Bearer ").map(str::to_owned))
    })
}

fn deny(status: u16, code: &str, reason: &str) -> Admission {
    Admission::Deny(Denial {
        status,
        code: code.into(),
        reason: reason.into(),
    })
}

struct TieredPolicy;

impl policy_files::Guest for TieredPolicy {
    fn init(config: String) -> Result<(), String> {
        let config: Config = parse_config(&config)?;
        for (token, identity) in &config.tokens {
            if !config.tiers.contains_key(&identity.tier) {
                return Err(format!(
                    "tokens.{token}: tier {:?} is not defined in tiers",
                    identity.tier
                ));
            }
        }
        if let Some(tier) = &config.anonymous_tier
            && !config.tiers.contains_key(tier)
        {
            return Err(format!(
                "anonymous_tier: tier {tier:?} is not defined in tiers"
            ));
        }
        log::log(
            log::Level::Info,
            &format!(
                "tiered-policy ready: tiers {:?}, {} tokens",
                config.tiers.keys().collect::<Vec<_>>(),
                config.tokens.len()
            ),
        );
        let _ = CONFIG.set(config);
        Ok(())
    }

    fn self_check() -> Result<(), String> {
        match CONFIG.get() {
            Some(config) if !config.tiers.is_empty() => Ok(()),
            _ => Err("no tiers configured".into()),
        }
    }

    fn admit(handshake: Handshake) -> Admission {
        let Some(config) = CONFIG.get() else {
            return deny(503, "rejected", "policy not initialised");
        };
        let (user, tier_name) = match token(&handshake) {
            Some(token) => match config.tokens.get(&token) {
                Some(identity) => (identity.user.clone(), identity.tier.clone()),
                None => return deny(401, "unauthorized", "unknown token"),
            },
            None => match &config.anonymous_tier {
                Some(tier) => {
                    let ip = handshake
                        .peer
                        .rsplit_once(':')
                        .map_or(handshake.peer.as_str(), |(ip, _)| ip);
                    (format!("anon:{ip}"), tier.clone())
                }
                None => return deny(401, "unauthorized", "a token is required"),
            },
        };
        let tier = &config.tiers[&tier_name];
        Admission::Allow(Grant {
            user,
            tier: tier_name,
            limits: limits(tier),
        })
    }

    fn may_transfer(
        _user: String,
        tier: String,
        action: TransferAction,
        file: FileInfo,
    ) -> Result<(), Rejection> {
        let (right, verb) = match action {
            TransferAction::Upload => (FileRight::Upload, "upload"),
            TransferAction::Download => (FileRight::Download, "download"),
            TransferAction::Push => (FileRight::Push, "push"),
        };
        let allowed = CONFIG
            .get()
            .and_then(|config| config.tiers.get(&tier))
            .is_some_and(|tier| tier.files.contains(&right));
        if allowed {
            Ok(())
        } else {
            Err(Rejection {
                code: "forbidden".into(),
                reason: format!("tier {tier} may not {verb} files ({:?})", file.name),
            })
        }
    }

    fn may_register(_user: String, tier: String, space: String) -> Result<(), Rejection> {
        let allowed = CONFIG
            .get()
            .and_then(|config| config.tiers.get(&tier))
            .is_some_and(|tier| {
                tier.register
                    .iter()
                    .any(|pattern| match pattern.strip_suffix('*') {
                        Some(prefix) => space.starts_with(prefix),
                        None => *pattern == space,
                    })
            });
        if allowed {
            Ok(())
        } else {
            Err(Rejection {
                code: "forbidden".into(),
                reason: format!("tier {tier} may not register instances of space {space:?}"),
            })
        }
    }
}

wasmrelay_plugin_sdk::policy_files::export_policy_files!(TieredPolicy);
