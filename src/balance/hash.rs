//! The fixed client hash and the weighted rendezvous (highest-random-weight) choice of a target.
//!
//! Every client IP gets a 64-bit key, every target (by its `id`) a 64-bit seed, and every
//! (client, target) pair a score. A client goes to the usable target with the best rank, where
//! the rank is the score itself when all weights are equal and `ln(u)/w` otherwise. Health is
//! applied at pick time (the `usable` argument), over a [`Table`] built once from the configured
//! targets, so a target going down or coming back never rebuilds anything.
//!
//! # Why rendezvous hashing
//!
//! Each client ranks every target independently, so:
//! - removal (a target deactivated or deleted) moves only that target's clients: every other
//!   client's best target is still there and still best (0 collateral), and the removed target's
//!   clients go to their second-best, which is spread evenly over the rest;
//! - adding a target moves only the clients for which the new target ranks first, and all of
//!   them move to it (about 1/(N+1) of clients, weighted: w_new / Σw);
//! - the result depends on the set of (id, weight), never on list order, and there is no ring
//!   of virtual nodes to rebuild when health changes or to unbalance the shares: a pick is one
//!   pass over the targets, one score each and no allocation (`benches/pick.rs` measures it;
//!   figures in docs/benchmarks.md), which is cheap at the sizes a TCP balancer sees.
//!
//! # Why a fixed hash
//!
//! The mapping must be the same in every worker thread, in every balancer instance running side
//! by side, after a restart and after an upgrade; otherwise a client's session lands on another
//! target. So nothing here is seeded per process: `ahash`'s `RandomState` (or std's) is right
//! for hash maps, which must resist flooding and never leave the process, and wrong here. The
//! functions below are a contract: **they must never change between versions**. The golden
//! vectors in the tests pin them; a change that breaks one breaks stickiness across versions and
//! across instances running different versions.
//!
//! # The contract, exactly
//!
//! - `fnv1a64(bytes)`: FNV-1a 64: `h = 0xcbf29ce484222325`; for each byte `b`:
//!   `h = (h ^ b) * 0x100000001b3` (wrapping).
//! - `fmix64(k)`: MurmurHash3's 64-bit finalizer: `k ^= k >> 33; k *= 0xff51afd7ed558ccd;
//!   k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53; k ^= k >> 33` (wrapping). It is a bijection.
//! - [`client_key`]`(ip) = fmix64(fnv1a64(octets))` where `octets` are the 4 or 16 bytes of
//!   `canonical_ip(ip)` (`src/addr.rs`) in network order, so `::ffff:a.b.c.d` hashes as
//!   `a.b.c.d`.
//! - The `ip` a connection is hashed by is the *client*: its address masked to `clientPrefix`
//!   (`ClientPrefix::client` in `src/addr.rs`: canonical form, then every bit after the
//!   family's prefix cleared; an IPv4-mapped address is IPv4 and takes the IPv4 prefix). With
//!   the default, IPv4 /32 and IPv6 /64, an IPv4 client's key is `client_key` of its full
//!   address, exactly as before `clientPrefix` existed; an IPv6 client's key is `client_key`
//!   of its /64 network address (`2001:db8::42` and `2001:db8::ffff:1:2:3` both hash as
//!   `2001:db8::`). **This changed the mapping of IPv6 clients once**, in the version that
//!   introduced `clientPrefix` (issue 16): an IPv6 client reached its old target after the
//!   upgrade only by chance. The golden vectors pin both families from that version on.
//! - [`target_seed`]`(id) = fmix64(fnv1a64(id as UTF-8))`.
//! - [`score`]`(key, seed) = fmix64(key ^ seed)`. FNV-1a alone mixes poorly; each of key and seed
//!   has already been through `fmix64`, and a second `fmix64` of their XOR decorrelates the
//!   scores of one client across targets. The statistical tests (balance, χ² against uniform,
//!   consecutive addresses, removal, addition) pass with margin with this combination, so
//!   nothing stronger is used.
//! - Rank, all weights equal: the raw score (higher wins).
//! - Rank, weights differ: `ln(u) / w` as an `f64` (higher, i.e. closer to 0, wins), with
//!   `u = ((score >> 11) as f64 + 0.5) / 2^53` evaluated in `f64` (so `u` is in `[2^-54, 1]`;
//!   above `2^52` the `+ 0.5` rounds to even) and `w` the weight as `f64`. This is the standard
//!   logarithmic weighted rendezvous: target `i` wins with probability `w_i / Σw`. A weight of 0
//!   ranks `-∞`: such a target is chosen only when no weighted target is usable.
//! - `ln` is ours, not `f64::ln`, because libm differs between platforms and the mapping must
//!   be identical everywhere. For `x` in `(0, 1]`: take `x = 2^k · m` with `m` in `[1, 2)` from
//!   the bits; if `m > SQRT_2` (the `f64` constant) then `m = m / 2, k = k + 1`;
//!   `f = m - 1` (exact); `s = f / (2 + f)`; `z = s · s`;
//!   `R = z·(c1 + z·(c2 + z·(… + z·c10)))` with `c_j = 2/(2j+1)` rounded to `f64`
//!   (the atanh series `ln m = 2·atanh(s) = 2s + s·R`); `hfsq = 0.5 · f · f`;
//!   `ln x = k·LN2_HI − ((hfsq − (s·(hfsq + R) + k·LN2_LO)) − f)` with fdlibm's split of ln 2
//!   (`LN2_HI = 0x3FE62E42FEE00000`, `LN2_LO = 0x3DEA39EF35793C76` as bits). Each step is one
//!   IEEE-754 binary64 `+ − × ÷` in round-to-nearest-even, in the order written (Rust never
//!   contracts to FMA), so the result is bit-identical on every platform. It is accurate to a
//!   few units in the last place (≤ 1e-15 relative, tested against `f64::ln`) and monotone on
//!   the grid of `u` (tested near every boundary), so equal weights rank exactly as raw scores.
//! - Ties: by rank, then raw score, then seed, so the result never depends on list order. As
//!   `fmix64` is a bijection, two targets tie on raw score only if their seeds are equal, which
//!   the config prevents (ids are unique); if it happens anyway, the earlier index wins.
//!
//! # Bounded loads
//!
//! With `hashBalanceFactor` a new client goes to its best-ranked usable target *under the
//! bound* ([`Table::pick_bounded`]): one whose load is below factor % of its weighted share of
//! the load, counting the connection being placed. The rank order is the one above; the loads
//! are the balancer's own (so two instances with different loads may place one new client
//! differently, which is why the bound is not part of the mapping contract: it is a policy on
//! top of it, applied only where the hash's first choice is overloaded).
//!
//! # Not sticky: power of two choices
//!
//! With `stickiness: false` a connection goes to the less loaded (load / weight) of two distinct
//! usable targets drawn at random ([`Table::pick_two_choices`]), using [`random_u64`], a cheap
//! per-thread generator that is deliberately *not* part of the contract above.
use std::cell::Cell;
use std::net::IpAddr;

use crate::addr::canonical_ip;

