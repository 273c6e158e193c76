//! SACK payload parser: no panic; what parses re-encodes to the same prefix.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::stream::sack;

fuzz_target!(|data: &[u8]| {
    if let Some(blocks) = sack::parse(data) {
        let list: Vec<sack::Block> = blocks.iter().collect();
        let mut out = [0u8; sack::MAX_LEN];
        let n = sack::emit(&list, &mut out).unwrap();
        assert_eq!(&out[..n], &data[..n]);
    }
});
