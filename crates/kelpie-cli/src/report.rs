//! The report of a `kelpie sim` run: totals over seeds, the failure (if any) with its replay
//! command and last events, as text or JSON, and the timing figures for stderr.

use std::collections::BTreeMap;
use std::fmt::Write;

use kelpie_dst::{LeaseEvent, LeaseEventKind, LeaseOpCounts};
use kelpie_sim::{FaultType, SimError};
use serde_json::json;

use crate::events::format_event;
use crate::sim::{RunSettings, SeedRun};
use crate::timing::Elapsed;

/// Events shown before a failure.
pub const EVENTS_BEFORE_FAILURE_COUNT: usize = 20;

/// Which seeds an invocation covered.
#[derive(Debug, Clone, Copy)]
pub enum Seeds {
    /// One seed.
    Single(u64),
    /// `count` seeds from `base` upwards (a failure stops the sweep early).
    Sweep {
        /// The first seed.
        base: u64,
        /// Seeds asked for.
        count: u64,
    },
}

/// How one fault fared over all seeds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultTotal {
    /// Seeds that ran with it enabled.
    pub seeds_enabled: u64,
    /// Times it fired, summed over seeds.
    pub fired: u64,
}

/// Sums over the seeds run.
#[derive(Debug, Default)]
pub struct Totals {
    /// Seeds run, including a failed one.
    pub seeds_run: u64,
    /// Seeds that failed (the sweep stops at the first, so 0 or 1).
    pub violations: u64,
    /// Simulated time, ms.
    pub sim_time_ms: u64,
    /// Executor steps: the simulated events.
    pub steps: u64,
    /// Invariant evaluations.
    pub checks_evaluated: u64,
    /// Lease operations of the seeds that finished.
    pub ops: LeaseOpCounts,
    /// Per fault, in [`FaultType`] order.
    pub faults: BTreeMap<FaultType, FaultTotal>,
}

impl Totals {
    /// Adds one seed's figures. A failed seed has no report, only the step and time at
    /// which it stopped.
    pub fn add(&mut self, run: &SeedRun) {
        self.seeds_run += 1;
        for config in run.faults.iter().filter(|c| c.probability > 0.0) {
            self.faults.entry(config.fault).or_default().seeds_enabled += 1;
        }
        match &run.result {
            Ok(report) => {
                let sim = &report.sim;
                self.sim_time_ms += sim.sim_time_ms;
                self.steps += sim.steps;
                self.checks_evaluated += sim.checks_evaluated;
                for (fault, fired) in &sim.faults_fired {
                    self.faults.entry(*fault).or_default().fired += fired;
                }
                add_ops(&mut self.ops, &report.ops);
            }
            Err(error) => {
                self.violations += 1;
                self.sim_time_ms += failure_time_ms(error).unwrap_or(0);
                self.steps += error.step().unwrap_or(0);
            }
        }
    }
}

fn add_ops(total: &mut LeaseOpCounts, ops: &LeaseOpCounts) {
    total.acquired += ops.acquired;
    total.renewed += ops.renewed;
    total.released += ops.released;
    total.refused += ops.refused;
    total.store_failed += ops.store_failed;
}

fn failure_time_ms(error: &SimError) -> Option<u64> {
    match error {
        SimError::InvariantViolated { sim_time_ms, .. }
        | SimError::ScenarioFailed { sim_time_ms, .. }
        | SimError::Panicked { sim_time_ms, .. }
        | SimError::Deadlock { sim_time_ms, .. }
        | SimError::StepLimit { sim_time_ms, .. } => Some(*sim_time_ms),
        _ => None,
    }
}

/// The events leading up to the first violation (and it), or the last events of the run if
/// it failed otherwise.
pub fn events_before_failure(events: &[LeaseEvent]) -> &[LeaseEvent] {
    let violation = events
        .iter()
        .position(|e| matches!(e.kind, LeaseEventKind::Violation { .. }));
    let end = violation.map_or(events.len(), |index| index + 1);
    &events[end.saturating_sub(EVENTS_BEFORE_FAILURE_COUNT + 1)..end]
}

/// The text report. With a failure it starts with `DST_SEED=<n>` and the replay command.
pub fn render_text(
    settings: &RunSettings,
    seeds: Seeds,
    totals: &Totals,
    failure: Option<&SeedRun>,
) -> String {
    let mut out = String::new();
    if let Some(run) = failure {
        render_failure(&mut out, run);
        out.push('\n');
    }
    render_totals(&mut out, settings, seeds, totals);
    let verdict = match failure {
        None => format!(
            "PASS: no invariant violated in {}",
            plural(totals.seeds_run, "seed")
        ),
        Some(run) => format!(
            "FAIL: seed {} failed ({}); replay it with the command above",
            run.seed,
            failure_name(run)
        ),
    };
    let _ = writeln!(out, "result:            {verdict}");
    out
}

