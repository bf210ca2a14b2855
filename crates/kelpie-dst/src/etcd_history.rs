//! What every node saw of the simulated etcd, and the check that it is what one linearizable
//! etcd could have answered.
//!
//! The lease operations of the etcd backend are not atomic at the lease level (an acquire is a
//! transaction plus a keepalive, and expiry is etcd deleting keys on its own), so the lease
//! protocol's sequential model does not apply to them. What etcd promises is linearizability of
//! its key-value requests, ordered by its cluster revision: every answer carries the revision
//! it was served at. The checks here are the consequences of that promise a client can verify
//! from the answers alone (the approach of Jepsen's etcd analyses):
//!
//! - **Real time**: a request sent after another was answered is served at a revision no
//!   earlier than that answer's. A stale read violates it.
//! - **One state per revision**: two answers that show a key as of the same revision show the
//!   same key (or both its absence).
//! - **Well-formed keys**: a key shown as of revision `r` was last written at or before `r`,
//!   and created at or before that write.
//! - **No write in between**: a key shown as of revision `r2` and last written at `m <= r1 <=
//!   r2` is the very key any answer shows as of `r1`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use kelpie_lease::etcd_api::{
    EtcdKeyValue, RangeReply, RangeRequest, Txn, TxnOp, TxnOpResult, TxnReply,
};

/// One key as an answer showed it, as of a revision: the key, or `None` if it was absent.
pub type KeyState = Option<EtcdKeyValue>;

/// One request a node made, with what its answer showed (if one arrived).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOp {
    /// When it was sent, on global simulated time.
    pub invoked_ms: u64,
    /// When its answer arrived and what it showed, if it did.
    pub answered: Option<Answered>,
}

/// An answer: when it arrived, the revision it was served at, and the keys it showed as of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// When it arrived, on global simulated time.
    pub answered_ms: u64,
    /// The revision it was served at (after the request, for a write).
    pub revision: i64,
    /// Keys shown as of `revision`.
    pub keys: Vec<(Vec<u8>, KeyState)>,
}

impl Answered {
    /// What a transaction's answer shows: the keys its gets read after the branch's last
    /// write (earlier gets saw the state before the revision was complete).
    pub fn of_txn(answered_ms: u64, txn: &Txn, reply: &TxnReply) -> Self {
        let ops = if reply.succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let last_write = ops.iter().rposition(|op| !matches!(op, TxnOp::Get { .. }));
        let keys = (ops.iter().zip(&reply.results).enumerate())
            .filter(|(index, _)| last_write.is_none_or(|w| *index > w))
            .filter_map(|(_, (op, result))| match (op, result) {
                (TxnOp::Get { key }, TxnOpResult::Get(kv)) => Some((key.clone(), kv.clone())),
                _ => None,
            })
            .collect();
        Self {
            answered_ms,
            revision: reply.revision,
            keys,
        }
    }

    /// What a range read's answer shows: the one key asked for (present or not), or every key
    /// a range returned.
    pub fn of_range(answered_ms: u64, request: &RangeRequest, reply: &RangeReply) -> Self {
        let keys = if request.range_end.is_empty() {
            vec![(request.key.clone(), reply.kvs.first().cloned())]
        } else {
            (reply.kvs.iter())
                .map(|kv| (kv.key.clone(), Some(kv.clone())))
                .collect()
        };
        Self {
            answered_ms,
            revision: reply.revision,
            keys,
        }
    }
}

/// Every request of a run, shared by the nodes' connections.
#[derive(Debug, Clone, Default)]
pub struct EtcdHistory {
    ops: Rc<RefCell<Vec<EtcdOp>>>,
}

impl EtcdHistory {
    /// Notes a request sent at `invoked_ms`; returns its index.
    pub fn invoke(&self, invoked_ms: u64) -> usize {
        let mut ops = self.ops.borrow_mut();
        ops.push(EtcdOp {
            invoked_ms,
            answered: None,
        });
        ops.len() - 1
    }

