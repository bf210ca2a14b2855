//! The lease store's sequential model with symbolic instants: [`branches`] is
//! [`kelpie_lease::backend::decide`] for an instant known only as a zone slot ([`N`]), split into the
//! cases `decide` distinguishes by comparing instants. Each case carries the difference
//! constraints under which `decide` takes it, its reply and its write, with times as slot
//! expressions. The discrete parts (holder, token, renewal count) stay concrete: every effect
//! sets them to a value that depends only on the record and the request.
//!
//! `model_agrees_with_decide` in the tests compares the two on every small record, request and
//! instant; and every linearization the search accepts is replayed through `decide` itself with
//! concrete instants (see `search::Witness`), so a disagreement is a loud checker bug rather than
//! a silent acceptance.

use kelpie_core::{ActorId, NodeId};
use kelpie_lease::{backend::LeaseOp, backend::LeaseRequest, Lease, LeaseError};

use super::zone::{Slot, A, E, N};

/// A node, as an index into its actor history's table of node ids.
pub(super) type Node = u32;

/// The record's holder and the renewals of its tenure; its times are the zone's slots [`A`]
/// (acquired) and [`E`] (expires).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Holding {
    pub(super) holder: Node,
    pub(super) renewals: u64,
}

/// The discrete part of a record. `token` 0 means no record yet; a released record keeps only
/// its token (all `decide` ever reads of a record without a holder).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Record {
    pub(super) token: u64,
    pub(super) holding: Option<Holding>,
}

/// A request, with its node interned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Req {
    pub(super) op: LeaseOp,
    pub(super) node: Node,
    pub(super) guard: Option<u64>,
    pub(super) duration_ms: i64,
}

/// A time as `slot + offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Expr {
    pub(super) slot: Slot,
    pub(super) offset: i64,
}

const fn at(slot: Slot) -> Expr {
    Expr { slot, offset: 0 }
}

/// What the model answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reply {
    Lease {
        holder: Node,
        token: u64,
        renewals: u64,
        acquired: Expr,
        expires: Expr,
    },
    HeldByOther {
        holder: Node,
        expires: Expr,
    },
    NotHolder {
        holder: Option<Node>,
    },
    Expired {
        expired_at: Expr,
    },
}

/// What the model writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Write {
    /// Nothing.
    Keep,
    /// A held record.
    Set {
        holding: Holding,
        token: u64,
        acquired: Expr,
        expires: Expr,
    },
    /// The holder gave it up.
    Release,
}

impl Write {
    /// The discrete record written over `record`.
    pub(super) fn record(self, record: Record) -> Record {
        match self {
            Write::Keep => record,
            Write::Set { holding, token, .. } => Record {
                token,
                holding: Some(holding),
            },
            Write::Release => Record {
                token: record.token,
                holding: None,
            },
        }
    }

    /// Whether it can leave the record other than it was (an effect that cannot is never
    /// worth placing unseen: it only moves time on).
    pub(super) fn changes(self, record: Record) -> bool {
        match self {
            Write::Keep => false,
            Write::Release => true,
            Write::Set {
                acquired, expires, ..
            } => self.record(record) != record || acquired != at(A) || expires != at(E),
        }
    }
}

/// One case of the decision: `x - y <= c` for each constraint, then the reply and the write.
#[derive(Clone, Copy, Debug)]
pub(super) struct Branch {
    pub(super) constraints: [(Slot, Slot, i64); 2],
    pub(super) constraints_len: usize,
    pub(super) reply: Reply,
    pub(super) write: Write,
}

impl Branch {
    fn new(constraints: &[(Slot, Slot, i64)], reply: Reply, write: Write) -> Self {
        let mut all = [(0, 0, 0); 2];
        all[..constraints.len()].copy_from_slice(constraints);
        Self {
            constraints: all,
            constraints_len: constraints.len(),
            reply,
            write,
        }
    }

    pub(super) fn constraints(&self) -> &[(Slot, Slot, i64)] {
        &self.constraints[..self.constraints_len]
    }
}

/// Most cases `decide` tells apart for one record and request.
#[cfg(test)]
const BRANCHES_MAX: usize = 3;

/// The cases of one decision, collected (the tests look at them together; the search visits
/// them one by one with [`for_each_branch`]).
#[cfg(test)]
pub(super) fn branches(record: Record, req: &Req) -> Vec<Branch> {
    let mut cases = Vec::new();
    for_each_branch(record, req, |branch| cases.push(branch));
    assert!(
        cases.len() <= BRANCHES_MAX,
        "linearizability checker bug: more than {BRANCHES_MAX} cases in a decision"
    );
    cases
}

