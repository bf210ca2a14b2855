//! Progress of a many-seed run on stderr: a bar with an ETA on a terminal, and a plain line
//! every tenth of the run otherwise (CI logs, pipes), so stdout stays the report alone.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::timing::Stopwatch;

/// How many plain progress lines a run prints at most.
const PLAIN_LINES_COUNT: u64 = 10;

/// Reports seeds done.
pub struct Progress {
    display: Display,
    total: u64,
    done: u64,
    stopwatch: Stopwatch,
}

enum Display {
    Bar(ProgressBar),
    Lines { every: u64 },
    Off,
}

impl Progress {
    /// Progress over `total` seeds; nothing is shown for a single seed.
    pub fn new(total: u64) -> Self {
        let display = if total <= 1 {
            Display::Off
        } else if std::io::stderr().is_terminal() {
            Display::Bar(bar(total))
        } else {
            Display::Lines {
                every: total.div_ceil(PLAIN_LINES_COUNT),
            }
        };
        Self {
            display,
            total,
            done: 0,
            stopwatch: Stopwatch::start(),
        }
    }

    /// One more seed finished; `violations` so far.
    pub fn seed_done(&mut self, violations: u64) {
        self.done += 1;
        match &self.display {
            Display::Bar(bar) => {
                bar.set_message(format!("violations {violations}"));
                bar.inc(1);
            }
            Display::Lines { every } => {
                if self.done.is_multiple_of(*every) || self.done == self.total {
                    let secs = self.stopwatch.elapsed().wall.as_secs_f64();
                    eprintln!(
                        "kelpie sim: {}/{} seeds, {violations} violations, {secs:.1} s",
                        self.done, self.total
                    );
                }
            }
            Display::Off => {}
        }
    }

    /// The run ended normally: the bar is removed.
    pub fn finish(self) {
        if let Display::Bar(bar) = self.display {
            bar.finish_and_clear();
        }
    }

    /// The run stopped at a failure. The simulator has already written its failure banner
    /// to stderr below the bar; the bar is left as it was (showing where the run stopped)
    /// and never drawn again, because a redraw would overwrite the banner's last line.
    pub fn abandon(self) {
        if let Display::Bar(bar) = self.display {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
    }
}

fn bar(total: u64) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{pos}/{len} seeds [{wide_bar}] {percent:>3}%  ETA {eta:>3}  {msg}",
    )
    .expect("the template is valid")
    .progress_chars("=> ");
    ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(style)
}
