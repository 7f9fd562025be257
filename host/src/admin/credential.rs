//! The operator credential: the bearer token every operator endpoint asks
//! for. Configured (`admin.token`), or generated on first start into
//! `<data_dir>/admin.token` (mode 0600) and reused, so the local CLI finds it
//! without being told. Only `admin.insecure = true` opens the operator API,
//! and only on loopback listeners.

use std::path::{Path, PathBuf};

use crate::config::Config;

/// File name of the generated token inside the data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// What operator endpoints ask of a caller.
#[derive(Clone, PartialEq, Eq)]
pub enum AdminCredential {
    /// `Authorization: Bearer <token>`.
    Token(String),
    /// Nothing: `admin.insecure = true` on loopback listeners only.
    Open,
}

impl std::fmt::Debug for AdminCredential {
    // Never print the token: this type ends up in logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token(_) => f.write_str("Token(..)"),
            Self::Open => f.write_str("Open"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error("cannot read the admin token {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the admin token {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin token file {path} is empty; delete it to have a new token generated")]
    Empty { path: PathBuf },
}

/// Where the generated token lives for a data directory.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// The credential `config` asks for; generates and stores a token when none
/// is configured and none was generated before.
pub fn resolve(config: &Config) -> Result<AdminCredential, CredentialError> {
    if config.admin.insecure {
        tracing::warn!(
            "admin.insecure = true: /admin and /metrics answer anyone who can reach the loopback listener"
        );
        return Ok(AdminCredential::Open);
    }
    if let Some(token) = &config.admin.token {
        return Ok(AdminCredential::Token(token.clone()));
    }
    let path = token_path(&config.server.data_dir);
    match read_token_file(&path)? {
        Some(token) => {
            if let Err(e) = crate::secrets::restrict(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot make the admin token owner-only (0600)");
            }
            tracing::info!(path = %path.display(), "admin token: using the stored one");
            Ok(AdminCredential::Token(token))
        }
        None => {
            let token =
                crate::secrets::random_token().map_err(|source| CredentialError::Write {
                    path: path.clone(),
                    source,
                })?;
            crate::secrets::write_private(&path, format!("{token}\n").as_bytes()).map_err(
                |source| CredentialError::Write {
                    path: path.clone(),
                    source,
                },
            )?;
            tracing::info!(path = %path.display(), "admin token: generated (mode 0600); the CLI reads it from there");
            Ok(AdminCredential::Token(token))
        }
    }
}

/// The token stored at `path`, or `None` when there is no such file.
pub fn read_token_file(path: &Path) -> Result<Option<String>, CredentialError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            if token.is_empty() {
                Err(CredentialError::Empty {
                    path: path.to_owned(),
                })
            } else {
                Ok(Some(token.to_owned()))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CredentialError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_in(dir: &Path) -> Config {
        let mut config = Config::default();
        config.server.data_dir = dir.to_owned();
        config
    }

    #[test]
    fn a_generated_token_is_stored_owner_only_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let AdminCredential::Token(first) = resolve(&config).unwrap() else {
            panic!("the default is a token");
        };
        assert_eq!(first.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(token_path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(resolve(&config).unwrap(), AdminCredential::Token(first));
    }

    #[test]
    fn a_configured_token_wins_and_insecure_opens() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_in(dir.path());
        config.admin.token = Some("configured".into());
        assert_eq!(
            resolve(&config).unwrap(),
            AdminCredential::Token("configured".into())
        );
        assert!(!token_path(dir.path()).exists(), "nothing generated");
        config.admin.token = None;
        config.admin.insecure = true;
        assert_eq!(resolve(&config).unwrap(), AdminCredential::Open);
    }

    #[test]
    fn an_empty_token_file_is_an_error_not_an_open_door() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(token_path(dir.path()), "\n").unwrap();
        let err = resolve(&config_in(dir.path())).unwrap_err();
        assert!(err.to_string().contains("admin.token"), "{err}");
    }
}
