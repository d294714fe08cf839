//! The pick's passes over every target, four targets at a time where the CPU has AVX2.
//!
//! A pick scores the client against every target (design §2 asks ≤ 100 ns for one pick at 64
//! targets). A score is `fmix64` of a XOR: two 64-bit multiplies per target, which x86-64's
//! baseline (SSE2) cannot do side by side and AVX2 can, as three 32-bit multiplies each. So each
//! pass is written twice: with AVX2 intrinsics, taken at run time when the CPU has AVX2 (std
//! detects it once per process), and in plain Rust, for every other CPU and as the reference the
//! tests hold the AVX2 passes to. Both do the same integer and IEEE-754 operations in the same
//! order (no FMA, no reassociation), so they return the same thing bit for bit: which one runs
//! never changes a client's target.
//!
//! The passes:
//! - [`best_equal`]: the target with the highest raw score (equal weights: that is the pick).
//! - [`units`] and [`survivors`]: a weighted pick over a chunk of at most 64 targets. The exact
//!   weighted rank needs a logarithm (`ln(u)/w`); these two find the few targets for which it
//!   must be computed. `units` computes every target's `u` and the one with the best cheap
//!   estimate `(u - 1)/w` (an upper bound of the rank, tight for the `u` near 1 that win);
//!   once the caller knows that target's exact rank, `survivors` marks the targets whose upper
//!   bound does not lose to it: typically that target alone.

use super::{score_premixed, unit, PRUNE_MARGIN};

/// The most targets [`units`] and [`survivors`] take at once (one bit each in a `u64`).
pub(super) const CHUNK: usize = 64;

/// The index of the highest `score_premixed(kp, m)` over `mixed` (non-empty), the earlier index
/// on a tie.
#[inline]
pub(super) fn best_equal(kp: u64, mixed: &[u64]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if mixed.len() >= 8 && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { avx2::best_equal(kp, mixed) };
    }
    portable::best_equal(kp, mixed)
}

/// Writes `unit(score_premixed(kp, mixed[i]))` into `units[i]` for every target of the chunk
/// (`mixed`, `inverse_weight` and `units` of one length, at most [`CHUNK`], not empty) and
/// returns the index of the highest `(units[i] - 1) · inverse_weight[i]`, the earlier on a tie.
#[inline]
pub(super) fn units(kp: u64, mixed: &[u64], inverse_weight: &[f64], units: &mut [f64]) -> usize {
    debug_assert!(!mixed.is_empty() && mixed.len() <= CHUNK);
    debug_assert!(mixed.len() == inverse_weight.len() && mixed.len() == units.len());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { avx2::units(kp, mixed, inverse_weight, units) };
    }
    portable::units(kp, mixed, inverse_weight, units)
}

/// Bit `i` set for each target of the chunk that the cheap bound does not rule out:
/// not `(units[i] - 1) · PRUNE_MARGIN < best_rank · weight[i]` (see `Table::pick`'s weighted
/// pass for why a target so ruled out ranks strictly below `best_rank`). `best_rank = -∞`
/// rules out nothing.
#[inline]
pub(super) fn survivors(units: &[f64], weight: &[f64], best_rank: f64) -> u64 {
    debug_assert!(units.len() <= CHUNK && units.len() == weight.len());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { avx2::survivors(units, weight, best_rank) };
    }
    portable::survivors(units, weight, best_rank)
}

/// The passes in plain Rust.
pub(super) mod portable {
    use super::{score_premixed, unit, PRUNE_MARGIN};

