//! The report of a `kelpie sim` run: totals over seeds, the failure (if any) with its replay
//! command and last events, every failing seed of a `--keep-going` sweep, as text or JSON,
//! and the timing figures for stderr.
//!
//! A sweep's figures are gathered into one [`Report`], and both the text and the JSON are
//! rendered from it. The JSON holds all of it and reads back into the same `Report`, so a
//! report merged from the JSON reports of a sweep's shards (`kelpie sim merge`, in
//! `merge.rs`) prints exactly what the whole sweep would have printed.

use std::collections::BTreeMap;
use std::fmt::Write;

use kelpie_dst::{LeaseEvent, LeaseEventKind, LeaseOpCounts, SwarmStore, SWARM_COVERAGE_MARKS};
use kelpie_lease::coverage::{
    COVERAGE_MARKS, ETCD_COVERAGE_MARKS, MARK_EXPIRED_LEASE_SEEN, MARK_TAKEOVER_AFTER_EXPIRY,
};
use kelpie_sim::{FaultType, Shard, SimError};
use serde::{Deserialize, Serialize};

use crate::events::format_event;
use crate::sim::{RunSettings, SeedRun, StoreChoice};
use crate::timing::Elapsed;

/// Events shown before a failure.
pub const EVENTS_BEFORE_FAILURE_COUNT: usize = 20;

/// Which seeds an invocation covered.
#[derive(Debug, Clone, Copy)]
pub enum Seeds {
    /// One seed.
    Single(u64),
    /// `count` seeds from `base` upwards (a failure or a time budget may end the sweep early).
    Sweep {
        /// The first seed.
        base: u64,
        /// Seeds asked for.
        count: u64,
    },
}

/// How a sweep was run, as far as it shapes the report (never the number of jobs: the report
/// is the same for any).
#[derive(Debug, Clone)]
pub struct SweepShape {
    /// The part of the sweep this process ran.
    pub shard: Shard,
    /// Whether failing seeds were collected instead of ending the sweep.
    pub keep_going: bool,
    /// The time budget as given, if any.
    pub time_budget: Option<String>,
    /// Whether the budget ended the sweep.
    pub budget_spent: bool,
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
    /// Seeds run, including failed ones.
    pub seeds_run: u64,
    /// Of those, seeds run on the simulated etcd (`--store etcd` or `mixed`).
    pub seeds_on_etcd: u64,
    /// Seeds that failed (without `--keep-going` the sweep stops at the first, so 0 or 1).
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
    /// Hits per coverage mark.
    pub marks: BTreeMap<&'static str, u64>,
}

