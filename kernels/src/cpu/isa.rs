//! Instruction-set detection and per-ISA compilation of hot kernels.
//!
//! The crate is built for the baseline x86-64 target so one binary runs everywhere; hot kernels
//! are compiled several times with `#[target_feature]` and chosen at run time. Generic code that
//! LLVM auto-vectorises is written once as an `#[inline(always)]` body and instantiated per ISA
//! by [`multiversion!`]; the GEMM microkernels use explicit intrinsics instead.

use std::sync::OnceLock;

/// The instruction sets kernels are specialised for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, whatever the build target allows (aarch64 NEON, x86-64 SSE2).
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/DQ/VL + FMA.
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(detect_uncached)
    }

    /// Every instruction set this CPU can run, worst first (for tests comparing them).
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| *i <= Isa::detect())
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses a name as printed by [`Isa::name`].
    pub fn parse(name: &str) -> Option<Isa> {
        match name {
            "portable" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }
}

fn detect_uncached() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl");
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Defines `fn $name(isa: Isa, args…)` whose body is compiled once per instruction set and run
/// with the one `isa` names. `isa` must not exceed [`Isa::detect`] (the backend guarantees it).
///
/// The body is an `#[inline(always)]` function, so everything it calls that is also
/// `#[inline(always)]` gets the target features and auto-vectorises for them. Closures handed
/// to other threads do not inherit the features: parallel loops belong outside the body.
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name(isa: $crate::cpu::isa::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            match isa {
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::isa::Isa::Avx512 => {
                    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
                    unsafe fn specialised($($arg: $ty),*) $(-> $ret)? {
                        body($($arg),*)
                    }
                    // SAFETY: `Isa::Avx512` is only handed out after runtime detection of these
                    // features (`Isa::detect`, and the backend clamps requests to it).
                    unsafe { specialised($($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::isa::Isa::Avx2 => {
                    #[target_feature(enable = "avx2,fma,f16c")]
                    unsafe fn specialised($($arg: $ty),*) $(-> $ret)? {
                        body($($arg),*)
                    }
                    // SAFETY: as above, `Isa::Avx2` implies these features were detected.
                    unsafe { specialised($($arg),*) }
                }
                _ => body($($arg),*),
            }
        }
    };
}

pub(crate) use multiversion;
