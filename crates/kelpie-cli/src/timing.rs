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

/// CPU time the calling thread has used so far (zero where it cannot be read): what one seed
/// cost, whatever else the machine runs.
pub fn thread_cpu_time() -> Duration {
    cpu_time::ThreadTime::try_now().map_or(Duration::ZERO, |t| t.as_duration())
}

/// User plus system CPU time this process has used so far (`cpu-time` reads it with
/// `clock_gettime(CLOCK_PROCESS_CPUTIME_ID)`; zero where it cannot).
fn process_cpu_time() -> Duration {
    cpu_time::ProcessTime::try_now().map_or(Duration::ZERO, |t| t.as_duration())
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
