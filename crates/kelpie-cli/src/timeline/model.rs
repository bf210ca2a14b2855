//! What the timeline draws, derived from a run's events: truth tenures per actor, beliefs
//! per node and actor, fault windows and points, violations.

use std::collections::BTreeMap;

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_dst::{LeaseEvent, LeaseEventKind};

/// One holder's tenure in the store's truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenure {
    /// When the store recorded it.
    pub start_ms: u64,
    /// When it was released, taken over or expired.
    pub end_ms: u64,
    /// The holder.
    pub holder: NodeId,
    /// Its token.
    pub token: FencingToken,
}

/// A span during which a node believed it held an actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeliefSpan {
    /// When the belief started.
    pub start_ms: u64,
    /// When it ended (or the run did).
    pub end_ms: u64,
    /// The token believed in.
    pub token: FencingToken,
    /// Parts of the span the store did not back with a tenure of this node and token.
    pub unbacked: Vec<(u64, u64)>,
}

/// A fault: a window, or a point when it has no duration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultMark {
    /// When it started.
    pub start_ms: u64,
    /// When it ended; `None` for a point fault.
    pub end_ms: Option<u64>,
    /// What it was, as the simulator described it.
    pub label: String,
}

/// A violation found by a checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViolationMark {
    /// When.
    pub at_ms: u64,
    /// The invariant.
    pub invariant: String,
    /// The checker's message.
    pub message: String,
}

/// Everything the timeline draws.
#[derive(Debug, Default)]
pub struct Model {
    /// The run's end, the right edge of the plot.
    pub end_ms: u64,
    /// Actors, in natural order (`actor-2` before `actor-10`); one row each.
    pub actors: Vec<ActorId>,
    /// Nodes, in natural order; one colour and one belief lane each.
    pub nodes: Vec<NodeId>,
    /// Truth per actor.
    pub tenures: BTreeMap<ActorId, Vec<Tenure>>,
    /// Beliefs per actor and node.
    pub beliefs: BTreeMap<(ActorId, NodeId), Vec<BeliefSpan>>,
    /// Faults.
    pub faults: Vec<FaultMark>,
    /// Violations.
    pub violations: Vec<ViolationMark>,
}

/// A tenure or belief still open while the events are read.
struct Open<T> {
    start_ms: u64,
    value: T,
}

impl Model {
    /// The model of `events`, for a run that ended at `end_ms`.
    pub fn build(events: &[LeaseEvent], end_ms: u64) -> Model {
        let mut model = Model {
            end_ms,
            ..Model::default()
        };
        model.collect_ids(events);
        // Grouped once, so the work is linear in the events times the nodes.
        let mut by_actor: BTreeMap<&ActorId, Vec<&LeaseEvent>> = BTreeMap::new();
        for event in events {
            if let Some(actor) = &event.actor_id {
                by_actor.entry(actor).or_default().push(event);
            }
        }
        for (actor, events) in by_actor {
            let held = tenures(&events, end_ms);
            for node in &model.nodes {
                let mut spans = beliefs(&events, node, end_ms);
                for span in &mut spans {
                    span.unbacked = unbacked(span, node, &held);
                }
                model.beliefs.insert((actor.clone(), node.clone()), spans);
            }
            model.tenures.insert(actor.clone(), held);
        }
        model.faults = faults(events, end_ms);
        model.violations = violations(events);
        model
    }

    fn collect_ids(&mut self, events: &[LeaseEvent]) {
        let mut actors = BTreeMap::new();
        let mut nodes = BTreeMap::new();
        for event in events {
            if let Some(actor) = &event.actor_id {
                actors.insert(natural_key(actor.as_str()), actor.clone());
            }
            if let Some(node) = &event.node_id {
                nodes.insert(natural_key(node.as_str()), node.clone());
            }
            if let LeaseEventKind::Truth {
                holder: Some(holder),
                ..
            } = &event.kind
            {
                nodes.insert(natural_key(holder.as_str()), holder.clone());
            }
        }
        self.actors = actors.into_values().collect();
        self.nodes = nodes.into_values().collect();
    }
}

