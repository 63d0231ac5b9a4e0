//! The per-process shared cluster.

mod common;

use common::{port_open, psql};
use std::path::PathBuf;
use std::process::Command;

#[test]
fn shared_cluster_is_started_once_per_process() {
    let a = crudgate_pgtemp::shared();
    let b = crudgate_pgtemp::shared();
    assert!(std::ptr::eq(a, b));
    assert_eq!(psql(a.bin_dir(), &a.url(), "select 42").unwrap(), "42");
}

/// Run in a child process by the test below; does nothing otherwise.
#[test]
fn child_process_prints_its_shared_cluster() {
    if std::env::var_os("PGTEMP_SHARED_CHILD").is_none() {
        return;
    }
    let cluster = crudgate_pgtemp::shared();
    println!("PGTEMP_DATA={}", cluster.data_dir().display());
    println!("PGTEMP_PORT={}", cluster.port());
}

#[test]
fn shared_cluster_is_stopped_and_removed_when_the_process_exits() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_prints_its_shared_cluster",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PGTEMP_SHARED_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, value)| value))
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
            .to_string()
    };
    let data = PathBuf::from(field("PGTEMP_DATA="));
    let port: u16 = field("PGTEMP_PORT=").parse().unwrap();
    assert!(
        !data.parent().unwrap().exists(),
        "{} left behind",
        data.display()
    );
    assert!(!port_open(port), "port {port} still answers");
}
