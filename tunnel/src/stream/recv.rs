//! The receive side: in-order bytes waiting for the application, and out-of-order segments
//! waiting for the hole before them to fill.
//!
//! The buffer holds at most `max` bytes in total (ready plus out of order). The window it
//! offers the peer ends at `nxt + (max - ready)`: bytes beyond that are dropped unacknowledged,
//! which is also how a v1 sender, which ignores a zero window, is held back (v1 wire §11.5).
//! Out-of-order data is never dropped once stored (no reneging), so SACKed bytes stay valid.
//! Overlapping and straddling segments are trimmed to what is new, so any segmentation works.

use std::collections::{BTreeMap, VecDeque};

/// What one insertion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Inserted {
    /// Bytes that became readable.
    pub in_order: usize,
    /// Bytes stored out of order.
    pub out_of_order: usize,
    /// Bytes already held or already delivered.
    pub duplicate: usize,
    /// Bytes beyond the window, dropped.
    pub beyond_window: usize,
}

#[derive(Debug)]
pub(crate) struct RecvBuffer {
    ready: VecDeque<u8>,
    ooo: BTreeMap<u64, Vec<u8>>,
    ooo_bytes: usize,
    /// Next in-order offset expected.
    nxt: u64,
    max: usize,
    /// Most recently stored out-of-order range start, reported first in SACK.
    last_ooo: Option<u64>,
}

impl RecvBuffer {
    pub fn new(max: usize) -> Self {
        RecvBuffer {
            ready: VecDeque::new(),
            ooo: BTreeMap::new(),
            ooo_bytes: 0,
            nxt: 0,
            max,
            last_ooo: None,
        }
    }

    pub fn nxt(&self) -> u64 {
        self.nxt
    }

    pub fn readable(&self) -> usize {
        self.ready.len()
    }

    pub fn has_out_of_order(&self) -> bool {
        !self.ooo.is_empty()
    }

    /// Bytes of window offered beyond `nxt`.
    pub fn window(&self) -> usize {
        self.max - self.ready.len()
    }

    /// Free space (what the advertised window reports).
    pub fn free(&self) -> usize {
        self.max - self.ready.len() - self.ooo_bytes
    }

    /// Stores `data` that starts at stream offset `offset`.
    pub fn insert(&mut self, offset: u64, data: &[u8]) -> Inserted {
        let mut r = Inserted::default();
        let end = offset + data.len() as u64;
        let right = self.nxt + self.window() as u64;
        let mut start = offset;
        if start < self.nxt {
            let skip = (self.nxt - start).min(data.len() as u64);
            r.duplicate += skip as usize;
            start += skip;
        }
        let stop = end.min(right);
        if end > stop {
            r.beyond_window += (end - stop.max(start)) as usize;
        }
        if start >= stop {
            return r;
        }
        let slice = |a: u64, b: u64| &data[(a - offset) as usize..(b - offset) as usize];

        if start == self.nxt {
            // In order: take up to the next stored segment (whose bytes are already held).
            let next_stored = self.ooo.keys().next().copied().unwrap_or(u64::MAX);
            let take_end = stop.min(next_stored);
            self.ready.extend(slice(start, take_end));
            r.in_order += (take_end - start) as usize;
            self.nxt = take_end;
            self.drain_in_order();
            r.in_order += (self.nxt - take_end) as usize;
            // What remains overlaps data that was stored and is now delivered.
            let resume = self.nxt.min(stop);
            r.duplicate += (resume - take_end) as usize;
            start = resume;
            if start >= stop {
                return r;
            }
        }

        // Out of order: store the pieces of [start, stop) not already held.
        let mut cursor = start;
        while cursor < stop {
            // The stored segment at or before cursor, if it covers cursor, skips ahead.
            if let Some((&k, v)) = self.ooo.range(..=cursor).next_back() {
                let kend = k + v.len() as u64;
                if kend > cursor {
                    let skip_to = kend.min(stop);
                    r.duplicate += (skip_to - cursor) as usize;
                    cursor = skip_to;
                    continue;
                }
            }
            let next_start = self
                .ooo
                .range(cursor + 1..)
                .next()
                .map_or(u64::MAX, |(&k, _)| k);
            let piece_end = stop.min(next_start);
            let piece = slice(cursor, piece_end).to_vec();
            self.ooo_bytes += piece.len();
            r.out_of_order += piece.len();
            self.ooo.insert(cursor, piece);
            self.last_ooo = Some(cursor);
            cursor = piece_end;
        }
        self.drain_in_order();
        r
    }

