//! The checks on the recorded history of every node process, and the state store's final
//! contents. Pure functions of what was recorded, so that they can be tested on made-up
//! histories (`checks_flag_each_kind_of_violation` below).
//!
//! Order comes from the stores, not from clocks: tokens order the holders of an actor, the
//! fenced state store's refusal of a write orders the writer after the later holder's fence,
//! what a fence read (the `read_token` and `read_seq` of an `activated` line) orders every
//! accepted write before that fence, and a process's own lines are in program order. The
//! harness's time of receipt of a line ([`Line::at_ms`]) orders nothing: a node can be stopped
//! between the store's answer and its log line, and print the line seconds later.

use std::collections::{BTreeMap, BTreeSet};

/// One line a node process printed, as the harness received it.
#[derive(Debug, Clone)]
pub struct Line {
    /// Harness time of receipt, ms since the run started (only for figures and bounded waits).
    pub at_ms: u64,
    /// Which node (0..5) and which of its processes (0 = first start).
    pub node: usize,
    pub generation: u32,
    pub json: serde_json::Value,
}

impl Line {
    pub fn message(&self) -> &str {
        self.json["message"].as_str().unwrap_or("")
    }

    pub fn actor(&self) -> &str {
        self.json["actor"].as_str().unwrap_or("")
    }

    pub fn number(&self, key: &str) -> u64 {
        self.json[key].as_u64().unwrap_or(0)
    }

    pub fn text(&self, key: &str) -> &str {
        self.json[key].as_str().unwrap_or("")
    }
}

/// One run of an actor's final write log: token, holder, first and last sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub token: u64,
    pub holder: String,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Parses the value `kelpie node` writes (`TOKEN HOLDER FIRST LAST` per line).
pub fn parse_runs(value: &[u8]) -> Result<Vec<Run>, String> {
    let text = std::str::from_utf8(value).map_err(|e| e.to_string())?;
    text.lines()
        .map(|line| {
            let words: Vec<&str> = line.split(' ').collect();
            let number = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
            match (number(0), number(2), number(3), words.len()) {
                (Some(token), Some(first_seq), Some(last_seq), 4) => Ok(Run {
                    token,
                    holder: words[1].to_string(),
                    first_seq,
                    last_seq,
                }),
                _ => Err(format!("not a run: {line:?}")),
            }
        })
        .collect()
}

/// What the checks counted and found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub activations: usize,
    pub writes_accepted: usize,
    pub writes_refused: usize,
    /// Refused writes after which the writer no longer acted as holder: fencing stopped a
    /// late write (a pause, a race with the cancellation).
    pub late_writes_refused: usize,
    pub acknowledged_checked: usize,
    pub violations: Vec<String>,
}

/// Runs every safety check on the history and on the final state (`final_runs` per actor).
pub fn check(lines: &[Line], final_runs: &BTreeMap<String, Vec<Run>>) -> Verdict {
    let mut verdict = Verdict::default();
    fencing_token_monotonic(lines, &mut verdict);
    no_belief_outlives_a_later_fence(lines, &mut verdict);
    no_stale_token_accepted(lines, &mut verdict);
    no_write_accepted_after_a_later_fence(lines, &mut verdict);
    acknowledged_writes_survive(lines, final_runs, &mut verdict);
    verdict
}

