//! One line per [`LeaseEvent`], for the events printed before a violation and the timeline's
//! tooltips: `   1234 ms  node-1  actor-0  granted acquire token=3 expires=2234`.

use kelpie_dst::{LeaseEvent, LeaseEventKind};

/// Width of the node and actor columns; longer ids push the line out rather than being cut.
const ID_COLUMN_WIDTH: usize = 8;

/// The event as one aligned line.
pub fn format_event(event: &LeaseEvent) -> String {
    let node = event.node_id.as_ref().map_or("-", |n| n.as_str());
    let actor = event.actor_id.as_ref().map_or("-", |a| a.as_str());
    format!(
        "{:>7} ms  {node:<width$}  {actor:<width$}  {}",
        event.at_ms,
        describe_kind(&event.kind),
        width = ID_COLUMN_WIDTH
    )
}

/// What happened, without when or to whom.
pub fn describe_kind(kind: &LeaseEventKind) -> String {
    match kind {
        LeaseEventKind::Request { op } => format!("request {}", op.name()),
        LeaseEventKind::Granted {
            op,
            fencing_token,
            expires_at_ms,
        } => format!(
            "granted {} token={fencing_token} expires={expires_at_ms}",
            op.name()
        ),
        LeaseEventKind::Refused { op, reason } => format!("refused {}: {reason}", op.name()),
        LeaseEventKind::StoreFailed { op, reason } => {
            format!("store failed {}: {reason}", op.name())
        }
        LeaseEventKind::Truth {
            holder,
            fencing_token,
            expires_at_ms,
        } => {
            let holder = holder.as_ref().map_or("none", |h| h.as_str());
            format!("store truth holder={holder} token={fencing_token} expires={expires_at_ms}")
        }
        LeaseEventKind::BeliefStarted { fencing_token, .. } => {
            format!("belief started token={fencing_token}")
        }
        LeaseEventKind::BeliefEnded => "belief ended".to_string(),
        LeaseEventKind::Fault { what } => format!("fault {what}"),
        LeaseEventKind::Violation { invariant, message } => {
            format!("VIOLATION {invariant}: {message}")
        }
        // Kinds added to the simulator later are shown through their serialized form, so
        // they appear (less prettily) without a change here.
        other => generic(other),
    }
}

fn generic(kind: &LeaseEventKind) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::Object(fields)) => {
            let name = fields
                .get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("event")
                .to_string();
            let rest: Vec<String> = fields
                .iter()
                .filter(|(key, _)| key.as_str() != "type")
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            format!("{name} {}", rest.join(" ")).trim_end().to_string()
        }
        _ => format!("{kind:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kelpie_core::{ActorId, FencingToken, NodeId};
    use kelpie_lease::backend::LeaseOp;

    #[test]
    fn events_print_as_aligned_lines() {
        let event = LeaseEvent {
            at_ms: 1234,
            node_id: Some(NodeId::new("node-1").unwrap()),
            actor_id: Some(ActorId::new("actor-0").unwrap()),
            kind: LeaseEventKind::Granted {
                op: LeaseOp::Acquire,
                fencing_token: FencingToken(3),
                expires_at_ms: 2234,
            },
        };
        assert_eq!(
            format_event(&event),
            "   1234 ms  node-1    actor-0   granted acquire token=3 expires=2234"
        );
        let truth = LeaseEvent {
            at_ms: 5,
            node_id: None,
            actor_id: None,
            kind: LeaseEventKind::Truth {
                holder: None,
                fencing_token: FencingToken(1),
                expires_at_ms: 9,
            },
        };
        assert!(
            format_event(&truth).ends_with("-         store truth holder=none token=1 expires=9")
        );
    }
}
