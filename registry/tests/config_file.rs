//! pilot-registry's JSON config file through the binary: the shipped example documents every
//! setting and passes --check-config; unknown keys and bad values are errors naming the key.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn registry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pilot-registry"))
        .args(args)
        .env_remove("PILOT_REGISTRY_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn shipped_example_documents_every_setting_and_checks() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("beacon-token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").unwrap();
    let store = dir.path().join("r.redb");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config/registry.json");
    let out = registry(&[
        "--config",
        example.to_str().unwrap(),
        "--beacon-token-file",
        token.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--check-config",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let settings: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).unwrap();
    let file: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&example).unwrap()).unwrap();
    assert!(settings.len() >= 10, "{settings:?}");
    for key in settings.keys() {
        assert!(
            file.contains_key(&format!("# {key}")),
            "{key} is not documented"
        );
    }
    assert_eq!(settings["addr"], "[::]:9000");
    assert_eq!(settings["store"], store.to_str().unwrap());
    assert!(!store.exists(), "--check-config opened the store");
}

#[test]
fn unknown_keys_and_bad_values_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("registry.json");
    for (json, want) in [
        (r#"{"colour": "blue"}"#, "unknown key \"colour\""),
        (r#"{"addr": "nowhere"}"#, "--addr"),
        (r#"{"requests-per-ip": -1}"#, "--requests-per-ip"),
    ] {
        std::fs::write(&f, json).unwrap();
        let out = registry(&["--config", f.to_str().unwrap(), "--check-config"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{json}: {err}");
        assert!(err.contains(want), "{json}: {err}");
    }
}
