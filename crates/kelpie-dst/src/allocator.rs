//! The allocator policy of the processes that run sweeps (`kelpie sim`, `swarm_bench`), both
//! on mimalloc.

/// Keeps the memory a finished seed frees for the next one. mimalloc otherwise hands freed
/// pages back to the OS soon after (a purge), and a sweep, which builds and drops a world per
/// seed, faults them back in. With transparent huge pages each fault clears 2 MiB: most of a
/// sweep's system time, and up to about 4% of `swarm_bench`'s time. The process keeps its
/// peak heap instead, which the next seed reuses. It sets an option of mimalloc whether or not
/// mimalloc is the process's allocator (if it is not, nothing changes).
///
/// Call it before the process starts any other thread.
pub fn keep_freed_memory() {
    /// `mi_option_purge_delay` in the mimalloc sources the pinned `libmimalloc-sys` bundles
    /// (the crate names no constant for it); -1: never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one of the allocator's options and takes no pointer. Callers call it before
    // the process starts any other thread, so no thread reads the option while it is written.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
