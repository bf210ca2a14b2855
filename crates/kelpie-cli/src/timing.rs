//! Wall-clock and CPU time of the process, for the figures `kelpie sim` and `kelpie bench`
//! report. This is the one place the CLI reads real time: it measures the simulator from the
//! outside and never feeds anything back into a simulated run.

use std::time::{Duration, Instant};

/// Wall and CPU time since it was started.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch {
    wall_start: Instant,
    cpu_start: Duration,
}

/// What a [`Stopwatch`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Elapsed {
    /// Real time.
    pub wall: Duration,
    /// CPU time of the whole process (user and system), across its threads.
    pub cpu: Duration,
}

impl Stopwatch {
    /// Starts measuring now.
    // Real time is banned in the workspace so that simulated code cannot read it; measuring
    // how long the simulator took is outside the simulated world.
    #[allow(clippy::disallowed_methods)]
    pub fn start() -> Self {
        Self {
            wall_start: Instant::now(),
            cpu_start: process_cpu_time(),
        }
    }

    /// Wall time since [`start`](Self::start), without the system call CPU time costs.
    pub fn wall(&self) -> Duration {
        self.wall_start.elapsed()
    }

    /// Time since [`start`](Self::start).
    pub fn elapsed(&self) -> Elapsed {
        Elapsed {
            wall: self.wall_start.elapsed(),
            cpu: process_cpu_time().saturating_sub(self.cpu_start),
        }
    }
}

/// User plus system CPU time this process has used so far.
#[cfg(unix)]
fn process_cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the zeroed struct we own and pass by pointer.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let to_duration = |tv: libc::timeval| {
        let micros = u64::try_from(tv.tv_sec).unwrap_or(0) * 1_000_000
            + u64::try_from(tv.tv_usec).unwrap_or(0);
        Duration::from_micros(micros)
    };
    to_duration(usage.ru_utime) + to_duration(usage.ru_stime)
}

/// Without getrusage, CPU time is not measured; reports then fall back to wall time.
#[cfg(not(unix))]
fn process_cpu_time() -> Duration {
    Duration::ZERO
}

impl Elapsed {
    /// CPU time, or wall time where CPU time could not be measured.
    pub fn cpu_or_wall(&self) -> Duration {
        if self.cpu.is_zero() {
            self.wall
        } else {
            self.cpu
        }
    }
}