/// The simulator's `FencingTokenMonotonic` (kelpie-dst), on what the processes saw of the
/// store, in orders the store fixed:
/// - per actor, every activation in token order, each as the record naming its process: a
///   token activated by two processes is "passed ... with the same token" (one holder per
///   grant);
/// - per process and actor, in that process's program order (one task per actor writes its
///   lines; every store operation it makes is linearizable), the token of each activation and
///   the store's highest token named by each refusal: the tokens one client sees never go back,
///   and a token it saw held by another never becomes its own.
///
/// The simulator's other checkers judge the store's records and every node's beliefs at each
/// instant of one global clock (`LeaseUniqueness`, `BeliefConsistency`), or the store's own
/// decisions (`RenewalRequiresOwnership`, `ExpiredLeaseClaimable`); real processes give neither
/// a global clock nor the store's internals, so their store-ordered counterparts are the checks
/// below (a refused write while still believing, a write accepted after a later fence).
fn fencing_token_monotonic(lines: &[Line], verdict: &mut Verdict) {
    /// A token and, if known, its holder.
    type Seen = (u64, Option<String>);
    use kelpie_dst::checkers::{FencingTokenMonotonic, Invariant};
    let holder = |line: &Line| format!("node-{}-p{}", line.node, line.generation);
    let mut granted: BTreeMap<&str, BTreeMap<u64, BTreeSet<String>>> = BTreeMap::new();
    // (process, actor) -> tokens in program order, each with its holder if it was this one.
    let mut seen: BTreeMap<(usize, u32, &str), Vec<Seen>> = BTreeMap::new();
    for line in lines {
        let token = line.number("token");
        let key = (line.node, line.generation, line.actor());
        match (line.message(), line.text("outcome")) {
            ("activated", _) => {
                verdict.activations += 1;
                let by_token = granted.entry(line.actor()).or_default();
                by_token.entry(token).or_default().insert(holder(line));
                seen.entry(key)
                    .or_default()
                    .push((token, Some(holder(line))));
            }
            ("write", "refused") if line.number("highest") > 0 => {
                seen.entry(key)
                    .or_default()
                    .push((line.number("highest"), None));
            }
            _ => {}
        }
    }
    let mut feed = |label: String, actor: &str, tokens: &mut dyn Iterator<Item = Seen>| {
        let Ok(actor_id) = kelpie_core::ActorId::new(actor) else {
            return;
        };
        let mut checker = FencingTokenMonotonic::default();
        for (token, holder) in tokens {
            let record = kelpie_lease::backend::LeaseRecord {
                holder: holder.and_then(|h| kelpie_core::NodeId::new(h).ok()),
                fencing_token: kelpie_core::FencingToken(token),
                acquired_at_ms: 0,
                expires_at_ms: 0,
                renewal_count: 0,
            };
            let view = kelpie_dst::checkers::ActorView {
                record: Some(record),
                beliefs: Vec::new(),
            };
            // One actor, always at index 0: the checker keeps its state by that index.
            let mut actors = kelpie_dst::checkers::ActorMap::default();
            actors.insert(actor_id.clone(), view);
            let world = kelpie_dst::checkers::LeaseWorld {
                store_now_ms: 0,
                actors: &actors,
                changed_indices: &[0],
                decisions: &[],
                // Only FencingTokenMonotonic runs here, which does not read it.
                held_until_deleted: false,
            };
            if let Err(violation) = checker.check(&world) {
                verdict
                    .violations
                    .push(format!("{} ({label}): {violation}", checker.name()));
                return;
            }
        }
    };
    for (actor, by_token) in &granted {
        let mut all = by_token
            .iter()
            .flat_map(|(token, holders)| holders.iter().map(|h| (*token, Some(h.clone()))));
        feed("grants in token order".to_string(), actor, &mut all);
    }
    for ((node, generation, actor), tokens) in seen {
        let label = format!("as node {node} (process {generation}) saw them");
        feed(label, actor, &mut tokens.into_iter());
    }
}

/// A write refused as stale while its writer still acted as holder afterwards: the store had
/// fenced a later token (a later activation) while this activation was still in force, so
/// two activations of the actor existed at one instant.
fn no_belief_outlives_a_later_fence(lines: &[Line], verdict: &mut Verdict) {
    for line in lines.iter().filter(|l| l.message() == "write") {
        match line.text("outcome") {
            "accepted" => verdict.writes_accepted += 1,
            "refused" => {
                verdict.writes_refused += 1;
                if line.json["acting_after"].as_bool() == Some(true) {
                    verdict.violations.push(format!(
                        "two activations of {} at one instant: node {} (process {}) still acted \
                         with token {} after the store had fenced token {}",
                        line.actor(),
                        line.node,
                        line.generation,
                        line.number("token"),
                        line.number("highest")
                    ));
                } else {
                    verdict.late_writes_refused += 1;
                }
            }
            _ => {}
        }
    }
}

/// Once the store refused a token for an actor, it never accepts that token (or a lower one)
/// again: checked in each process's program order.
fn no_stale_token_accepted(lines: &[Line], verdict: &mut Verdict) {
    let mut refused: BTreeMap<(usize, u32, String), u64> = BTreeMap::new();
    for line in lines.iter().filter(|l| l.message() == "write") {
        let key = (line.node, line.generation, line.actor().to_string());
        let token = line.number("token");
        match line.text("outcome") {
            "refused" => {
                let highest = refused.entry(key).or_insert(0);
                *highest = (*highest).max(token);
            }
            "accepted" if refused.get(&key).is_some_and(|r| token <= *r) => {
                verdict.violations.push(format!(
                    "stale token accepted: {} token {} by node {} after the store had refused \
                     it",
                    line.actor(),
                    token,
                    line.node
                ));
            }
            _ => {}
        }
    }
}

