//! The identity file: v1 compatibility, atomic 0600 writes, and clear errors naming the path.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::fs;
use std::os::unix::fs::PermissionsExt;

use rand_core::OsRng;
use tunnel::identity::{Identity, IdentityError, IdentityFormatError};

/// A v1 identity file for seed [7; 32], encoded with Python's base64.
const V1_FILE: &str = r#"{
  "private_key": "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwfqSmxj4pxSCr71UHsTLsX5lUd2rr6+e5JCHuppFEbSLA==",
  "public_key": "6kpsY+KcUgq+9VB7Ey7F+ZVHdq6+vnuSQh7qaRRG0iw="
}"#;

fn mode(p: &std::path::Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn reads_and_writes_the_v1_format() {
    let id = Identity::from_json(V1_FILE.as_bytes()).unwrap();
    assert_eq!(id.signing_key().to_bytes(), [7; 32]);
    assert_eq!(
        id.public_key_base64(),
        "6kpsY+KcUgq+9VB7Ey7F+ZVHdq6+vnuSQh7qaRRG0iw="
    );
    // Our output is byte-for-byte v1's pretty JSON (plus a final newline).
    assert_eq!(id.to_json().as_str(), format!("{V1_FILE}\n"));
}

#[test]
fn save_is_atomic_0600_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/sub/identity.json");
    let id = Identity::generate(&mut OsRng);
    id.save(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    let back = Identity::load(&path).unwrap();
    assert_eq!(back.public_key(), id.public_key());
    // No temporary file is left behind.
    let names: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("identity.json")]);
    // Saving again replaces the file.
    let id2 = Identity::generate(&mut OsRng);
    id2.save(&path).unwrap();
    assert_eq!(
        Identity::load(&path).unwrap().public_key(),
        id2.public_key()
    );
}

#[test]
fn load_or_create_keeps_the_first_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.json");
    let (first, created) = Identity::load_or_create(&path, &mut OsRng).unwrap();
    assert!(created);
    let (again, created) = Identity::load_or_create(&path, &mut OsRng).unwrap();
    assert!(!created);
    assert_eq!(first.public_key(), again.public_key());
}

#[test]
fn missing_file_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.json");
    match Identity::load(&path) {
        Err(IdentityError::NotFound(p)) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
}

#[test]
fn loose_permissions_are_refused_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.json");
    Identity::generate(&mut OsRng).save(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = Identity::load(&path).unwrap_err();
    assert!(matches!(
        err,
        IdentityError::Permissions { mode: 0o644, .. }
    ));
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("chmod 600"), "{msg}");
}

fn write_0600(path: &std::path::Path, contents: &[u8]) {
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// Whether a format error is the expected one.
type Expect = fn(&IdentityFormatError) -> bool;

#[test]
fn corrupt_and_truncated_files_are_refused_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.json");
    let cases: Vec<(Vec<u8>, Expect)> = vec![
        (V1_FILE.as_bytes()[..60].to_vec(), |e| {
            matches!(e, IdentityFormatError::Json(_))
        }),
        (b"".to_vec(), |e| matches!(e, IdentityFormatError::Json(_))),
        (b"\xff\xfe garbage".to_vec(), |e| {
            matches!(e, IdentityFormatError::Json(_))
        }),
        (
            br#"{"private_key":"!!!","public_key":"6kpsY+KcUgq+9VB7Ey7F+ZVHdq6+vnuSQh7qaRRG0iw="}"#
                .to_vec(),
            |e| matches!(e, IdentityFormatError::Base64("private_key")),
        ),
        (
            br#"{"private_key":"BwcH","public_key":"6kpsY+KcUgq+9VB7Ey7F+ZVHdq6+vnuSQh7qaRRG0iw="}"#
                .to_vec(),
            |e| {
                matches!(
                    e,
                    IdentityFormatError::Length {
                        field: "private_key",
                        expected: 64,
                        got: 3
                    }
                )
            },
        ),
        (
            V1_FILE.replace("6kpsY+Kc", "AAAAAAAA").into_bytes(),
            |e| matches!(e, IdentityFormatError::PublicKeyMismatch),
        ),
    ];
    for (contents, expect) in cases {
        write_0600(&path, &contents);
        let err = Identity::load(&path).unwrap_err();
        match &err {
            IdentityError::Format { path: p, source } => {
                assert_eq!(p, &path);
                assert!(expect(source), "{source:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains(&path.display().to_string()));
        // A corrupt identity is never replaced by a new one.
        assert!(Identity::load_or_create(&path, &mut OsRng).is_err());
        assert_eq!(fs::read(&path).unwrap(), contents);
    }
}

#[test]
fn directory_in_place_of_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.json");
    fs::create_dir(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
    let err = Identity::load(&path).unwrap_err();
    assert!(matches!(err, IdentityError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[test]
fn save_never_writes_through_a_planted_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.json");
    let target = dir.path().join("elsewhere");
    fs::write(&target, b"untouched").unwrap();
    let tmp = dir
        .path()
        .join(format!(".identity.json.tmp.{}", std::process::id()));
    std::os::unix::fs::symlink(&target, &tmp).unwrap();
    let id = Identity::generate(&mut OsRng);
    id.save(&path).unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"untouched");
    assert_eq!(Identity::load(&path).unwrap().public_key(), id.public_key());
}