mod scan;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes` (part of the contract: see the module doc).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// `fmix64`'s two multipliers.
const FMIX_C1: u64 = 0xff51_afd7_ed55_8ccd;
const FMIX_C2: u64 = 0xc4ce_b9fe_1a85_ec53;

/// MurmurHash3's 64-bit finalizer (part of the contract: see the module doc).
#[inline(always)]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(FMIX_C1);
    k ^= k >> 33;
    k = k.wrapping_mul(FMIX_C2);
    k ^= k >> 33;
    k
}

/// The fixed 64-bit key of a client: `fmix64(fnv1a64(octets of canonical_ip(ip)))`.
///
/// Fixed for ever (see the module doc): never seed it per process.
pub fn client_key(ip: IpAddr) -> u64 {
    let h = match canonical_ip(ip) {
        IpAddr::V4(v4) => fnv1a64(&v4.octets()),
        IpAddr::V6(v6) => fnv1a64(&v6.octets()),
    };
    fmix64(h)
}

/// The fixed 64-bit seed of a target: `fmix64(fnv1a64(id))`.
pub fn target_seed(id: &str) -> u64 {
    fmix64(fnv1a64(id.as_bytes()))
}

/// The score of a (client, target) pair: `fmix64(key ^ seed)`; higher ranks first.
#[inline(always)]
pub fn score(key: u64, seed: u64) -> u64 {
    fmix64(key ^ seed)
}

/// `x ^ (x >> 33)`: the first step of `fmix64`, an involution. That step distributes over XOR,
/// so `score(key, seed) == score_premixed(premix(key), premix(seed))`: a [`Table`] stores
/// premixed seeds and a pick premixes the key once, two operations fewer per target.
#[inline(always)]
fn premix(x: u64) -> u64 {
    x ^ (x >> 33)
}

/// [`score`] from premixed operands: the rest of `fmix64`.
#[inline(always)]
fn score_premixed(key_premixed: u64, seed_premixed: u64) -> u64 {
    let mut k = key_premixed ^ seed_premixed;
    k = k.wrapping_mul(FMIX_C1);
    k ^= k >> 33;
    k = k.wrapping_mul(FMIX_C2);
    k ^ (k >> 33)
}

/// `2^-53`: `x * 2^-53` is exactly `x / 2^53` (a power of two only moves the exponent).
const TWO_POW_MINUS_53: f64 = 1.0 / 9_007_199_254_740_992.0;

/// `u = ((score >> 11) as f64 + 0.5) / 2^53`, in `[2^-54, 1]`.
#[inline(always)]
fn unit(score: u64) -> f64 {
    ((score >> 11) as f64 + 0.5) * TWO_POW_MINUS_53
}

/// fdlibm's split of ln 2: `LN2_HI` has 32 significant bits, so `k * LN2_HI` is exact for any
/// exponent `k`, and `LN2_LO` carries the rest.
const LN2_HI: f64 = 6.931_471_803_691_238e-1;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
/// `c_j = 2 / (2j + 1)` for `j = 1..=10`: the atanh series. Constant division is correctly
/// rounded, so each is the `f64` nearest to `2 / (2j + 1)`.
const C: [f64; 10] = [
    2.0 / 3.0,
    2.0 / 5.0,
    2.0 / 7.0,
    2.0 / 9.0,
    2.0 / 11.0,
    2.0 / 13.0,
    2.0 / 15.0,
    2.0 / 17.0,
    2.0 / 19.0,
    2.0 / 21.0,
];

/// The natural logarithm of `x` in `(0, 1]` (positive and normal), exactly as the module doc
/// specifies. Not `f64::ln`: libm differs between platforms, and this must not.
///
/// With `m` in `[√½, √2]`, `|s| ≤ 0.1716` and `z ≤ 0.0295`; the first omitted term is
/// `< z^11 / 23 ≈ 6e-19` relative, so the error is rounding only (a few ulps).
#[inline]
fn ln_unit(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut k = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        k += 1;
    }
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    // Horner, innermost first: R = z·(c1 + z·(c2 + … + z·c10)).
    let mut r = C[9];
    for c in C[..9].iter().rev() {
        r = c + z * r;
    }
    let r = z * r;
    let hfsq = 0.5 * f * f;
    let k = f64::from(k);
    k * LN2_HI - ((hfsq - (s * (hfsq + r) + k * LN2_LO)) - f)
}

/// `1 - 1e-9`: the margin of the cheap bound `ln(u) ≤ u - 1` used to skip most `ln`s.
const PRUNE_MARGIN: f64 = 1.0 - 1e-9;

/// The weighted rank `ln(u) / w`; `-∞` for weight 0. (This and the next three items spell out
/// the full order as a reference; the picks compute it incrementally, and the tests check that
/// they agree.)
#[cfg(test)]
fn weighted_rank(score: u64, weight: u32) -> f64 {
    if weight == 0 {
        f64::NEG_INFINITY
    } else {
        ln_unit(unit(score)) / f64::from(weight)
    }
}

/// `x` as a `u64` with the same order as `f64::total_cmp`, so a rank is a plain integer tuple.
#[cfg(test)]
fn ordered_bits(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

/// The seed of a premixed seed: `premix` is its own inverse.
#[inline(always)]
fn seed_of(mixed: u64) -> u64 {
    premix(mixed)
}

/// The full order of one target for one client: higher is better. Rank (as ordered bits; 0 for
/// equal weights), then raw score, then seed, then the lower index (`Reverse`), which only
/// matters for duplicate seeds.
#[cfg(test)]
type RankKey = (u64, u64, u64, std::cmp::Reverse<usize>);

/// The configured targets, ready for picking: `(seed, weight)` per target, indexed by position
/// in the slice given to [`Table::new`]. Built once per config; health is applied per pick.
/// Stored by column, so that a pick's pass over every target reads one contiguous array
/// (four targets at a time where `scan` has AVX2).
#[derive(Debug, Clone)]
pub struct Table {
    /// `premix(seed)` of each target (see [`premix`]; [`seed_of`] gives the seed back).
    mixed: Vec<u64>,
    weights: Vec<u32>,
    /// `⌊2^(32 + shift) / w⌋` per target, at most `2^32 - 1` (and that for a weight of 0), with
    /// `shift = ⌊log2⌋` of the smallest positive weight: the factor of `scan::estimates`'s
    /// estimate of `(1 - u)/w`. The shift keeps large weights' estimates as precise as those of
    /// small ones (the pass keeps 32 bits of each); it scales every estimate alike.
    factors: Vec<u64>,
    /// That `shift`: an estimate `e` stands for at most `e · 2^-(32 + shift)` of a rank's
    /// magnitude (see [`Table::first_try`]).
    shift: u32,
    /// All weights are equal: rank by raw score and skip the float math (same order, since
    /// `ln` is monotone and dividing by one common weight keeps the order).
    equal_weights: bool,
}

/// The best target of a weighted pick so far: its index, raw score and exact rank.
#[derive(Debug, Clone, Copy)]
struct Best {
    index: usize,
    score: u64,
    rank: f64,
}

/// What [`Table::first_try`] found: the target with the best estimate, its raw score, if its
/// rank could be bounded the estimate above which no target can beat it, and the runner-up's
/// estimate (which together say whether it is certainly first, [`FirstTry::clear`]).
#[derive(Debug, Clone, Copy)]
struct FirstTry {
    index: usize,
    score: u64,
    limit: Option<u64>,
    /// The smallest estimate among the other targets (the runner-up's).
    second: u64,
}

impl FirstTry {
    /// No other target's estimate is within the candidate's bound: it is certainly first.
    fn clear(&self) -> bool {
        self.limit.is_some_and(|limit| self.second > limit)
    }
}

impl Table {
    /// A table over `targets`, each `(target_seed(id), weight)`; indices are positions in
    /// `targets`. O(n). A valid config has weights ≥ 1; a weight of 0 ranks last in `pick`.
    pub fn new(targets: &[(u64, u32)]) -> Table {
        let weights: Vec<u32> = targets.iter().map(|&(_, weight)| weight).collect();
        let most = u64::from(u32::MAX);
        let shift = weights
            .iter()
            .filter(|&&w| w > 0)
            .min()
            .map_or(0, |w| w.ilog2());
        Table {
            mixed: targets.iter().map(|&(seed, _)| premix(seed)).collect(),
            equal_weights: weights.windows(2).all(|w| w[0] == w[1]),
            factors: weights
                .iter()
                .map(|&w| {
                    (1u64 << (32 + shift))
                        .checked_div(u64::from(w))
                        .map_or(most, |f| f.min(most))
                })
                .collect(),
            shift,
            weights,
        }
    }

    /// The number of targets.
    pub fn len(&self) -> usize {
        self.mixed.len()
    }

    /// True when the table has no target.
    pub fn is_empty(&self) -> bool {
        self.mixed.is_empty()
    }

    /// The best-ranked target for `key` among those for which `usable(i)` is true; `None` if
    /// there is none. No allocation. With equal weights: one branch-free pass, then `usable` of
    /// the winner; if it is down, a second pass for the runner-up, and only if that one is down
    /// too, a pass over the others. Weighted: one pass in integers, which settles most picks
    /// ([`Table::first_try`]); else the exact rank of the few targets that can win (see
    /// `pick_weighted`). Either way `usable` is only asked about targets that would beat the
    /// best usable one so far (a handful).
    #[inline]
    pub fn pick(&self, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.equal_weights {
            self.pick_equal(key, usable)
        } else {
            self.pick_weighted(key, usable)
        }
    }

    /// [`Table::pick`] with bounded loads (`hashBalanceFactor`, Mirrokni, Thorup and
    /// Zadimoghaddam's consistent hashing with bounded loads, as HAProxy's
    /// `hash-balance-factor`): the best-ranked usable target whose load is under the bound.
    ///
    /// `load(i)` is the number of connections target `i` carries now, not counting the one
    /// being placed; `factor` is a percent (≥ 100). With `T` the total load and `W` the total
    /// weight of the usable targets, target `i` (weight `w_i`) is *under the bound* when
    /// `load(i) < factor/100 × (T + 1) × w_i / W`: its load is below `factor` percent of its
    /// weighted share of the load counting this connection. Computed exactly in integers
    /// (`load(i) · 100 · W < factor · (T + 1) · w_i` in `u128`), so the result is the same on
    /// every platform for the same loads.
    ///
    /// Some usable target is always under the bound, because the bounds add up to
    /// `factor/100 × (T + 1) > T`, the sum of the loads; so "the next-ranked target under the
    /// bound" always exists. (Loads read twice may change under concurrent connections; if no
    /// target is under the bound on the second read, the best-ranked usable one is returned.)
    ///
    /// Cost: the pick of [`Table::pick`], one pass asking `usable` and `load` about every
    /// target to sum the loads and weights of the usable ones and, only when the first choice
    /// is at the bound, a second pick with the bound as part of `usable`. No allocation, no
    /// sort. The pass is what the bound costs (`benches/pick.rs`, `bounded_125_*`; figures
    /// in docs/benchmarks.md): the mean over the usable targets is not known without it.
    pub fn pick_bounded(
        &self,
        key: u64,
        factor: u32,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u64,
    ) -> Option<BoundedPick> {
        let first = self.pick(key, &usable)?;
        // T and W over the usable targets, without a branch per target. The sums fit in u64:
        // loads are connection counts, weights at most 1,000,000 each. (Summing inside the
        // pick's own pass instead measured no faster: the cost is reading every target.)
        let (mut total, mut weights) = (0u64, 0u64);
        for (i, &weight) in self.weights.iter().enumerate() {
            let on = u64::from(usable(i));
            total += load(i) * on;
            weights += u64::from(weight) * on;
        }
        // The test in u128: `load · 100 · W < factor · (T + 1) · w` cannot overflow there.
        let scale = (u128::from(total) + 1) * u128::from(factor);
        let weights = u128::from(weights);
        let under =
            |i: usize| u128::from(load(i)) * 100 * weights < scale * u128::from(self.weights[i]);
        if under(first) {
            return Some(BoundedPick {
                index: first,
                overflowed: false,
            });
        }
        Some(match self.pick(key, |i| usable(i) && under(i)) {
            Some(index) => BoundedPick {
                index,
                overflowed: true,
            },
            None => BoundedPick {
                index: first,
                overflowed: false,
            },
        })
    }

    #[inline]
    fn pick_equal(&self, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.mixed.is_empty() {
            return None;
        }
        let kp = premix(key);
        let first = scan::best_equal(kp, &self.mixed);
        if usable(first) {
            return Some(first);
        }
        // The hash's first choice is down: its runner-up, if usable, is the best usable target
        // (with one target down, nearly always).
        let second = scan::best_equal_except(kp, &self.mixed, first)?;
        if usable(second) {
            return Some(second);
        }
        // More than one down: the best of the others, asking `usable` only about targets that
        // beat the best usable one so far.
        let mut best: Option<usize> = None;
        let mut best_score = 0u64;
        for (i, &mixed) in self.mixed.iter().enumerate() {
            let s = score_premixed(kp, mixed);
            // Strictly greater: equal scores mean equal seeds (fmix64 is a bijection), so the
            // seed tie-break is implied and the earlier index wins, as in `rank_key`.
            if (s > best_score || best.is_none()) && i != first && usable(i) {
                best = Some(i);
                best_score = s;
            }
        }
        best
    }

    /// The weighted pick. One pass ([`scan::estimates`]) names the target with the smallest
    /// estimate of `(1 - u)/w` and the runner-up's estimate; when those prove it first
    /// ([`Table::first_try`]) and it is usable, it is the answer, with no float arithmetic
    /// (98 % of picks at 64 targets with weights 1–8). Otherwise the candidate is ranked
    /// exactly and weighed against the others ([`Table::consider`]): if it is usable, only
    /// against the few whose estimate is within its bound ([`scan::within`]), the only ones
    /// that can beat it; if it is down, against those same few first (the top of the order),
    /// then, with the best usable one among them, against the targets within that one's bound
    /// ([`Table::limit_of`]); against every target only when there is no bound to go by (the
    /// candidate's `u` below ½, or nothing usable near the top). `consider` rules out nearly
    /// every target it is shown by a cheap bound, and compares in the full order (rank, score,
    /// seed, then the earlier index), so the result does not depend on the order of the visit.
    fn pick_weighted(&self, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let kp = premix(key);
        let first = self.first_try(kp);
        let up = usable(first.index);
        if first.clear() && up {
            return Some(first.index);
        }
        let mut best: Option<Best> = None;
        self.consider(kp, first.index, first.score, &mut best, |_| up);
        let visit = |i: usize, best: &mut Option<Best>| {
            if i != first.index {
                let score = score_premixed(kp, self.mixed[i]);
                self.consider(kp, i, score, best, &usable);
            }
        };
        let within = |limit: u64, best: &mut Option<Best>| {
            scan::within(kp, &self.mixed, &self.factors, limit, |i| visit(i, best));
        };
        let every = |best: &mut Option<Best>| (0..self.mixed.len()).for_each(|i| visit(i, best));
        match first.limit {
            Some(limit) if up => within(limit, &mut best),
            // The candidate is down. The top of the order comes first: the targets that could
            // outrank it and the runner-up by estimate (where the best usable one nearly always
            // is); then, if one of them is usable, only the targets that could outrank that one
            // ([`Table::limit_of`]; the wider visit shows the first one's targets again, and
            // `consider` keeps its answer).
            Some(limit) => {
                let top = limit.max(first.second);
                within(top, &mut best);
                match best.map(|b| self.limit_of(b.rank)) {
                    Some(wider) if wider > top => within(wider, &mut best),
                    Some(_) => {}
                    None => every(&mut best),
                }
            }
            None => every(&mut best),
        }
        best.map(|b| b.index)
    }

    /// The estimate above which a target's computed rank is certainly below `rank` (a computed
    /// rank, `ln(u)/w`); `u64::MAX` when there is none (`rank` is `-∞`, or so low that every
    /// estimate may be under it).
    ///
    /// Why: a target's estimate `e` has `e · 2^-(32 + shift) ≤ -ln(u)/w` (the proof in
    /// [`Table::first_try`]), and our `ln` and the division are within 1e-14 relative of the
    /// true values. So an estimate above `|rank| · 2^(32 + shift) · (1 + 1e-9)` (rounded up)
    /// means a computed rank whose magnitude exceeds `|rank|`: strictly below it.
    fn limit_of(&self, rank: f64) -> u64 {
        let scaled = -rank * f64::from(1u32 << self.shift) * 4_294_967_296.0 * (1.0 + 1e-9);
        // `as` saturates: ∞ (and anything past 2^64) gives u64::MAX.
        scaled.ceil() as u64
    }

    /// The weighted pick's first try, in integers only: the target with the smallest estimate
    /// of `(1 - u)/w` over the whole table ([`scan::estimates`]), the estimate at or below
    /// which another target could rank above it (`limit`; none when its `u` is below ½ or its
    /// weight 0), and the runner-up's estimate: clear ([`FirstTry::clear`]) when that is above
    /// the limit. Clear for most picks over many targets: the runner-up's estimate must exceed
    /// the winner's by about `1 - u` of the winner, a few per cent at 64 targets.
    ///
    /// Why it is exact. For a target `j` with `a = !s >> 32`, `x = 1 - u` and its factor
    /// `f = min(⌊2^(32+k)/w⌋, 2^32 - 1)` (`k` the table's shift, `w ≥ 2^k`): `unit` rounds
    /// `(s >> 11) + 0.5` by at most ½ either way, so `a·2^-32 ≤ x ≤ (a + 1)·2^-32`; and
    /// `f·2^-(32+k) ≤ 1/w ≤ (f + 1)·2^-(32+k)` (for `w = 2^k` the cap makes `f + 1 = 2^32`).
    /// So with `t = 2^-(64+k)` the product `a·f` gives `a·f·t ≤ x/w ≤ -ln(u)/w`, the magnitude
    /// of the true rank, and the pass's estimate `e = ⌊a·f / 2^32⌋` gives `e·2^32·t ≤ -ln(u)/w`.
    /// For the candidate `c`, with `q = a_c + 1` and `x ≤ ½`: `-ln(1 - x) = x + x²/2 + x³/3 +
    /// … ≤ x·(1 + x/2 + x²)`, so its true rank's magnitude is at most
    /// `q·(f_c + 1)·t·(1 + q/2·2^-32 + q²·2^-64)`. The bound `B` below rounds each term up and
    /// adds `8·2^-32` (2e-9 relative) for our `ln`'s 1e-15 relative error and the division's
    /// rounding. A target whose estimate exceeds `limit = ⌊B / 2^32⌋` has `e·2^32 > B`, so its
    /// computed rank is strictly below the candidate's, whatever the tie-breaks; when every
    /// other target's does (`second > limit`), the candidate is first.
    fn first_try(&self, kp: u64) -> FirstTry {
        let e = scan::estimates(kp, &self.mixed, &self.factors);
        let (index, score) = (e.index, score_premixed(kp, self.mixed[e.index]));
        let q = (!score >> 32) + 1;
        let limit = (self.weights[index] > 0 && q <= 1 << 31).then(|| {
            // q ≤ 2^31 and f + 1 ≤ 2^32: the product fits in 64 bits, the scaled one in 128;
            // B < 2^63·1.6, so B / 2^32 fits in 64 bits.
            let p = u128::from(q * (self.factors[index] + 1));
            let scale = (1u128 << 32) + u128::from((q >> 1) + 1) + u128::from(((q * q) >> 32) + 1);
            ((p * (scale + 8)) >> 64) as u64
        });
        FirstTry {
            index,
            score,
            limit,
            second: e.second,
        }
    }

    /// Target `i` (of score `score`) against the weighted pick's best so far: ruled out by
    /// the bound `ln(u) ≤ u - 1` against the best's exact rank if it can be, else ranked
    /// exactly and kept if it comes first in the full order and is usable.
    ///
    /// Why that bound is exact: `ln(u) ≤ u - 1 < 0`, and our `ln` is within 1e-15 relative of
    /// the true one, so `ln(u) < (u - 1)·(1 - 1e-9)`; the 1e-9 margin ([`PRUNE_MARGIN`]) also
    /// absorbs the rounding of the test. So when `(u - 1)·PRUNE_MARGIN < best_rank·w`,
    /// `ln(u)/w < best_rank` strictly.
    #[inline]
    fn consider(
        &self,
        kp: u64,
        i: usize,
        score: u64,
        best: &mut Option<Best>,
        usable: impl Fn(usize) -> bool,
    ) {
        debug_assert_eq!(score, score_premixed(kp, self.mixed[i]));
        if let Some(b) = best {
            let w = self.weights[i];
            if w > 0 && (unit(score) - 1.0) * PRUNE_MARGIN < b.rank * f64::from(w) {
                return;
            }
        }
        let rank = self.rank_of(i, score);
        let better = match best {
            None => true,
            Some(b) => match rank.total_cmp(&b.rank) {
                std::cmp::Ordering::Greater => true,
                std::cmp::Ordering::Less => false,
                std::cmp::Ordering::Equal => {
                    let this = (score, seed_of(self.mixed[i]), std::cmp::Reverse(i));
                    let that = (
                        b.score,
                        seed_of(self.mixed[b.index]),
                        std::cmp::Reverse(b.index),
                    );
                    this > that
                }
            },
        };
        if better && usable(i) {
            *best = Some(Best {
                index: i,
                score,
                rank,
            });
        }
    }

    /// The exact weighted rank of target `i` with score `score`: `ln(u)/w`, `-∞` for weight 0.
    fn rank_of(&self, i: usize, score: u64) -> f64 {
        match self.weights[i] {
            0 => f64::NEG_INFINITY,
            w => ln_unit(unit(score)) / f64::from(w),
        }
    }

    /// The full order of target `i` for `key` (see [`RankKey`]).
    #[cfg(test)]
    fn rank_key(&self, key: u64, i: usize) -> RankKey {
        let (seed, weight) = (seed_of(self.mixed[i]), self.weights[i]);
        let s = score(key, seed);
        let rank = if self.equal_weights {
            0
        } else {
            ordered_bits(weighted_rank(s, weight))
        };
        (rank, s, seed, std::cmp::Reverse(i))
    }

    /// Every index, best first for `key`, into `out` (cleared first): the order in which the
    /// fail-over path tries targets. That path never builds it: it asks [`Table::pick`] with the
    /// targets already tried excluded, which gives this order one step at a time (the tests
    /// check that the two agree).
    #[cfg(test)]
    pub fn ranked(&self, key: u64, out: &mut Vec<usize>) {
        out.clear();
        out.extend(0..self.len());
        out.sort_by_cached_key(|&i| std::cmp::Reverse(self.rank_key(key, i)));
    }

    /// Power of two choices, for `stickiness: false`: two distinct usable targets drawn at
    /// random from `rng` (a fresh random `u64` from the caller, such as [`random_u64`]); the one
    /// with the lower `load / weight` wins (a tie goes to the first drawn, itself random). A
    /// single usable target is returned directly; `None` if none is usable.
    ///
    /// When both first draws are usable (the common case) this asks `usable` twice and `load`
    /// twice; otherwise it counts the usable targets and draws among them, so the pair is
    /// uniform over usable pairs in both cases.
    pub fn pick_two_choices(
        &self,
        rng: u64,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u64,
    ) -> Option<usize> {
        let n = self.len();
        if n <= 1 {
            return (n == 1 && usable(0)).then_some(0);
        }
        let (a, b) = distinct_pair(rng, n);
        if usable(a) && usable(b) {
            return Some(self.lighter(a, b, &load));
        }
        // Some target is down: draw among the usable ones. `usable` may change under us (other
        // threads mark targets down); only an index for which it just said true is returned.
        let m = (0..n).filter(|&i| usable(i)).count();
        if m <= 1 {
            return (0..n).find(|&i| usable(i));
        }
        let (ra, rb) = distinct_pair(fmix64(rng ^ 0x9e37_79b9_7f4a_7c15), m);
        let (mut a, mut b) = (None, None);
        for (nth, i) in (0..n).filter(|&i| usable(i)).enumerate() {
            if nth == ra {
                a = Some(i);
            } else if nth == rb {
                b = Some(i);
            }
        }
        match (a, b) {
            (Some(a), Some(b)) => Some(self.lighter(a, b, &load)),
            (a, b) => a.or(b),
        }
    }

    /// `a` unless `b` has a strictly lower load per unit of weight:
    /// `load_b / w_b < load_a / w_a` ⇔ `load_b · w_a < load_a · w_b` (u128: no overflow).
    fn lighter(&self, a: usize, b: usize, load: impl Fn(usize) -> u64) -> usize {
        let wa = u128::from(self.weights[a]);
        let wb = u128::from(self.weights[b]);
        if u128::from(load(b)) * wa < u128::from(load(a)) * wb {
            b
        } else {
            a
        }
    }
}