impl Totals {
    /// Adds one seed's figures. A failed seed has no report, only the step and time at
    /// which it stopped (and the marks it hit until then).
    pub fn add(&mut self, run: &SeedRun) {
        self.seeds_run += 1;
        self.seeds_on_etcd += u64::from(run.store == SwarmStore::Etcd);
        for config in run.faults.iter().filter(|c| c.probability > 0.0) {
            self.faults.entry(config.fault).or_default().seeds_enabled += 1;
        }
        for (mark, hits) in &run.marks {
            *self.marks.entry(mark).or_default() += hits;
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

/// A sweep's report: what `--json` prints, and what the text is rendered from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The options every seed shared.
    pub settings: SettingsRecord,
    /// The first seed (the seed, for a single-seed run).
    pub base_seed: u64,
    /// Seeds in the whole sweep.
    pub seeds_asked: u64,
    /// Whether this was one seed (`--seed`, `DST_SEED`) rather than a sweep.
    pub single_seed: bool,
    /// The shard `I/N` this process ran, `null` for the whole sweep.
    #[serde(with = "shard_text")]
    pub shard: Option<Shard>,
    /// Whether failing seeds were collected rather than ending the sweep.
    pub keep_going: bool,
    /// The `--time-budget`, if one was given.
    pub time_budget: Option<String>,
    /// Whether the budget ended the sweep before every seed ran.
    pub budget_spent: bool,
    /// Seeds run, failed ones included.
    pub seeds_run: u64,
    /// Of those, seeds run on the simulated etcd; the others ran on the protocol's store.
    /// `null` in reports written before it was counted, and in a merge of one.
    #[serde(default)]
    pub seeds_on_etcd: Option<u64>,
    /// Simulated time, ms.
    pub sim_time_ms: u64,
    /// Lease operations of the seeds that finished.
    pub lease_ops: OpsRecord,
    /// Every fault, in the simulator's order.
    pub faults: Vec<FaultRecord>,
    /// Hits per coverage mark, every mark of the lease layer and the swarm included.
    pub coverage: BTreeMap<String, u64>,
    /// Invariant evaluations.
    pub checks_evaluated: u64,
    /// Executor steps.
    pub steps: u64,
    /// Seeds that failed.
    pub violations: u64,
    /// The first failing seed in seed order, in full.
    pub failure: Option<FailureRecord>,
    /// Every failing seed, in seed order.
    pub failures: Vec<FailedSeed>,
}

/// The options every seed of a run shared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsRecord {
    /// Simulated nodes.
    pub nodes: u64,
    /// Contended actors.
    pub actors: u64,
    /// Lease duration, ms.
    pub lease_ms: u64,
    /// Simulated seconds per seed.
    pub sim_secs: u64,
    /// `--faults` as given.
    pub faults: String,
    /// The injected bug's name.
    pub inject_bug: Option<String>,
    /// The store the seeds ran on (`--store`).
    #[serde(default = "protocol_store")]
    pub store: String,
    /// The bound on each node's clock drift against the store's, in parts per million. Every
    /// seed's clocks drift, whatever `--faults` says: half the nodes at the bound.
    #[serde(default = "scenario_clock_drift_ppm_max")]
    pub clock_drift_ppm_max: u64,
}

fn protocol_store() -> String {
    "protocol".to_string()
}

/// The drift bound of reports written before it was recorded: the scenario's, unchanged since.
fn scenario_clock_drift_ppm_max() -> u64 {
    kelpie_dst::LeaseScenario::default()
        .cluster
        .clock_drift_ppm_max
}

/// Lease operations by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsRecord {
    /// All of them.
    pub total: u64,
    /// Acquired.
    pub acquired: u64,
    /// Renewed.
    pub renewed: u64,
    /// Released.
    pub released: u64,
    /// Refused by the protocol.
    pub refused: u64,
    /// Failed by the store.
    pub store_failed: u64,
}

/// How one fault fared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRecord {
    /// Its name.
    pub fault: String,
    /// Seeds that ran with it enabled.
    pub seeds_enabled: u64,
    /// Times it fired.
    pub fired: u64,
}

/// A failed seed in full: what failed, where, and the events before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureRecord {
    /// The seed.
    pub dst_seed: u64,
    /// The command that replays it.
    pub replay: String,
    /// The kind of failure (`invariant-violated`, `deadlock`, ...).
    pub kind: String,
    /// The invariant, for a violation.
    pub invariant: Option<String>,
    /// The executor step it failed at.
    pub step: Option<u64>,
    /// The simulated time it failed at.
    pub sim_time_ms: Option<u64>,
    /// The whole error message.
    pub message: String,
    /// What the checker reported (for a violation), or the whole message.
    pub detail: String,
    /// The events before it.
    pub events: Vec<LeaseEvent>,
}

/// A failed seed in one line: the seed, what failed, and the command that replays it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedSeed {
    /// The seed.
    pub dst_seed: u64,
    /// The invariant violated, or the kind of failure.
    pub failed: String,
    /// The command that replays it.
    pub replay: String,
}

impl FailedSeed {
    /// The line of a failed run.
    pub fn of(run: &SeedRun) -> Self {
        Self {
            dst_seed: run.seed,
            failed: failure_name(&run.result),
            replay: run.replay.clone(),
        }
    }
}