/// The lease is valid at the new instant: `N < E`.
const VALID: (Slot, Slot, i64) = (N, E, -1);
/// It expired: `E <= N`.
const EXPIRED: (Slot, Slot, i64) = (E, N, 0);

/// Hands `visit` each case of `decide(record, req)` at instant [`N`] (at most three), in
/// order. A visitor, not a returned array: the search asks at every step, and the cases are
/// large enough that building and moving an array of them was a visible part of its cost.
#[inline(always)]
pub(super) fn for_each_branch(record: Record, req: &Req, mut visit: impl FnMut(Branch)) {
    let d = req.duration_ms;
    // `max(N + d, E)`: `N + d` when `E <= N + d`, else `E`.
    let extend_to_n = (E, N, d);
    let keep_expiry = (N, E, -d - 1);
    let grant = || {
        let holding = Holding {
            holder: req.node,
            renewals: 0,
        };
        let (token, acquired, expires) = (record.token + 1, at(N), Expr { slot: N, offset: d });
        let reply = Reply::Lease {
            holder: req.node,
            token,
            renewals: 0,
            acquired,
            expires,
        };
        let write = Write::Set {
            holding,
            token,
            acquired,
            expires,
        };
        (reply, write)
    };
    // The same tenure, its expiry `max(N + d, E)`, with `renewals` renewals.
    let extended = |holding: Holding, renewals: u64, expires: Expr| {
        let holding = Holding {
            renewals,
            ..holding
        };
        let reply = Reply::Lease {
            holder: holding.holder,
            token: record.token,
            renewals,
            acquired: at(A),
            expires,
        };
        let write = Write::Set {
            holding,
            token: record.token,
            acquired: at(A),
            expires,
        };
        (reply, write)
    };
    let to_n = Expr { slot: N, offset: d };
    match req.op {
        LeaseOp::Acquire => match record.holding {
            Some(held) if held.holder == req.node => {
                let (reply, write) = extended(held, held.renewals, to_n);
                visit(Branch::new(&[VALID, extend_to_n], reply, write));
                let (reply, write) = extended(held, held.renewals, at(E));
                visit(Branch::new(&[VALID, keep_expiry], reply, write));
                let (reply, write) = grant();
                visit(Branch::new(&[EXPIRED], reply, write));
            }
            Some(held) => {
                let reply = Reply::HeldByOther {
                    holder: held.holder,
                    expires: at(E),
                };
                visit(Branch::new(&[VALID], reply, Write::Keep));
                let (reply, write) = grant();
                visit(Branch::new(&[EXPIRED], reply, write));
            }
            None => {
                let (reply, write) = grant();
                visit(Branch::new(&[], reply, write));
            }
        },
        LeaseOp::Renew | LeaseOp::Release => {
            let holds = record.holding.filter(|held| {
                held.holder == req.node && req.guard.is_none_or(|token| token == record.token)
            });
            match (holds, record.holding) {
                (None, Some(held)) => {
                    let reply = Reply::NotHolder {
                        holder: Some(held.holder),
                    };
                    visit(Branch::new(&[VALID], reply, Write::Keep));
                    let reply = Reply::NotHolder { holder: None };
                    visit(Branch::new(&[EXPIRED], reply, Write::Keep));
                }
                (None, None) => {
                    let reply = Reply::NotHolder { holder: None };
                    visit(Branch::new(&[], reply, Write::Keep));
                }
                (Some(held), _) if req.op == LeaseOp::Renew => {
                    let reply = Reply::Expired { expired_at: at(E) };
                    visit(Branch::new(&[EXPIRED], reply, Write::Keep));
                    let renewals = held.renewals.saturating_add(1);
                    let (reply, write) = extended(held, renewals, to_n);
                    visit(Branch::new(&[VALID, extend_to_n], reply, write));
                    let (reply, write) = extended(held, renewals, at(E));
                    visit(Branch::new(&[VALID, keep_expiry], reply, write));
                }
                (Some(held), _) => {
                    let reply = Reply::Lease {
                        holder: held.holder,
                        token: record.token,
                        renewals: held.renewals,
                        acquired: at(A),
                        expires: at(E),
                    };
                    visit(Branch::new(&[], reply, Write::Release));
                }
            }
        }
    }
}

/// Whether `req` can ever write again from `record` on: a guarded renewal or release whose
/// token was passed, or that belongs to a tenure that ended, is refused forever (tokens only
/// grow, and a new tenure always takes a new token).
pub(super) fn can_write_again(record: Record, req: &Req) -> bool {
    match (req.op, req.guard) {
        (LeaseOp::Acquire, _) | (_, None) => true,
        (_, Some(guard)) => {
            guard > record.token
                || (guard == record.token
                    && record.holding.is_some_and(|held| held.holder == req.node))
        }
    }
}

