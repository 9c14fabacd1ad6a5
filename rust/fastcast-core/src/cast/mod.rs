//! Casting kernels: bit-exact with `torch.Tensor.to(dtype)` on the CPU.
//!
//! [`scalar`] holds the reference conversion of one element; [`generic`]
//! turns it into whole-buffer loops; the x86 module adds SIMD kernels picked
//! at run time by [`Kernel::detect`]. [`cast`] and [`cast_parallel`] are the
//! entry points: they check the buffers, then run one kernel path over them.

pub mod generic;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use rayon::prelude::*;

pub use scalar::Fp8Overflow;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// A kernel path: the portable loops, or one of the SIMD tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// The reference loops compiled for the baseline target (x86-64 SSE2).
    Scalar,
    /// AVX2 + F16C + FMA.
    Avx2,
    /// AVX-512 F/BW/VL (with the AVX2 features).
    Avx512,
}

impl Kernel {
    /// Every kernel path, slowest first.
    pub const ALL: [Kernel; 3] = [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512];

    /// The name used by `FASTCAST_KERNEL` and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
        }
    }

    /// True when this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::avx2::is_available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => x86::avx512::is_available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The paths this CPU can run, slowest first.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// The fastest path this CPU can run.
    pub fn detect() -> Kernel {
        *Kernel::available().last().unwrap_or(&Kernel::Scalar)
    }

    /// Parse a path name; `"auto"` (or an empty string) picks the fastest.
    ///
    /// ```
    /// use fastcast_core::cast::Kernel;
    /// assert_eq!(Kernel::from_name("scalar").unwrap(), Kernel::Scalar);
    /// assert!(Kernel::from_name("sse9").is_err());
    /// ```
    pub fn from_name(name: &str) -> Result<Kernel> {
        let name = name.trim();
        if name.is_empty() || name.eq_ignore_ascii_case("auto") {
            return Ok(Kernel::detect());
        }
        let available = || {
            Kernel::available()
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match Kernel::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
        {
            Some(k) if k.is_available() => Ok(k),
            _ => Err(Error::KernelUnavailable {
                name: name.to_owned(),
                available: available(),
            }),
        }
    }
}

/// How a cast runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CastOptions {
    /// What fp8 e4m3fn does with values beyond ±448 and with ±inf.
    pub fp8_overflow: Fp8Overflow,
    /// Which kernel path runs.
    pub kernel: Kernel,
}

impl Default for CastOptions {
    fn default() -> CastOptions {
        CastOptions {
            fp8_overflow: Fp8Overflow::default(),
            kernel: Kernel::detect(),
        }
    }
}

/// Elements per parallel work item: big enough to amortise scheduling,
/// small enough to stay in L2 and to balance across threads.
pub const PARALLEL_CHUNK_ELEMS: usize = 64 * 1024;

/// Check that `from → to` is a cast fastcast performs and that the buffers
/// hold the same whole number of elements. Returns the element count.
pub fn check_buffers(from: DType, to: DType, src_len: usize, dst_len: usize) -> Result<usize> {
    if from != to && !(from.is_castable() && to.is_castable()) {
        return Err(Error::not_castable(from, to));
    }
    if !src_len.is_multiple_of(from.size()) {
        return Err(Error::Buffer {
            problem: format!("source holds {src_len} bytes, not a whole number of {from} elements"),
        });
    }
    let n = src_len / from.size();
    if dst_len != n * to.size() {
        return Err(Error::Buffer {
            problem: format!(
                "destination holds {dst_len} bytes but {n} {to} elements need {}",
                n * to.size()
            ),
        });
    }
    Ok(n)
}

/// Run one kernel path over a buffer on the current thread; the caller has
/// checked the buffers with [`check_buffers`].
fn run_checked(from: DType, to: DType, opts: &CastOptions, src: &[u8], dst: &mut [u8]) {
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    let overflow = opts.fp8_overflow;
    match opts.kernel {
        Kernel::Scalar => generic::run(from, to, overflow, src, dst),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            assert!(
                x86::avx2::is_available(),
                "AVX2 kernel asked for on a CPU without it"
            );
            // SAFETY: the CPU has the features, checked just above.
            unsafe { x86::avx2::run(from, to, overflow, src, dst) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            assert!(
                x86::avx512::is_available(),
                "AVX-512 kernel asked for on a CPU without it"
            );
            // SAFETY: the CPU has the features, checked just above.
            unsafe { x86::avx512::run(from, to, overflow, src, dst) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => generic::run(from, to, overflow, src, dst),
    }
}

/// Cast `src`, a buffer of `from` elements (little-endian, any alignment),
/// into `dst`, a buffer of as many `to` elements, on the current thread.
///
/// Same dtype on both sides is a copy (for any dtype); otherwise both must
/// be castable.
///
/// ```
/// use fastcast_core::cast::{cast, CastOptions};
/// use fastcast_core::DType;
/// let src: Vec<u8> = [1.0f32, -2.5, 65536.0].iter().flat_map(|x| x.to_le_bytes()).collect();
/// let mut dst = vec![0u8; 6];
/// cast(&src, DType::F32, &mut dst, DType::BF16, &CastOptions::default()).unwrap();
/// assert_eq!(dst, [0x80, 0x3F, 0x20, 0xC0, 0x80, 0x47]);
/// ```
pub fn cast(src: &[u8], from: DType, dst: &mut [u8], to: DType, opts: &CastOptions) -> Result<()> {
    check_buffers(from, to, src.len(), dst.len())?;
    run_checked(from, to, opts, src, dst);
    Ok(())
}

/// [`cast`], split into chunks run in parallel on the current rayon pool.
pub fn cast_parallel(
    src: &[u8],
    from: DType,
    dst: &mut [u8],
    to: DType,
    opts: &CastOptions,
) -> Result<()> {
    check_buffers(from, to, src.len(), dst.len())?;
    src.par_chunks(PARALLEL_CHUNK_ELEMS * from.size())
        .zip(dst.par_chunks_mut(PARALLEL_CHUNK_ELEMS * to.size()))
        .for_each(|(s, d)| run_checked(from, to, opts, s, d));
    Ok(())
}

#[cfg(test)]
mod tests;
