//! Secure defaults, each test an attack that used to work against a default
//! relay: the operator API without a credential, a guest taking over a
//! space, a caller's credentials reaching an instance that did not ask for
//! them, connections that never finish their headers, churn that pushes a
//! bystander off its channel.

use std::time::Duration;

use wasmrelay_tests::{ChildProcess, free_port, wait_for};

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");

/// Runs the `wasmrelay` CLI with `args`; returns success and all it printed.
async fn cli(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(RELAY)
            .args(&args)
            .output()
            .expect("run the CLI");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    })
    .await
    .expect("CLI thread")
}

/// A relay started as `wasmrelay serve` with nothing about admin configured,
/// on `host` (loopback or every interface); only loopback is ever dialled.
async fn default_relay(host: &str) -> (ChildProcess, String, tempfile::TempDir) {
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let relay = ChildProcess::spawn(
        RELAY,
        &[
            "serve",
            "--listen",
            &format!("{host}:{port}"),
            "--data-dir",
            data_dir.path().to_str().unwrap(),
            "--no-quic",
            "--no-tls",
        ],
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let health = format!("{base}/healthz");
    wait_for(
        "the relay to answer /healthz",
        Duration::from_secs(60),
        || {
            let health = health.clone();
            async move { (reqwest::get(&health).await.ok()?.status() == 200).then_some(()) }
        },
    )
    .await;
    (relay, base, data_dir)
}

#[tokio::test]
async fn operator_endpoints_refuse_anonymous_callers_on_loopback_and_on_every_interface() {
    for host in ["127.0.0.1", "0.0.0.0"] {
        let (_relay, base, data_dir) = default_relay(host).await;
        let token_file = data_dir.path().join("admin.token");
        let token = std::fs::read_to_string(&token_file).unwrap();
        let token = token.trim();
        assert_eq!(token.len(), 64, "32 random bytes in hex");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the token file is owner-only");
        }

        let client = reqwest::Client::new();
        for path in [
            "/admin/connections",
            "/admin/stats",
            "/admin/plugins",
            "/admin/plugins/tiered-policy",
            "/metrics",
        ] {
            let response = client.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 401, "GET {path} on {host}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        // The attacks: unload the rate policy, install a plugin.
        let response = client
            .delete(format!("{base}/admin/plugins/tiered-policy"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "DELETE on {host}");
        let response = client
            .put(format!("{base}/admin/plugins/grabber"))
            .body("not even multipart")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "PUT on {host}");
        let response = client
            .post(format!("{base}/admin/plugins/tiered-policy/rollback"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "rollback on {host}");

        // The operator's token opens them, and nothing was changed.
        let plugins: serde_json::Value = client
            .get(format!("{base}/admin/plugins"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let names: Vec<&str> = plugins
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(names.contains(&"tiered-policy"), "{plugins}");
        assert!(!names.contains(&"grabber"), "{plugins}");
        // Health stays public.
        let response = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 200);

        // The local CLI finds the token in the data directory by itself.
        let data = data_dir.path().display().to_string();
        let (ok, out) = cli(vec![
            "conns".into(),
            "--relay".into(),
            base.clone(),
            "--data-dir".into(),
            data,
        ])
        .await;
        assert!(ok, "{out}");
        assert!(out.contains("Total:"), "{out}");
        // Elsewhere, without the token, it says what to do.
        let elsewhere = tempfile::tempdir().unwrap();
        let (ok, out) = cli(vec![
            "plugin".into(),
            "list".into(),
            "--relay".into(),
            base.clone(),
            "--data-dir".into(),
            elsewhere.path().display().to_string(),
        ])
        .await;
        assert!(!ok, "{out}");
        assert!(out.contains("401") && out.contains("--token"), "{out}");
    }
}

#[tokio::test]
async fn an_open_admin_plane_is_refused_on_a_public_listener() {
    let data_dir = tempfile::tempdir().unwrap();
    let config = data_dir.path().join("relay.toml");
    std::fs::write(&config, "[admin]\ninsecure = true\n").unwrap();
    let (ok, out) = cli(vec![
        "serve".into(),
        "--config".into(),
        config.display().to_string(),
        "--listen".into(),
        format!("0.0.0.0:{}", free_port()),
        "--data-dir".into(),
        data_dir.path().display().to_string(),
        "--no-quic".into(),
        "--no-tls".into(),
    ])
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("admin.insecure"), "{out}");
    assert!(out.contains("0.0.0.0"), "{out}");
}