/// A reply a node saw, in the model's terms. Anything `decide` could never have answered for
/// this actor and request is [`Seen::Impossible`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seen {
    Lease {
        holder: Node,
        token: u64,
        renewals: u64,
        acquired_ms: i64,
        expires_ms: i64,
    },
    HeldByOther {
        holder: Node,
        expires_ms: i64,
    },
    NotHolder {
        holder: Option<Node>,
    },
    Expired {
        expired_at_ms: i64,
    },
    Impossible,
}

impl Seen {
    /// `reply` to `request` on `actor_id`, with nodes interned by `intern`.
    pub(super) fn of(
        actor_id: &ActorId,
        request: &LeaseRequest,
        reply: &Result<Lease, LeaseError>,
        mut intern: impl FnMut(&NodeId) -> Node,
    ) -> Self {
        use super::zone::ms;
        match reply {
            Ok(lease) if lease.actor_id == *actor_id => Seen::Lease {
                holder: intern(&lease.holder),
                token: lease.fencing_token.0,
                renewals: lease.renewal_count,
                acquired_ms: ms(lease.acquired_at_ms),
                expires_ms: ms(lease.expires_at_ms),
            },
            Err(LeaseError::HeldByOther {
                actor_id: a,
                holder,
                expires_at_ms,
            }) if a == actor_id => Seen::HeldByOther {
                holder: intern(holder),
                expires_ms: ms(*expires_at_ms),
            },
            Err(LeaseError::NotHolder {
                actor_id: a,
                node_id,
                holder,
            }) if a == actor_id && *node_id == request.node_id => Seen::NotHolder {
                holder: holder.as_ref().map(intern),
            },
            Err(LeaseError::Expired {
                actor_id: a,
                node_id,
                expired_at_ms,
            }) if a == actor_id && *node_id == request.node_id => Seen::Expired {
                expired_at_ms: ms(*expired_at_ms),
            },
            _ => Seen::Impossible,
        }
    }

    /// The equalities under which the model's `reply` is this one: `(expr, value)` pairs, or
    /// `None` if they differ in a discrete part.
    pub(super) fn matches(&self, reply: &Reply) -> Option<[Option<(Expr, i64)>; 2]> {
        match (*self, *reply) {
            (
                Seen::Lease {
                    holder,
                    token,
                    renewals,
                    acquired_ms,
                    expires_ms,
                },
                Reply::Lease {
                    holder: h,
                    token: t,
                    renewals: r,
                    acquired,
                    expires,
                },
            ) if (holder, token, renewals) == (h, t, r) => {
                Some([Some((acquired, acquired_ms)), Some((expires, expires_ms))])
            }
            (
                Seen::HeldByOther { holder, expires_ms },
                Reply::HeldByOther { holder: h, expires },
            ) if holder == h => Some([Some((expires, expires_ms)), None]),
            (Seen::NotHolder { holder }, Reply::NotHolder { holder: h }) if holder == h => {
                Some([None, None])
            }
            (Seen::Expired { expired_at_ms }, Reply::Expired { expired_at }) => {
                Some([Some((expired_at, expired_at_ms)), None])
            }
            _ => None,
        }
    }

