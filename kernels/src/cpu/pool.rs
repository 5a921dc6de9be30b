//! The CPU backend's worker threads and the one parallel pattern kernels use: run `f(i)` for
//! every task index, in any order, and return when all are done.
//!
//! A decode step runs dozens of short parallel regions back to back, so the cost that matters
//! is starting one: the calling thread takes part in the work, idle workers spin on an epoch
//! counter for a short while before parking (so consecutive regions start in well under a
//! microsecond instead of a futex wake-up), and tasks are claimed from an atomic counter.
//!
//! Kernels hand out disjoint output regions per task index; [`SharedMut`] carries the raw
//! pointer across threads for that.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(20);

/// One parallel region, borrowed by the workers while it runs.
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    /// Workers that have not yet finished this job.
    pending: AtomicUsize,
    panicked: AtomicBool,
}

struct Shared {
    epoch: AtomicU64,
    job: AtomicPtr<Job>,
    shutdown: AtomicBool,
    /// Number of parked workers, guarded for the park/notify handshake.
    parked: Mutex<usize>,
    wake: Condvar,
}

thread_local! {
    /// Set while this thread runs a task, so a nested `for_each` runs inline, not deadlocked.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// A fixed set of worker threads (the caller of [`Pool::for_each`] is one more).
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises regions started from different threads.
    publish: Mutex<()>,
    threads: usize,
}

impl Pool {
    /// A pool using `threads` threads including the caller (0: one per available core).
    pub fn new(threads: usize) -> Pool {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            threads
        };
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            shutdown: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        });
        let mut workers = Vec::new();
        for i in 1..threads {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("myriad-cpu-{i}"))
                .spawn(move || worker(&s));
            // If the OS refuses a thread, the pool simply has fewer workers.
            if let Ok(h) = spawned {
                workers.push(h);
            }
        }
        let threads = workers.len() + 1;
        Pool {
            shared,
            workers,
            publish: Mutex::new(()),
            threads,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for `i in 0..tasks` on the caller and the workers; returns when all are
    /// done. A panic in any task is re-raised here after every worker has let go of `f`.
    pub fn for_each(&self, tasks: usize, f: impl Fn(usize) + Sync + Send) {
        if tasks == 0 {
            return;
        }
        if tasks == 1 || self.workers.is_empty() || IN_TASK.with(Cell::get) {
            (0..tasks).for_each(f);
            return;
        }
        let _one_at_a_time = lock(&self.publish);
        let f_ref: &(dyn Fn(usize) + Sync) = &f;
        let job = Job {
            // SAFETY (of the lifetime erasure): `f` outlives the job, because this function
            // does not return (or unwind) before every worker has finished with it — see the
            // `WaitForWorkers` guard below.
            f: unsafe {
                std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(
                    f_ref,
                )
            },
            tasks,
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(self.workers.len()),
            panicked: AtomicBool::new(false),
        };
        let guard = WaitForWorkers(&job);
        self.shared
            .job
            .store(&job as *const Job as *mut Job, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::Release);
        {
            // Taking the lock orders this notify after any worker's epoch check.
            let parked = lock(&self.shared.parked);
            if *parked > 0 {
                self.shared.wake.notify_all();
            }
        }
        run_tasks(&job);
        drop(guard);
        if job.panicked.load(Ordering::Acquire) {
            resume_unwind(Box::new("a parallel kernel task panicked"));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _parked = lock(&self.shared.parked);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Waits, also while unwinding, until no worker uses the job any more.
struct WaitForWorkers<'a>(&'a Job);

impl Drop for WaitForWorkers<'_> {
    fn drop(&mut self) {
        let mut spins = 0u32;
        while self.0.pending.load(Ordering::Acquire) > 0 {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the counters it
    // guards stay consistent, so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Claims and runs tasks of `job` until none are left.
fn run_tasks(job: &Job) {
    IN_TASK.with(|c| c.set(true));
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks {
            break;
        }
        // SAFETY: the job (and the closure it points to) is alive until `pending` reaches 0.
        let f = unsafe { &*job.f };
        if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
            job.panicked.store(true, Ordering::Release);
        }
    }
    IN_TASK.with(|c| c.set(false));
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for the next job: spin first, then park.
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut parked = lock(&s.parked);
            *parked += 1;
            while s.epoch.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
                parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
            }
            *parked -= 1;
        }
        let job = s.job.load(Ordering::Acquire);
        // SAFETY: a new epoch is published only after `job` points at a live job, which stays
        // alive until this worker decrements `pending`.
        let job = unsafe { &*job };
        run_tasks(job);
        job.pending.fetch_sub(1, Ordering::AcqRel);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_regions() {
        let pool = Pool::new(3);
        for tasks in [0usize, 1, 2, 5, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            pool.for_each(tasks, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
        // Regions after the workers have parked still run.
        std::thread::sleep(Duration::from_millis(5));
        let n = AtomicUsize::new(0);
        pool.for_each(10, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn nested_regions_run_inline_and_threads_can_share_a_pool() {
        let pool = Arc::new(Pool::new(2));
        let total = AtomicUsize::new(0);
        pool.for_each(4, |_| {
            pool.for_each(3, |_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let p = pool.clone();
                std::thread::spawn(move || {
                    let n = AtomicUsize::new(0);
                    for _ in 0..200 {
                        p.for_each(7, |_| {
                            n.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                    n.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().expect("no panic"), 1400);
        }
    }

    #[test]
    fn a_panicking_task_is_reraised_and_the_pool_survives() {
        let pool = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.for_each(8, |i| assert!(i != 5, "task 5 fails"))
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.for_each(8, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }
}
