//! `WorkerBootstrap::handler_references`: what a worker with a given config would call, found
//! without starting it.

use serde_json::{json, Value};
use tasker_worker::{EngineError, WorkerBootstrap, WorkerConfig};

const ORDERS: &str = "namespace: shop\nname: orders\nversion: 1.0.0\nsteps:\n  - { name: pay, handler: { callable: Shop::Pay } }\n  - { name: ship, dependencies: [pay], handler: { callable: Shop::Ship } }\n";
const REPORTS: &str = "namespace: reports\nname: daily\nversion: 2.0.0\nsteps:\n  - { name: build, handler: { callable: Reports::Build } }\n";

fn config(dir: &tempfile::TempDir, extra: Value) -> WorkerConfig {
    let mut map = extra.as_object().cloned().unwrap_or_default();
    map.insert("templates".into(), json!(dir.path().to_str().unwrap()));
    WorkerConfig::from_map(&map, |_| None).unwrap()
}

fn templates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("orders.yml"), ORDERS).unwrap();
    std::fs::write(dir.path().join("reports.yml"), REPORTS).unwrap();
    dir
}

fn callables(config: &WorkerConfig) -> Vec<String> {
    WorkerBootstrap::handler_references(config)
        .unwrap()
        .into_iter()
        .map(|h| {
            format!(
                "{}/{}@{} {} {}",
                h.namespace, h.name, h.version, h.step, h.callable
            )
        })
        .collect()
}

#[test]
fn lists_every_step_of_every_namespace_by_default() {
    let dir = templates();
    assert_eq!(
        callables(&config(&dir, json!({}))),
        [
            "reports/daily@2.0.0 build Reports::Build",
            "shop/orders@1.0.0 pay Shop::Pay",
            "shop/orders@1.0.0 ship Shop::Ship",
        ]
    );
}

#[test]
fn lists_only_the_namespaces_the_worker_runs() {
    let dir = templates();
    assert_eq!(
        callables(&config(&dir, json!({"namespaces": ["shop"]}))),
        [
            "shop/orders@1.0.0 pay Shop::Pay",
            "shop/orders@1.0.0 ship Shop::Ship"
        ]
    );
}

#[test]
fn refuses_what_start_refuses() {
    let dir = templates();
    let err = WorkerBootstrap::handler_references(&config(&dir, json!({"namespaces": ["nobody"]})))
        .unwrap_err();
    assert!(matches!(err, EngineError::Configuration(_)), "{err}");
    assert!(err.to_string().contains("\"nobody\""), "{err}");

    std::fs::write(dir.path().join("broken.yml"), "namespace: x\n").unwrap();
    let err = WorkerBootstrap::handler_references(&config(&dir, json!({}))).unwrap_err();
    assert!(err.to_string().contains("broken.yml"), "{err}");
}

#[test]
fn postgres_namespaces_without_local_templates_list_nothing_to_check() {
    let dir = templates();
    let config = config(
        &dir,
        json!({"backend": "postgres", "database_url": "postgres://127.0.0.1:1/none", "namespaces": ["elsewhere", "reports"]}),
    );
    // Nothing connects: the database URL points nowhere and the listing still answers.
    assert_eq!(
        callables(&config),
        ["reports/daily@2.0.0 build Reports::Build"]
    );
}

#[test]
fn starts_nothing() {
    let dir = templates();
    WorkerBootstrap::handler_references(&config(&dir, json!({}))).unwrap();
    // No test of this binary starts a worker: an engine thread here came from the listing.
    let engine_threads = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|n| n.trim() == "tasker-engine")
        })
        .count();
    assert_eq!(engine_threads, 0);
}