/// The shard as `I/N` text in JSON.
mod shard_text {
    use kelpie_sim::Shard;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(shard: &Option<Shard>, out: S) -> Result<S::Ok, S::Error> {
        match shard {
            Some(shard) => out.collect_str(shard),
            None => out.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<Option<Shard>, D::Error> {
        Option::<String>::deserialize(input)?
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The mark names every report lists, hit or not: the keeper's and the swarm's, with the
/// protocol's (`decide`) where the seeds ran on it and the etcd backend's where they ran on
/// etcd.
pub fn known_marks(store: StoreChoice) -> Vec<&'static str> {
    let protocol = [MARK_TAKEOVER_AFTER_EXPIRY, MARK_EXPIRED_LEASE_SEEN];
    let mut marks: Vec<&'static str> = COVERAGE_MARKS
        .iter()
        .copied()
        .filter(|mark| store != StoreChoice::Etcd || !protocol.contains(mark))
        .chain(SWARM_COVERAGE_MARKS.iter().copied())
        .collect();
    if store != StoreChoice::Protocol {
        marks.extend(ETCD_COVERAGE_MARKS);
    }
    marks
}

impl Report {
    /// The report of the seeds a sweep ran.
    pub fn new(
        settings: &RunSettings,
        seeds: Seeds,
        shape: &SweepShape,
        totals: &Totals,
        failure: Option<&SeedRun>,
        failures: Vec<FailedSeed>,
    ) -> Self {
        let (base_seed, seeds_asked, single_seed) = match seeds {
            Seeds::Single(seed) => (seed, 1, true),
            Seeds::Sweep { base, count } => (base, count, false),
        };
        let faults = FaultType::all()
            .iter()
            .map(|fault| {
                let total = totals.faults.get(fault).copied().unwrap_or_default();
                FaultRecord {
                    fault: fault.name().to_string(),
                    seeds_enabled: total.seeds_enabled,
                    fired: total.fired,
                }
            })
            .collect();
        let mut coverage: BTreeMap<String, u64> = (known_marks(settings.store).into_iter())
            .map(|mark| (mark.to_string(), 0))
            .collect();
        for (mark, hits) in &totals.marks {
            *coverage.entry(mark.to_string()).or_default() += hits;
        }
        let ops = &totals.ops;
        Self {
            settings: SettingsRecord {
                nodes: settings.nodes,
                actors: settings.actors,
                lease_ms: settings.lease_ms,
                sim_secs: settings.sim_secs,
                faults: settings.faults.to_string(),
                inject_bug: settings.inject_bug.map(|m| m.name().to_string()),
                store: settings.store.name().to_string(),
                clock_drift_ppm_max: settings
                    .scenario(SwarmStore::Protocol)
                    .cluster
                    .clock_drift_ppm_max,
            },
            base_seed,
            seeds_asked,
            single_seed,
            shard: (!shape.shard.is_whole()).then_some(shape.shard),
            keep_going: shape.keep_going,
            time_budget: shape.time_budget.clone(),
            budget_spent: shape.budget_spent,
            seeds_run: totals.seeds_run,
            seeds_on_etcd: Some(totals.seeds_on_etcd),
            sim_time_ms: totals.sim_time_ms,
            lease_ops: OpsRecord {
                total: ops.total(),
                acquired: ops.acquired,
                renewed: ops.renewed,
                released: ops.released,
                refused: ops.refused,
                store_failed: ops.store_failed,
            },
            faults,
            coverage,
            checks_evaluated: totals.checks_evaluated,
            steps: totals.steps,
            violations: totals.violations,
            failure: failure.and_then(FailureRecord::of),
            failures,
        }
    }

    /// The JSON report: one object, with a `failure` member (null when every seed passed).
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("a report serializes");
        text.push('\n');
        text
    }

    /// The text report. With a failure it starts with `DST_SEED=<n>` and the replay command.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if let Some(failure) = &self.failure {
            failure.render(&mut out);
            out.push('\n');
        }
        if self.keep_going && !self.failures.is_empty() {
            self.render_failed_seeds(&mut out);
            out.push('\n');
        }
        self.render_totals(&mut out);
        let verdict = match (&self.failure, self.failures.len()) {
            (None, _) => format!(
                "PASS: no invariant violated in {}",
                plural(self.seeds_run, "seed")
            ),
            (Some(failure), 0 | 1) => format!(
                "FAIL: seed {} failed ({}); replay it with the command above",
                failure.dst_seed,
                failure.name()
            ),
            (Some(failure), failed) => format!(
                "FAIL: {failed} seeds failed; the first, seed {} ({}), replays with the command \
                 above",
                failure.dst_seed,
                failure.name()
            ),
        };
        let _ = writeln!(out, "result:            {verdict}");
        out
    }