    pub(in crate::balance::hash) fn best_equal(kp: u64, mixed: &[u64]) -> usize {
        if mixed.len() < 2 {
            return 0;
        }
        // Two running maxima (even and odd positions), updated without branches: a new record
        // is unpredictable (≈ ln n per pick, each a mispredicted branch), and two independent
        // compare-and-select chains halve the loop-carried latency. Each lane starts on its
        // first target with score 0: any positive score replaces it, and a score of 0 there
        // is that target's own, so the start is exact.
        let (mut best_a, mut idx_a, mut best_b, mut idx_b) = (0u64, 0usize, 0u64, 1usize);
        let pairs = mixed.chunks_exact(2);
        let odd_last = pairs.remainder().first();
        for (j, pair) in pairs.enumerate() {
            let a = score_premixed(kp, pair[0]);
            let b = score_premixed(kp, pair[1]);
            let (a_wins, b_wins) = (a > best_a, b > best_b);
            best_a = if a_wins { a } else { best_a };
            idx_a = if a_wins { 2 * j } else { idx_a };
            best_b = if b_wins { b } else { best_b };
            idx_b = if b_wins { 2 * j + 1 } else { idx_b };
        }
        if let Some(&m) = odd_last {
            let a = score_premixed(kp, m);
            if a > best_a {
                best_a = a;
                idx_a = mixed.len() - 1;
            }
        }
        let b_wins = best_b > best_a || (best_b == best_a && idx_b < idx_a);
        if b_wins {
            idx_b
        } else {
            idx_a
        }
    }

    pub(in crate::balance::hash) fn units(
        kp: u64,
        mixed: &[u64],
        inverse_weight: &[f64],
        units: &mut [f64],
    ) -> usize {
        let (mut best, mut index) = (f64::NEG_INFINITY, 0);
        for (i, ((&m, &inverse), u)) in mixed.iter().zip(inverse_weight).zip(units).enumerate() {
            *u = unit(score_premixed(kp, m));
            let estimate = (*u - 1.0) * inverse;
            if estimate > best {
                best = estimate;
                index = i;
            }
        }
        index
    }

    pub(in crate::balance::hash) fn survivors(
        units: &[f64],
        weight: &[f64],
        best_rank: f64,
    ) -> u64 {
        let mut bits = 0u64;
        for (i, (&u, &w)) in units.iter().zip(weight).enumerate() {
            let ruled_out = (u - 1.0) * PRUNE_MARGIN < best_rank * w;
            bits |= u64::from(!ruled_out) << i;
        }
        bits
    }
}

