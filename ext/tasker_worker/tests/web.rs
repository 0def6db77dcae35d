//! The web API end to end over real sockets (no Ruby: Rust threads stand in for handler threads).

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use tasker_worker::{EngineError, WorkerBootstrap, WorkerConfig, WorkerSystemHandle};

const TEMPLATE: &str = "namespace: t\nname: one\nversion: 1.0.0\nsteps:\n  - name: only\n    handler: { callable: X }\n";

fn start(dir: &tempfile::TempDir, extra: Value) -> Result<WorkerSystemHandle, EngineError> {
    std::fs::write(dir.path().join("t.yml"), TEMPLATE).unwrap();
    let mut map = json!({
        "templates": dir.path().to_str().unwrap(),
        "enable_web_api": true,
        "web_api_bind": "127.0.0.1:0",
    })
    .as_object()
    .cloned()
    .unwrap();
    map.extend(extra.as_object().cloned().unwrap_or_default());
    WorkerBootstrap::start(WorkerConfig::from_map(&map, |_| None).unwrap())
}

/// (status code, body) of a plain HTTP/1.1 GET.
fn get(address: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

fn stop(system: WorkerSystemHandle) {
    system.request_stop();
    let _ = system.stopped().recv();
    system.join();
}

#[test]
fn answers_and_closes_its_socket_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let system = start(&dir, json!({"web_api_token": "tok"})).unwrap();
    system.started().recv().unwrap().unwrap();
    let address = system.status().web_api_bind.unwrap();

    assert_eq!(get(address, "/health", "").0, 401);
    let (code, body) = get(address, "/health", "Authorization: Bearer tok\r\n");
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(address, "/status", "Authorization: Bearer tok\r\n");
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["state"], "running");
    assert_eq!(status["web_api_bind"], address.to_string());
    let (code, body) = get(address, "/missing", "Authorization: Bearer tok\r\n");
    assert_eq!(code, 404);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());

    stop(system);
    let refused = TcpStream::connect_timeout(&address, Duration::from_secs(1));
    assert!(refused.is_err(), "still listening after the worker stopped");
}

#[test]
fn a_port_in_use_fails_the_start_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let Err(err) = start(&dir, json!({"web_api_bind": format!("127.0.0.1:{port}")})) else {
        panic!("started on a port in use");
    };
    assert!(matches!(err, EngineError::Bootstrap(_)), "{err:?}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

/// The server builds its database pool on its own runtime, and says not ready when the database
/// does not answer (nothing listens on port 1), while the engine itself fails to start.
#[test]
fn not_ready_without_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let system = start(
        &dir,
        json!({"backend": "postgres", "database_url": "postgres://nobody@127.0.0.1:1/none"}),
    )
    .unwrap();
    let address = system.status().web_api_bind.unwrap();
    let (code, body) = get(address, "/ready", "");
    assert_eq!(code, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["database"], false);
    assert!(system.started().recv().unwrap().is_err());
    stop(system);
    assert!(TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_err());
}
