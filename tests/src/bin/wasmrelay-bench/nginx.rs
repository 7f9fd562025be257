//! nginx as a WebSocket reverse proxy in front of the bare relay, when
//! Debian's `nginx` is installed. The benchmark installs nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use wasmrelay_tests::{ChildProcess, free_port};

/// A running nginx (master and workers), stopped with SIGTERM when dropped
/// so its workers go with it.
pub struct Nginx {
    process: ChildProcess,
    pub port: u16,
    _prefix: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.process.terminate(Duration::from_secs(5));
    }
}

pub fn find() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Starts nginx proxying `/ws` to `backend`, one worker per core.
pub async fn start(binary: &Path, backend: SocketAddr) -> anyhow::Result<Nginx> {
    let prefix = tempfile::tempdir()?;
    let dir = prefix.path().display().to_string();
    let port = free_port();
    let config = format!(
        r#"daemon off;
master_process on;
user root;
worker_processes auto;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    tcp_nodelay on;
    server {{
        listen 127.0.0.1:{port};
        location /ws {{
            proxy_pass http://{backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"#
    );
    let config_path = prefix.path().join("nginx.conf");
    std::fs::write(&config_path, config)?;
    let binary = binary.to_str().context("nginx path")?;
    let mut process = ChildProcess::spawn(
        binary,
        &[
            "-p",
            &dir,
            "-e",
            &format!("{dir}/error.log"),
            "-c",
            config_path.to_str().context("path")?,
        ],
    )?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(Nginx {
                process,
                port,
                _prefix: prefix,
            });
        }
        if let Some(status) = process.child.try_wait()? {
            let log = std::fs::read_to_string(prefix.path().join("error.log")).unwrap_or_default();
            bail!("nginx exited with {status}: {log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nginx did not listen on {port} within 5 s")
}