/// What [`Table::pick_bounded`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundedPick {
    /// The target (an index into the table).
    pub index: usize,
    /// The best-ranked usable target was at the bound, so this is a later-ranked one.
    pub overflowed: bool,
}

/// Two distinct indices below `n` (≥ 2), uniform, from one random `u64`: the high half of
/// `rng · n` gives the first (Lemire's method), a remixed `rng` the second.
#[inline]
fn distinct_pair(rng: u64, n: usize) -> (usize, usize) {
    let below = |r: u64, n: usize| ((u128::from(r) * n as u128) >> 64) as usize;
    let a = below(rng, n);
    let mut b = below(fmix64(rng.wrapping_add(0x6a09_e667_f3bc_c909)), n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

thread_local! {
    /// The state of [`random_u64`] for this thread.
    static RNG_STATE: Cell<u64> = Cell::new(rng_seed());
}

/// A seed that differs between threads, processes and runs: the thread id and the time, hashed
/// with std's per-process random keys. Only for [`random_u64`], never for the sticky mapping.
fn rng_seed() -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::thread::current().id().hash(&mut h);
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .hash(&mut h);
    h.finish()
}

/// A fast per-thread pseudo-random `u64` (wyrand, seeded once per thread) for
/// [`Table::pick_two_choices`]. Not cryptographic, no lock, no allocation.
#[inline]
pub fn random_u64() -> u64 {
    RNG_STATE.with(|state| {
        let x = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// splitmix64: a fixed-seed generator, so every statistical figure is reproducible.
    /// (`scan`'s tests use it too.)
    pub(super) struct TestRng(pub(super) u64);

    impl TestRng {
        pub(super) fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn ipv4(&mut self) -> IpAddr {
            IpAddr::V4(Ipv4Addr::from(self.next() as u32))
        }

        fn below(&mut self, n: usize) -> usize {
            ((u128::from(self.next()) * n as u128) >> 64) as usize
        }

        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let j = self.below(i + 1);
                v.swap(i, j);
            }
        }
    }

    /// `n` client keys of random IPv4 addresses, from a fixed seed.
    fn client_keys(n: usize, seed: u64) -> Vec<u64> {
        let mut rng = TestRng(seed);
        (0..n).map(|_| client_key(rng.ipv4())).collect()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 256, i % 256))
            .collect()
    }

    fn equal_table(ids: &[String]) -> Table {
        let targets: Vec<(u64, u32)> = ids.iter().map(|id| (target_seed(id), 1)).collect();
        Table::new(&targets)
    }

    /// Clients per target when every target is usable.
    fn counts(table: &Table, keys: &[u64]) -> Vec<usize> {
        let mut c = vec![0; table.len()];
        for &k in keys {
            c[table.pick(k, |_| true).unwrap()] += 1;
        }
        c
    }

    /// Pearson's χ² against a uniform share: ≈ n - 1 ± sqrt(2(n - 1)) for a good hash.
    fn chi_square(counts: &[usize]) -> f64 {
        let total: usize = counts.iter().sum();
        let mean = total as f64 / counts.len() as f64;
        counts
            .iter()
            .map(|&c| (c as f64 - mean).powi(2) / mean)
            .sum()
    }

    fn busiest_over_mean(counts: &[usize]) -> f64 {
        let total: usize = counts.iter().sum();
        let max = *counts.iter().max().unwrap();
        max as f64 / (total as f64 / counts.len() as f64)
    }

    // GOLDEN VECTORS. These literals were computed once by this implementation and pin the
    // contract of the module doc. If one of them fails, the mapping of clients to targets has
    // changed: that breaks stickiness across versions and between instances running different
    // versions. Do not update them to make a change pass; restore the old behaviour instead.

    #[test]
    fn golden_client_keys_never_change() {
        let cases: [(&str, u64); 6] = [
            ("0.0.0.0", 0x4d33_a937_2719_2487),
            ("10.1.2.3", 0xb8b3_87fa_0a1c_d4e9),
            ("192.168.0.1", 0x2c89_2be8_396c_86fa),
            ("255.255.255.255", 0x5dbe_b358_e39c_496d),
            ("::1", 0xb55b_7400_0d56_0088),
            ("2001:db8::42", 0xe051_6264_eb8a_f19c),
        ];
        for (ip, want) in cases {
            let got = client_key(ip.parse().unwrap());
            assert_eq!(got, want, "client_key({ip}) = {got:#018x}");
        }
    }

    #[test]
    fn golden_target_seeds_never_change() {
        let cases: [(&str, u64); 4] = [
            ("", 0xefd0_1f60_ba99_2926),
            ("a", 0x82a2_a958_a9be_ce5b),
            ("10.0.0.1:8080", 0xe8c7_2115_6ed5_2b14),
            ("backend-é", 0x067c_7e4c_403d_f878),
        ];
        for (id, want) in cases {
            let got = target_seed(id);
            assert_eq!(got, want, "target_seed({id:?}) = {got:#018x}");
        }
    }

    #[test]
    fn golden_picks_never_change() {
        let equal: Vec<String> = ids(5);
        let equal = equal_table(&equal);
        let weighted = Table::new(&[
            (target_seed("a:1"), 1),
            (target_seed("b:1"), 2),
            (target_seed("c:1"), 3),
            (target_seed("d:1"), 4),
        ]);
        let cases: [(&str, usize, usize); 6] = [
            ("10.1.2.3", 3, 3),
            ("192.168.0.1", 3, 2),
            ("172.16.5.9", 1, 2),
            ("8.8.8.8", 4, 3),
            ("2001:db8::42", 4, 2),
            ("::ffff:10.1.2.3", 3, 3),
        ];
        for (ip, want_equal, want_weighted) in cases {
            let key = client_key(ip.parse().unwrap());
            let got = (equal.pick(key, |_| true), weighted.pick(key, |_| true));
            assert_eq!(got, (Some(want_equal), Some(want_weighted)), "{ip}");
        }
        // The weighted rank itself, bit for bit (covers our ln).
        let key = client_key("10.1.2.3".parse().unwrap());
        let rank = weighted_rank(score(key, target_seed("c:1")), 3);
        assert_eq!(rank.to_bits(), 0xbfc4_5f5d_69c5_c544, "{rank:e}");
    }

    #[test]
    fn golden_ipv6_clients_are_keyed_by_their_64_under_the_default_prefix() {
        // The client is the address masked to `clientPrefix` (src/addr.rs) before it is
        // hashed: with the default (IPv4 /32, IPv6 /64), IPv4 keys are those above, and every
        // address of one IPv6 /64 has the key of the /64's network address.
        let prefix = crate::addr::ClientPrefix::DEFAULT;
        let equal = equal_table(&ids(5));
        let weighted = Table::new(&[
            (target_seed("a:1"), 1),
            (target_seed("b:1"), 2),
            (target_seed("c:1"), 3),
            (target_seed("d:1"), 4),
        ]);
        let cases: [(&str, &str, u64, usize, usize); 8] = [
            ("2001:db8::42", "2001:db8::", 0x5d20_b828_001d_10e2, 3, 3),
            (
                "2001:db8::ffff:1:2:3",
                "2001:db8::",
                0x5d20_b828_001d_10e2,
                3,
                3,
            ),
            (
                "2001:db8:0:1:aaaa:bbbb:cccc:dddd",
                "2001:db8:0:1::",
                0x10ce_a5f0_f553_96e9,
                3,
                2,
            ),
            (
                "2001:db8:abcd:12::1",
                "2001:db8:abcd:12::",
                0xc0aa_474b_70d2_2530,
                0,
                2,
            ),
            ("fe80::1", "fe80::", 0xcf46_56d1_8825_0a1e, 4, 1),
            ("::1", "::", 0xa5e0_dba6_c385_580a, 2, 2),
            // IPv4-mapped stays IPv4, with the IPv4 prefix: the IPv4 golden key.
            ("::ffff:10.1.2.3", "10.1.2.3", 0xb8b3_87fa_0a1c_d4e9, 3, 3),
            ("10.1.2.3", "10.1.2.3", 0xb8b3_87fa_0a1c_d4e9, 3, 3),
        ];
        for (ip, network, want_key, want_equal, want_weighted) in cases {
            let client = prefix.client(ip.parse().unwrap());
            assert_eq!(client, network.parse::<IpAddr>().unwrap(), "{ip}");
            let key = client_key(client);
            assert_eq!(key, want_key, "key of {ip} = {key:#018x}");
            let got = (equal.pick(key, |_| true), weighted.pick(key, |_| true));
            assert_eq!(got, (Some(want_equal), Some(want_weighted)), "{ip}");
        }
    }

    #[test]
    fn fnv1a64_and_fmix64_are_the_standard_functions() {
        // Published FNV-1a 64 test vectors, and fmix64's fixed point at 0.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fmix64(0), 0);
    }

    #[test]
    fn premixed_score_is_the_score() {
        let mut rng = TestRng(3);
        for _ in 0..100_000 {
            let (key, seed) = (rng.next(), rng.next());
            assert_eq!(score_premixed(premix(key), premix(seed)), score(key, seed));
            assert_eq!(premix(premix(seed)), seed);
        }
    }

    #[test]
    fn branch_free_best_is_the_best_rank() {
        // Every size around the two-lane split, duplicate seeds (earlier index wins), and a
        // target whose score is 0 (key == seed).
        let mut rng = TestRng(5);
        for n in (1..=9).chain([63, 64, 65]) {
            let mut targets: Vec<(u64, u32)> = (0..n).map(|_| (rng.next(), 1)).collect();
            if n >= 3 {
                targets[n - 1] = targets[1];
            }
            let table = Table::new(&targets);
            let mut keys = client_keys(2_000, 7 + n as u64);
            keys.extend(targets.iter().map(|t| t.0));
            for key in keys {
                let brute = (0..n).max_by_key(|&i| table.rank_key(key, i));
                assert_eq!(table.pick(key, |_| true), brute, "n = {n}");
                let down = brute.unwrap_or(0);
                let brute = (0..n)
                    .filter(|&i| i != down)
                    .max_by_key(|&i| table.rank_key(key, i));
                assert_eq!(table.pick(key, |i| i != down), brute, "n = {n}");
            }
        }
        assert_eq!(Table::new(&[]).pick(1, |_| true), None);
    }

    #[test]
    fn ln_constants_are_fdlibms_split_of_ln2() {
        assert_eq!(LN2_HI.to_bits(), 0x3fe6_2e42_fee0_0000);
        assert_eq!(LN2_LO.to_bits(), 0x3dea_39ef_3579_3c76);
    }

    #[test]
    fn ipv4_mapped_ipv6_hashes_as_ipv4() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(client_key(mapped), client_key(v4));
        let mut rng = TestRng(7);
        for _ in 0..1000 {
            let v4 = Ipv4Addr::from(rng.next() as u32);
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            assert_eq!(client_key(mapped), client_key(IpAddr::V4(v4)));
        }
        // IPv4-compatible (::a.b.c.d, deprecated) is a different address, and hashes differently.
        let compat = IpAddr::V6(Ipv6Addr::from(0x0a01_0203u128));
        assert_ne!(client_key(compat), client_key(v4));
    }

    #[test]
    fn ln_is_accurate() {
        let mut worst = 0f64;
        let mut check = |x: f64| {
            let (ours, std) = (ln_unit(x), x.ln());
            let rel = if std == 0.0 {
                ours.abs()
            } else {
                ((ours - std) / std).abs()
            };
            worst = worst.max(rel);
        };
        let mut rng = TestRng(11);
        for _ in 0..200_000 {
            check(unit(rng.next()));
        }
        for e in 0..=54 {
            let p = 0.5f64.powi(e);
            for x in [p, p * std::f64::consts::SQRT_2, p * 0.75] {
                let mut y = x;
                for _ in 0..64 {
                    if y > 0.0 && y <= 1.0 {
                        check(y);
                    }
                    y = f64::from_bits(y.to_bits() - 1);
                }
            }
        }
        assert_eq!(ln_unit(1.0).to_bits(), 0.0f64.to_bits());
        eprintln!("ln_unit: worst relative error vs f64::ln = {worst:e}");
        assert!(worst < 1e-15, "worst relative error {worst:e}");
    }

    #[test]
    fn ln_is_monotone_on_the_unit_grid() {
        // Every u the ranking can see is unit(s) for some score s; check consecutive ones near
        // every exponent boundary, near the √2 switch, and at random places.
        let mut inversions = 0;
        let mut check_from = |m0: u64| {
            let mut prev = ln_unit(unit(m0 << 11));
            for m in m0 + 1..(m0 + 2048).min(1 << 53) {
                let cur = ln_unit(unit(m << 11));
                if cur < prev {
                    inversions += 1;
                }
                prev = cur;
            }
        };
        for e in 0..53 {
            let boundary = 1u64 << e;
            check_from(boundary.saturating_sub(1024));
            let sqrt2 = (std::f64::consts::SQRT_2 * boundary as f64) as u64;
            check_from(sqrt2.saturating_sub(1024));
        }
        let mut rng = TestRng(13);
        for _ in 0..200 {
            check_from(rng.next() >> 11);
        }
        check_from((1 << 53) - 2048);
        assert_eq!(inversions, 0);
    }

    #[test]
    fn equal_weights_shortcut_ranks_as_the_weighted_formula() {
        let ids = ids(16);
        let table = equal_table(&ids);
        assert!(table.equal_weights);
        for key in client_keys(100_000, 17) {
            let fast = table.pick_equal(key, |_| true);
            let slow = table.pick_weighted(key, |_| true);
            assert_eq!(fast, slow, "key {key:#x}");
        }
    }

    #[test]
    fn weighted_pick_skips_ln_without_changing_the_result() {
        // Brute force (the best full rank key among usable targets) against the pick, from 2
        // targets to 150, with all targets usable, only the even ones,
        // a random half, or only the worst-ranked one (nothing rules anything out then); plus a
        // weight of 0 and a duplicated seed in the larger tables.
        let mut rng = TestRng(19);
        for n in [2, 3, 5, 40, 64, 65, 150] {
            let mut targets: Vec<(u64, u32)> = (0..n)
                .map(|i| (target_seed(&format!("t{i}")), 1 + rng.below(10) as u32))
                .collect();
            if n > 64 {
                targets[3].1 = 0;
                targets[n - 1] = targets[70 % n];
            }
            let table = Table::new(&targets);
            let mut out = Vec::new();
            for key in client_keys(20_000, 23 + n as u64) {
                let mask = rng.next();
                table.ranked(key, &mut out);
                let last = *out.last().unwrap();
                let usable = |i: usize| match key % 4 {
                    0 => true,
                    1 => i % 2 == 0,
                    2 => mask >> (i % 64) & 1 == 1,
                    _ => i == last,
                };
                let brute = (0..table.len())
                    .filter(|&i| usable(i))
                    .max_by_key(|&i| table.rank_key(key, i));
                assert_eq!(table.pick(key, usable), brute, "n = {n}");
                assert_eq!(out.iter().copied().find(|&i| usable(i)), brute);
            }
        }
    }

    #[test]
    fn a_clear_winner_is_the_best_ranked_target() {
        // Whenever the integer-only first try names a target, it is the best of the full order
        // (brute force, every target usable), from 2 targets to 150, with weights 1–8,
        // 1–1,000, 500,000–1,000,000 (the table's shift keeps those estimates as precise) and
        // a weight of 0; and it names one for most picks of many targets (it would still be
        // exact naming none, but then it would only cost time).
        let mut rng = TestRng(29);
        let cases = [
            (2, 1, 1_000),
            (3, 1, 8),
            (8, 1, 8),
            (64, 1, 8),
            (64, 1, 1_000),
            (64, 500_000, 1_000_000),
            (150, 1, 8),
        ];
        for (n, least, most) in cases {
            let mut targets: Vec<(u64, u32)> = (0..n)
                .map(|i| {
                    let w = least + rng.below((most - least + 1) as usize) as u32;
                    (target_seed(&format!("c{i}")), w)
                })
                .collect();
            if n > 64 {
                targets[5].1 = 0;
            }
            targets[0].1 = least; // never all equal
            targets[1].1 = least + 1;
            let table = Table::new(&targets);
            let keys = client_keys(20_000, 31 + n as u64);
            let mut named = 0;
            for &key in &keys {
                let first = table.first_try(premix(key));
                if first.clear() {
                    named += 1;
                    let brute = (0..n).max_by_key(|&i| table.rank_key(key, i));
                    assert_eq!(Some(first.index), brute, "n = {n}, weights {least}–{most}");
                }
            }
            if n >= 64 {
                assert!(
                    named * 10 > keys.len() * 9,
                    "n = {n}, weights {least}–{most}: named {named} of {}",
                    keys.len()
                );
            }
        }
    }

    #[test]
    fn large_weights_get_estimates_as_precise_as_small_ones() {
        // The table's shift makes the factors depend on the weights' ratios only: weights
        // scaled by 2^12 (up to 32,768) give the same factors, and so the same first try, as
        // the weights 1–8 they came from. Without it their estimates would keep 12 bits fewer.
        let mut rng = TestRng(37);
        let weights: Vec<u32> = (0..64).map(|_| 1 + rng.below(8) as u32).collect();
        let table = |scale: u32| {
            let targets: Vec<(u64, u32)> = (0..64)
                .map(|i| (target_seed(&format!("s{i}")), weights[i] * scale))
                .collect();
            Table::new(&targets)
        };
        let (small, large) = (table(1), table(1 << 12));
        assert_eq!(small.factors, large.factors);
        for key in client_keys(2_000, 41) {
            let (a, b) = (small.first_try(premix(key)), large.first_try(premix(key)));
            assert_eq!((a.index, a.clear(), a.limit), (b.index, b.clear(), b.limit));
            assert_eq!(small.pick(key, |_| true), large.pick(key, |_| true));
        }
    }

    #[test]
    fn pick_is_independent_of_list_order() {
        let mut rng = TestRng(29);
        for weighted in [false, true] {
            let targets: Vec<(u64, u32)> = (0..16)
                .map(|i| {
                    let w = if weighted { 1 + i % 4 } else { 1 };
                    (target_seed(&format!("backend-{i}")), w)
                })
                .collect();
            let mut shuffled = targets.clone();
            rng.shuffle(&mut shuffled);
            assert_ne!(shuffled, targets);
            let (a, b) = (Table::new(&targets), Table::new(&shuffled));
            for key in client_keys(10_000, 31) {
                let pa = a.pick(key, |_| true).unwrap();
                let pb = b.pick(key, |_| true).unwrap();
                assert_eq!(targets[pa], shuffled[pb]);
                // Also with a target down, named by identity.
                let down = targets[3].0;
                let pa = a.pick(key, |i| targets[i].0 != down).unwrap();
                let pb = b.pick(key, |i| shuffled[i].0 != down).unwrap();
                assert_eq!(targets[pa], shuffled[pb]);
            }
        }
    }

    #[test]
    fn equal_targets_share_clients_evenly_at_100k_clients() {
        let keys = client_keys(100_000, 37);
        for n in [2, 8, 16, 32, 64] {
            let ratio = busiest_over_mean(&counts(&equal_table(&ids(n)), &keys));
            eprintln!("balance: 100k clients over {n:2} targets: busiest/mean = {ratio:.4}");
            // Multinomial noise alone: σ per bin = sqrt((1-1/n)·n/100k) of the mean, 2.5% at
            // n = 64, so the expected busiest/mean is ≈ 1.07 there for any hash; 1.05 holds with
            // margin only up to n = 16. Larger n is checked at 1M clients below.
            let bound = if n <= 16 { 1.05 } else { 1.10 };
            assert!(ratio <= bound, "n = {n}: busiest/mean = {ratio:.4}");
        }
    }

    #[test]
    fn equal_targets_share_clients_evenly_at_1m_clients() {
        let keys = client_keys(1_000_000, 41);
        for n in [2, 8, 32, 64] {
            let c = counts(&equal_table(&ids(n)), &keys);
            let (ratio, chi2) = (busiest_over_mean(&c), chi_square(&c));
            eprintln!(
                "balance: 1M clients over {n:2} targets: busiest/mean = {ratio:.4}, \
                 chi2 = {chi2:.1} (uniform: {} ± {:.1})",
                n - 1,
                (2.0 * (n - 1) as f64).sqrt()
            );
            assert!(ratio <= 1.05, "n = {n}: busiest/mean = {ratio:.4}");
            // Indistinguishable from uniform: within 5 σ of χ²'s mean.
            let df = (n - 1) as f64;
            assert!(
                chi2 < df + 5.0 * (2.0 * df).sqrt(),
                "n = {n}: chi2 = {chi2:.1}"
            );
        }
    }

    #[test]
    fn consecutive_client_addresses_balance_too() {
        // Real clients are not uniform over the address space: a whole /16 of IPv4, or the low
        // 16 bits of one IPv6 prefix, must spread as well as random addresses do.
        let v4: Vec<u64> = (0..=u16::MAX)
            .map(|i| client_key(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | u32::from(i)))))
            .collect();
        let v6: Vec<u64> = (0..=u16::MAX)
            .map(|i| {
                let ip = Ipv6Addr::from(0x2001_0db8_0000_0000_0000_0000_0000_0000 | u128::from(i));
                client_key(IpAddr::V6(ip))
            })
            .collect();
        for (name, keys) in [("10.0.0.0/16", &v4), ("2001:db8::/112", &v6)] {
            for n in [8, 64] {
                let c = counts(&equal_table(&ids(n)), keys);
                let (ratio, chi2) = (busiest_over_mean(&c), chi_square(&c));
                eprintln!(
                    "balance: {name} over {n:2} targets: busiest/mean = {ratio:.4}, \
                     chi2 = {chi2:.1} (uniform: {} ± {:.1})",
                    n - 1,
                    (2.0 * (n - 1) as f64).sqrt()
                );
                // 65,536 clients: σ per target is 1.0% at n = 8 and 3.1% at n = 64.
                let bound = if n <= 8 { 1.05 } else { 1.15 };
                assert!(ratio <= bound, "{name}, n = {n}: busiest/mean = {ratio:.4}");
                let df = (n - 1) as f64;
                assert!(
                    chi2 < df + 5.0 * (2.0 * df).sqrt(),
                    "{name}, n = {n}: chi2 = {chi2:.1}"
                );
            }
        }
    }

    #[test]
    fn weighted_targets_share_clients_in_proportion() {
        let keys = client_keys(100_000, 43);
        let weights = [1u32, 2, 3, 4];
        let targets: Vec<(u64, u32)> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (target_seed(&format!("w{i}")), w))
            .collect();
        let c = counts(&Table::new(&targets), &keys);
        let total_w: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let expected = keys.len() as f64 * f64::from(w) / f64::from(total_w);
            let ratio = c[i] as f64 / expected;
            eprintln!(
                "weights: weight {w}: {} clients, share/expected = {ratio:.4}",
                c[i]
            );
            assert!(
                (1.0 / 1.05..=1.05).contains(&ratio),
                "weight {w}: {ratio:.4}"
            );
        }
    }

    #[test]
    fn removal_moves_only_the_removed_targets_clients() {
        let keys = client_keys(100_000, 47);
        for n in [8, 64] {
            let ids = ids(n);
            let table = equal_table(&ids);
            let before: Vec<usize> = keys
                .iter()
                .map(|&k| table.pick(k, |_| true).unwrap())
                .collect();
            let removed = n / 3;
            // Deactivated: still in the table, unusable.
            let after: Vec<usize> = keys
                .iter()
                .map(|&k| table.pick(k, |i| i != removed).unwrap())
                .collect();
            // Deleted: a new table without it (indices above `removed` shift down by one).
            let mut rest = ids.clone();
            rest.remove(removed);
            let smaller = equal_table(&rest);
            let collateral = (0..keys.len())
                .filter(|&c| before[c] != removed && after[c] != before[c])
                .count();
            let mut load = vec![0usize; n];
            for (c, &k) in keys.iter().enumerate() {
                assert_ne!(after[c], removed);
                let deleted = smaller.pick(k, |_| true).unwrap();
                let deleted = if deleted >= removed {
                    deleted + 1
                } else {
                    deleted
                };
                assert_eq!(deleted, after[c], "deactivated and deleted agree");
                load[after[c]] += 1;
            }
            load.remove(removed);
            let moved = before.iter().filter(|&&t| t == removed).count();
            let ratio = busiest_over_mean(&load);
            eprintln!(
                "removal: 1 of {n} targets: {moved} clients moved, collateral {collateral}, \
                 busiest/mean after = {ratio:.4}"
            );
            assert_eq!(collateral, 0);
            assert!(ratio <= 1.10, "n = {n}: busiest/mean = {ratio:.4}");
        }
    }

    #[test]
    fn addition_moves_clients_only_to_the_new_target() {
        let keys = client_keys(100_000, 53);
        for n in [8, 64] {
            let ids = ids(n);
            let table = equal_table(&ids);
            for new_id in ["new-a:80", "new-b:80", "new-c:80"] {
                let mut more = ids.clone();
                more.push(new_id.to_owned());
                let bigger = equal_table(&more);
                let mut moved = 0;
                for &k in &keys {
                    let (old, new) = (table.pick(k, |_| true), bigger.pick(k, |_| true));
                    if old != new {
                        moved += 1;
                        assert_eq!(new, Some(n), "a moved client went to the new target");
                    }
                }
                let fraction = moved as f64 / keys.len() as f64;
                let ideal = 1.0 / (n + 1) as f64;
                eprintln!(
                    "addition: {new_id} to {n} targets: moved {fraction:.5} vs 1/(N+1) = \
                     {ideal:.5} (ratio {:.4})",
                    fraction / ideal
                );
                assert!(fraction <= 1.1 * ideal, "n = {n}: moved {fraction:.5}");
            }
        }
    }

    #[test]
    fn ranked_starts_with_pick_and_is_a_permutation() {
        let mut rng = TestRng(59);
        let equal = equal_table(&ids(12));
        let weighted = Table::new(
            &(0..12)
                .map(|i| (target_seed(&format!("w{i}")), 1 + i % 3))
                .collect::<Vec<_>>(),
        );
        let mut out = vec![99; 3];
        for table in [&equal, &weighted] {
            for key in client_keys(2_000, 61) {
                table.ranked(key, &mut out);
                assert_eq!(Some(out[0]), table.pick(key, |_| true));
                let mut sorted = out.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..table.len()).collect::<Vec<_>>());
                // Each next one is what pick gives with the ones before it down.
                let k = rng.below(table.len());
                assert_eq!(Some(out[k]), table.pick(key, |i| !out[..k].contains(&i)));
            }
        }
    }

    #[test]
    fn pick_is_none_when_nothing_is_usable() {
        let equal = equal_table(&ids(4));
        let weighted = Table::new(&[(1, 1), (2, 2)]);
        for table in [&equal, &weighted, &Table::new(&[])] {
            assert_eq!(table.pick(123, |_| false), None);
            assert_eq!(table.pick_two_choices(123, |_| false, |_| 0), None);
        }
        assert!(Table::new(&[]).is_empty());
        let mut out = vec![1];
        Table::new(&[]).ranked(5, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn two_choices_never_picks_an_unusable_target() {
        let table = equal_table(&ids(10));
        let mut rng = TestRng(67);
        for _ in 0..20_000 {
            let mask = rng.next() as u16 & 0x3ff;
            let usable = |i: usize| mask & (1 << i) != 0;
            match table.pick_two_choices(rng.next(), usable, |i| i as u64) {
                Some(i) => assert!(usable(i)),
                None => assert_eq!(mask, 0),
            }
        }
        // A single usable target is returned directly.
        for only in 0..10 {
            assert_eq!(
                table.pick_two_choices(rng.next(), |i| i == only, |_| 0),
                Some(only)
            );
        }
    }

    #[test]
    fn two_choices_prefers_the_lower_load_per_weight() {
        let mut rng = TestRng(71);
        // Two targets: always the less loaded one.
        let two = equal_table(&ids(2));
        for _ in 0..1000 {
            assert_eq!(
                two.pick_two_choices(rng.next(), |_| true, |i| [5, 3][i]),
                Some(1)
            );
        }
        // Weighted: load 10 on weight 4 (2.5 each) beats load 3 on weight 1.
        let weighted = Table::new(&[(1, 1), (2, 4)]);
        for _ in 0..1000 {
            assert_eq!(
                weighted.pick_two_choices(rng.next(), |_| true, |i| [3, 10][i]),
                Some(1)
            );
        }
        // Many targets, one idle: it is chosen whenever it is drawn, the busiest never is, and
        // every usable target gets drawn.
        let table = equal_table(&ids(8));
        let mut chosen = [0usize; 8];
        for _ in 0..40_000 {
            let i = table
                .pick_two_choices(
                    rng.next(),
                    |i| i != 5,
                    |i| if i == 2 { 0 } else { 10 + i as u64 },
                )
                .unwrap();
            chosen[i] += 1;
        }
        eprintln!("two choices over 8 (5 down, 2 idle, 7 busiest): {chosen:?}");
        assert_eq!(chosen[5], 0);
        assert_eq!(chosen[7], 0);
        // The idle one is in 1 - C(6,2)/C(7,2) = 2/7 of pairs.
        let idle = chosen[2] as f64 / 40_000.0;
        assert!((idle - 2.0 / 7.0).abs() < 0.02, "idle share {idle:.3}");
        assert!(chosen
            .iter()
            .enumerate()
            .all(|(i, &c)| i == 5 || i == 7 || c > 0));
    }

    /// Whether target `i` is under the bound of `factor` (the definition in `pick_bounded`'s
    /// doc, `loads[i] / (factor/100 × (T + 1) × w_i / W) < 1`, cross-multiplied into exact
    /// integers: a float would round a load exactly at the bound either way).
    fn under_bound(table: &Table, i: usize, loads: &[u64], usable: &[bool], factor: u32) -> bool {
        let total: u64 = (0..table.len())
            .filter(|&j| usable[j])
            .map(|j| loads[j])
            .sum();
        let weights: u64 = (0..table.len())
            .filter(|&j| usable[j])
            .map(|j| u64::from(table.weights[j]))
            .sum();
        let lhs = u128::from(loads[i]) * 100 * u128::from(weights);
        let rhs = u128::from(factor) * u128::from(total + 1) * u128::from(table.weights[i]);
        lhs < rhs
    }

    #[test]
    fn bounded_pick_is_the_first_ranked_target_under_the_bound() {
        // Brute force: walk the full ranking and take the first usable target under the
        // bound, for random loads, health and factors, equal and unequal weights.
        let mut rng = TestRng(73);
        let equal = equal_table(&ids(9));
        let weighted = Table::new(
            &(0..9)
                .map(|i| (target_seed(&format!("w{i}")), 1 + i % 4))
                .collect::<Vec<_>>(),
        );
        let mut ranked = Vec::new();
        let mut overflows = 0;
        for table in [&equal, &weighted] {
            for key in client_keys(20_000, 79) {
                let factor = [100, 101, 125, 150, 200][rng.below(5)];
                let loads: Vec<u64> = (0..9).map(|_| rng.below(40) as u64).collect();
                let usable: Vec<bool> = (0..9).map(|_| rng.below(8) != 0).collect();
                let got = table.pick_bounded(key, factor, |i| usable[i], |i| loads[i]);
                table.ranked(key, &mut ranked);
                let first = ranked.iter().copied().find(|&i| usable[i]);
                let want = ranked
                    .iter()
                    .copied()
                    .find(|&i| usable[i] && under_bound(table, i, &loads, &usable, factor));
                match (got, first) {
                    (None, None) => {}
                    (Some(got), Some(first)) => {
                        let want = want.expect("some usable target is under the bound");
                        assert_eq!(got.index, want, "key {key:#x} loads {loads:?} {usable:?}");
                        assert_eq!(got.overflowed, want != first);
                        overflows += usize::from(got.overflowed);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        eprintln!("bounded pick: {overflows} of 40000 random cases overflowed");
        assert!(
            overflows > 1000,
            "the cases exercise the bound: {overflows}"
        );
    }

    #[test]
    fn bounded_pick_with_light_loads_is_the_plain_pick() {
        for table in [
            &equal_table(&ids(8)),
            &Table::new(&[(1, 1), (2, 5), (3, 2)]),
        ] {
            for key in client_keys(5_000, 83) {
                let got = table.pick_bounded(key, 100, |_| true, |_| 0);
                let plain = table.pick(key, |_| true).unwrap();
                assert_eq!(
                    got,
                    Some(BoundedPick {
                        index: plain,
                        overflowed: false
                    })
                );
            }
        }
    }

    #[test]
    fn at_the_bound_is_over_it() {
        // Four equal targets at loads 3, 3, 3, 2: counting this connection the mean is 12/4
        // = 3, so with factor 100 a target at 3 is at the bound, and only the one at 2 is
        // under it; every client lands there, the others' first choices overflow.
        let table = equal_table(&ids(4));
        let loads = [3, 3, 3, 2];
        for key in client_keys(1_000, 89) {
            let first = table.pick(key, |_| true).unwrap();
            let got = table
                .pick_bounded(key, 100, |_| true, |i| loads[i])
                .unwrap();
            assert_eq!(got.index, 3);
            assert_eq!(got.overflowed, first != 3);
            // At 134 %, 3 < 1.34 × 3 = 4.02: everyone is under the bound.
            let got = table
                .pick_bounded(key, 134, |_| true, |i| loads[i])
                .unwrap();
            assert_eq!(
                got,
                BoundedPick {
                    index: first,
                    overflowed: false
                }
            );
        }
    }

    #[test]
    fn the_bound_is_a_share_of_the_weighted_mean() {
        // Weights 3 and 1, loads 5 and 2: counting this connection, 8 connections over weight
        // 4; the bounds at 100 % are 6 and 2. The weight-3 target (5 < 6) is under its bound
        // with more than twice the other's load; the weight-1 target (2, not < 2) is at it.
        let table = Table::new(&[(target_seed("heavy"), 3), (target_seed("light"), 1)]);
        for key in client_keys(1_000, 97) {
            let got = table
                .pick_bounded(key, 100, |_| true, |i| [5, 2][i])
                .unwrap();
            assert_eq!(got.index, 0);
            // Loads 6 and 1: now the heavy one is at its bound (6 of 6) and the light one
            // under (1 < 2).
            let got = table
                .pick_bounded(key, 100, |_| true, |i| [6, 1][i])
                .unwrap();
            assert_eq!(got.index, 1);
        }
    }

    #[test]
    fn unusable_targets_are_never_under_the_bound_nor_in_the_mean() {
        // Target 0 is down with no load: it is not a place to overflow to. The mean is over
        // the three usable ones (31/3 with this connection), so their load of 10 is under the
        // bound at 100 % and every client stays on its first usable choice; counted over all
        // four (31/4) every one of them would be over.
        let table = equal_table(&ids(4));
        let loads = [0, 10, 10, 10];
        for key in client_keys(2_000, 101) {
            let usable = |i: usize| i != 0;
            let got = table.pick_bounded(key, 100, usable, |i| loads[i]).unwrap();
            assert_eq!(got.index, table.pick(key, usable).unwrap());
            assert!(!got.overflowed);
            // Only target 0 usable, however loaded: it is the pick.
            let got = table
                .pick_bounded(key, 100, |i| i == 0, |_| 1_000_000)
                .unwrap();
            assert_eq!(got.index, 0);
        }
        assert_eq!(table.pick_bounded(1, 125, |_| false, |_| 0), None);
    }

    #[test]
    fn random_u64_varies() {
        let a: Vec<u64> = (0..8).map(|_| random_u64()).collect();
        let b = std::thread::spawn(|| (0..8).map(|_| random_u64()).collect::<Vec<u64>>())
            .join()
            .unwrap();
        assert_ne!(a, b);
        assert!(a.windows(2).all(|w| w[0] != w[1]));
    }
}
