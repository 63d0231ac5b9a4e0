//! Starting, stopping, restarting and dropping private clusters.

mod common;

use common::{port_open, psql};
use crudgate_pgtemp::{Cluster, ClusterOptions};
use std::os::unix::fs::MetadataExt;

#[test]
fn cluster_starts_accepts_connections_and_is_removed_on_drop() {
    let cluster = Cluster::start().expect("start");
    let port = cluster.port();
    assert_eq!(
        cluster.url(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );
    assert_eq!(
        psql(cluster.bin_dir(), &cluster.url(), "select 1 + 1").unwrap(),
        "2"
    );
    let data_dir = cluster.data_dir().to_path_buf();
    let root = data_dir.parent().unwrap().to_path_buf();
    assert!(data_dir.join("PG_VERSION").exists());

    drop(cluster);
    assert!(!root.exists(), "{} still exists", root.display());
    assert!(!port_open(port), "port {port} still answers");
}

#[test]
fn stopped_cluster_restarts_on_the_same_port() {
    let cluster = Cluster::start().expect("start");
    let port = cluster.port();
    psql(
        cluster.bin_dir(),
        &cluster.url(),
        "create table kept (x int); insert into kept values (7)",
    )
    .unwrap();

    cluster.stop().expect("stop");
    assert!(!port_open(port));
    assert!(psql(cluster.bin_dir(), &cluster.url(), "select 1").is_err());
    assert!(
        cluster.data_dir().join("PG_VERSION").exists(),
        "stop keeps the data"
    );
    cluster.stop().expect("stopping twice is fine");

    cluster.restart().expect("restart");
    assert_eq!(cluster.port(), port);
    assert_eq!(
        psql(cluster.bin_dir(), &cluster.url(), "select x from kept").unwrap(),
        "7"
    );
    cluster
        .restart()
        .expect("restarting a running cluster is fine");
}

#[test]
fn url_for_names_a_database_on_the_same_server() {
    let cluster = Cluster::start().expect("start");
    psql(cluster.bin_dir(), &cluster.url(), "create database app").unwrap();
    let url = cluster.url_for("app");
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/app", cluster.port())
    );
    assert_eq!(
        psql(cluster.bin_dir(), &url, "select current_database()").unwrap(),
        "app"
    );
}

#[test]
fn default_cluster_is_fast_and_durable_cluster_keeps_fsync_on() {
    let fast = Cluster::start().expect("start fast");
    let durable = Cluster::start_with(ClusterOptions {
        durable: true,
        ..Default::default()
    })
    .expect("start durable");
    assert_ne!(fast.port(), durable.port());
    let settings =
        "select current_setting('fsync') || ',' || current_setting('synchronous_commit') \
                    || ',' || current_setting('max_connections') \
                    || ',' || current_setting('listen_addresses')";
    assert_eq!(
        psql(fast.bin_dir(), &fast.url(), settings).unwrap(),
        "off,off,200,127.0.0.1"
    );
    assert_eq!(
        psql(durable.bin_dir(), &durable.url(), settings).unwrap(),
        "on,on,200,127.0.0.1"
    );
}

#[test]
fn server_socket_and_log_live_in_the_cluster_directory_owned_by_a_non_root_user() {
    let cluster = Cluster::start().expect("start");
    let socket = cluster
        .data_dir()
        .join(format!(".s.PGSQL.{}", cluster.port()));
    assert!(socket.exists(), "{} missing", socket.display());
    assert!(cluster
        .log_file()
        .starts_with(cluster.data_dir().parent().unwrap()));
    let owner = std::fs::metadata(cluster.data_dir()).unwrap().uid();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_ne!(owner, 0, "the data directory must not belong to root");
    }
}

#[test]
fn restart_fails_cleanly_while_the_port_is_taken_and_works_once_it_is_free() {
    let cluster = Cluster::start().expect("start");
    let port = cluster.port();
    cluster.stop().expect("stop");

    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).expect("take the port");
    let err = cluster.restart().unwrap_err();
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    assert!(
        !cluster.data_dir().join("postmaster.pid").exists(),
        "a server was left running"
    );
    drop(squatter);

    cluster.restart().expect("restart once the port is free");
    assert_eq!(
        psql(cluster.bin_dir(), &cluster.url(), "select 1").unwrap(),
        "1"
    );
}