/// Sorts ids with their digit runs compared as numbers, so `node-10` follows `node-9`.
fn natural_key(id: &str) -> Vec<(u8, u64, String)> {
    let mut key = Vec::new();
    let mut chars = id.chars().peekable();
    while let Some(&c) = chars.peek() {
        let digits = c.is_ascii_digit();
        let mut run = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_digit() != digits {
                break;
            }
            run.push(c);
            chars.next();
        }
        match digits {
            true => key.push((1, run.parse().unwrap_or(u64::MAX), run)),
            false => key.push((0, 0, run)),
        }
    }
    key
}

/// The holder tenures in one actor's events. A change that keeps holder and token is a renewal and
/// extends the tenure; anything else ends it, as does reaching its expiry.
fn tenures(events: &[&LeaseEvent], end_ms: u64) -> Vec<Tenure> {
    let mut done = Vec::new();
    let mut open: Option<Open<(NodeId, FencingToken, u64)>> = None;
    let close = |open: Open<(NodeId, FencingToken, u64)>, at_ms: u64| {
        let (holder, token, expires_ms) = open.value;
        Tenure {
            start_ms: open.start_ms,
            end_ms: at_ms.min(expires_ms).max(open.start_ms),
            holder,
            token,
        }
    };
    for event in events {
        let LeaseEventKind::Truth {
            holder,
            fencing_token,
            expires_at_ms,
        } = &event.kind
        else {
            continue;
        };
        if let Some(current) = &mut open {
            let same = holder.as_ref() == Some(&current.value.0)
                && *fencing_token == current.value.1
                && event.at_ms <= current.value.2;
            if same {
                current.value.2 = *expires_at_ms;
                continue;
            }
        }
        if let Some(current) = open.take() {
            done.push(close(current, event.at_ms));
        }
        open = holder.clone().map(|holder| Open {
            start_ms: event.at_ms,
            value: (holder, *fencing_token, *expires_at_ms),
        });
    }
    if let Some(current) = open {
        done.push(close(current, end_ms));
    }
    done
}

/// The spans during which `node` believed it held the actor whose events these are.
fn beliefs(events: &[&LeaseEvent], node: &NodeId, end_ms: u64) -> Vec<BeliefSpan> {
    let mut done = Vec::new();
    let mut open: Option<Open<FencingToken>> = None;
    let close = |open: Open<FencingToken>, at_ms: u64| BeliefSpan {
        start_ms: open.start_ms,
        end_ms: at_ms.max(open.start_ms),
        token: open.value,
        unbacked: Vec::new(),
    };
    for event in events.iter().filter(|e| e.node_id.as_ref() == Some(node)) {
        match &event.kind {
            LeaseEventKind::BeliefStarted { fencing_token, .. } => {
                if open.as_ref().is_some_and(|o| o.value == *fencing_token) {
                    continue;
                }
                if let Some(current) = open.take() {
                    done.push(close(current, event.at_ms));
                }
                open = Some(Open {
                    start_ms: event.at_ms,
                    value: *fencing_token,
                });
            }
            LeaseEventKind::BeliefEnded => {
                if let Some(current) = open.take() {
                    done.push(close(current, event.at_ms));
                }
            }
            _ => {}
        }
    }
    if let Some(current) = open {
        done.push(close(current, end_ms));
    }
    done
}

/// The parts of `span` not covered by a tenure of `node` with the span's token. A belief
/// that lasted no simulated time (it started in the step a checker caught it) is one
/// instant, unbacked unless a tenure covers that instant.
fn unbacked(span: &BeliefSpan, node: &NodeId, tenures: &[Tenure]) -> Vec<(u64, u64)> {
    if span.start_ms == span.end_ms {
        let at_ms = span.start_ms;
        let covered = tenures.iter().any(|t| {
            &t.holder == node && t.token == span.token && t.start_ms <= at_ms && at_ms < t.end_ms
        });
        return if covered {
            Vec::new()
        } else {
            vec![(at_ms, at_ms)]
        };
    }
    let mut covered: Vec<(u64, u64)> = tenures
        .iter()
        .filter(|t| &t.holder == node && t.token == span.token)
        .filter(|t| t.end_ms > span.start_ms && t.start_ms < span.end_ms)
        .map(|t| (t.start_ms, t.end_ms))
        .collect();
    covered.sort_unstable();
    let mut gaps = Vec::new();
    let mut from_ms = span.start_ms;
    for (start_ms, end_ms) in covered {
        if start_ms > from_ms {
            gaps.push((from_ms, start_ms.min(span.end_ms)));
        }
        from_ms = from_ms.max(end_ms);
    }
    if from_ms < span.end_ms {
        gaps.push((from_ms, span.end_ms));
    }
    gaps.retain(|(start, end)| end > start);
    gaps
}

