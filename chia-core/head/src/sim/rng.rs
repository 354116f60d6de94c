//! A tiny seeded PRNG (SplitMix64): no dependency, the same numbers on every platform and build,
//! and cheap enough that choosing never shows up next to the head's own work.

/// A stream of pseudo-random numbers from one seed.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

/// The SplitMix64 finalizer: a good 64-bit mix, also used to derive seeds and digests.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    /// The stream of `seed`: the same numbers on every platform.
    pub fn new(seed: u64) -> Rng {
        Rng { state: mix64(seed ^ GOLDEN) }
    }

    /// An independent stream for one purpose (the network, one worker, ...), so that what one
    /// part of the model draws does not shift every other part's choices.
    pub fn derive(seed: u64, stream: u64, index: u64) -> Rng {
        Rng::new(mix64(seed ^ mix64(stream.wrapping_mul(GOLDEN) ^ mix64(index.wrapping_add(1)))))
    }

    /// The next number, uniform over all of `u64`.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-high: the bias is below 2^-32 for the small
    /// ranges the model uses.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo { lo } else { lo + self.below(hi - lo + 1) }
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.below(1000) < u64::from(per_mille)
    }

    /// An index into `weights`, each chosen in proportion to its weight (not all zero).
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut left = self.below(total.max(1));
        for (i, &w) in weights.iter().enumerate() {
            if left < u64::from(w) {
                return i;
            }
            left -= u64::from(w);
        }
        weights.len() - 1
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let word = self.next_u64().to_le_bytes();
            let take = (len - out.len()).min(8);
            out.extend_from_slice(&word[..take]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]), "one seed, one sequence");
        let mut x = Rng::derive(7, 1, 0);
        let mut y = Rng::derive(7, 1, 1);
        assert_ne!(x.next_u64(), y.next_u64());
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            assert!(r.below(3) < 3);
            assert!((5..=9).contains(&r.range(5, 9)));
        }
        assert_eq!(r.weighted(&[0, 5, 0]), 1);
    }
}
