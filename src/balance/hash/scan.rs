//! The pick's passes over every target, four targets at a time where the CPU has AVX2.
//!
//! A pick scores the client against every target (design §2 asks ≤ 100 ns for one pick at 64
//! targets). A score is `fmix64` of a XOR: two 64-bit multiplies per target, which x86-64's
//! baseline (SSE2) cannot do side by side and AVX2 can, as two 32-bit multiplies each (one
//! widening, one of the two cross products at once). So each
//! pass is written twice: with AVX2 intrinsics, taken at run time when the CPU has AVX2 (std
//! detects it once per process), and in plain Rust, for every other CPU and as the reference the
//! tests hold the AVX2 passes to. Both are the same integer arithmetic (no float is involved:
//! the weighted pick's logarithms stay in `hash.rs`, computed once per candidate), so they
//! return the same thing bit for bit: which one runs never changes a client's target.
//!
//! The passes:
//! - [`best_equal`]: the target with the highest raw score (equal weights: that is the pick);
//!   [`best_equal_except`] the same without one target (the runner-up, when the first is down).
//! - [`estimates`]: a weighted pick's first try, over every target at once: the target with the
//!   smallest cheap estimate of `(1 - u)/w` (from the score's top 32 bits, kept to 32 bits)
//!   and the smallest estimate of all the others. When the runner-up's estimate is clearly
//!   larger, the first wins without any float arithmetic (`Table::first_try` holds the proof).
//! - [`within`]: when it is not that clear, the targets whose estimate is at most a limit: the
//!   only ones that can beat the first, which `hash.rs` then ranks exactly.
//!
//! The AVX2 functions the dispatchers call are not generic: a generic one is compiled in its
//! caller's crate (a bench's, say), where the helpers it calls (`Mix`, not `#[inline]`) stay
//! calls instead of being inlined; `within`'s pass was such, three calls per four targets. So
//! `within` gets bits from the AVX2 pass and visits them itself, and `best_equal_masked`'s two
//! instances are made in this module by two plain wrappers.

use super::score_premixed;

/// From this many targets on, [`best_equal`] takes the AVX2 pass: below it, setting up the
/// registers and reducing the four lanes cost about what the plain loop saves
/// (`benches/pick.rs`: at 16 targets the two measured alike, 31–34 ns; at 64 the AVX2 pass
/// takes about 0.7 of the time).
#[cfg(target_arch = "x86_64")]
const AVX2_FROM: usize = 32;

/// The index of the highest `score_premixed(kp, m)` over `mixed` (non-empty), the earlier index
/// on a tie.
#[inline]
pub(super) fn best_equal(kp: u64, mixed: &[u64]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if mixed.len() >= AVX2_FROM && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { avx2::best_equal(kp, mixed) };
    }
    portable::best_equal(kp, mixed)
}

/// The estimate of one target: the top half of `(!score >> 32) · factor`, a 32-bit number
/// (below `2^32 - 1`, since both factors are below `2^32`).
#[inline(always)]
fn estimate(kp: u64, mixed: u64, factor: u64) -> u64 {
    ((!score_premixed(kp, mixed) >> 32) * factor) >> 32
}

/// The index of the highest `score_premixed(kp, m)` over `mixed` but `except`, the earlier index
/// on a tie; `None` when `except` is the only target. (The equal pick's runner-up, when its
/// first choice is down.)
#[inline]
pub(super) fn best_equal_except(kp: u64, mixed: &[u64], except: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if mixed.len() >= AVX2_FROM && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        let found = unsafe { avx2::best_equal_except(kp, mixed, except) };
        // The pass's lanes start on their first target with the lowest score, so it names
        // `except` only if every other target of its lane scores 0 (odds of 2^-64 per target):
        // the plain pass decides then.
        if found != except {
            return Some(found);
        }
    }
    portable::best_equal_except(kp, mixed, except)
}

/// The smallest [`estimate`] over every target, and the smallest of all the other targets'
/// estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Estimates {
    /// A target with the smallest estimate (the earliest index on a tie).
    pub index: usize,
    /// Its estimate.
    pub best: u64,
    /// The smallest estimate among the other targets (equal to `best` on a tie; `u64::MAX`
    /// for a single target).
    pub second: u64,
}