    fn render_failed_seeds(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "failing seeds:     {}, in seed order; each replays with its command",
            self.failures.len()
        );
        for failed in &self.failures {
            let _ = writeln!(
                out,
                "  DST_SEED={} {}: {}",
                failed.dst_seed, failed.failed, failed.replay
            );
        }
    }

    fn render_totals(&self, out: &mut String) {
        let settings = &self.settings;
        let _ = writeln!(
            out,
            "lease scenario:    {} nodes, {} actors, lease {} ms, {} s simulated per seed, clock \
             drift up to {} ppm, store {}, faults {}{}",
            settings.nodes,
            settings.actors,
            settings.lease_ms,
            settings.sim_secs,
            settings.clock_drift_ppm_max,
            settings.store,
            settings.faults,
            settings
                .inject_bug
                .as_ref()
                .map_or(String::new(), |name| format!(", injected bug {name}"))
        );
        let _ = writeln!(out, "seeds run:         {}", self.seeds_text());
        if let (true, Some(on_etcd)) = (
            self.settings.store == StoreChoice::Mixed.name(),
            self.seeds_on_etcd,
        ) {
            let on_protocol = self.seeds_run.saturating_sub(on_etcd);
            let _ = writeln!(
                out,
                "stores:            {on_protocol} seeds on protocol, {on_etcd} on etcd"
            );
        }
        if let Some(budget) = &self.time_budget {
            let spent = match self.budget_spent {
                true => "spent, no further seed started",
                false => "not spent",
            };
            let _ = writeln!(out, "time budget:       {budget}, {spent}");
        }
        let secs = self.sim_time_ms as f64 / 1_000.0;
        // A failure in the first simulated second would otherwise read as no time at all.
        let decimals = if secs < 10.0 { 3 } else { 1 };
        let _ = writeln!(out, "simulated time:    {secs:.decimals$} s");
        let ops = &self.lease_ops;
        let _ = writeln!(
            out,
            "lease operations:  {} (acquired {}, renewed {}, released {}, refused {}, store \
             failed {}){}",
            ops.total,
            ops.acquired,
            ops.renewed,
            ops.released,
            ops.refused,
            ops.store_failed,
            self.finished_only()
        );
        self.render_faults(out);
        let _ = writeln!(out, "coverage marks hit:");
        for (mark, hits) in &self.coverage {
            let _ = writeln!(out, "  {mark:<40} {hits:>10}");
        }
        let _ = writeln!(
            out,
            "checks evaluated:  {}{}",
            self.checks_evaluated,
            self.finished_only()
        );
        let _ = writeln!(out, "simulated events:  {} executor steps", self.steps);
        let _ = writeln!(out, "violations:        {}", self.violations);
    }

    fn seeds_text(&self) -> String {
        let (base, count, run) = (self.base_seed, self.seeds_asked, self.seeds_run);
        if self.single_seed {
            return format!("{run} (seed {base})");
        }
        let planned = seed_range(base, count);
        let shard = self.shard.unwrap_or(Shard::WHOLE);
        let mut text = if run == shard.seeds_in(count) {
            format!("{run} of {count}, seeds {planned} (base seed {base})")
        } else if self.budget_spent {
            // A time budget runs the whole sweep (it refuses --shard), and the sweep starts
            // seeds in order and finishes every one it started (kelpie_sim::Sweep), so the
            // seeds run are the first ones, however many jobs ran them.
            match run.checked_sub(1) {
                Some(last) => format!(
                    "{run} of {count}: seeds {}, the first {run} of the planned {planned} (base \
                     seed {base})",
                    seed_range(base, last + 1)
                ),
                None => format!("0 of {count}: none of the planned {planned} (base seed {base})"),
            }
        } else {
            // Stopped at a failure: the seeds before it in this shard ran, but in a report
            // merged from shards that each stopped at their own failure they are no one
            // range, so the range is only what was planned.
            format!("{run} of {count}, planned seeds {planned} (base seed {base})")
        };
        if let Some(shard) = self.shard {
            let _ = write!(
                text,
                ", shard {shard}: the {} seeds whose index is {} modulo {}",
                shard.seeds_in(count),
                shard.index(),
                shard.count()
            );
        }
        text
    }

    /// A failed seed returns no counts (only its step and time), so the counts of a run
    /// with a failure cover the seeds that finished: said after each.
    fn finished_only(&self) -> &'static str {
        match self.violations > 0 {
            true => " in the seeds that finished",
            false => "",
        }
    }

    fn render_faults(&self, out: &mut String) {
        let _ = writeln!(out, "faults fired{}:", self.finished_only());
        for fault in &self.faults {
            let enabled = match (fault.seeds_enabled, fault.fired) {
                (0, 0) => "not enabled".to_string(),
                // Some counts are consequences, e.g. messages lost to a partition the scenario
                // set.
                (0, _) => {
                    "not enabled itself; counted as a consequence of other faults".to_string()
                }
                // Enabled and never taking effect: the run did not test what it was asked to.
                (n, 0) => format!(
                    "enabled in {n} of {} seeds, never took effect: raise its probability or \
                     run more seeds to test it",
                    self.seeds_run
                ),
                (n, _) => format!("enabled in {n} of {} seeds", self.seeds_run),
            };
            let _ = writeln!(
                out,
                "  {:<24} {:>10}  ({enabled})",
                fault.fault, fault.fired
            );
        }
    }
}

