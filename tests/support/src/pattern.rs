//! Deterministic bytes: a small generator ([`Rng`]) for reproducible "random" choices, and the
//! byte [`Pattern`] made from it, so a receiver checks a transfer byte for byte without keeping
//! a copy of what was sent, and a failure names the first byte that differs.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::PATIENCE;

/// xorshift64*: fast, reproducible from its seed, good enough in its high and low bits for
/// test data, sizes and choices (not for anything secret).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value: the state is never 0).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A value uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A deterministic stream of bytes: the output of [`Rng`] from a seed, 8 bytes at a time.
pub struct Pattern {
    rng: Rng,
    buf: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            rng: Rng::new(seed),
            buf: [0; 8],
            used: 8,
        }
    }

    /// Fills `out` with the next bytes of the pattern.
    pub fn fill(&mut self, out: &mut [u8]) {
        for byte in out.iter_mut() {
            if self.used == 8 {
                self.buf = self.rng.next_u64().to_le_bytes();
                self.used = 0;
            }
            *byte = self.buf[self.used];
            self.used += 1;
        }
    }
}

/// Writes `len` pattern bytes from `seed` to `w`, then shuts its write side.
pub async fn send_pattern<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    seed: u64,
    len: usize,
) -> io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        pattern.fill(&mut chunk[..n]);
        w.write_all(&chunk[..n]).await?;
        left -= n;
    }
    w.shutdown().await
}

/// Reads `r` to EOF and checks that it is exactly `len` pattern bytes from `seed`. Returns the
/// number of bytes that matched before the first difference (== len when all is well).
pub async fn check_pattern<R: AsyncReadExt + Unpin>(
    r: &mut R,
    seed: u64,
    len: usize,
) -> io::Result<usize> {
    let mut pattern = Pattern::new(seed);
    let mut got = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = r.read(&mut got).await?;
        if n == 0 {
            return Ok(total);
        }
        if total + n > len {
            return Err(io::Error::other(format!("more than {len} bytes received")));
        }
        pattern.fill(&mut want[..n]);
        if got[..n] != want[..n] {
            let at = got[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(io::Error::other(format!("byte {} differs", total + at)));
        }
        total += n;
    }
}

/// Sends `len` pattern bytes from `seed` on `stream` (to an echo backend), then half-closes it,
/// and checks the echo byte for byte up to its EOF, both directions at once (so a transfer
/// larger than the socket buffers cannot deadlock). Returns the bytes that came back; panics on
/// a difference, an error, or no EOF within [`PATIENCE`].
pub async fn echo_exact(stream: TcpStream, seed: u64, len: usize) -> usize {
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move { send_pattern(&mut w, seed, len).await });
    let got = tokio::time::timeout(PATIENCE, check_pattern(&mut r, seed, len))
        .await
        .expect("echo within the patience bound")
        .expect("echo matches byte for byte");
    writer.await.expect("writer").expect("send");
    got
}