/// [`Estimates`] over `mixed` and `factor` (one length, not empty, any length; each factor
/// below 2^32). Scores are not kept: the caller recomputes the one it needs.
#[inline]
pub(super) fn estimates(kp: u64, mixed: &[u64], factor: &[u64]) -> Estimates {
    debug_assert!(!mixed.is_empty() && mixed.len() == factor.len());
    debug_assert!(factor.iter().all(|&f| f <= u64::from(u32::MAX)));
    #[cfg(target_arch = "x86_64")]
    if mixed.len() >= AVX2_FROM && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { avx2::estimates(kp, mixed, factor) };
    }
    portable::estimates(kp, mixed, factor, 0, None)
}

/// Calls `visit(i)` for every target `i` whose [`estimate`] is at most `limit`, in index order
/// (same lengths and factors as [`estimates`]).
#[inline]
pub(super) fn within(
    kp: u64,
    mixed: &[u64],
    factor: &[u64],
    limit: u64,
    mut visit: impl FnMut(usize),
) {
    debug_assert!(mixed.len() == factor.len());
    #[cfg(target_arch = "x86_64")]
    if mixed.len() >= AVX2_FROM && std::is_x86_feature_detected!("avx2") {
        // The AVX2 pass gives 64 targets at a time as bits (it is not generic, so it is
        // compiled here beside the helpers it inlines, whoever calls `within`); the visit of
        // the set bits, in index order, is this generic part's.
        let whole = mixed.len() / 4 * 4;
        for from in (0..whole).step_by(64) {
            let to = (from + 64).min(whole);
            // SAFETY: the CPU has AVX2 (checked just above).
            let mut inside = unsafe { avx2::within_bits(kp, mixed, factor, limit, from, to) };
            while inside != 0 {
                visit(from + inside.trailing_zeros() as usize);
                inside &= inside - 1;
            }
        }
        return portable::within(kp, &mixed[whole..], &factor[whole..], limit, whole, visit);
    }
    portable::within(kp, mixed, factor, limit, 0, visit)
}

/// The passes in plain Rust.
pub(super) mod portable {
    use super::{estimate, score_premixed, Estimates};

    #[inline]
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

    /// [`super::best_equal_except`], by its definition.
    pub(in crate::balance::hash) fn best_equal_except(
        kp: u64,
        mixed: &[u64],
        except: usize,
    ) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for (i, &m) in mixed.iter().enumerate().filter(|&(i, _)| i != except) {
            let s = score_premixed(kp, m);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// [`super::estimates`], continuing from `so_far` (the estimates of the targets before
    /// these, whose indices come first) with these targets numbered from `offset`.
    pub(in crate::balance::hash) fn estimates(
        kp: u64,
        mixed: &[u64],
        factor: &[u64],
        offset: usize,
        so_far: Option<Estimates>,
    ) -> Estimates {
        let mut so_far = so_far;
        for (i, (&m, &f)) in mixed.iter().zip(factor).enumerate() {
            let e = estimate(kp, m, f);
            so_far = Some(match so_far {
                // Strictly smaller: the earlier index keeps a tie.
                Some(b) if e < b.best => Estimates {
                    index: offset + i,
                    best: e,
                    second: b.best,
                },
                Some(b) => Estimates {
                    second: b.second.min(e),
                    ..b
                },
                None => Estimates {
                    index: offset + i,
                    best: e,
                    second: u64::MAX,
                },
            });
        }
        so_far.expect("estimates of no target")
    }

    /// [`super::within`] over these targets, numbered from `offset`.
    pub(in crate::balance::hash) fn within(
        kp: u64,
        mixed: &[u64],
        factor: &[u64],
        limit: u64,
        offset: usize,
        mut visit: impl FnMut(usize),
    ) {
        for (i, (&m, &f)) in mixed.iter().zip(factor).enumerate() {
            if estimate(kp, m, f) <= limit {
                visit(offset + i);
            }
        }
    }
}

/// The passes in AVX2, four targets per 256-bit register.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::{FMIX_C1, FMIX_C2};
    use super::{portable, Estimates};