    /// Moves stored segments that now start at `nxt` into the ready queue.
    fn drain_in_order(&mut self) {
        while let Some(entry) = self.ooo.first_entry() {
            let k = *entry.key();
            if k > self.nxt {
                break;
            }
            let v = entry.remove();
            self.ooo_bytes -= v.len();
            let end = k + v.len() as u64;
            if end > self.nxt {
                let skip = (self.nxt - k) as usize;
                self.ready.extend(&v[skip..]);
                self.nxt = end;
            }
        }
        if self.ooo.is_empty() {
            self.last_ooo = None;
        }
    }

    /// Reads into `out`; returns the bytes read.
    pub fn read(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.ready.len());
        let (a, b) = self.ready.as_slices();
        if n <= a.len() {
            out[..n].copy_from_slice(&a[..n]);
        } else {
            out[..a.len()].copy_from_slice(a);
            out[a.len()..n].copy_from_slice(&b[..n - a.len()]);
        }
        self.ready.drain(..n);
        n
    }

    /// Up to `out.len()` out-of-order ranges `[start, end)` as stream offsets: the range
    /// holding the most recent arrival first (RFC 2018 §4), then the others from the lowest up.
    pub fn sack_ranges(&self, out: &mut [(u64, u64)]) -> usize {
        if out.is_empty() {
            return 0;
        }
        let mut n = 0;
        if let Some(last) = self.last_ooo {
            out[0] = self.range_around(last);
            n = 1;
        }
        for r in self.merged_ranges() {
            if n == out.len() {
                break;
            }
            if !out[..n].contains(&r) {
                out[n] = r;
                n += 1;
            }
        }
        n
    }

    /// The merged range of stored data around the entry starting at `key`.
    fn range_around(&self, key: u64) -> (u64, u64) {
        let mut start = key;
        let mut end = key;
        // Entries never overlap, so neighbours touch exactly when they are contiguous.
        for (&k, v) in self.ooo.range(..=key).rev() {
            if k + v.len() as u64 != start && k != key {
                break;
            }
            start = k;
            if k == key {
                end = k + v.len() as u64;
            }
        }
        for (&k, v) in self.ooo.range(key + 1..) {
            if k != end {
                break;
            }
            end = k + v.len() as u64;
        }
        (start, end)
    }

    fn merged_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut iter = self.ooo.iter().peekable();
        std::iter::from_fn(move || {
            let (&k, v) = iter.next()?;
            let mut end = k + v.len() as u64;
            while let Some((&nk, nv)) = iter.peek() {
                if nk > end {
                    break;
                }
                end = end.max(nk + nv.len() as u64);
                iter.next();
            }
            Some((k, end))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(range: core::ops::Range<u8>) -> Vec<u8> {
        range.collect()
    }

    #[test]
    fn reassembles_any_segmentation() {
        let data: Vec<u8> = (0..200u8).collect();
        let mut r = RecvBuffer::new(1000);
        // Out of order, overlapping, straddling the expected offset, duplicated.
        r.insert(50, &data[50..80]);
        r.insert(60, &data[60..120]);
        r.insert(150, &data[150..200]);
        let mut ranges = [(0, 0); 4];
        let n = r.sack_ranges(&mut ranges);
        assert_eq!(&ranges[..n], &[(150, 200), (50, 120)]);
        assert_eq!(r.readable(), 0);
        let ins = r.insert(0, &data[0..55]);
        assert_eq!(ins.in_order, 120);
        assert_eq!(r.nxt(), 120);
        r.insert(100, &data[100..160]);
        assert_eq!(r.nxt(), 200);
        assert!(!r.has_out_of_order());
        let mut out = vec![0u8; 300];
        assert_eq!(r.read(&mut out), 200);
        assert_eq!(out[..200], data[..]);
        let dup = r.insert(10, &data[10..20]);
        assert_eq!(dup.duplicate, 10);
    }

    #[test]
    fn window_limits() {
        let mut r = RecvBuffer::new(100);
        let ins = r.insert(0, &[1; 150]);
        assert_eq!((ins.in_order, ins.beyond_window), (100, 50));
        assert_eq!(r.window(), 0);
        assert_eq!(r.insert(100, &[1; 10]).beyond_window, 10);
        let mut out = [0u8; 40];
        r.read(&mut out);
        assert_eq!(r.window(), 40);
        let ins = r.insert(120, &bytes(0..30));
        assert_eq!((ins.out_of_order, ins.beyond_window), (20, 10));
        assert_eq!(r.free(), 20);
    }
}
