//! https and wss on the TLS listener: the same endpoints as plain HTTP and
//! WebSocket, the development certificate, and certificate files reloaded for
//! new connections without dropping established ones.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use wasmrelay_tests::{TestRelay, wait_for};

fn connector(cert_pem: &Path) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn tls_stream(
    addr: std::net::SocketAddr,
    cert_pem: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector(cert_pem)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

async fn https_get(
    addr: std::net::SocketAddr,
    cert_pem: &Path,
    path: &str,
) -> std::io::Result<String> {
    let mut stream = tls_stream(addr, cert_pem).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::test]
async fn https_and_wss_serve_the_same_endpoints() {
    let relay = TestRelay::start().await;
    let addr = relay.https_addr.expect("TLS is on");
    let health = https_get(addr, &relay.cert_pem, "/healthz").await.unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains(r#"{"status":"ok"}"#), "{health}");

    let stream = tls_stream(addr, &relay.cert_pem).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/ws", stream)
        .await
        .unwrap();
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text(
        json!({"type": "hello", "v": 1}).to_string().into(),
    ))
    .await
    .unwrap();
    let Some(Ok(Message::Text(welcome))) = ws.next().await else {
        panic!("no welcome over wss")
    };
    assert!(welcome.contains("\"welcome\""), "{welcome}");
    let table = wasmrelay_tests::get_json(&relay.url("/admin/connections"))
        .await
        .unwrap();
    assert!(
        table["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["transport"] == "ws"),
        "{table}"
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn plain_http_on_the_tls_port_and_untrusted_clients_are_refused() {
    let relay = TestRelay::start().await;
    let addr = relay.https_addr.unwrap();
    // Plain HTTP to the TLS port: the handshake fails, nothing is served.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    // A client that trusts another certificate does not connect.
    let other = TestRelay::start().await;
    assert!(tls_stream(addr, &other.cert_pem).await.is_err());
    // The relay still serves a proper client.
    let health = https_get(addr, &relay.cert_pem, "/healthz").await.unwrap();
    assert!(health.starts_with("HTTP/1.1 200"));
    other.stop().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn changed_certificate_files_are_served_to_new_connections_only() {
    let dir = tempfile::tempdir().unwrap();
    let write_pair = |name: &str| {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = dir.path().join(format!("{name}-cert.pem"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        (cert, generated.signing_key.serialize_pem())
    };
    let (first_cert, first_key) = write_pair("first");
    let live_cert = dir.path().join("cert.pem");
    let live_key = dir.path().join("key.pem");
    std::fs::copy(&first_cert, &live_cert).unwrap();
    std::fs::write(&live_key, &first_key).unwrap();
    let (cert_path, key_path) = (live_cert.clone(), live_key.clone());
    let relay = TestRelay::start_with(|c| {
        c.tls.cert = Some(cert_path);
        c.tls.key = Some(key_path);
        c.tls.reload_interval_ms = 100;
    })
    .await;
    let addr = relay.https_addr.unwrap();
    let old = tls_stream(addr, &first_cert)
        .await
        .expect("the first certificate is served");

    let (second_cert, second_key) = write_pair("second");
    std::fs::write(&live_key, &second_key).unwrap();
    std::fs::copy(&second_cert, &live_cert).unwrap();
    wait_for(
        "the second certificate to be served",
        Duration::from_secs(10),
        || async { tls_stream(addr, &second_cert).await.ok().map(|_| ()) },
    )
    .await;
    assert!(
        tls_stream(addr, &first_cert).await.is_err(),
        "new connections use the new certificate"
    );

    // The connection made with the first certificate still works.
    let mut old = old;
    old.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    old.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    relay.stop().await.unwrap();
}

/// A self-signed certificate for `names`, valid only in `validity`, written
/// to `dir`; returns the certificate and key paths.
fn write_certificate(
    dir: &Path,
    name: &str,
    names: &[&str],
    validity: Option<(i32, i32)>,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    if let Some((from, until)) = validity {
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
    }
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.join(format!("{name}-cert.pem"));
    let key_path = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[tokio::test]
async fn expired_or_mismatched_certificates_fail_the_handshake_on_both_transports() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("expired", ["localhost"], Some((2020, 2021)), "expired"),
        ("mismatched", ["example.com"], None, "not valid for name"),
    ];
    for (name, names, validity, expected) in cases {
        let (cert, key) = write_certificate(dir.path(), name, &names, validity);
        let relay = TestRelay::start_with(|c| {
            c.tls.cert = Some(cert.clone());
            c.tls.key = Some(key);
        })
        .await;

        // wss/https: the client's verifier refuses and says why.
        let error = tls_stream(relay.https_addr.unwrap(), &cert)
            .await
            .expect_err("a bad certificate must not be accepted")
            .to_string();
        assert!(error.to_lowercase().contains(expected), "{name}: {error}");

        // QUIC: the same certificate, the same refusal.
        let endpoint = wasmrelay_tests::quic_client(&cert, b"wasmrelay/1").unwrap();
        let error = endpoint
            .connect(relay.quic_addr.unwrap(), "localhost")
            .unwrap()
            .await
            .expect_err("a bad certificate must not be accepted over QUIC")
            .to_string();
        assert!(error.to_lowercase().contains(expected), "{name}: {error}");

        // Nothing else is affected: plain HTTP still answers.
        let health = reqwest::get(relay.url("/healthz")).await.unwrap();
        assert_eq!(health.status(), 200);
        relay.stop().await.unwrap();
    }
}