    /// `a · c` (wrapping) in each 64-bit lane, `c` given as its low 32 bits broadcast and as
    /// its two halves swapped: `a_lo·c_lo + ((a_lo·c_hi + a_hi·c_lo) << 32)`, the part of the
    /// full product that fits. The two cross products are one 32-bit `mullo` (each needs
    /// only its low half), so a 64-bit multiply is two multiplies, not three.
    #[target_feature(enable = "avx2")]
    fn mul64(a: __m256i, c_lo: __m256i, c_swapped: __m256i) -> __m256i {
        let cross = cross_sum(a, c_swapped);
        _mm256_add_epi64(_mm256_mul_epu32(a, c_lo), _mm256_slli_epi64::<32>(cross))
    }

    /// The top half of `a · c` (wrapping) in the low 32 bits of each 64-bit lane (the high 32
    /// bits are left over: `_mm256_mul_epu32` ignores them), `c` given as for [`mul64`]:
    /// `hi(a_lo·c_lo) + lo(a_lo·c_hi) + lo(a_hi·c_lo)`, modulo 2^32.
    #[target_feature(enable = "avx2")]
    fn mul64_top(a: __m256i, c_lo: __m256i, c_swapped: __m256i) -> __m256i {
        let cross = cross_sum(a, c_swapped);
        _mm256_add_epi32(cross, _mm256_srli_epi64::<32>(_mm256_mul_epu32(a, c_lo)))
    }

    /// `lo(a_lo·c_hi) + lo(a_hi·c_lo)`, modulo 2^32, in the low 32 bits of each 64-bit lane
    /// (the high 32 bits are left over): one `mullo` gives both products, side by side.
    #[target_feature(enable = "avx2")]
    fn cross_sum(a: __m256i, c_swapped: __m256i) -> __m256i {
        let cross = _mm256_mullo_epi32(a, c_swapped);
        _mm256_add_epi32(cross, _mm256_srli_epi64::<32>(cross))
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
                    _mm256_set1_epi64x(c.rotate_left(32) as i64),
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
            let k = mul64(self.mixed_once(mixed, at), self.c2.0, self.c2.1);
            _mm256_xor_si256(k, _mm256_srli_epi64::<33>(k))
        }

        /// The products `(!score >> 32) · factor` of the four targets at `at`, whose top
        /// halves are their estimates. Only the score's top half counts, and `fmix64`'s last
        /// step (`k ^ (k >> 33)`) leaves it as it is: so it is the top half of the second
        /// multiply, [`mul64_top`], and no more.
        #[target_feature(enable = "avx2")]
        fn products(&self, mixed: &[u64], factor: &[u64], at: usize) -> __m256i {
            let top = mul64_top(self.mixed_once(mixed, at), self.c2.0, self.c2.1);
            let f = &factor[at..at + 4];
            // SAFETY: `f` is four u64s, 32 bytes; the load is unaligned.
            let f = unsafe { _mm256_loadu_si256(f.as_ptr().cast()) };
            // `!s >> 32` is the complement of the top half: in the low 32 bits, which are all
            // `_mm256_mul_epu32` reads; both factors below 2^32, so it is the whole product.
            _mm256_mul_epu32(_mm256_xor_si256(top, _mm256_set1_epi64x(-1)), f)
        }

