//! A plugin's manifest (`plugin.toml`): who it is, which role it plays, which
//! capabilities it is granted, its sandbox limits and its own configuration.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The WIT package version this relay implements; a plugin built against
/// another (incompatible) version is refused at load.
pub const WIT_VERSION: &str = "0.1.0";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Capabilities the plugin may import; everything else is refused.
    #[serde(default)]
    pub capabilities: BTreeSet<Capability>,
    /// Filters only: the channels the filter sees (exact names, or prefixes ending in `*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    #[serde(default)]
    pub limits: PluginLimits,
    /// With the `http` capability: hosts (`name` or `name:port`) it may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// The plugin's own configuration, handed to `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Router,
    Policy,
    Filter,
    Task,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Policy => "policy",
            Role::Filter => "filter",
            Role::Task => "task",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Log,
    Kv,
    Publish,
    Presence,
    Clock,
    Http,
    Stats,
    /// Task plugins only: put files and offer them (push).
    Transfer,
}

impl Capability {
    pub const ALL: [Capability; 8] = [
        Capability::Log,
        Capability::Kv,
        Capability::Publish,
        Capability::Presence,
        Capability::Clock,
        Capability::Http,
        Capability::Stats,
        Capability::Transfer,
    ];

    /// The WIT interface name that carries this capability.
    pub fn interface(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Kv => "kv",
            Capability::Publish => "publish",
            Capability::Presence => "presence",
            Capability::Clock => "clock",
            Capability::Http => "http",
            Capability::Stats => "stats",
            Capability::Transfer => "transfer",
        }
    }

    pub fn from_interface(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.interface() == name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginLimits {
    /// Largest linear memory an instance may grow to.
    pub memory_bytes: u64,
    /// Longest one call may run before it is interrupted.
    pub call_timeout_ms: u64,
    /// Keys the plugin may keep in `kv`.
    pub kv_max_keys: usize,
    /// Largest `kv` value.
    pub kv_max_value_bytes: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 16 * 1024 * 1024,
            // Legitimate calls take microseconds; the deadline exists to stop
            // runaway loops, and must not fire because a busy machine
            // descheduled the thread for a few milliseconds.
            call_timeout_ms: 50,
            kv_max_keys: 10_000,
            kv_max_value_bytes: 64 * 1024,
        }
    }
}

/// A manifest that cannot be used; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
#[error("invalid manifest: {0}")]
pub struct ManifestError(pub String);

impl Manifest {
    pub fn from_toml(text: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| ManifestError(e.to_string()))?;
        Ok(manifest)
    }

    /// Checks what serde cannot, against the relay's ceilings.
    pub fn validate(&self, max_memory_bytes: u64) -> Result<(), ManifestError> {
        let fail = |msg: String| Err(ManifestError(msg));
        if let Err(reason) = validate_plugin_name(&self.name) {
            return fail(format!("name: {reason}"));
        }
        if self.version.is_empty() || self.version.len() > 64 {
            return fail("version: must be 1 to 64 characters".into());
        }
        if self.limits.memory_bytes < 64 * 1024 || self.limits.memory_bytes > max_memory_bytes {
            return fail(format!(
                "limits.memory_bytes: must be between 65536 and the relay's plugins.max_memory_bytes ({max_memory_bytes})"
            ));
        }
        if self.limits.call_timeout_ms == 0 || self.limits.call_timeout_ms > 10_000 {
            return fail("limits.call_timeout_ms: must be between 1 and 10000".into());
        }
        if self.role != Role::Task && self.capabilities.contains(&Capability::Transfer) {
            return fail("capabilities: transfer is for task plugins only".into());
        }
        if self.role != Role::Filter && !self.channels.is_empty() {
            return fail("channels: only a filter has channels".into());
        }
        if !self.allow_hosts.is_empty() && !self.capabilities.contains(&Capability::Http) {
            return fail("allow_hosts: needs the http capability".into());
        }
        if let Some(host) = self.allow_hosts.iter().find(|h| is_metadata_host(h)) {
            return fail(format!(
                "allow_hosts: {host:?} is a link-local or cloud metadata address; plugins may not reach it"
            ));
        }
        Ok(())
    }

    /// The JSON `init` receives: the `[config]` table plus `_plugin = {name, version}`.
    pub fn init_config(&self) -> String {
        let mut config = serde_json::to_value(&self.config).unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut config {
            map.insert(
                "_plugin".into(),
                serde_json::json!({ "name": self.name, "version": self.version }),
            );
        }
        config.to_string()
    }

    /// Whether this filter sees messages on `channel`.
    pub fn covers_channel(&self, channel: &str) -> bool {
        if self.channels.is_empty() {
            return true;
        }
        self.channels
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => channel.starts_with(prefix),
                None => pattern == channel,
            })
    }
}

