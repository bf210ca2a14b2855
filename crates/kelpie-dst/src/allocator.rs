//! The allocator policy of the processes that run sweeps (`kelpie sim`, `swarm_bench`), both
//! on mimalloc.

/// Sets mimalloc's options for a sweep, which builds and drops a world per seed:
///
/// - **Freed memory is kept** for the next seed. mimalloc otherwise hands freed pages back to
///   the OS soon after (a purge), and the next seed faults them back in. The process keeps its
///   peak heap instead, which the next seed reuses.
/// - **No transparent huge pages.** With them every 2 MiB region the heap touches is cleared
///   whole on its first fault, used or not: 21.5 MB resident where 12.1 MB are touched, and
///   the clearing took 5.9% of a 20-seed `swarm_bench` on a 2-core VM (the first touch of a
///   page is slow there). Without them a long sweep runs at the same speed. mimalloc reads
///   its own option for this before `main`, too early for this function, so it is turned off
///   for the process (`prctl(PR_SET_THP_DISABLE)`, which is what mimalloc does with the
///   option set; on Linux only), for every fault from then on.
///
/// It sets options of mimalloc whether or not mimalloc is the process's allocator (if it is
/// not, they change nothing). Call it first thing in `main`, before the process starts any
/// other thread.
pub fn configure_for_sweeps() {
    /// `mi_option_purge_delay` in the mimalloc sources the pinned `libmimalloc-sys` bundles
    /// (the crate names no constant for it).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one of the allocator's options and takes no pointer. Callers call this
    // before the process starts any other thread, so no thread reads the option while it is
    // written. -1: never purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `prctl` with `PR_SET_THP_DISABLE` takes integers only. It fails only on a
        // kernel older than 3.15, which then keeps huge pages: slower, not wrong.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}