/// The passes in AVX2, four targets per 256-bit register.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::{FMIX_C1, FMIX_C2, TWO_POW_MINUS_53};
    use super::{portable, PRUNE_MARGIN};

    /// `a · c` (wrapping) in each 64-bit lane, `c` given as its low and high 32 bits broadcast:
    /// `a_lo·c_lo + ((a_lo·c_hi + a_hi·c_lo) << 32)`, the part of the full product that fits.
    #[target_feature(enable = "avx2")]
    fn mul64(a: __m256i, c_lo: __m256i, c_hi: __m256i) -> __m256i {
        let cross = _mm256_add_epi64(
            _mm256_mul_epu32(a, c_hi),
            _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), c_lo),
        );
        _mm256_add_epi64(_mm256_mul_epu32(a, c_lo), _mm256_slli_epi64::<32>(cross))
    }

    /// The multipliers of `fmix64`, split for [`mul64`], and the premixed key broadcast.
    struct Mix {
        key: __m256i,
        c1: (__m256i, __m256i),
        c2: (__m256i, __m256i),
    }

    impl Mix {
        #[target_feature(enable = "avx2")]
        fn new(kp: u64) -> Mix {
            let split = |c: u64| {
                (
                    _mm256_set1_epi64x((c & 0xffff_ffff) as i64),
                    _mm256_set1_epi64x((c >> 32) as i64),
                )
            };
            Mix {
                key: _mm256_set1_epi64x(kp as i64),
                c1: split(FMIX_C1),
                c2: split(FMIX_C2),
            }
        }

        /// `score_premixed(kp, m)` for the four premixed seeds at `mixed[at..at + 4]`.
        #[target_feature(enable = "avx2")]
        fn scores(&self, mixed: &[u64], at: usize) -> __m256i {
            let m = &mixed[at..at + 4];
            // SAFETY: `m` is four u64s, 32 bytes; the load is unaligned.
            let m = unsafe { _mm256_loadu_si256(m.as_ptr().cast()) };
            let mut k = _mm256_xor_si256(self.key, m);
            k = mul64(k, self.c1.0, self.c1.1);
            k = _mm256_xor_si256(k, _mm256_srli_epi64::<33>(k));
            k = mul64(k, self.c2.0, self.c2.1);
            _mm256_xor_si256(k, _mm256_srli_epi64::<33>(k))
        }
    }

    /// The lanes of a register, lowest first.
    #[target_feature(enable = "avx2")]
    fn lanes(v: __m256i) -> [u64; 4] {
        let mut out = [0u64; 4];
        // SAFETY: `out` is 32 bytes; the store is unaligned.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
        out
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn best_equal(kp: u64, mixed: &[u64]) -> usize {
        let mix = Mix::new(kp);
        // Unsigned order through a signed compare: flip the top bit of both sides. Lane `j`
        // holds targets `j, j + 4, …` and starts on its first with score 0 (flipped: i64::MIN),
        // as the portable pass's lanes do; a strictly greater score replaces the record, so
        // within a lane the earlier index wins a tie.
        let top = _mm256_set1_epi64x(i64::MIN);
        let mut best = top;
        let mut best_index = _mm256_set_epi64x(3, 2, 1, 0);
        let mut index = best_index;
        let four = _mm256_set1_epi64x(4);
        let whole = mixed.len() / 4 * 4;
        for at in (0..whole).step_by(4) {
            let flipped = _mm256_xor_si256(mix.scores(mixed, at), top);
            let wins = _mm256_cmpgt_epi64(flipped, best);
            best = _mm256_blendv_epi8(best, flipped, wins);
            best_index = _mm256_blendv_epi8(best_index, index, wins);
            index = _mm256_add_epi64(index, four);
        }
        // Across the lanes, then the last (fewer than four) targets, which come after all of
        // them: the highest score, the lower index on a tie.
        let (scores, indices) = (lanes(_mm256_xor_si256(best, top)), lanes(best_index));
        let mut winner = (scores[0], indices[0] as usize);
        for lane in 1..4 {
            let (s, i) = (scores[lane], indices[lane] as usize);
            if s > winner.0 || (s == winner.0 && i < winner.1) {
                winner = (s, i);
            }
        }
        for (i, &m) in mixed.iter().enumerate().skip(whole) {
            let s = super::score_premixed(kp, m);
            if s > winner.0 {
                winner = (s, i);
            }
        }
        winner.1
    }

    /// `unit(s)` of four scores, exactly as the scalar `unit`: `(s >> 11)` is below 2^53, so
    /// it is converted as two exact halves (`hi · 2^32 + lo`, each through the 2^52 trick, and
    /// their sum is exact), then `(x + 0.5) · 2^-53`, the same two roundings as the scalar.
    #[target_feature(enable = "avx2")]
    fn unit4(s: __m256i) -> __m256d {
        let two_52 = _mm256_set1_epi64x(0x4330_0000_0000_0000);
        let two_52_f = _mm256_set1_pd(4_503_599_627_370_496.0);
        let x = _mm256_srli_epi64::<11>(s);
        let hi = _mm256_srli_epi64::<32>(x);
        let lo = _mm256_and_si256(x, _mm256_set1_epi64x(0xffff_ffff));
        let hi = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(hi, two_52)), two_52_f);
        let lo = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(lo, two_52)), two_52_f);
        let x = _mm256_add_pd(_mm256_mul_pd(hi, _mm256_set1_pd(4_294_967_296.0)), lo);
        _mm256_mul_pd(
            _mm256_add_pd(x, _mm256_set1_pd(0.5)),
            _mm256_set1_pd(TWO_POW_MINUS_53),
        )
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn units(
        kp: u64,
        mixed: &[u64],
        inverse_weight: &[f64],
        units: &mut [f64],
    ) -> usize {
        let mix = Mix::new(kp);
        let one = _mm256_set1_pd(1.0);
        let mut best = _mm256_set1_pd(f64::NEG_INFINITY);
        let mut best_index = _mm256_set_epi64x(3, 2, 1, 0);
        let mut index = best_index;
        let four = _mm256_set1_epi64x(4);
        let whole = mixed.len() / 4 * 4;
        for at in (0..whole).step_by(4) {
            let u = unit4(mix.scores(mixed, at));
            // SAFETY: `at + 4 <= whole <= len` for both slices (checked by the indexing).
            let inverse = unsafe { _mm256_loadu_pd(inverse_weight[at..at + 4].as_ptr()) };
            unsafe { _mm256_storeu_pd(units[at..at + 4].as_mut_ptr(), u) };
            let estimate = _mm256_mul_pd(_mm256_sub_pd(u, one), inverse);
            let wins = _mm256_castpd_si256(_mm256_cmp_pd::<_CMP_GT_OQ>(estimate, best));
            best = _mm256_blendv_pd(best, estimate, _mm256_castsi256_pd(wins));
            best_index = _mm256_blendv_epi8(best_index, index, wins);
            index = _mm256_add_epi64(index, four);
        }
        let mut estimates = [0f64; 4];
        // SAFETY: `estimates` is 32 bytes; the store is unaligned.
        unsafe { _mm256_storeu_pd(estimates.as_mut_ptr(), best) };
        let indices = lanes(best_index);
        // A lane that never won holds -∞ and its first index, which loses to any finite lane
        // or (all -∞, impossible for weights ≥ 1) keeps the lowest index.
        let mut winner = (f64::NEG_INFINITY, usize::MAX);
        for lane in 0..4 {
            let (e, i) = (estimates[lane], indices[lane] as usize);
            if i < whole && (e > winner.0 || (e == winner.0 && i < winner.1)) {
                winner = (e, i);
            }
        }
        let tail = portable::units(
            kp,
            &mixed[whole..],
            &inverse_weight[whole..],
            &mut units[whole..],
        );
        if whole < mixed.len() {
            let e = (units[whole + tail] - 1.0) * inverse_weight[whole + tail];
            if e > winner.0 || winner.1 == usize::MAX {
                winner = (e, whole + tail);
            }
        }
        winner.1
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn survivors(units: &[f64], weight: &[f64], best_rank: f64) -> u64 {
        let one = _mm256_set1_pd(1.0);
        let margin = _mm256_set1_pd(PRUNE_MARGIN);
        let rank = _mm256_set1_pd(best_rank);
        let whole = units.len() / 4 * 4;
        let mut bits = 0u64;
        for at in (0..whole).step_by(4) {
            // SAFETY: `at + 4 <= whole <= len` for both slices (checked by the indexing).
            let (u, w) = unsafe {
                (
                    _mm256_loadu_pd(units[at..at + 4].as_ptr()),
                    _mm256_loadu_pd(weight[at..at + 4].as_ptr()),
                )
            };
            let bound = _mm256_mul_pd(_mm256_sub_pd(u, one), margin);
            let ruled_out = _mm256_cmp_pd::<_CMP_LT_OQ>(bound, _mm256_mul_pd(rank, w));
            let kept = !_mm256_movemask_pd(ruled_out) & 0b1111;
            bits |= (kept as u64) << at;
        }
        // (Nothing is left past a full chunk: `whole` is then 64, too far to shift by.)
        let tail = portable::survivors(&units[whole..], &weight[whole..], best_rank);
        bits | tail.checked_shl(whole as u32).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FMIX_C1, FMIX_C2};
    use super::*;

    /// A small deterministic generator (splitmix64).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn the_dispatched_passes_match_the_portable_ones() {
        // Whichever passes run on this CPU (AVX2 on the machines we build on), every length
        // from 1 to 64 (the tail after the last group of four included), random keys and
        // seeds, weights 1–1,000,000, and ranks from none (-∞) to far below the best.
        let mut rng = Rng(7);
        for n in 1..=CHUNK {
            for _ in 0..200 {
                let kp = rng.next();
                let mixed: Vec<u64> = (0..n).map(|_| rng.next()).collect();
                assert_eq!(
                    best_equal(kp, &mixed),
                    portable::best_equal(kp, &mixed),
                    "n = {n}"
                );
                let weight: Vec<f64> = (0..n)
                    .map(|_| {
                        (1 + rng.next() % if rng.next() % 2 == 0 { 8 } else { 1_000_000 }) as f64
                    })
                    .collect();
                let inverse: Vec<f64> = weight.iter().map(|w| 1.0 / w).collect();
                let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
                let best_a = units(kp, &mixed, &inverse, &mut a);
                let best_b = portable::units(kp, &mixed, &inverse, &mut b);
                assert_eq!(best_a, best_b, "n = {n}");
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
                for rank in [f64::NEG_INFINITY, -1e-9, -1e-3, -0.01, -1.0, -40.0] {
                    let rank = rank * (1.0 + (rng.next() % 1000) as f64 / 1000.0);
                    assert_eq!(
                        survivors(&a, &weight, rank),
                        portable::survivors(&a, &weight, rank),
                        "n = {n}, rank {rank}"
                    );
                }
            }
        }
    }

    #[test]
    fn equal_scores_go_to_the_earlier_index_in_every_lane() {
        // Duplicate seeds (which a config forbids) tie on score: the earliest wins, wherever
        // the copies sit among the lanes and the tail.
        let mut rng = Rng(11);
        for n in [8, 9, 13, 64] {
            for _ in 0..100 {
                let kp = rng.next();
                let mut mixed: Vec<u64> = (0..n).map(|_| rng.next()).collect();
                let best = portable::best_equal(kp, &mixed);
                let copy = (rng.next() % n as u64) as usize;
                mixed[copy] = mixed[best];
                let expected = best.min(copy);
                assert_eq!(best_equal(kp, &mixed), expected);
                assert_eq!(portable::best_equal(kp, &mixed), expected);
            }
        }
    }

    /// The premixed seed `m` for which `score_premixed(0, m) == s`: every step of `fmix64`
    /// after the premix is invertible (`x ^ x >> 33` is its own inverse, an odd multiplier has
    /// an inverse modulo 2^64).
    fn seed_scoring(s: u64) -> u64 {
        fn inverse(c: u64) -> u64 {
            // Newton's iteration doubles the correct low bits each step: 5 steps from 3 bits.
            let mut x = c;
            for _ in 0..5 {
                x = x.wrapping_mul(2u64.wrapping_sub(c.wrapping_mul(x)));
            }
            x
        }
        let h = |x: u64| x ^ (x >> 33);
        h(h(s).wrapping_mul(inverse(FMIX_C2))).wrapping_mul(inverse(FMIX_C1))
    }

    #[test]
    fn units_are_the_scalar_unit_of_the_score_across_the_grid() {
        // Both ends of the grid (where `+ 0.5` rounds to even, and `u` reaches 1.0), either
        // side of 2^52 and 2^32 in `s >> 11` (the two halves of the conversion), and random.
        let mut rng = Rng(3);
        let mut scores = vec![0, 2047, 2048, 4096, u64::MAX, u64::MAX - 2048, 1 << 63];
        for bit in [32 + 11, 52 + 11] {
            scores.extend([(1u64 << bit) - 2048, 1 << bit, (1 << bit) + 2048]);
        }
        scores.extend((0..CHUNK - scores.len()).map(|_| rng.next()));
        let mixed: Vec<u64> = scores.iter().map(|&s| seed_scoring(s)).collect();
        for (m, &s) in mixed.iter().zip(&scores) {
            assert_eq!(score_premixed(0, *m), s);
        }
        let mut out = vec![0.0; mixed.len()];
        units(0, &mixed, &vec![1.0; mixed.len()], &mut out);
        for (u, &s) in out.iter().zip(&scores) {
            assert_eq!(u.to_bits(), unit(s).to_bits(), "score {s:#x}");
        }
    }
}