/// Plugin names: 1–64 of `a-z 0-9 -`, so they are safe in URLs and file names.
pub fn validate_plugin_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("may contain only a-z, 0-9 and '-'");
    }
    Ok(())
}

/// Link-local addresses (169.254.0.0/16, fe80::/10) and the metadata names
/// cloud providers serve instance credentials on: never a plugin's business.
fn is_metadata_host(entry: &str) -> bool {
    use std::net::{IpAddr, SocketAddr};
    // Entries are `host` or `host:port`; IPv6 literals may come in brackets.
    let ip = entry
        .parse::<SocketAddr>()
        .map(|addr| addr.ip())
        .or_else(|_| entry.trim_matches(['[', ']']).parse::<IpAddr>());
    match ip {
        Ok(IpAddr::V4(ip)) => ip.is_link_local(),
        Ok(IpAddr::V6(ip)) => {
            (ip.segments()[0] & 0xffc0) == 0xfe80
                || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
        Err(_) => {
            let host = entry.rsplit_once(':').map_or(entry, |(host, _)| host);
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            matches!(host.as_str(), "metadata.google.internal" | "metadata")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_and_metadata_hosts_are_never_allowed() {
        for host in [
            "169.254.169.254",
            "169.254.169.254:80",
            "[fe80::1]:8080",
            "fe80::1",
            "[::ffff:169.254.169.254]:80",
            "metadata.google.internal",
            "Metadata.Google.Internal.:80",
        ] {
            assert!(is_metadata_host(host), "{host}");
        }
        for host in [
            "localhost:8080",
            "127.0.0.1",
            "example.com",
            "[::1]:80",
            "10.0.0.1",
        ] {
            assert!(!is_metadata_host(host), "{host}");
        }
    }

    #[test]
    fn bundled_manifests_are_valid() {
        for text in [
            include_str!("../../../plugins/path-router/plugin.toml"),
            include_str!("../../../plugins/tiered-policy/plugin.toml"),
            include_str!("../../../plugins/stamp-filter/plugin.toml"),
            include_str!("../../../examples/plugin-template/plugin.toml"),
        ] {
            let manifest = Manifest::from_toml(text).unwrap();
            manifest.validate(64 * 1024 * 1024).unwrap();
        }
    }

    #[test]
    fn only_task_plugins_may_transfer_files() {
        let manifest = |role: &str| {
            Manifest::from_toml(&format!(
                "name = \"x\"\nversion = \"1\"\nrole = \"{role}\"\ncapabilities = [\"transfer\"]\n"
            ))
            .unwrap()
        };
        manifest("task").validate(1 << 26).unwrap();
        for role in ["router", "policy", "filter"] {
            let err = manifest(role).validate(1 << 26).unwrap_err();
            assert!(err.0.contains("transfer is for task plugins"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let err =
            Manifest::from_toml("name = \"x\"\nversion = \"1\"\nrole = \"bouncer\"\n").unwrap_err();
        assert!(err.0.contains("role"), "{err}");
        let err = Manifest::from_toml(
            "name = \"x\"\nversion = \"1\"\nrole = \"filter\"\ncapabilities = [\"fs\"]\n",
        )
        .unwrap_err();
        assert!(err.0.contains("capabilities"), "{err}");
        let mut manifest =
            Manifest::from_toml("name = \"Bad Name\"\nversion = \"1\"\nrole = \"filter\"\n")
                .unwrap();
        assert!(
            manifest
                .validate(1 << 26)
                .unwrap_err()
                .0
                .starts_with("name")
        );
        manifest.name = "ok".into();
        manifest.limits.memory_bytes = 1 << 30;
        assert!(
            manifest
                .validate(1 << 26)
                .unwrap_err()
                .0
                .contains("limits.memory_bytes")
        );
    }

    #[test]
    fn channel_patterns() {
        let mut manifest =
            Manifest::from_toml("name = \"f\"\nversion = \"1\"\nrole = \"filter\"\n").unwrap();
        assert!(manifest.covers_channel("anything"));
        manifest.channels = vec!["chat/*".into(), "news".into()];
        assert!(manifest.covers_channel("chat/room"));
        assert!(manifest.covers_channel("news"));
        assert!(!manifest.covers_channel("newsroom"));
    }

    #[test]
    fn init_config_carries_identity() {
        let manifest = Manifest::from_toml(
            "name = \"f\"\nversion = \"2.1\"\nrole = \"filter\"\n[config]\nmode = \"json\"\n",
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&manifest.init_config()).unwrap();
        assert_eq!(json["mode"], "json");
        assert_eq!(json["_plugin"]["version"], "2.1");
    }
}
