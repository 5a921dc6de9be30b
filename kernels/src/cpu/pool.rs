//! The CPU backend's worker threads and the one parallel pattern kernels use: run `f(i)` for
//! every task index, in any order, and return when all are done.
//!
//! Kernels hand out disjoint output regions per task index; [`SharedMut`] carries the raw
//! pointer across threads for that.

use rayon::prelude::*;

/// A fixed set of worker threads.
pub struct Pool {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl Pool {
    /// A pool of `threads` workers (0: one per available core).
    pub fn new(threads: usize) -> Pool {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("myriad-cpu-{i}"))
            .build()
            .unwrap_or_else(|_| {
                // Only fails if the OS refuses threads; a one-thread pool still works.
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("a one-thread pool")
            });
        let threads = pool.current_num_threads();
        Pool { pool, threads }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for `i in 0..tasks` on the workers.
    pub fn for_each(&self, tasks: usize, f: impl Fn(usize) + Sync + Send) {
        match tasks {
            0 => {}
            1 => f(0),
            _ if self.threads == 1 => (0..tasks).for_each(f),
            _ => self.pool.install(|| (0..tasks).into_par_iter().for_each(f)),
        }
    }

    /// Runs `f` inside the pool (so rayon calls within it use these workers).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

/// A raw pointer that tasks may share because each writes a disjoint region.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(*mut T);

// SAFETY: users guarantee that concurrent tasks touch disjoint elements.
unsafe impl<T> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(slice: &mut [T]) -> Self {
        SharedMut(slice.as_mut_ptr())
    }

    pub fn ptr(self) -> *mut T {
        self.0
    }

    /// A mutable view of `len` elements at `offset`.
    ///
    /// # Safety
    /// The range must be inside the original slice and no other live reference may overlap it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        // SAFETY: forwarded to the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}