impl FailureRecord {
    /// The record of a failed run; `None` if it passed.
    fn of(run: &SeedRun) -> Option<Self> {
        let error = run.result.as_ref().err()?;
        let (invariant, detail) = match error {
            SimError::InvariantViolated {
                invariant, message, ..
            } => (Some(invariant.clone()), message.clone()),
            other => (None, other.to_string()),
        };
        Some(Self {
            dst_seed: run.seed,
            replay: run.replay.clone(),
            kind: error.kind().to_string(),
            invariant,
            step: error.step(),
            sim_time_ms: failure_time_ms(error),
            message: error.to_string(),
            detail,
            events: events_before_failure(&run.events).to_vec(),
        })
    }

    /// The invariant, or the kind of failure.
    fn name(&self) -> &str {
        self.invariant.as_deref().unwrap_or(&self.kind)
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "DST_SEED={}", self.dst_seed);
        let _ = writeln!(out, "{}", self.replay);
        match &self.invariant {
            Some(invariant) => {
                let _ = writeln!(out, "invariant: {invariant}");
            }
            None => {
                let _ = writeln!(out, "failure: {}", self.kind);
            }
        }
        let step = self.step.map_or("-".to_string(), |s| s.to_string());
        let _ = match self.sim_time_ms {
            Some(ms) => writeln!(out, "step: {step} (simulated time {ms} ms)"),
            None => writeln!(out, "step: {step}"),
        };
        let _ = writeln!(out, "message: {}", self.detail);
        let _ = writeln!(out, "last {} events, up to the failure:", self.events.len());
        for event in &self.events {
            let _ = writeln!(out, "{}", format_event(event));
        }
    }
}

/// The `count` seeds from `base`, which wrap past `u64::MAX` to 0 as a sweep's seeds do: a
/// wrapped range is shown as its two parts, not as `18446744073709551614..=1`. (A report read
/// back from JSON may say anything: no count is a panic.)
fn seed_range(base: u64, count: u64) -> String {
    let Some(last_offset) = count.checked_sub(1) else {
        return "no seeds".to_string();
    };
    match base.checked_add(last_offset) {
        Some(last) => format!("{base}..={last}"),
        None => format!(
            "{base}..={} and 0..={}",
            u64::MAX,
            base.wrapping_add(last_offset)
        ),
    }
}

/// `1 seed`, `2 seeds`.
fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("{count} {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// The invariant a run violated, or the kind of its failure.
fn failure_name(result: &Result<kelpie_dst::LeaseRunReport, SimError>) -> String {
    match result {
        Err(SimError::InvariantViolated { invariant, .. }) => invariant.clone(),
        Err(error) => error.kind().to_string(),
        Ok(_) => "passed".to_string(),
    }
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

    /// A sweep's seeds wrap past u64::MAX to 0; their range read as empty
    /// (`18446744073709551614..=1`) before.
    #[test]
    fn a_wrapped_seed_range_is_shown_as_its_two_parts() {
        assert_eq!(seed_range(5, 0), "no seeds");
        assert_eq!(seed_range(5, 1), "5..=5");
        assert_eq!(seed_range(5, 10), "5..=14");
        assert_eq!(
            seed_range(u64::MAX - 1, 2),
            "18446744073709551614..=18446744073709551615"
        );
        assert_eq!(
            seed_range(u64::MAX - 1, 4),
            "18446744073709551614..=18446744073709551615 and 0..=1"
        );
    }

    /// A report written before the drift bound was recorded reads with the scenario's.
    #[test]
    fn settings_without_the_drift_bound_read_with_the_scenarios() {
        let json = r#"{"nodes":3,"actors":2,"lease_ms":1000,"sim_secs":20,"faults":"swarm",
            "inject_bug":null,"store":"protocol"}"#;
        let settings: SettingsRecord = serde_json::from_str(json).unwrap();
        assert_eq!(settings.clock_drift_ppm_max, 50_000);
    }

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