    /// Notes the answer to request `index`.
    pub fn answer(&self, index: usize, answered: Answered) {
        self.ops.borrow_mut()[index].answered = Some(answered);
    }

    /// Every request so far.
    pub fn ops(&self) -> Vec<EtcdOp> {
        self.ops.borrow().clone()
    }
}

/// What [`check_etcd_history`] looked at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EtcdHistoryReport {
    /// Requests answered, each checked.
    pub answered: u64,
    /// Requests never answered (they may or may not have been applied).
    pub unanswered: u64,
    /// Key states compared.
    pub key_states: u64,
}

/// Checks `ops` against the consequences of linearizability listed in the module docs.
pub fn check_etcd_history(ops: &[EtcdOp]) -> Result<EtcdHistoryReport, String> {
    let mut report = EtcdHistoryReport::default();
    let answered: Vec<(u64, &Answered)> = ops
        .iter()
        .filter_map(|op| op.answered.as_ref().map(|a| (op.invoked_ms, a)))
        .collect();
    report.answered = answered.len() as u64;
    report.unanswered = ops.len() as u64 - report.answered;
    check_real_time(&answered)?;
    // Per key, what each revision showed.
    let mut states: BTreeMap<&[u8], BTreeMap<i64, &KeyState>> = BTreeMap::new();
    for (_, answer) in &answered {
        for (key, state) in &answer.keys {
            report.key_states += 1;
            if let Some(kv) = state {
                if kv.mod_revision > answer.revision || kv.create_revision > kv.mod_revision {
                    return Err(format!(
                        "key {} shown as of revision {} was written at {} and created at {}",
                        String::from_utf8_lossy(key),
                        answer.revision,
                        kv.mod_revision,
                        kv.create_revision
                    ));
                }
            }
            let by_revision = states.entry(key.as_slice()).or_default();
            match by_revision.get(&answer.revision) {
                Some(seen) if *seen != state => {
                    return Err(format!(
                        "key {} as of revision {} was shown as {seen:?} and as {state:?}",
                        String::from_utf8_lossy(key),
                        answer.revision
                    ));
                }
                _ => {
                    by_revision.insert(answer.revision, state);
                }
            }
        }
    }
    for (key, by_revision) in &states {
        check_no_write_between(key, by_revision)?;
    }
    Ok(report)
}

/// A request sent after another was answered is served at a revision no earlier.
fn check_real_time(answered: &[(u64, &Answered)]) -> Result<(), String> {
    let mut by_answer: Vec<&Answered> = answered.iter().map(|(_, a)| *a).collect();
    by_answer.sort_by_key(|a| a.answered_ms);
    let mut by_invocation: Vec<&(u64, &Answered)> = answered.iter().collect();
    by_invocation.sort_by_key(|(invoked_ms, _)| *invoked_ms);
    let (mut done, mut highest) = (0, None::<&Answered>);
    for (invoked_ms, answer) in by_invocation {
        while done < by_answer.len() && by_answer[done].answered_ms < *invoked_ms {
            if highest.is_none_or(|h| by_answer[done].revision > h.revision) {
                highest = Some(by_answer[done]);
            }
            done += 1;
        }
        if let Some(earlier) = highest.filter(|h| h.revision > answer.revision) {
            return Err(format!(
                "a request sent at {invoked_ms} ms was served at revision {}, after another \
                 was answered at {} ms from revision {}: a stale read",
                answer.revision, earlier.answered_ms, earlier.revision
            ));
        }
    }
    Ok(())
}

