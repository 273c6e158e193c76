//! Anti-replay window over 64-bit nonce counters (RFC 6479 block bitmap).
//!
//! The window remembers the last [`WINDOW`] counters below the highest one seen. Checking and
//! recording are separate steps: the caller checks, authenticates the frame, and only then
//! records. So a forged frame, whatever counter it claims, never moves the window (v1 moves it
//! before authenticating, which lets one forged frame with counter 2^64-1 blackhole a peer).
//!
//! Counter 0 is never valid: v1 senders pre-increment, so their first counter is 1.

const BLOCK_BITS: u64 = 64;
const BLOCKS: usize = 64;
/// Counters this far or further below the highest recorded one are rejected as too old.
/// One block of the bitmap is kept free for sliding, as RFC 6479 does.
pub const WINDOW: u64 = BLOCK_BITS * (BLOCKS as u64 - 1);

// The issue of record requires a window of at least 2048 counters.
const _: () = assert!(WINDOW >= 2048);

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// Counter 0 is never sent.
    #[error("counter 0 is never valid")]
    Zero,
    /// Below the window.
    #[error("counter {counter} is too old (highest {highest}, window {WINDOW})")]
    TooOld {
        /// The counter received.
        counter: u64,
        /// The highest counter recorded.
        highest: u64,
    },
    /// Already recorded.
    #[error("counter {0} was already received")]
    Replayed(u64),
}

/// Sliding bitmap of recently received counters.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    highest: u64,
    bitmap: [u64; BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window: every counter from 1 up is acceptable.
    pub const fn new() -> Self {
        ReplayWindow {
            highest: 0,
            bitmap: [0; BLOCKS],
        }
    }

    /// The highest counter recorded (0 when none).
    pub const fn highest(&self) -> u64 {
        self.highest
    }

    fn slot(counter: u64) -> (usize, u64) {
        let block = (counter / BLOCK_BITS) as usize % BLOCKS;
        (block, 1u64 << (counter % BLOCK_BITS))
    }

    /// Whether `counter` would be accepted. Changes nothing.
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        if counter == 0 {
            return Err(ReplayError::Zero);
        }
        if counter > self.highest {
            return Ok(());
        }
        if self.highest - counter >= WINDOW {
            return Err(ReplayError::TooOld {
                counter,
                highest: self.highest,
            });
        }
        let (block, bit) = Self::slot(counter);
        if self.bitmap[block] & bit != 0 {
            return Err(ReplayError::Replayed(counter));
        }
        Ok(())
    }

    /// Records an authenticated counter. Checks again, so a caller cannot record twice.
    pub fn record(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        if counter > self.highest {
            let cur = self.highest / BLOCK_BITS;
            let new = counter / BLOCK_BITS;
            let to_clear = (new - cur).min(BLOCKS as u64);
            for i in 1..=to_clear {
                self.bitmap[((cur + i) % BLOCKS as u64) as usize] = 0;
            }
            self.highest = counter;
        }
        let (block, bit) = Self::slot(counter);
        self.bitmap[block] |= bit;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_duplicates() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(0), Err(ReplayError::Zero));
        for c in 1..=5000 {
            w.record(c).unwrap();
            assert_eq!(w.check(c), Err(ReplayError::Replayed(c)));
        }
        assert_eq!(w.highest(), 5000);
    }

    #[test]
    fn out_of_order_inside_window() {
        const TOP: u64 = 10_000;
        let mut w = ReplayWindow::new();
        w.record(TOP).unwrap();
        // Everything inside the window that was not seen is still acceptable, once.
        for c in (TOP - WINDOW + 1)..TOP {
            w.record(c).unwrap();
        }
        assert!(matches!(
            w.check(TOP - WINDOW),
            Err(ReplayError::TooOld { .. })
        ));
    }

    #[test]
    fn big_jump_clears_bitmap() {
        let mut w = ReplayWindow::new();
        for c in 1..100 {
            w.record(c).unwrap();
        }
        w.record(1_000_000).unwrap();
        // Counters just below the new highest were never seen and are accepted.
        w.record(1_000_000 - 65).unwrap();
        w.record(1_000_000 - 1).unwrap();
        assert_eq!(w.check(1_000_000 - 1), Err(ReplayError::Replayed(999_999)));
        assert!(matches!(w.check(50), Err(ReplayError::TooOld { .. })));
    }

    #[test]
    fn check_does_not_move() {
        let mut w = ReplayWindow::new();
        w.record(10).unwrap();
        assert!(w.check(u64::MAX).is_ok());
        assert_eq!(w.highest(), 10);
        w.record(11).unwrap();
    }

    #[test]
    fn top_of_range() {
        let mut w = ReplayWindow::new();
        w.record(u64::MAX - 1).unwrap();
        w.record(u64::MAX).unwrap();
        assert_eq!(w.check(u64::MAX), Err(ReplayError::Replayed(u64::MAX)));
    }

    proptest::proptest! {
        /// Differential test against a model that remembers every counter: a counter is
        /// accepted iff it is non-zero, not seen, and less than WINDOW below the highest.
        #[test]
        fn matches_a_model_that_remembers_everything(
            steps in proptest::collection::vec((0u8..5, 0u64..6000, proptest::bool::ANY), 1..400)
        ) {
            let mut w = ReplayWindow::new();
            let mut seen = std::collections::HashSet::new();
            let mut highest = 0u64;
            for (kind, x, record) in steps {
                // Near the top, far below, at the edge, and big jumps.
                let counter = match kind {
                    0 => highest.saturating_sub(x % 64),
                    1 => highest.saturating_sub(x),
                    2 => highest + x % 100,
                    3 => highest + x * 1000,
                    // Exactly at the window's edge.
                    _ => highest.saturating_sub(WINDOW - 1 + x % 3),
                };
                let model_ok = counter != 0
                    && !seen.contains(&counter)
                    && (counter > highest || highest - counter < WINDOW);
                proptest::prop_assert_eq!(w.check(counter).is_ok(), model_ok, "counter {}", counter);
                if record && model_ok {
                    w.record(counter).unwrap();
                    seen.insert(counter);
                    highest = highest.max(counter);
                }
            }
        }
    }
}