/// How a fault event's description reads: the start or end of a window, or a point.
#[derive(Debug, PartialEq, Eq)]
enum FaultShape {
    Start(String),
    End(String),
    /// Ends every open window whose key contains all these words (`heal` ends partitions,
    /// `restart node-1` ends `crash node-1`).
    EndMatching(Vec<String>),
    Point,
}

fn fault_shape(what: &str) -> FaultShape {
    let what = what.trim();
    for suffix in [" start", " started", " begin", " on"] {
        if let Some(key) = what.strip_suffix(suffix) {
            return FaultShape::Start(key.to_string());
        }
    }
    for suffix in [" end", " ended", " stop", " off", " healed"] {
        if let Some(key) = what.strip_suffix(suffix) {
            return FaultShape::End(key.to_string());
        }
    }
    let words: Vec<&str> = what.split_whitespace().collect();
    match words.as_slice() {
        // `heal all` ends every window; a bare `heal` ends the partitions.
        ["heal", "all"] => return FaultShape::EndMatching(Vec::new()),
        ["heal", ..] => return FaultShape::EndMatching(vec!["partition".into()]),
        _ => {}
    }
    // `restart node-1` ends `crash node-1`; `storage restart` ends `storage crash`.
    if words
        .iter()
        .any(|w| matches!(*w, "restart" | "recover" | "resume"))
    {
        let crash_words = words
            .iter()
            .map(|w| match *w {
                "restart" | "recover" => "crash".to_string(),
                "resume" => "pause".to_string(),
                other => other.to_string(),
            })
            .collect();
        return FaultShape::EndMatching(crash_words);
    }
    if words
        .iter()
        .any(|w| matches!(*w, "crash" | "partition" | "pause" | "drift"))
    {
        return FaultShape::Start(what.to_string());
    }
    FaultShape::Point
}

/// Fault windows (closed at the run's end if still open) and point faults.
fn faults(events: &[LeaseEvent], end_ms: u64) -> Vec<FaultMark> {
    let mut marks = Vec::new();
    let mut open: Vec<(String, usize)> = Vec::new();
    for event in events {
        let LeaseEventKind::Fault { what } = &event.kind else {
            continue;
        };
        let subject = event
            .node_id
            .as_ref()
            .map_or(String::new(), |n| format!(" {n}"));
        match fault_shape(what) {
            FaultShape::Start(key) => {
                let key = format!("{key}{subject}");
                open.push((key.clone(), marks.len()));
                marks.push(FaultMark {
                    start_ms: event.at_ms,
                    end_ms: Some(end_ms),
                    label: key,
                });
            }
            FaultShape::End(key) => {
                let key = format!("{key}{subject}");
                open.retain(|(open_key, index)| {
                    let closes = *open_key == key;
                    if closes {
                        marks[*index].end_ms = Some(event.at_ms);
                    }
                    !closes
                });
            }
            FaultShape::EndMatching(words) => {
                open.retain(|(open_key, index)| {
                    let closes = words
                        .iter()
                        .all(|w| open_key.split_whitespace().any(|k| k == w));
                    if closes {
                        marks[*index].end_ms = Some(event.at_ms);
                    }
                    !closes
                });
            }
            FaultShape::Point => marks.push(FaultMark {
                start_ms: event.at_ms,
                end_ms: None,
                label: format!("{what}{subject}"),
            }),
        }
    }
    marks
}