    /// The highest token the record can have just before an operation with this reply.
    pub(super) fn token_cap(&self) -> Option<u64> {
        match self {
            Seen::Lease { token, .. } => Some(*token),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::zone::{Zone, T, Z};
    use super::*;
    use kelpie_core::FencingToken;
    use kelpie_lease::{backend::decide, backend::LeaseRecord};

    /// For every small record, request and instant: exactly one case of the model holds when
    /// its instants are fixed, and it gives `decide`'s reply and write.
    #[test]
    fn model_agrees_with_decide() {
        let actor = ActorId::new("a").unwrap();
        let nodes = [NodeId::new("n0").unwrap(), NodeId::new("n1").unwrap()];
        let mut records = vec![None];
        for token in 1..=2 {
            records.push(Some(LeaseRecord {
                holder: None,
                fencing_token: FencingToken(token),
                acquired_at_ms: 0,
                expires_at_ms: 0,
                renewal_count: 0,
            }));
            for holder in &nodes {
                for (acquired, expires) in [(0, 10), (5, 20)] {
                    records.push(Some(LeaseRecord {
                        holder: Some(holder.clone()),
                        fencing_token: FencingToken(token),
                        acquired_at_ms: acquired,
                        expires_at_ms: expires,
                        renewal_count: token - 1,
                    }));
                }
            }
        }
        let mut checked = 0;
        for record in &records {
            for op in [LeaseOp::Acquire, LeaseOp::Renew, LeaseOp::Release] {
                for (n, node) in nodes.iter().enumerate() {
                    for guard in [None, Some(1), Some(2)] {
                        for duration_ms in [1, 8, 15] {
                            for now_ms in [4, 9, 10, 12, 19, 20, 25] {
                                let mut request = LeaseRequest::new(op, node.clone(), duration_ms);
                                request.fencing_token = guard.map(FencingToken);
                                let expected = decide(&actor, record.as_ref(), &request, now_ms);
                                let req = Req {
                                    op,
                                    node: n as Node,
                                    guard,
                                    duration_ms: duration_ms as i64,
                                };
                                compare(&actor, &nodes, record.as_ref(), &req, now_ms, &expected);
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 4_000, "{checked}");
    }

    fn compare(
        actor: &ActorId,
        nodes: &[NodeId],
        record: Option<&LeaseRecord>,
        req: &Req,
        now_ms: u64,
        expected: &kelpie_lease::backend::Decision,
    ) {
        let intern = |node: &NodeId| nodes.iter().position(|n| n == node).unwrap() as Node;
        let discrete = record.map_or(Record::default(), |r| Record {
            token: r.fencing_token.0,
            holding: r.holder.as_ref().map(|holder| Holding {
                holder: intern(holder),
                renewals: r.renewal_count,
            }),
        });
        let mut zone = Zone::unconstrained();
        assert!(zone.fix(N, now_ms as i64) && zone.fix(T, now_ms as i64));
        if let Some(r) = record.filter(|r| r.holder.is_some()) {
            assert!(zone.fix(A, r.acquired_at_ms as i64) && zone.fix(E, r.expires_at_ms as i64));
        }
        let value = |zone: &Zone, expr: Expr| zone.range(expr.slot).0.unwrap() + expr.offset;
        let holding: Vec<_> = branches(discrete, req)
            .iter()
            .copied()
            .filter(|branch| {
                let mut zone = zone.clone();
                branch
                    .constraints()
                    .iter()
                    .all(|&(x, y, c)| zone.constrain(x, y, c))
            })
            .collect();
        let context = format!("{record:?} {req:?} at {now_ms}");
        assert_eq!(holding.len(), 1, "exactly one case holds: {context}");
        let branch = holding[0];
        let reply = match branch.reply {
            Reply::Lease {
                holder,
                token,
                renewals,
                acquired,
                expires,
            } => Ok(Lease {
                actor_id: actor.clone(),
                holder: nodes[holder as usize].clone(),
                fencing_token: FencingToken(token),
                acquired_at_ms: value(&zone, acquired) as u64,
                expires_at_ms: value(&zone, expires) as u64,
                renewal_count: renewals,
            }),
            Reply::HeldByOther { holder, expires } => Err(LeaseError::HeldByOther {
                actor_id: actor.clone(),
                holder: nodes[holder as usize].clone(),
                expires_at_ms: value(&zone, expires) as u64,
            }),
            Reply::NotHolder { holder } => Err(LeaseError::NotHolder {
                actor_id: actor.clone(),
                node_id: nodes[req.node as usize].clone(),
                holder: holder.map(|h| nodes[h as usize].clone()),
            }),
            Reply::Expired { expired_at } => Err(LeaseError::Expired {
                actor_id: actor.clone(),
                node_id: nodes[req.node as usize].clone(),
                expired_at_ms: value(&zone, expired_at) as u64,
            }),
        };
        assert_eq!(reply, expected.reply, "{context}");
        let written = branch.write.record(discrete);
        match (&expected.write, branch.write) {
            (None, Write::Keep) => {}
            (Some(w), Write::Release) => {
                assert!(w.holder.is_none(), "{context}");
                assert_eq!(w.fencing_token.0, written.token, "{context}");
            }
            (
                Some(w),
                Write::Set {
                    acquired, expires, ..
                },
            ) => {
                let held = written.holding.unwrap();
                assert_eq!(w.holder.as_ref(), Some(&nodes[held.holder as usize]));
                assert_eq!(w.fencing_token.0, written.token, "{context}");
                assert_eq!(w.renewal_count, held.renewals, "{context}");
                assert_eq!(w.acquired_at_ms as i64, value(&zone, acquired), "{context}");
                assert_eq!(w.expires_at_ms as i64, value(&zone, expires), "{context}");
            }
            (w, model) => panic!("{context}: decide writes {w:?}, the model {model:?}"),
        }
        let _ = Z;
    }
}
