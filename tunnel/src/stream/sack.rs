//! SACK blocks as v1 carries them: the payload of a pure ACK (v1 wire §3.4).
//!
//! ```text
//! "SACK" | count (u8, 1..=4) | count x ( left u32 BE | right u32 BE )
//! ```
//!
//! `left` is the first sequence number held, `right` one past the last (half-open). Blocks are
//! sorted ascending. Trailing bytes are allowed. A v1 receiver parses *any* ACK payload that
//! looks like this as SACK, so a sender must never start a data segment with such bytes; see
//! [`would_parse_as_sack`].

/// Marker at the start of a SACK payload.
pub const MARKER: [u8; 4] = *b"SACK";
/// Most blocks one ACK carries.
pub const MAX_BLOCKS: usize = 4;
/// Bytes of one block.
const BLOCK_LEN: usize = 8;

/// One SACK block in wire sequence numbers, half-open `[left, right)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// First sequence number held.
    pub left: u32,
    /// One past the last sequence number held.
    pub right: u32,
}

/// Blocks parsed from one payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Blocks {
    blocks: [Option<Block>; MAX_BLOCKS],
}

impl Blocks {
    /// The blocks, in wire order.
    pub fn iter(&self) -> impl Iterator<Item = Block> + '_ {
        self.blocks.iter().map_while(|b| *b)
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// True when there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks[0].is_none()
    }
}

/// Parses a payload as v1 does: at least 5 bytes, the marker, 1..=4 blocks, all present.
pub fn parse(payload: &[u8]) -> Option<Blocks> {
    if payload.len() < 5 || payload[..4] != MARKER {
        return None;
    }
    let count = usize::from(payload[4]);
    if !(1..=MAX_BLOCKS).contains(&count) || payload.len() < 5 + BLOCK_LEN * count {
        return None;
    }
    let mut out = Blocks::default();
    for (i, chunk) in payload[5..5 + BLOCK_LEN * count]
        .chunks_exact(BLOCK_LEN)
        .enumerate()
    {
        let left = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let right = u32::from_be_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
        out.blocks[i] = Some(Block { left, right });
    }
    Some(out)
}

/// True when `payload` would be taken for SACK by a v1 receiver.
pub fn would_parse_as_sack(payload: &[u8]) -> bool {
    parse(payload).is_some()
}

/// Writes up to [`MAX_BLOCKS`] blocks into `buf`; returns the bytes written, or `None` when
/// there are no blocks or `buf` is too small.
pub fn emit(blocks: &[Block], buf: &mut [u8]) -> Option<usize> {
    let count = blocks.len().min(MAX_BLOCKS);
    let len = 5 + BLOCK_LEN * count;
    if count == 0 || buf.len() < len {
        return None;
    }
    buf[..4].copy_from_slice(&MARKER);
    buf[4] = count as u8;
    for (b, chunk) in blocks[..count]
        .iter()
        .zip(buf[5..len].chunks_exact_mut(BLOCK_LEN))
    {
        chunk[..4].copy_from_slice(&b.left.to_be_bytes());
        chunk[4..].copy_from_slice(&b.right.to_be_bytes());
    }
    Some(len)
}

/// Largest SACK payload.
pub const MAX_LEN: usize = 5 + BLOCK_LEN * MAX_BLOCKS;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden() {
        let blocks = [
            Block {
                left: 4097,
                right: 8193,
            },
            Block {
                left: 12289,
                right: 16385,
            },
        ];
        let mut buf = [0u8; MAX_LEN];
        let n = emit(&blocks, &mut buf).unwrap();
        assert_eq!(
            buf[..n],
            [
                b'S', b'A', b'C', b'K', 2, 0, 0, 0x10, 0x01, 0, 0, 0x20, 0x01, 0, 0, 0x30, 0x01, 0,
                0, 0x40, 0x01
            ]
        );
        let parsed = parse(&buf[..n]).unwrap();
        assert_eq!(parsed.iter().collect::<Vec<_>>(), blocks);
        // Trailing bytes are allowed.
        let mut longer = buf[..n].to_vec();
        longer.extend_from_slice(b"xyz");
        assert_eq!(parse(&longer), Some(parsed));
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(b"SACK"), None);
        assert_eq!(parse(b"SACK\x00"), None);
        assert_eq!(parse(b"SACK\x05"), None);
        assert_eq!(parse(b"SACK\x01\x00\x00\x00\x01\x00\x00\x00"), None);
        assert_eq!(parse(b"sack\x01\x00\x00\x00\x01\x00\x00\x00\x02"), None);
        assert!(would_parse_as_sack(
            b"SACK\x01\x00\x00\x00\x01\x00\x00\x00\x02"
        ));
        assert_eq!(emit(&[], &mut [0u8; 64]), None);
    }
}