/// `1 seed`, `2 seeds`.
fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("{count} {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

fn failure_name(run: &SeedRun) -> String {
    match &run.result {
        Err(SimError::InvariantViolated { invariant, .. }) => invariant.clone(),
        Err(error) => error.kind().to_string(),
        Ok(_) => "passed".to_string(),
    }
}

fn render_failure(out: &mut String, run: &SeedRun) {
    let Err(error) = &run.result else {
        return;
    };
    let _ = writeln!(out, "DST_SEED={}", run.seed);
    let _ = writeln!(out, "{}", run.replay);
    match error {
        SimError::InvariantViolated {
            invariant, message, ..
        } => {
            let _ = writeln!(out, "invariant: {invariant}");
            let _ = writeln!(out, "{}", step_line(error));
            let _ = writeln!(out, "message: {message}");
        }
        other => {
            let _ = writeln!(out, "failure: {}", other.kind());
            let _ = writeln!(out, "{}", step_line(error));
            let _ = writeln!(out, "message: {other}");
        }
    }
    let shown = events_before_failure(&run.events);
    let _ = writeln!(out, "last {} events before it:", shown.len());
    for event in shown {
        let _ = writeln!(out, "{}", format_event(event));
    }
}

fn step_line(error: &SimError) -> String {
    let step = error.step().map_or("-".to_string(), |s| s.to_string());
    match failure_time_ms(error) {
        Some(ms) => format!("step: {step} (simulated time {ms} ms)"),
        None => format!("step: {step}"),
    }
}

fn render_totals(out: &mut String, settings: &RunSettings, seeds: Seeds, totals: &Totals) {
    let _ = writeln!(
        out,
        "lease scenario:    {} nodes, {} actors, lease {} ms, {} s simulated per seed, faults {}{}",
        settings.nodes,
        settings.actors,
        settings.lease_ms,
        settings.sim_secs,
        settings.faults,
        settings
            .inject_bug
            .map_or(String::new(), |m| format!(", injected bug {}", m.name()))
    );
    let seeds_text = match seeds {
        Seeds::Single(seed) => format!("{} (seed {seed})", totals.seeds_run),
        Seeds::Sweep { base, count } => format!(
            "{} of {count}, seeds {base}..={} (base seed {base})",
            totals.seeds_run,
            base.wrapping_add(count - 1)
        ),
    };
    let _ = writeln!(out, "seeds run:         {seeds_text}");
    let secs = totals.sim_time_ms as f64 / 1_000.0;
    // A failure in the first simulated second would otherwise read as no time at all.
    let decimals = if secs < 10.0 { 3 } else { 1 };
    let _ = writeln!(out, "simulated time:    {secs:.decimals$} s");
    let ops = &totals.ops;
    let _ = writeln!(
        out,
        "lease operations:  {} (acquired {}, renewed {}, released {}, refused {}, store failed \
         {}){}",
        ops.total(),
        ops.acquired,
        ops.renewed,
        ops.released,
        ops.refused,
        ops.store_failed,
        // A failed seed returns no counts, so they cover the seeds that finished.
        if totals.violations > 0 {
            " in the seeds that finished"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "faults fired:");
    for fault in FaultType::all() {
        let total = totals.faults.get(fault).copied().unwrap_or_default();
        let enabled = match (total.seeds_enabled, total.fired) {
            (0, 0) => "not enabled".to_string(),
            // Some counts are consequences, e.g. messages lost to a partition the scenario set.
            (0, _) => "not enabled itself; counted as a consequence of other faults".to_string(),
            (n, _) => format!("enabled in {n} of {} seeds", totals.seeds_run),
        };
        let _ = writeln!(
            out,
            "  {:<24} {:>10}  ({enabled})",
            fault.name(),
            total.fired
        );
    }
    let _ = writeln!(out, "checks evaluated:  {}", totals.checks_evaluated);
    let _ = writeln!(out, "simulated events:  {} executor steps", totals.steps);
    let _ = writeln!(out, "violations:        {}", totals.violations);
}

/// The JSON report: one object, with a `failure` member (null when every seed passed).
pub fn render_json(
    settings: &RunSettings,
    seeds: Seeds,
    totals: &Totals,
    failure: Option<&SeedRun>,
) -> String {
    let (base_seed, seeds_asked) = match seeds {
        Seeds::Single(seed) => (seed, 1),
        Seeds::Sweep { base, count } => (base, count),
    };
    let faults: Vec<_> = FaultType::all()
        .iter()
        .map(|fault| {
            let total = totals.faults.get(fault).copied().unwrap_or_default();
            json!({"fault": fault.name(), "seeds_enabled": total.seeds_enabled, "fired": total.fired})
        })
        .collect();
    let ops = &totals.ops;
    let value = json!({
        "settings": {
            "nodes": settings.nodes,
            "actors": settings.actors,
            "lease_ms": settings.lease_ms,
            "sim_secs": settings.sim_secs,
            "faults": settings.faults.to_string(),
            "inject_bug": settings.inject_bug.map(|m| m.name()),
        },
        "base_seed": base_seed,
        "seeds_asked": seeds_asked,
        "seeds_run": totals.seeds_run,
        "sim_time_ms": totals.sim_time_ms,
        "lease_ops": {
            "total": ops.total(),
            "acquired": ops.acquired,
            "renewed": ops.renewed,
            "released": ops.released,
            "refused": ops.refused,
            "store_failed": ops.store_failed,
        },
        "faults": faults,
        "checks_evaluated": totals.checks_evaluated,
        "steps": totals.steps,
        "violations": totals.violations,
        "failure": failure.map(failure_json),
    });
    let mut text = serde_json::to_string_pretty(&value).expect("a JSON value serializes");
    text.push('\n');
    text
}

fn failure_json(run: &SeedRun) -> serde_json::Value {
    let error = run.result.as_ref().err();
    let invariant = match error {
        Some(SimError::InvariantViolated { invariant, .. }) => Some(invariant.clone()),
        _ => None,
    };
    json!({
        "dst_seed": run.seed,
        "replay": run.replay,
        "kind": error.map(SimError::kind),
        "invariant": invariant,
        "step": error.and_then(SimError::step),
        "sim_time_ms": error.and_then(failure_time_ms),
        "message": error.map(ToString::to_string),
        "events": events_before_failure(&run.events),
    })
}

/// The timing line for stderr: these figures differ from run to run, so they stay out of
/// stdout, which must be identical for the same seed.
pub fn render_timing(totals: &Totals, elapsed: &Elapsed) -> String {
    let wall_secs = elapsed.wall.as_secs_f64().max(1e-9);
    let cpu_secs = elapsed.cpu_or_wall().as_secs_f64().max(1e-9);
    let steps_per_cpu_sec = totals.steps as f64 / cpu_secs;
    let compression = totals.sim_time_ms as f64 / 1_000.0 / wall_secs;
    format!(
        "kelpie sim: {:.2} s wall, {:.2} s CPU; {} simulated events (executor steps) per CPU \
         second; time compression {:.0}x (simulated seconds per wall second)",
        elapsed.wall.as_secs_f64(),
        elapsed.cpu_or_wall().as_secs_f64(),
        si(steps_per_cpu_sec),
        compression
    )
}

/// `1234567.0` as `1.23 M`: the figure's size matters, not its last digits.
fn si(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.2} G", v / 1e9),
        v if v >= 1e6 => format!("{:.2} M", v / 1e6),
        v if v >= 1e3 => format!("{:.1} k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at_ms: u64, kind: LeaseEventKind) -> LeaseEvent {
        LeaseEvent {
            at_ms,
            node_id: None,
            actor_id: None,
            kind,
        }
    }

    #[test]
    fn events_before_a_violation_end_with_it() {
        let mut events: Vec<LeaseEvent> = (0..30)
            .map(|i| event(i, LeaseEventKind::BeliefEnded))
            .collect();
        let violation = LeaseEventKind::Violation {
            invariant: "X".into(),
            message: "m".into(),
        };
        events.insert(25, event(25, violation));
        let shown = events_before_failure(&events);
        assert_eq!(shown.len(), EVENTS_BEFORE_FAILURE_COUNT + 1);
        assert!(matches!(
            shown.last().unwrap().kind,
            LeaseEventKind::Violation { .. }
        ));
        assert_eq!(events_before_failure(&events[..3]).len(), 3);
    }

    #[test]
    fn large_figures_are_shown_with_a_prefix() {
        assert_eq!(si(1_234_567.0), "1.23 M");
        assert_eq!(si(999.0), "999");
        assert_eq!(si(12_345.0), "12.3 k");
    }
}
