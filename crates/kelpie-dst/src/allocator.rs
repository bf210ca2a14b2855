//! The allocator policy of the processes that run sweeps (`kelpie sim`, `swarm_bench`), both
//! on mimalloc.

/// Sets the policy of a process that runs sweeps: it keeps the memory a seed frees for the next
/// one, on ordinary 4 KiB pages. Call it first thing in `main`, before the process starts any
/// other thread.
///
/// - **Freed memory is kept.** mimalloc otherwise hands freed pages back to the OS soon after
///   (a purge), and a sweep, which builds and drops a world per seed, faults them back in. The
///   process keeps its peak heap instead, which the next seed reuses.
/// - **No transparent huge pages.** mimalloc asks for them on its arenas (`MADV_HUGEPAGE`), and
///   a fault on one clears 2 MiB of memory the OS may not have used for a while. On this
///   project's 2-core VM that clearing cost 4-10% of a default `swarm_bench` run and half of a
///   50 × 10,000 one, and varied sixfold from process to process; 4 KiB faults mostly get
///   recently freed pages. See `docs/SPEED.md`, "Small pages".
///
/// Both are performance settings: if the OS refuses one, the process runs as it would have.
pub fn set_sweep_policy() {
    keep_freed_memory();
    no_transparent_huge_pages();
}

/// mimalloc's purge delay set to never. It sets an option of mimalloc whether or not mimalloc
/// is the process's allocator (if it is not, nothing changes).
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in the mimalloc sources the pinned `libmimalloc-sys` bundles
    /// (the crate names no constant for it); -1: never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one of the allocator's options and takes no pointer. Callers call it before
    // the process starts any other thread, so no thread reads the option while it is written.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Turns transparent huge pages off for the whole process (`PR_SET_THP_DISABLE`), which
/// overrides mimalloc's `MADV_HUGEPAGE` and a system-wide `always`. mimalloc's own option for
/// this is read once, when it reserves its first arena before `main` runs, so it is too late
/// to set here.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes integers only and changes no memory the program
        // sees. Its result is ignored on purpose: an OS without the flag keeps huge pages.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The flag is the process's: the test harness's threads share it, and it changes no
    /// result, only the size of the pages behind new memory.
    #[test]
    fn transparent_huge_pages_are_off_after_the_policy() {
        super::no_transparent_huge_pages();
        // SAFETY: PR_GET_THP_DISABLE takes no pointer and returns the flag.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1, "PR_GET_THP_DISABLE after the policy");
    }
}
