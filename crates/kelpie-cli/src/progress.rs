//! Progress of a many-seed run on stderr: a bar with an ETA on a terminal, and a plain line
//! every tenth of the run otherwise (CI logs, pipes), so stdout stays the report alone. At the
//! end, the CPU time per seed of the first and the last tenth of the seeds: a sweep whose
//! seeds grow dearer as it goes shows it there.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::timing::Stopwatch;

/// How many plain progress lines a run prints at most (twice that with a time budget: one per
/// tenth of the seeds and one per tenth of the budget).
const PLAIN_LINES_COUNT: u64 = 10;
/// Fewest seeds for which the first and last tenth are compared.
const TENTHS_SEEDS_MIN: u64 = 20;

/// Reports seeds done.
pub struct Progress {
    display: Display,
    total: u64,
    done: u64,
    stopwatch: Stopwatch,
    /// Wall time at the last plain line.
    last_line_secs: f64,
    /// CPU time of each seed done, in microseconds, in seed order.
    cpu_us: Vec<u32>,
    /// Wall time when each seed was delivered, in seed order.
    delivered_secs: Vec<f32>,
}

enum Display {
    Bar(ProgressBar),
    Lines {
        every: u64,
        budget: Option<Duration>,
        next_budget_line: Duration,
    },
    Off,
}

impl Progress {
    /// Progress over `total` seeds, or until `budget` is spent; nothing is shown for a single
    /// seed.
    pub fn new(total: u64, budget: Option<Duration>) -> Self {
        let display = if total <= 1 {
            Display::Off
        } else if std::io::stderr().is_terminal() {
            Display::Bar(bar(total, budget))
        } else {
            Display::Lines {
                every: total.div_ceil(PLAIN_LINES_COUNT),
                budget,
                next_budget_line: budget.unwrap_or_default() / PLAIN_LINES_COUNT as u32,
            }
        };
        Self {
            display,
            total,
            done: 0,
            stopwatch: Stopwatch::start(),
            last_line_secs: 0.0,
            cpu_us: Vec::new(),
            delivered_secs: Vec::new(),
        }
    }

    /// One more seed finished, having taken `cpu` on its thread; `violations` so far.
    pub fn seed_done(&mut self, violations: u64, cpu: Duration) {
        self.done += 1;
        let wall = self.stopwatch.wall();
        self.cpu_us
            .push(u32::try_from(cpu.as_micros()).unwrap_or(u32::MAX));
        self.delivered_secs.push(wall.as_secs_f32());
        match &mut self.display {
            Display::Bar(bar) => {
                bar.set_message(format!("violations {violations}"));
                bar.inc(1);
            }
            Display::Lines {
                every,
                budget,
                next_budget_line,
            } => {
                let seeds_line = self.done.is_multiple_of(*every) || self.done == self.total;
                let budget_line = budget.is_some() && wall >= *next_budget_line;
                if budget_line {
                    // The first multiple of a tenth of the budget after now, in one step: a
                    // budget of a few nanoseconds has tenths of zero.
                    let budget_ns = budget.unwrap_or_default().as_nanos();
                    let step_ns = (budget_ns / PLAIN_LINES_COUNT as u128).max(1);
                    let next_ns = (wall.as_nanos() / step_ns + 1) * step_ns;
                    *next_budget_line =
                        Duration::from_nanos(u64::try_from(next_ns).unwrap_or(u64::MAX));
                }
                if seeds_line || budget_line {
                    let secs = wall.as_secs_f64();
                    eprintln!(
                        "kelpie sim: {}/{} seeds, {violations} violations, {secs:.1} s (+{:.1} s)",
                        self.done,
                        self.total,
                        secs - self.last_line_secs
                    );
                    self.last_line_secs = secs;
                }
            }
            Display::Off => {}
        }
    }

    /// The run ended normally: the bar is removed.
    pub fn finish(self) {
        self.print_tenths();
        if let Display::Bar(bar) = self.display {
            bar.finish_and_clear();
        }
    }

    /// The run stopped at a failure. The bar is left as it was (showing where the run
    /// stopped) and never drawn again, so that nothing written below it is overwritten.
    pub fn abandon(self) {
        self.print_tenths();
        if let Display::Bar(bar) = self.display {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
    }

    /// The CPU and wall time per seed of the first and the last tenth of the seeds done.
    fn print_tenths(&self) {
        let done = self.cpu_us.len();
        if (done as u64) < TENTHS_SEEDS_MIN {
            return;
        }
        let tenth = done / 10;
        let cpu_ms = |range: std::ops::Range<usize>| {
            let sum: u64 = self.cpu_us[range].iter().map(|&us| u64::from(us)).sum();
            sum as f64 / 1_000.0 / tenth as f64
        };
        let (first_cpu, last_cpu) = (cpu_ms(0..tenth), cpu_ms(done - tenth..done));
        let first_wall = f64::from(self.delivered_secs[tenth - 1]) * 1_000.0 / tenth as f64;
        let last_wall =
            f64::from(self.delivered_secs[done - 1] - self.delivered_secs[done - tenth - 1])
                * 1_000.0
                / tenth as f64;
        eprintln!(
            "kelpie sim: per seed, first tenth ({tenth} seeds): {first_cpu:.2} ms CPU, \
             {first_wall:.2} ms wall; last tenth: {last_cpu:.2} ms CPU, {last_wall:.2} ms wall \
             (last/first CPU {:.2}x)",
            last_cpu / first_cpu.max(1e-9)
        );
    }
}

fn bar(total: u64, budget: Option<Duration>) -> ProgressBar {
    let template = match budget {
        Some(budget) => format!(
            "{{pos}} seeds  {{elapsed}} of the {} budget  {{msg}}",
            humantime::format_duration(budget)
        ),
        None => "{pos}/{len} seeds [{wide_bar}] {percent:>3}%  ETA {eta:>3}  {msg}".to_string(),
    };
    let style = ProgressStyle::with_template(&template)
        .expect("the template is valid")
        .progress_chars("=> ");
    ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(style)
}
