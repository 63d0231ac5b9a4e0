//! Finding the PostgreSQL binaries, and what happens when they are missing.

use crudgate_pgtemp::{find_bin_dir, find_bin_dir_in, Cluster, ClusterOptions, Error};
use std::path::PathBuf;

#[test]
fn missing_binaries_give_a_clear_message() {
    let empty = tempfile::tempdir().unwrap();
    let err = find_bin_dir_in([empty.path().to_path_buf()]).unwrap_err();
    assert!(matches!(err, Error::NotInstalled(_)), "{err:?}");
    let msg = err.to_string();
    for needle in [
        "initdb",
        "apt-get install postgresql",
        "brew install postgresql",
        "--database-url",
        "DATABASE_URL",
        &empty.path().display().to_string(),
    ] {
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
}

#[test]
fn starting_with_an_empty_bin_dir_fails_with_not_installed() {
    let empty = tempfile::tempdir().unwrap();
    let err = Cluster::start_with(ClusterOptions {
        bin_dir: Some(empty.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, Error::NotInstalled(_)), "{err:?}");
}

#[test]
fn lookup_skips_directories_without_all_three_binaries() {
    let real = find_bin_dir().expect("PostgreSQL is installed on test machines");
    let empty = tempfile::tempdir().unwrap();
    // A directory with only `initdb` in it does not qualify.
    let partial = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(real.join("initdb"), partial.path().join("initdb")).unwrap();
    let found = find_bin_dir_in([
        empty.path().to_path_buf(),
        partial.path().to_path_buf(),
        real.clone(),
    ])
    .unwrap();
    assert_eq!(found, real);
    for name in ["initdb", "pg_ctl", "postgres"] {
        assert!(found.join(name).exists());
    }
}

#[test]
fn lookup_with_no_candidates_is_not_installed() {
    let err = find_bin_dir_in(Vec::<PathBuf>::new()).unwrap_err();
    assert!(matches!(err, Error::NotInstalled(_)), "{err:?}");
}