/// A key shown as of `r2` and last written at `m <= r1 <= r2` is what any answer shows as of
/// `r1`.
fn check_no_write_between(
    key: &[u8],
    by_revision: &BTreeMap<i64, &KeyState>,
) -> Result<(), String> {
    for (&r2, state) in by_revision {
        let Some(kv) = state else { continue };
        for (&r1, earlier) in by_revision.range(kv.mod_revision..r2) {
            if earlier.as_ref() != Some(kv) {
                return Err(format!(
                    "key {} was last written at revision {} as of revision {r2}, but as of \
                     revision {r1} it was shown as {earlier:?}",
                    String::from_utf8_lossy(key),
                    kv.mod_revision
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(value: &[u8], create_revision: i64, mod_revision: i64) -> EtcdKeyValue {
        EtcdKeyValue {
            key: b"k".to_vec(),
            value: value.to_vec(),
            create_revision,
            mod_revision,
            version: mod_revision - create_revision + 1,
            lease: 7,
        }
    }

    fn op(invoked_ms: u64, answered_ms: u64, revision: i64, state: KeyState) -> EtcdOp {
        EtcdOp {
            invoked_ms,
            answered: Some(Answered {
                answered_ms,
                revision,
                keys: vec![(b"k".to_vec(), state)],
            }),
        }
    }

    #[test]
    fn a_linearizable_history_passes() {
        let ops = [
            op(0, 2, 1, Some(kv(b"a", 1, 1))),
            op(3, 5, 2, Some(kv(b"a", 1, 2))),
            op(4, 6, 2, Some(kv(b"a", 1, 2))),
            // Concurrent with the write at revision 3: may be served before it.
            op(6, 9, 2, Some(kv(b"a", 1, 2))),
            op(7, 8, 3, None),
            EtcdOp {
                invoked_ms: 10,
                answered: None,
            },
        ];
        let report = check_etcd_history(&ops).unwrap();
        assert_eq!(
            (report.answered, report.unanswered, report.key_states),
            (5, 1, 5)
        );
    }

    #[test]
    fn a_read_served_before_a_write_it_followed_is_rejected() {
        let ops = [op(0, 2, 5, Some(kv(b"a", 5, 5))), op(3, 4, 4, None)];
        let error = check_etcd_history(&ops).unwrap_err();
        assert!(error.contains("stale read"), "{error}");
    }

    #[test]
    fn two_states_at_one_revision_are_rejected() {
        let ops = [
            op(0, 1, 3, Some(kv(b"a", 1, 3))),
            op(0, 1, 3, Some(kv(b"b", 1, 3))),
        ];
        let error = check_etcd_history(&ops).unwrap_err();
        assert!(error.contains("as of revision 3 was shown as"), "{error}");
    }

    #[test]
    fn a_key_written_after_the_revision_it_is_shown_at_is_rejected() {
        let ops = [op(0, 1, 3, Some(kv(b"a", 1, 4)))];
        let error = check_etcd_history(&ops).unwrap_err();
        assert!(error.contains("was written at 4"), "{error}");
    }

    #[test]
    fn a_key_created_after_its_last_write_is_rejected() {
        let ops = [op(0, 1, 5, Some(kv(b"a", 4, 3)))];
        let error = check_etcd_history(&ops).unwrap_err();
        assert!(
            error.contains("was written at 3 and created at 4"),
            "{error}"
        );
    }

    #[test]
    fn a_state_contradicting_a_later_unwritten_key_is_rejected() {
        // Shown as last written at 2 as of revision 6, so as of 4 it must be the same key;
        // an answer showing it absent at 4 contradicts it.
        let ops = [op(0, 1, 4, None), op(0, 1, 6, Some(kv(b"a", 1, 2)))];
        let error = check_etcd_history(&ops).unwrap_err();
        assert!(error.contains("last written at revision 2"), "{error}");
    }

    #[test]
    fn a_transaction_shows_only_the_gets_after_its_last_write() {
        let txn = Txn {
            compares: vec![],
            success: vec![
                TxnOp::get(b"k"),
                TxnOp::put(b"k", b"a", 0),
                TxnOp::get(b"k"),
            ],
            failure: vec![],
        };
        let reply = TxnReply {
            succeeded: true,
            revision: 9,
            results: vec![
                TxnOpResult::Get(None),
                TxnOpResult::Put,
                TxnOpResult::Get(Some(kv(b"a", 9, 9))),
            ],
        };
        let answered = Answered::of_txn(3, &txn, &reply);
        assert_eq!(answered.keys, vec![(b"k".to_vec(), Some(kv(b"a", 9, 9)))]);
    }
}
