//! The committed example configuration documents every key: it must load as it is.

use std::process::Command;

#[test]
fn the_example_configuration_loads_as_committed() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../crudgate.example.toml");
    // `rejections list` loads the configuration first and only then needs a database, so a
    // bad key fails with a configuration error and a good file with the database message.
    let out = Command::new(env!("CARGO_BIN_EXE_crudgate"))
        .args(["--config", root, "rejections", "list"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run crudgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("need --database-url"),
        "the example must load cleanly: {stderr}"
    );
}

#[test]
fn an_unknown_configuration_key_is_refused() {
    let dir = std::env::temp_dir().join(format!("crudgate-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[engine]\non_fatall = \"skip\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_crudgate"))
        .arg("--config")
        .arg(&path)
        .args(["rejections", "list"])
        .output()
        .expect("run crudgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("on_fatall"), "{stderr}");
}