/// Every accepted write came before the fence of every later token of its actor, in the
/// store's order: the state that later activation's fence read already held it (its last run
/// is the write's token with at least the write's sequence number, or a token between the
/// two, whose own fence read the write). A write that landed after a later holder's fence,
/// such as a paused holder's once it resumed, fails this however its line was timed.
///
/// This replaces a check that ordered a resumed node's accepted write after a later
/// activation by the harness's time of receipt of the two lines. That was wrong: a node
/// stopped (SIGSTOP) after the store committed its write but before it printed the
/// acknowledgement prints it after SIGCONT, seconds after the next holder's activation line,
/// though the store accepted the write first and the next holder's fence read it.
fn no_write_accepted_after_a_later_fence(lines: &[Line], verdict: &mut Verdict) {
    // Per actor: every activation's token and what its fence read.
    let mut fences: BTreeMap<&str, Vec<(u64, u64, u64)>> = BTreeMap::new();
    for line in lines.iter().filter(|l| l.message() == "activated") {
        let read = (line.number("read_token"), line.number("read_seq"));
        let fence = (line.number("token"), read.0, read.1);
        fences.entry(line.actor()).or_default().push(fence);
    }
    let mut late: BTreeSet<(String, u64, u64, usize, u32)> = BTreeSet::new();
    let mut first: Option<String> = None;
    for line in lines.iter().filter(|l| l.message() == "write") {
        if line.text("outcome") != "accepted" {
            continue;
        }
        let (token, seq) = (line.number("token"), line.number("seq"));
        let later = fences.get(line.actor()).into_iter().flatten();
        let missed = later.filter(|&&(fence, read_token, read_seq)| {
            fence > token && (read_token < token || (read_token == token && read_seq < seq))
        });
        if let Some((fence, read_token, read_seq)) = missed.min() {
            let key = (
                line.actor().to_string(),
                token,
                seq,
                line.node,
                line.generation,
            );
            if first.is_none() {
                first = Some(format!(
                    "{} token {token} seq {seq} by node {} (process {}) after the fence of \
                     token {fence}, which read token {read_token} seq {read_seq}",
                    key.0, key.3, key.4
                ));
            }
            late.insert(key);
        }
    }
    if let Some(first) = first {
        verdict.violations.push(format!(
            "{} writes accepted after a later holder's fence (two activations at one \
             instant), first: {first}",
            late.len()
        ));
    }
}

/// Every acknowledged write is in the actor's final log, and the log's tokens increase (a
/// stale write that was accepted would have cut the later holders' runs off).
fn acknowledged_writes_survive(
    lines: &[Line],
    final_runs: &BTreeMap<String, Vec<Run>>,
    verdict: &mut Verdict,
) {
    for (actor, runs) in final_runs {
        for pair in runs.windows(2) {
            if pair[1].token <= pair[0].token {
                verdict.violations.push(format!(
                    "{actor}: the final log has token {} after {}",
                    pair[1].token, pair[0].token
                ));
            }
        }
    }
    let mut missing = BTreeSet::new();
    for line in lines.iter().filter(|l| l.message() == "write") {
        if line.text("outcome") != "accepted" {
            continue;
        }
        verdict.acknowledged_checked += 1;
        let (token, seq) = (line.number("token"), line.number("seq"));
        let runs = final_runs.get(line.actor()).map_or(&[][..], Vec::as_slice);
        let present = runs
            .iter()
            .any(|r| r.token == token && r.first_seq <= seq && seq <= r.last_seq);
        if !present {
            missing.insert((line.actor().to_string(), token, seq));
        }
    }
    if let Some((actor, token, seq)) = missing.first() {
        verdict.violations.push(format!(
            "{} acknowledged writes missing from the final state, first: {actor} token {token} \
             seq {seq}",
            missing.len()
        ));
    }
}