fn violations(events: &[LeaseEvent]) -> Vec<ViolationMark> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            LeaseEventKind::Violation { invariant, message } => Some(ViolationMark {
                at_ms: event.at_ms,
                invariant: invariant.clone(),
                message: message.clone(),
            }),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_ms: u64, node: Option<&str>, actor: &str, kind: LeaseEventKind) -> LeaseEvent {
        LeaseEvent {
            at_ms,
            node_id: node.map(|n| NodeId::new(n).unwrap()),
            actor_id: Some(ActorId::new(actor).unwrap()),
            kind,
        }
    }

    fn truth(holder: Option<&str>, token: u64, expires_at_ms: u64) -> LeaseEventKind {
        LeaseEventKind::Truth {
            holder: holder.map(|h| NodeId::new(h).unwrap()),
            fencing_token: FencingToken(token),
            expires_at_ms,
        }
    }

    #[test]
    fn renewals_extend_a_tenure_and_expiry_ends_it() {
        let events = vec![
            at(0, None, "a", truth(Some("n1"), 1, 100)),
            at(50, None, "a", truth(Some("n1"), 1, 150)),
            at(400, None, "a", truth(Some("n2"), 2, 500)),
            at(450, None, "a", truth(None, 2, 450)),
        ];
        let model = Model::build(&events, 1_000);
        let tenures = &model.tenures[&ActorId::new("a").unwrap()];
        let spans: Vec<(u64, u64, u64)> = tenures
            .iter()
            .map(|t| (t.start_ms, t.end_ms, t.token.0))
            .collect();
        assert_eq!(spans, [(0, 150, 1), (400, 450, 2)]);
        assert_eq!(model.nodes.len(), 2);
    }

    #[test]
    fn belief_beyond_the_tenure_is_unbacked() {
        let node = NodeId::new("n1").unwrap();
        let tenure = |start_ms, end_ms, token| Tenure {
            start_ms,
            end_ms,
            holder: node.clone(),
            token: FencingToken(token),
        };
        let span = BeliefSpan {
            start_ms: 5,
            end_ms: 120,
            token: FencingToken(1),
            unbacked: Vec::new(),
        };
        assert_eq!(unbacked(&span, &node, &[tenure(0, 100, 1)]), [(100, 120)]);
        // Another token does not back it; two tenures with gaps leave the gaps.
        assert_eq!(unbacked(&span, &node, &[tenure(0, 200, 2)]), [(5, 120)]);
        let split = [tenure(0, 40, 1), tenure(60, 110, 1)];
        assert_eq!(unbacked(&span, &node, &split), [(40, 60), (110, 120)]);
        let instant = BeliefSpan {
            start_ms: 150,
            end_ms: 150,
            ..span
        };
        assert_eq!(unbacked(&instant, &node, &split), [(150, 150)]);
        assert!(unbacked(&instant, &node, &[tenure(100, 200, 1)]).is_empty());
    }

    #[test]
    fn fault_descriptions_become_windows_or_points() {
        assert_eq!(
            fault_shape("partition start"),
            FaultShape::Start("partition".into())
        );
        assert_eq!(
            fault_shape("crash node-1"),
            FaultShape::Start("crash node-1".into())
        );
        assert_eq!(
            fault_shape("heal"),
            FaultShape::EndMatching(vec!["partition".into()])
        );
        assert_eq!(fault_shape("storage-write-fail"), FaultShape::Point);
        assert_eq!(fault_shape("clock jump node-1 +30 ms"), FaultShape::Point);
        assert_eq!(
            fault_shape("storage restart"),
            FaultShape::EndMatching(vec!["storage".into(), "crash".into()])
        );
        let fault = |what: &str| LeaseEventKind::Fault { what: what.into() };
        let events = vec![
            at(10, None, "a", fault("partition node-1")),
            at(20, None, "a", fault("storage-write-fail")),
            at(25, None, "a", fault("crash node-1")),
            at(30, None, "a", fault("heal")),
            at(35, None, "a", fault("restart node-1")),
            at(40, None, "a", fault("clock drift start")),
            at(50, None, "a", fault("storage crash")),
            at(60, None, "a", fault("heal all")),
        ];
        let marks = faults(&events, 100);
        let shapes: Vec<(u64, Option<u64>)> =
            marks.iter().map(|m| (m.start_ms, m.end_ms)).collect();
        assert_eq!(
            shapes,
            [
                (10, Some(30)),
                (20, None),
                (25, Some(35)),
                (40, Some(60)),
                (50, Some(60))
            ]
        );
    }

    #[test]
    fn ids_sort_naturally() {
        let mut ids = vec!["node-10", "node-9", "node-1"];
        ids.sort_by_key(|id| natural_key(id));
        assert_eq!(ids, ["node-1", "node-9", "node-10"]);
    }
}
