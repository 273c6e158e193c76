//! Identity file parser: no panic; an accepted file re-serializes to an equal identity.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::Identity;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = Identity::from_json(data) {
        let again = Identity::from_json(id.to_json().as_bytes()).unwrap();
        assert_eq!(again.public_key(), id.public_key());
    }
});
