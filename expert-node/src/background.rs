//! Work that must not slow serving down. An expert node loads newly assigned experts while it
//! keeps answering requests on the same cores; the loading thread drops to the idle
//! scheduling class so the scheduler hands the cores to the serving threads first (on Linux
//! scheduling attributes are per thread, and threads inherit them). Packing weights fans out over rayon, whose
//! global pool was started at full priority, so the work runs inside a pool of its own whose
//! threads the low-priority thread starts (and so inherit its priority). Every thread of a
//! background load runs a `prepare` hook first (the backend's
//! `Backend::prepare_background_thread`: ordinary pages on the CPU).

/// Runs `f` on a new thread of the lowest CPU priority (with a rayon pool of `threads`
/// threads of the same priority for any parallel work inside) and returns its result.
pub fn run_low_priority<T: Send + 'static>(
    name: &str,
    threads: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    run_loader(name, threads, true, || {}, f)
}

/// Runs `f` on a new thread with a rayon pool of `threads` threads of its own; with
/// `background`, all of them at the lowest CPU priority and each running `prepare` first.
pub fn run_loader<T: Send + 'static>(
    name: &str,
    threads: usize,
    background: bool,
    prepare: impl Fn() + Clone + Send + Sync + 'static,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let pool_name = format!("{name}-worker");
    let prepare_thread = move || {
        if background {
            prepare();
        }
    };
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if background {
                lower_this_thread();
            }
            prepare_thread();
            match rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .thread_name(move |i| format!("{pool_name}-{i}"))
                .start_handler(move |_| prepare_thread())
                .build()
            {
                Ok(pool) => pool.install(f),
                // No threads to spare: run as is (parallel parts then use the global pool).
                Err(_) => f(),
            }
        })
}

#[cfg(target_os = "linux")]
fn lower_this_thread() {
    const PRIO_PROCESS: i32 = 0;
    const SCHED_IDLE: i32 = 5;
    #[repr(C)]
    struct SchedParam {
        priority: i32,
    }
    unsafe extern "C" {
        fn setpriority(which: i32, who: u32, prio: i32) -> i32;
        fn sched_setscheduler(pid: i32, policy: i32, param: *const SchedParam) -> i32;
    }
    // SAFETY: both calls only change the scheduling of the calling thread (pid/who 0 is the
    // caller; under Linux/NPTL scheduling attributes are per thread) and read nothing but the
    // parameter struct that lives across the call. Failure leaves the thread as it was.
    //
    // SCHED_IDLE rather than only nice 19: a waking serving thread preempts an idle-policy
    // thread at once, while a nice-19 thread may finish its slice first (milliseconds, on
    // every one of the many wake-ups a decode step makes).
    unsafe {
        if sched_setscheduler(0, SCHED_IDLE, &SchedParam { priority: 0 }) != 0 {
            setpriority(PRIO_PROCESS, 0, 19);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_this_thread() {}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_the_work_and_returns_its_result() {
        let h = super::run_low_priority("test-low", 2, || {
            use rayon::prelude::*;
            (0..100u64).into_par_iter().sum::<u64>()
        })
        .expect("spawn");
        assert_eq!(h.join().expect("join"), 4950);
    }
}