/// The `q`-quantile (0..=1) of `values`, nearest rank; `None` if empty.
pub fn quantile(values: &[u64], q: f64) -> Option<u64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// The checks themselves, on made-up histories: a clean one passes, and each kind of
/// violation is flagged.
#[test]
fn checks_flag_each_kind_of_violation() {
    let line = |node: usize, generation: u32, json: serde_json::Value| Line {
        at_ms: 0,
        node,
        generation,
        json,
    };
    let activated = |node, token: u64| {
        // The fence read the previous token's run, seq 1 (as the histories below have it).
        let read_token = token - 1;
        let json = serde_json::json!({"message": "activated", "actor": "a", "token": token,
            "read_token": read_token, "read_seq": u64::from(read_token > 0)});
        line(node, 0, json)
    };
    let write = |node, token, seq, outcome: &str, acting_after: bool| {
        let json = serde_json::json!({"message": "write", "actor": "a", "token": token,
            "seq": seq, "outcome": outcome, "highest": token + 1, "acting_after": acting_after});
        line(node, 0, json)
    };
    let run = |token, first_seq, last_seq| Run {
        token,
        holder: format!("n@{token}"),
        first_seq,
        last_seq,
    };
    let clean = vec![
        activated(0, 1),
        write(0, 1, 1, "accepted", true),
        activated(1, 2),
        write(0, 1, 2, "refused", false),
        write(1, 2, 1, "accepted", true),
    ];
    let state = BTreeMap::from([("a".to_string(), vec![run(1, 1, 1), run(2, 1, 1)])]);
    let verdict = check(&clean, &state);
    assert!(verdict.violations.is_empty(), "{:?}", verdict.violations);
    assert_eq!(
        (verdict.late_writes_refused, verdict.acknowledged_checked),
        (1, 2)
    );

    let mut overlap = clean.clone();
    overlap[3] = write(0, 1, 2, "refused", true);
    assert_eq!(
        check(&overlap, &state).violations.len(),
        1,
        "a belief outlived a fence"
    );
    let mut twice = clean.clone();
    twice.push(activated(2, 2));
    assert_eq!(
        check(&twice, &state).violations.len(),
        1,
        "one token, two holders"
    );
    let mut stale = clean.clone();
    stale.push(write(0, 1, 3, "accepted", true));
    // Accepted after its refusal, after the later fence, and (so) missing from the final
    // state.
    assert_eq!(
        check(&stale, &state).violations.len(),
        3,
        "a stale token accepted"
    );
    // A process that saw token 2 held by another, then was granted token 2 itself.
    let mut regrant = clean.clone();
    regrant.push(activated(0, 2));
    let violations = check(&regrant, &state).violations;
    assert!(
        violations
            .iter()
            .any(|v| v.starts_with("FencingTokenMonotonic (as node 0")),
        "{violations:?}"
    );
    let lost = BTreeMap::from([("a".to_string(), vec![run(2, 1, 1), run(1, 1, 1)])]);
    assert_eq!(
        check(&clean, &lost).violations.len(),
        1,
        "tokens out of order in the log"
    );
    assert_eq!(quantile(&[5, 1, 3, 2, 4], 0.5), Some(3));
    assert_eq!(quantile(&[], 0.5), None);
}

/// A holder stopped between the store's acceptance of its write and its log line prints the
/// acknowledgement after it resumes, after the next holder's activation line: that is no
/// violation, since the next holder's fence read the write. The same lines with a fence that
/// did not read the write are one.
///
/// Seen on etcd (seed 1, planted-bug mode, so the old check was not run): node 4, paused,
/// had etcd commit its write of acct-2 token 319 seq 267 before the SIGSTOP took hold; node 0
/// activated acct-2 with token 1277 at 24.25 s, its fence reading `319 267`; node 4 printed the
/// acceptance at 26.41 s, after SIGCONT. The check this replaces, which ordered the two lines
/// by their arrival, would have failed that run.
#[test]
fn writes_are_ordered_by_what_the_next_fence_read_not_by_arrival() {
    let line = |at_ms: u64, node: usize, json: serde_json::Value| Line {
        at_ms,
        node,
        generation: 0,
        json,
    };
    let activated = |at_ms, node, token: u64, read: (u64, u64)| {
        let json = serde_json::json!({"message": "activated", "actor": "a", "token": token,
            "read_token": read.0, "read_seq": read.1});
        line(at_ms, node, json)
    };
    let accepted = |at_ms, node, token: u64, seq: u64| {
        let json = serde_json::json!({"message": "write", "actor": "a", "token": token,
            "seq": seq, "outcome": "accepted"});
        line(at_ms, node, json)
    };
    let run = |token, first_seq, last_seq| Run {
        token,
        holder: format!("n@{token}"),
        first_seq,
        last_seq,
    };
    let state = BTreeMap::from([("a".to_string(), vec![run(7, 1, 2), run(9, 1, 1)])]);
    // Node 0 is stopped after the store accepted its write 2 and prints it on resuming, at
    // 5 s; node 1 took over at 3 s and its fence read that write.
    let resumed = vec![
        activated(0, 0, 7, (0, 0)),
        accepted(50, 0, 7, 1),
        activated(3_000, 1, 9, (7, 2)),
        accepted(3_050, 1, 9, 1),
        accepted(5_000, 0, 7, 2),
    ];
    let verdict = check(&resumed, &state);
    assert!(verdict.violations.is_empty(), "{:?}", verdict.violations);
    // The fence read only write 1: write 2 landed after it.
    let mut landed = resumed.clone();
    landed[2] = activated(3_000, 1, 9, (7, 1));
    let violations = check(&landed, &state).violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(
        violations[0].contains("accepted after a later holder's fence"),
        "{violations:?}"
    );
    // Nothing of token 7 read at all, and a token in between whose fence read the write.
    landed[2] = activated(3_000, 1, 9, (0, 0));
    assert_eq!(check(&landed, &state).violations.len(), 1);
    landed[2] = activated(3_000, 1, 9, (8, 4));
    assert!(check(&landed, &state).violations.is_empty());
}