        /// The four targets' `fmix64` state before its second multiply.
        #[target_feature(enable = "avx2")]
        fn mixed_once(&self, mixed: &[u64], at: usize) -> __m256i {
            let m = &mixed[at..at + 4];
            // SAFETY: `m` is four u64s, 32 bytes; the load is unaligned.
            let m = unsafe { _mm256_loadu_si256(m.as_ptr().cast()) };
            let k = mul64(_mm256_xor_si256(self.key, m), self.c1.0, self.c1.1);
            _mm256_xor_si256(k, _mm256_srli_epi64::<33>(k))
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn best_equal(kp: u64, mixed: &[u64]) -> usize {
        best_equal_masked::<false>(kp, mixed, usize::MAX)
    }

    /// May name `except` when every other target of its lane scores 0 (see
    /// [`super::best_equal_except`]).
    #[target_feature(enable = "avx2")]
    pub(super) fn best_equal_except(kp: u64, mixed: &[u64], except: usize) -> usize {
        best_equal_masked::<true>(kp, mixed, except)
    }

    /// [`super::best_equal`] (`EXCEPT` false), or the same over every target but `except`
    /// (`EXCEPT` true). Generic so that both are one loop; the two wrappers above instantiate
    /// it here, beside the `Mix` methods it must inline (instantiated in a caller's crate, it
    /// called them instead, and the equal pick took twice as long).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn best_equal_masked<const EXCEPT: bool>(kp: u64, mixed: &[u64], except: usize) -> usize {
        let mix = Mix::new(kp);
        let except_lanes = _mm256_set1_epi64x(except as i64);
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
            let mut wins = _mm256_cmpgt_epi64(flipped, best);
            if EXCEPT {
                wins = _mm256_andnot_si256(_mm256_cmpeq_epi64(index, except_lanes), wins);
            }
            best = _mm256_blendv_epi8(best, flipped, wins);
            best_index = _mm256_blendv_epi8(best_index, index, wins);
            index = _mm256_add_epi64(index, four);
        }
        // Across the lanes, in the registers (branching on each lane mispredicts about as
        // often as it decides): the highest score, then the lowest index among the lanes that
        // hold it. Then the last (fewer than four) targets, which come after all of them.
        let highest = across(best, |a, b| {
            _mm256_blendv_epi8(a, b, _mm256_cmpgt_epi64(b, a))
        });
        let not_highest =
            _mm256_xor_si256(_mm256_cmpeq_epi64(best, highest), _mm256_set1_epi64x(-1));
        // The lowest index, unsigned through the signed compare (top bit flipped): a lane
        // that does not hold the highest score is set to all ones first, above any index.
        let candidates = _mm256_xor_si256(_mm256_or_si256(best_index, not_highest), top);
        let lowest = across(candidates, |a, b| {
            _mm256_blendv_epi8(a, b, _mm256_cmpgt_epi64(a, b))
        });
        let low = |v: __m256i| _mm_cvtsi128_si64(_mm256_castsi256_si128(v)) as u64;
        let mut winner = (
            low(_mm256_xor_si256(highest, top)),
            (low(lowest) ^ (1 << 63)) as usize,
        );
        for (i, &m) in mixed.iter().enumerate().skip(whole) {
            let s = super::score_premixed(kp, m);
            if s > winner.0 && !(EXCEPT && i == except) {
                winner = (s, i);
            }
        }
        winner.1
    }

    /// `pick` applied across the four 64-bit lanes of `v` (two rounds of pairs), the result
    /// in every lane.
    #[target_feature(enable = "avx2")]
    fn across(v: __m256i, pick: impl Fn(__m256i, __m256i) -> __m256i) -> __m256i {
        let v = pick(v, _mm256_permute4x64_epi64::<0b0100_1110>(v));
        pick(v, _mm256_permute4x64_epi64::<0b1011_0001>(v))
    }

    /// The smallest of eight unsigned 32-bit lanes, in every lane.
    #[target_feature(enable = "avx2")]
    fn min_across(v: __m256i) -> __m256i {
        let v = _mm256_min_epu32(v, _mm256_permute2x128_si256::<1>(v, v));
        let v = _mm256_min_epu32(v, _mm256_shuffle_epi32::<0b0100_1110>(v));
        _mm256_min_epu32(v, _mm256_shuffle_epi32::<0b1011_0001>(v))
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn estimates(kp: u64, mixed: &[u64], factor: &[u64]) -> Estimates {
        let mix = Mix::new(kp);
        // Eight targets a round, their estimates as eight 32-bit lanes (lane 2k: target
        // `at + k`, lane 2k + 1: target `at + 4 + k`), so that the running minima are
        // AVX2's unsigned 32-bit `min` and `max`, with no compare and blend. Per lane: the
        // smallest estimate, the round it came in (a strictly smaller one replaces it, so the
        // earliest keeps a tie) and the smallest of the lane's others. Both minima start at
        // `u32::MAX`, which no estimate reaches.
        let mut best = _mm256_set1_epi32(-1);
        let mut second = best;
        let mut best_round = _mm256_setzero_si256();
        let mut round = best_round;
        let one = _mm256_set1_epi32(1);
        let mut at = 0;
        while at + 4 <= mixed.len() {
            let low = mix.products(mixed, factor, at);
            // A last group of four takes `u32::MAX` for the missing four, which never wins.
            let high = if at + 8 <= mixed.len() {
                mix.products(mixed, factor, at + 4)
            } else {
                _mm256_set1_epi32(-1)
            };
            let e = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(low), high);
            let smaller = _mm256_min_epu32(best, e);
            second = _mm256_min_epu32(second, _mm256_max_epu32(best, e));
            let kept = _mm256_cmpeq_epi32(smaller, best);
            best_round = _mm256_blendv_epi8(round, best_round, kept);
            best = smaller;
            round = _mm256_add_epi32(round, one);
            at += 8;
        }
        let done = at.min(mixed.len() / 4 * 4);
        // Across the lanes, in the registers (a reduction that branches on each lane
        // mispredicts about as often as it decides): the smallest best; the lowest index of
        // the lanes that hold it (the earliest target on a tie: each lane's round is its
        // earliest); and the runner-up, the smallest of the seconds and of the bests once the
        // smallest is taken out, unless several lanes hold it, when it is that.
        let ones = _mm256_set1_epi32(-1);
        let least = min_across(best);
        let at_least = _mm256_cmpeq_epi32(best, least);
        let index = _mm256_add_epi32(
            _mm256_slli_epi32::<3>(best_round),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        let first_index = min_across(_mm256_or_si256(index, _mm256_xor_si256(at_least, ones)));
        let others = min_across(_mm256_min_epu32(second, _mm256_or_si256(best, at_least)));
        let low = |v: __m256i| _mm256_cvtsi256_si32(v) as u32;
        let ties = _mm256_movemask_ps(_mm256_castsi256_ps(at_least)).count_ones();
        let (best, index) = (low(least), low(first_index));
        let runner_up = if ties > 1 { best } else { low(others) };
        // `u32::MAX` here means no other target (a table of one): say so as `u64::MAX`.
        let widen = |e: u32| {
            if e == u32::MAX {
                u64::MAX
            } else {
                u64::from(e)
            }
        };
        let so_far = Estimates {
            index: index as usize,
            best: u64::from(best),
            second: widen(runner_up),
        };
        if done == mixed.len() {
            return so_far;
        }
        portable::estimates(kp, &mixed[done..], &factor[done..], done, Some(so_far))
    }

    /// Of the targets `from..to` (at most 64, a whole number of groups of four), those whose
    /// estimate is at most `limit`: bit `i` for target `from + i`.
    #[target_feature(enable = "avx2")]
    pub(super) fn within_bits(
        kp: u64,
        mixed: &[u64],
        factor: &[u64],
        limit: u64,
        from: usize,
        to: usize,
    ) -> u64 {
        debug_assert!(to - from <= 64 && (to - from) % 4 == 0);
        let mix = Mix::new(kp);
        // Estimates are below 2^32 and the limit is capped there: the signed compare is exact.
        let bound = _mm256_set1_epi64x(limit.min(u64::from(u32::MAX)) as i64);
        let mut bits = 0u64;
        for at in (from..to).step_by(4) {
            let e = _mm256_srli_epi64::<32>(mix.products(mixed, factor, at));
            let over = _mm256_cmpgt_epi64(e, bound);
            let inside = !_mm256_movemask_pd(_mm256_castsi256_pd(over)) & 0b1111;
            bits |= (inside as u64) << (at - from);
        }
        bits
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::TestRng as Rng;
    use super::super::{FMIX_C1, FMIX_C2};
    use super::*;

    #[test]
    fn the_dispatched_passes_match_the_portable_ones() {
        // Whichever pass runs on this CPU (AVX2 on the machines we build on), every length
        // from 1 to 64 (the tail after the last group of four included), random keys and
        // seeds. (`estimates` has its own test below.)
        let mut rng = Rng(7);
        for n in 1..=64 {
            for _ in 0..200 {
                let kp = rng.next();
                let mixed: Vec<u64> = (0..n).map(|_| rng.next()).collect();
                assert_eq!(
                    best_equal(kp, &mixed),
                    portable::best_equal(kp, &mixed),
                    "n = {n}"
                );
            }
        }
    }

    #[test]
    fn the_runner_up_pass_is_the_best_of_the_others() {
        // Every length from 1 to 70 (the AVX2 pass from 32 on, tails included), the excluded
        // target anywhere: the dispatched pass, the plain one and the definition (the highest
        // score among the others, the earliest index on a tie) agree.
        let mut rng = Rng(13);
        for n in 1..=70usize {
            for round in 0..100 {
                let kp = rng.next();
                let mut mixed: Vec<u64> = (0..n).map(|_| rng.next()).collect();
                if round % 4 == 0 && n > 2 {
                    // A tie for the runner-up (duplicate seeds, which a config forbids).
                    let (a, b) = (rng.next() as usize % n, rng.next() as usize % n);
                    mixed[a] = mixed[b];
                }
                // Half the time the best target, as the pick excludes it.
                let except = if round % 2 == 0 {
                    best_equal(kp, &mixed)
                } else {
                    rng.next() as usize % n
                };
                let expected = (0..n)
                    .filter(|&i| i != except)
                    .max_by_key(|&i| (score_premixed(kp, mixed[i]), std::cmp::Reverse(i)));
                assert_eq!(best_equal_except(kp, &mixed, except), expected, "n = {n}");
                assert_eq!(
                    portable::best_equal_except(kp, &mixed, except),
                    expected,
                    "n = {n}"
                );
                // The AVX2 pass on its own (the dispatcher's fallback would hide a pass that
                // does not exclude): random scores are never 0, so it must be exact.
                #[cfg(target_arch = "x86_64")]
                if n >= AVX2_FROM && std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    let found = unsafe { avx2::best_equal_except(kp, &mixed, except) };
                    assert_eq!(Some(found), expected, "n = {n}");
                }
            }
        }
    }

    #[test]
    fn the_runner_up_pass_never_names_the_excluded_target() {
        // Every other target scores 0, so each AVX2 lane keeps the first target it started on,
        // the excluded one included: the plain pass decides, and names the earliest other.
        for n in [32, 33, 36, 64] {
            for except in [0, 1, 3, 4, n - 1] {
                let mut mixed = vec![seed_scoring(0); n];
                mixed[except] = seed_scoring(u64::MAX);
                let expected = usize::from(except == 0);
                assert_eq!(best_equal_except(0, &mixed, except), Some(expected));
            }
        }
    }

    /// The factor of weight `w` (with the table's shift 0).
    fn factor_of(w: u64) -> u64 {
        ((1 << 32) / w).min(u64::from(u32::MAX))
    }

    /// [`Estimates`] by their definition, over the whole list.
    fn estimates_by_definition(kp: u64, mixed: &[u64], factor: &[u64]) -> Estimates {
        let estimate = |i: usize| estimate(kp, mixed[i], factor[i]);
        let index = (0..mixed.len()).min_by_key(|&i| (estimate(i), i)).unwrap();
        let second = (0..mixed.len())
            .filter(|&i| i != index)
            .map(estimate)
            .min()
            .unwrap_or(u64::MAX);
        Estimates {
            index,
            best: estimate(index),
            second,
        }
    }

    #[test]
    fn estimates_are_the_smallest_two_of_the_whole_table() {
        // Every length from 1 to 200 (several groups of four, the tail after the last, far
        // more than 64), random and duplicated seeds (equal estimates, in one lane or across
        // lanes): the dispatched pass and the portable one give the definition's answer.
        let mut rng = Rng(13);
        for n in 1..=200 {
            for round in 0..40 {
                let kp = rng.next();
                let mut mixed: Vec<u64> = (0..n).map(|_| rng.next()).collect();
                let all_one = round % 4 == 3;
                let mut weight: Vec<u64> = (0..n)
                    .map(|_| if all_one { 1 } else { 1 + rng.next() % 8 })
                    .collect();
                if round % 2 == 1 && n > 1 {
                    // Copy the best target (or another) over some other, weight and all: two
                    // equal estimates.
                    let factor: Vec<u64> = weight.iter().map(|&w| factor_of(w)).collect();
                    let best = estimates_by_definition(kp, &mixed, &factor).index;
                    let from = if round % 4 == 1 {
                        best
                    } else {
                        rng.next() as usize % n
                    };
                    let to = rng.next() as usize % n;
                    mixed[to] = mixed[from];
                    weight[to] = weight[from];
                }
                let factor: Vec<u64> = weight.iter().map(|&w| factor_of(w)).collect();
                let expected = estimates_by_definition(kp, &mixed, &factor);
                assert_eq!(estimates(kp, &mixed, &factor), expected, "n = {n}");
                assert_eq!(
                    portable::estimates(kp, &mixed, &factor, 0, None),
                    expected,
                    "n = {n}"
                );
            }
        }
    }

    #[test]
    fn equal_scores_go_to_the_earlier_index_in_every_lane() {
        // Duplicate seeds (which a config forbids) tie on score: the earliest wins, wherever
        // the copies sit among the lanes and the tail.
        let mut rng = Rng(11);
        for n in [8, 13, 32, 33, 35, 64] {
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

    #[test]
    fn within_visits_exactly_the_targets_at_or_under_the_limit_in_order() {
        // Every length from 1 to 100, limits from none inside to all inside (the smallest
        // estimate, one between, the largest, 0 and beyond 2^32): the dispatched pass and the
        // portable one visit the definition's targets, each once, in index order.
        let mut rng = Rng(17);
        for n in 1..=100 {
            for round in 0..20 {
                let kp = rng.next();
                let mixed: Vec<u64> = (0..n).map(|_| rng.next()).collect();
                let factor: Vec<u64> = (0..n).map(|_| factor_of(1 + rng.next() % 8)).collect();
                let estimate = |i: usize| estimate(kp, mixed[i], factor[i]);
                let mut sorted: Vec<u64> = (0..n).map(estimate).collect();
                sorted.sort_unstable();
                let limit = match round % 5 {
                    0 => sorted[0],
                    1 => sorted[n / 2],
                    2 => *sorted.last().unwrap(),
                    3 => 0,
                    _ => u64::MAX - rng.next() % 3,
                };
                let expected: Vec<usize> = (0..n).filter(|&i| estimate(i) <= limit).collect();
                let mut got = Vec::new();
                within(kp, &mixed, &factor, limit, |i| got.push(i));
                assert_eq!(got, expected, "n = {n}, limit {limit}");
                got.clear();
                portable::within(kp, &mixed, &factor, limit, 0, |i| got.push(i));
                assert_eq!(got, expected, "n = {n}, limit {limit}");
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
    fn estimates_hold_at_the_ends_of_the_score_range() {
        // Scores at both ends (`!s >> 32` of 0 and of 2^32 - 1) and either side of the 32-bit
        // split, plus random ones, so that equal estimates occur: the dispatched pass agrees
        // with the definition written out here.
        let mut rng = Rng(3);
        let mut wanted = vec![
            0,
            1,
            u64::MAX,
            u64::MAX - 1,
            1 << 32,
            (1 << 32) - 1,
            1 << 63,
        ];
        wanted.extend([u64::MAX << 32, !(u64::MAX << 32), (u64::MAX << 32) - 1]);
        while wanted.len() < 64 {
            wanted.push(rng.next());
        }
        let mixed: Vec<u64> = wanted.iter().map(|&s| seed_scoring(s)).collect();
        assert!(mixed
            .iter()
            .zip(&wanted)
            .all(|(&m, &s)| score_premixed(0, m) == s));
        let factor: Vec<u64> = (0..64u64).map(|i| factor_of(1 + i % 3)).collect();
        let estimate = |i: usize| ((!wanted[i] >> 32) * factor[i]) >> 32;
        let expected = (0..64).min_by_key(|&i| (estimate(i), i)).unwrap();
        let got = estimates(0, &mixed, &factor);
        assert_eq!(got.index, expected);
        assert_eq!(got, estimates_by_definition(0, &mixed, &factor));
    }
}
