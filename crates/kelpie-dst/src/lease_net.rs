//! Leases over the simulated network: nodes reach the store only through [`SimNetwork`].
//!
//! A node's [`NetLeaseStore`] sends each request to the store host and waits for the reply on
//! its own clock, giving up after a timeout with [`StoreError::CommitUnknown`] (the request may
//! have been applied). A keeper's round of several requests ([`LeaseStore::apply_replies`])
//! goes as one message and is answered with one, as a client batching its calls on one
//! connection would send it. The server on the store host ([`serve_leases`]) applies each
//! request to the simulated store with the production decision function, in a storage
//! transaction of its own, and sends the reply back. Messages
//! can be lost, duplicated, delayed and partitioned; a duplicated or delayed request is
//! harmless because acquire is idempotent and renew and release carry the fencing token.
//!
//! A store given a [`History`] (see [`NetLeaseStore::record_history`]) records every request's
//! invocation and outcome there, on global time, for the linearizability check. A server
//! started with [`serve_leases_with_stale_reads`] is deliberately broken: it sometimes decides
//! on the previous version of a record, which that check must catch.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::sim_thread::SimThread;
use kelpie_core::ActorId;
use kelpie_lease::{
    backend::Decision, backend::LeaseRecord, backend::LeaseRequest, backend::LeaseStore,
    backend::RecordSnapshot, backend::StoreSnapshot, Lease, LeaseError, StoreError,
};

use crate::history::{History, OpOutcome};
use crate::sim_lease_store::SimLeaseStore;
use kelpie_sim::DeterministicRng;
use kelpie_sim::SimClock;
use kelpie_sim::SimEnv;
use kelpie_sim::Versioned;
use kelpie_sim::{HostId, SimNetwork};

/// The host the store runs on.
pub const STORE_HOST: HostId = 0;

/// A lease message on the simulated network.
#[derive(Clone)]
pub enum LeaseMessage {
    /// A node asks the store to apply a request.
    Request {
        /// Matches the reply to the request; unique per node incarnation.
        request_id: u64,
        /// The actor.
        actor_id: ActorId,
        /// The request. The store decides it with its own decision function.
        request: LeaseRequest,
        /// What the node asks back.
        wants: Wants,
    },
    /// A node asks the store to apply several requests, each on its own: a keeper's round
    /// ([`LeaseStore::apply_replies`]).
    Round {
        /// Matches the answer to the round; unique per node incarnation.
        request_id: u64,
        /// The requests, each decided by the store in its own atomic step.
        requests: Vec<(ActorId, LeaseRequest)>,
    },
    /// The store's answers to a round, once it has answered all its requests: each request's
    /// reply or the store's failure, in the round's order.
    RoundReplies {
        /// The round answered.
        request_id: u64,
        /// One outcome per request.
        outcomes: Vec<RoundOutcome>,
    },
    /// The store's answer to a request that wants the reply alone.
    Reply {
        /// The request answered.
        request_id: u64,
        /// The decision's reply, or the store's failure.
        outcome: Result<Result<Lease, LeaseError>, StoreError>,
    },
    /// The store's answer to a request that wants the whole decision; boxed, so that the
    /// record it carries does not make every message larger (a message is copied into the
    /// network's queue and out of it: at 88 bytes inline, at 128 through `memcpy`).
    Decision {
        /// The request answered.
        request_id: u64,
        /// The decision, or the store's failure.
        outcome: Box<Result<Decision, StoreError>>,
    },
    /// A node's request to the simulated etcd ([`crate::sim_etcd`]).
    EtcdRequest {
        /// Matches the reply to the request; unique per node incarnation.
        request_id: u64,
        /// The request.
        request: crate::sim_etcd::EtcdRequest,
    },
    /// The simulated etcd's answer.
    EtcdReply {
        /// The request answered.
        request_id: u64,
        /// The answer, or etcd's refusal.
        outcome: Result<crate::sim_etcd::EtcdResponse, kelpie_lease::etcd_api::EtcdApiError>,
    },
}

/// The outcome of one request of a round: its reply, or the store's failure.
pub type RoundOutcome = Result<Result<Lease, LeaseError>, StoreError>;

/// What a lease request asks the store to send back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wants {
    /// The decision's reply alone: what a lease manager hands its caller
    /// ([`LeaseStore::apply_reply`]).
    Reply,
    /// The whole decision, written record included ([`LeaseStore::apply`]).
    Decision,
}

/// An answer as it reached the node, in the form its request wanted.
enum Answered {
    Reply(Result<Result<Lease, LeaseError>, StoreError>),
    Decision(Box<Result<Decision, StoreError>>),
    Round(Vec<RoundOutcome>),
}

impl Answered {
    /// The answer to a request that got none, in the form it wanted.
    fn failed(wants: Wants, error: StoreError) -> Self {
        match wants {
            Wants::Reply => Answered::Reply(Err(error)),
            Wants::Decision => Answered::Decision(Box::new(Err(error))),
        }
    }

    /// The reply, or the store's failure.
    fn reply(&self) -> Result<&Result<Lease, LeaseError>, &StoreError> {
        match self {
            Answered::Reply(outcome) => outcome.as_ref(),
            Answered::Decision(outcome) => outcome.as_ref().as_ref().map(|d| &d.reply),
            Answered::Round(_) => unreachable!("a round's answer has one reply per request"),
        }
    }
}

type Pending = Rc<Replies<Answered>>;

// What the `Decision` variant's box is for: a lease message is copied inline, not by `memcpy`.
const _: () = assert!(std::mem::size_of::<LeaseMessage>() <= 88);

/// The replies one node awaits, by request id; [`route_replies`] hands each arriving reply
/// over. One slot per request, not a channel per request (an allocation and several atomic
/// operations each, for every request of a run). A node's request ids only grow, so the slots
/// are a window of consecutive ids: awaiting opens a slot at the end, and a slot freed at the
/// front drops off. A sorted map shifted its large slots on every removal.
///
/// A request may be awaited until a deadline on the node's clock
/// ([`Replies::expect_until`]). Deadlines follow the ids (the clock never goes back and every
/// request waits as long), so one task per connection ([`watch_deadlines`]) sleeps until the
/// earliest and wakes the requests whose deadline passed: a request sets no timer of its own
/// (registering and removing one cost about 3% of a swarm's instructions).
pub(crate) struct Replies<T> {
    slots: RefCell<ReplyWindow<T>>,
}

/// The slots of ids `first_id .. first_id + len`, in a ring that is reused. A slot is as large
/// as a reply, so it is never moved: awaiting, answering and freeing write its fields where it
/// lies. (A queue of slots copied one in when it was pushed and again when it was popped.)
struct ReplyWindow<T> {
    first_id: u64,
    /// Where the slot of `first_id` is in `ring`.
    head: usize,
    /// How many ids the window spans; the first is awaited, if any is.
    len: usize,
    /// Empty or a power of two long. Every slot not awaited is vacant: no reply, no waker.
    ring: Vec<ReplySlot<T>>,
    /// The deadline of the last id awaited: the next one's is no earlier.
    last_deadline_local_ms: u64,
    /// The deadline watcher, while it waits for a request with a deadline ahead.
    watcher: Option<Waker>,
    /// Set when the connection is gone: the watcher ends.
    closed: bool,
}

impl<T> ReplyWindow<T> {
    /// Where `request_id`'s slot is in the ring, if the window spans it.
    fn place(&self, request_id: u64) -> Option<usize> {
        let offset = usize::try_from(request_id.checked_sub(self.first_id)?).ok()?;
        (offset < self.len).then(|| (self.head + offset) & (self.ring.len() - 1))
    }

    /// The slot of `request_id`, if it is awaited.
    fn get_mut(&mut self, request_id: u64) -> Option<&mut ReplySlot<T>> {
        let place = self.place(request_id)?;
        let slot = &mut self.ring[place];
        slot.awaited.then_some(slot)
    }

    /// Extends the window to `request_id`, past its end, and awaits that id until
    /// `deadline_local_ms`.
    fn open(&mut self, request_id: u64, deadline_local_ms: u64) {
        if self.len == 0 {
            self.first_id = request_id;
        }
        let len = usize::try_from(request_id - self.first_id + 1)
            .expect("a node's awaited ids span less than memory");
        if len > self.ring.len() {
            self.grow(len);
        }
        self.len = len;
        let place = (self.head + len - 1) & (self.ring.len() - 1);
        let slot = &mut self.ring[place];
        debug_assert!(slot.is_vacant(), "a slot past the window is vacant");
        slot.awaited = true;
        slot.deadline_local_ms = deadline_local_ms;
    }

    /// A ring of at least `len` slots, the window's first at its start.
    fn grow(&mut self, len: usize) {
        let mut ring = std::mem::take(&mut self.ring);
        ring.rotate_left(self.head);
        let slots = len.next_power_of_two().max(REPLY_SLOTS_MIN);
        ring.resize_with(slots, ReplySlot::vacant);
        self.ring = ring;
        self.head = 0;
    }

    /// Frees the slot of `request_id`, returning its reply; then the vacant slots at the
    /// front leave the window.
    fn free(&mut self, request_id: u64) -> Option<T> {
        let place = self.place(request_id)?;
        let slot = &mut self.ring[place];
        slot.awaited = false;
        slot.due = false;
        slot.waker = None;
        let reply = slot.reply.take();
        let mask = self.ring.len() - 1;
        while self.len > 0 && !self.ring[self.head].awaited {
            debug_assert!(self.ring[self.head].is_vacant());
            self.head = (self.head + 1) & mask;
            self.len -= 1;
            self.first_id += 1;
        }
        reply
    }

    /// Marks every awaited request whose deadline is at or before `now_local_ms`, and which
    /// has no reply yet, as due, and hands over its waker. Returns the earliest deadline still
    /// ahead, if any. Deadlines follow the ids, so the walk stops at the first one ahead.
    fn mark_due(&mut self, now_local_ms: u64, wakers: &mut Vec<Waker>) -> Option<u64> {
        let mask = self.ring.len().wrapping_sub(1);
        for offset in 0..self.len {
            let slot = &mut self.ring[(self.head + offset) & mask];
            if !slot.awaited || slot.reply.is_some() || slot.due {
                continue;
            }
            if slot.deadline_local_ms > now_local_ms {
                return Some(slot.deadline_local_ms);
            }
            slot.due = true;
            wakers.extend(slot.waker.take());
        }
        None
    }
}

/// The ring's smallest size: most nodes await a few requests at a time.
const REPLY_SLOTS_MIN: usize = 8;

struct ReplySlot<T> {
    awaited: bool,
    /// The request gives up once the node's clock reads this, if no reply came by then.
    deadline_local_ms: u64,
    /// The deadline passed without a reply: the request gives up when next polled (a reply
    /// arriving before then still wins).
    due: bool,
    reply: Option<T>,
    waker: Option<Waker>,
}

impl<T> ReplySlot<T> {
    fn vacant() -> Self {
        Self {
            awaited: false,
            deadline_local_ms: NO_DEADLINE,
            due: false,
            reply: None,
            waker: None,
        }
    }

    fn is_vacant(&self) -> bool {
        !self.awaited && !self.due && self.reply.is_none() && self.waker.is_none()
    }
}

/// The deadline of a request awaited with none.
const NO_DEADLINE: u64 = u64::MAX;

impl<T> Default for Replies<T> {
    fn default() -> Self {
        Self {
            slots: RefCell::new(ReplyWindow {
                first_id: 0,
                head: 0,
                len: 0,
                ring: Vec::new(),
                last_deadline_local_ms: 0,
                watcher: None,
                closed: false,
            }),
        }
    }
}

impl<T> Replies<T> {
    /// Expects a reply to `request_id`, which is greater than every id awaited before: the
    /// future resolves with the first reply to arrive. Dropping it forgets the request, so a
    /// later reply is dropped, as a real client drops the response to a call it gave up on.
    pub(crate) fn expect(&self, request_id: u64) -> AwaitReply<'_, T> {
        self.expect_until(request_id, NO_DEADLINE)
    }

    /// As [`Replies::expect`], but the request gives up (the future resolves to `None`) once
    /// the node's clock reads `deadline_local_ms` without a reply, if [`watch_deadlines`]
    /// watches this connection. `deadline_local_ms` is no earlier than any awaited before.
    pub(crate) fn expect_until(
        &self,
        request_id: u64,
        deadline_local_ms: u64,
    ) -> AwaitReply<'_, T> {
        let mut window = self.slots.borrow_mut();
        // Freed slots leave the front with their ids, so this holds for every id ever awaited.
        let end_id = window.first_id + window.len as u64;
        assert!(
            request_id >= end_id,
            "request id {request_id} awaited after id {} was",
            end_id.saturating_sub(1)
        );
        assert!(
            deadline_local_ms >= window.last_deadline_local_ms,
            "request {request_id}'s deadline {deadline_local_ms} ms is before the last one's, {} ms",
            window.last_deadline_local_ms
        );
        window.last_deadline_local_ms = deadline_local_ms;
        window.open(request_id, deadline_local_ms);
        let watcher = match deadline_local_ms {
            NO_DEADLINE => None,
            _ => window.watcher.take(),
        };
        drop(window);
        if let Some(watcher) = watcher {
            watcher.wake();
        }
        AwaitReply {
            replies: self,
            request_id,
            answered: false,
        }
    }

    /// The watcher's step at `now_local_ms`: wakes the requests whose deadline passed, and
    /// gives the earliest deadline still ahead to sleep until; with none ahead, it waits
    /// until a request with a deadline is awaited. `None` once the connection is closed.
    fn poll_deadlines(&self, now_local_ms: u64, cx: &mut Context<'_>) -> Poll<Option<u64>> {
        let mut wakers = Vec::new();
        let next = {
            let mut window = self.slots.borrow_mut();
            if window.closed {
                return Poll::Ready(None);
            }
            let next = window.mark_due(now_local_ms, &mut wakers);
            if next.is_none() {
                window.watcher = Some(cx.waker().clone());
            }
            next
        };
        // Outside the borrow: a woken request frees its slot.
        wakers.into_iter().for_each(Waker::wake);
        match next {
            Some(deadline_local_ms) => Poll::Ready(Some(deadline_local_ms)),
            None => Poll::Pending,
        }
    }

    /// The connection is gone: its watcher ends.
    fn close(&self) {
        let watcher = {
            let mut window = self.slots.borrow_mut();
            window.closed = true;
            window.watcher.take()
        };
        if let Some(watcher) = watcher {
            watcher.wake();
        }
    }

    /// Hands `reply` to the request waiting for it. Dropped if none is (it gave up, or it
    /// is an earlier incarnation's), and if the request has its reply already (a duplicate).
    fn deliver(&self, request_id: u64, reply: T) {
        let waker = {
            let mut window = self.slots.borrow_mut();
            let Some(slot) = window.get_mut(request_id) else {
                return;
            };
            if slot.reply.is_some() {
                return;
            }
            slot.reply = Some(reply);
            slot.waker.take()
        };
        // Outside the borrow: waking may run code that awaits another reply.
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// How many slots are kept, vacant ones between awaited ids included.
    #[cfg(test)]
    fn slots_kept(&self) -> usize {
        self.slots.borrow().len
    }
}

/// Wakes the requests awaited on `replies` whose deadline passed on `clock` (see
/// [`Replies::expect_until`]), until the connection closes ([`Replies::close`]). One timer at a
/// time: it sleeps until the earliest deadline it saw; a request answered before then changes
/// nothing, and on waking it sleeps on until the next deadline ahead.
async fn watch_deadlines<T>(replies: Rc<Replies<T>>, clock: SimClock) {
    loop {
        let next = std::future::poll_fn(|cx| replies.poll_deadlines(clock.now_ms(), cx)).await;
        let Some(deadline_local_ms) = next else {
            return;
        };
        clock.sleep_until_local(deadline_local_ms).await;
    }
}

/// The reply to one request; see [`Replies::expect`]. `None` if its deadline passed first.
pub(crate) struct AwaitReply<'a, T> {
    replies: &'a Replies<T>,
    request_id: u64,
    answered: bool,
}

impl<T> Future for AwaitReply<'_, T> {
    type Output = Option<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        assert!(!self.answered, "a reply awaited after it arrived");
        let mut slots = self.replies.slots.borrow_mut();
        let slot = slots
            .get_mut(self.request_id)
            .expect("an awaited request's slot lives until its reply or its drop");
        if slot.reply.is_none() && !slot.due {
            match &mut slot.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waker => *waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        // The reply if it came, even after the deadline passed; else the request gives up.
        let reply = slots.free(self.request_id);
        drop(slots);
        self.answered = true;
        Poll::Ready(reply)
    }
}

impl<T> Drop for AwaitReply<'_, T> {
    fn drop(&mut self) {
        if !self.answered {
            self.replies.slots.borrow_mut().free(self.request_id);
        }
    }
}

struct NetInner {
    network: SimNetwork<LeaseMessage>,
    host: HostId,
    clock: SimClock,
    timeout_ms: u64,
    /// Why a request timed out, written once: a timeout clones it.
    timeout_reason: String,
    pending: Pending,
    next_request_id: Cell<u64>,
    truth: SimLeaseStore,
    history: RefCell<Option<History>>,
}

/// A node's view of the lease store, across the simulated network.
pub struct NetLeaseStore {
    inner: SimThread<Rc<NetInner>>,
}

impl NetLeaseStore {
    /// The store as seen from `host` (incarnation `incarnation`), timing out requests after
    /// `timeout_ms` on the node's `clock`. Replies arriving at `host` go to this connection
    /// from now on (the host's network handler); those to an earlier incarnation's requests are
    /// dropped. `truth` serves administrative scans.
    pub fn connect(
        network: SimNetwork<LeaseMessage>,
        host: HostId,
        incarnation: u32,
        clock: SimClock,
        timeout_ms: u64,
        truth: SimLeaseStore,
    ) -> Self {
        let pending: Pending = Rc::default();
        let reply = |message| match message {
            LeaseMessage::Reply {
                request_id,
                outcome,
            } => Some((request_id, Answered::Reply(outcome))),
            LeaseMessage::Decision {
                request_id,
                outcome,
            } => Some((request_id, Answered::Decision(outcome))),
            LeaseMessage::RoundReplies {
                request_id,
                outcomes,
            } => Some((request_id, Answered::Round(outcomes))),
            _ => None,
        };
        route_replies(&network, host, Rc::clone(&pending), reply);
        let watcher = watch_deadlines(Rc::clone(&pending), clock.clone());
        network.env().spawn_detached(watcher);
        let first_id = u64::from(incarnation) << 32;
        let inner = NetInner {
            network,
            host,
            clock,
            timeout_ms,
            timeout_reason: format!("no reply within {timeout_ms} ms"),
            pending,
            next_request_id: Cell::new(first_id),
            truth,
            history: RefCell::new(None),
        };
        Self {
            inner: SimThread::new(Rc::new(inner)),
        }
    }

    /// Records every request from now on in `history`: its invocation and outcome, on global
    /// simulated time.
    pub fn record_history(&self, history: History) {
        *self.inner.history.borrow_mut() = Some(history);
    }
}

/// From now on, hands each reply arriving at `host` (as `reply_of` reads it from a message)
/// to the request waiting for it, at its delivery: the host's network handler, replacing the
/// previous incarnation's. A reply nobody waits for (timed out, duplicated, or for an earlier
/// incarnation) is dropped, as a real client drops a response to a cancelled call. Shared by
/// the lease store's and the simulated etcd's connections.
pub(crate) fn route_replies<T: 'static>(
    network: &SimNetwork<LeaseMessage>,
    host: HostId,
    pending: Rc<Replies<T>>,
    reply_of: impl Fn(LeaseMessage) -> Option<(u64, T)> + 'static,
) {
    network.set_handler(host, move |_, message| {
        if let Some((request_id, outcome)) = reply_of(message) {
            pending.deliver(request_id, outcome);
        }
    });
}

impl NetInner {
    async fn call(
        self: Rc<Self>,
        actor_id: ActorId,
        request: LeaseRequest,
        wants: Wants,
    ) -> Answered {
        let history = self.history.borrow().clone();
        let recorded = history.map(|history| {
            let id = history.invoke(&actor_id, &request, self.clock.global_now_ms());
            (history, id)
        });
        let message = |request_id| LeaseMessage::Request {
            request_id,
            actor_id,
            request,
            wants,
        };
        let answered = match self.exchange(message).await {
            Some(answered) => answered,
            None => Answered::failed(wants, self.timed_out()),
        };
        if let Some((history, id)) = recorded {
            let responded_ms = self.clock.global_now_ms();
            history.respond(id, op_outcome(answered.reply(), responded_ms));
        }
        answered
    }

    /// Sends a round as one message and waits for its answers, up to the timeout.
    async fn call_round(
        self: Rc<Self>,
        requests: Vec<(ActorId, LeaseRequest)>,
    ) -> Vec<RoundOutcome> {
        if requests.is_empty() {
            return Vec::new();
        }
        let history = self.history.borrow().clone();
        let recorded = history.map(|history| {
            let invoked_ms = self.clock.global_now_ms();
            let ids: Vec<_> = requests
                .iter()
                .map(|(actor_id, request)| history.invoke(actor_id, request, invoked_ms))
                .collect();
            (history, ids)
        });
        let count = requests.len();
        let message = |request_id| LeaseMessage::Round {
            request_id,
            requests,
        };
        let outcomes = match self.exchange(message).await {
            Some(Answered::Round(outcomes)) => outcomes,
            Some(_) => unreachable!("the store answers a round with the round's replies"),
            None => vec![Err(self.timed_out()); count],
        };
        assert_eq!(outcomes.len(), count, "one outcome per request of a round");
        if let Some((history, ids)) = recorded {
            let responded_ms = self.clock.global_now_ms();
            for (id, outcome) in ids.into_iter().zip(&outcomes) {
                history.respond(id, op_outcome(outcome.as_ref(), responded_ms));
            }
        }
        outcomes
    }

    /// Sends the message `message` builds with a fresh request id and waits for its answer,
    /// up to the timeout: `None` if none came (one arriving later is dropped with its slot).
    async fn exchange(&self, message: impl FnOnce(u64) -> LeaseMessage) -> Option<Answered> {
        let request_id = self.next_request_id.get();
        self.next_request_id.set(request_id + 1);
        let deadline_local_ms = self.clock.now_ms().saturating_add(self.timeout_ms);
        let reply = self.pending.expect_until(request_id, deadline_local_ms);
        self.network
            .send(self.host, STORE_HOST, message(request_id));
        reply.await
    }

    /// What a request whose answer did not come in time ends with: it may have been applied.
    fn timed_out(&self) -> StoreError {
        StoreError::CommitUnknown {
            reason: self.timeout_reason.clone(),
        }
    }
}

/// A request's outcome as the history records it.
fn op_outcome(
    reply: Result<&Result<Lease, LeaseError>, &StoreError>,
    responded_ms: u64,
) -> OpOutcome {
    match reply {
        Ok(reply) => OpOutcome::Returned {
            responded_ms,
            reply: reply.clone(),
        },
        Err(error) => OpOutcome::Failed {
            responded_ms,
            error: error.clone(),
        },
    }
}

impl Drop for NetInner {
    fn drop(&mut self) {
        self.pending.close();
    }
}

impl LeaseStore for NetLeaseStore {
    async fn apply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> Result<Decision, StoreError> {
        let inner = Rc::clone(&self.inner);
        let call = inner.call(actor_id.clone(), request.clone(), Wants::Decision);
        match SimThread::new(call).await {
            Answered::Decision(outcome) => *outcome,
            Answered::Reply(_) | Answered::Round(_) => {
                unreachable!("the store answers a request as it wants")
            }
        }
    }

    /// The reply alone crosses the network: a smaller message than the whole decision.
    async fn apply_reply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> Result<Result<Lease, LeaseError>, StoreError> {
        let inner = Rc::clone(&self.inner);
        let call = inner.call(actor_id.clone(), request.clone(), Wants::Reply);
        match SimThread::new(call).await {
            Answered::Reply(outcome) => outcome,
            Answered::Decision(_) | Answered::Round(_) => {
                unreachable!("the store answers a request as it wants")
            }
        }
    }

    /// The round crosses the network as one message, and its answers as one.
    async fn apply_replies(&self, requests: Vec<(ActorId, LeaseRequest)>) -> Vec<RoundOutcome> {
        let inner = Rc::clone(&self.inner);
        SimThread::new(inner.call_round(requests)).await
    }

    async fn load(&self, actor_id: &ActorId) -> Result<RecordSnapshot, StoreError> {
        let truth = self.inner.truth.clone();
        let actor_id = actor_id.clone();
        SimThread::new(async move { truth.load(&actor_id).await }).await
    }

    async fn scan(&self) -> Result<StoreSnapshot, StoreError> {
        let truth = self.inner.truth.clone();
        SimThread::new(async move { truth.scan().await }).await
    }
}

/// Serves lease requests arriving at [`STORE_HOST`] from now on: each is applied to the
/// simulated store and answered when the store replies. No task runs the server: the store
/// host's network handler submits each request as it arrives, and the store's timed events
/// carry it ([`kelpie_sim::SimStorage::transact_then`]), so one slow write does not hold up
/// the others, and a request costs no task, future or poll.
pub fn serve_leases(network: &SimNetwork<LeaseMessage>, store: SimLeaseStore) {
    serve(network, move |actor_id, request, answer| {
        store.apply_then(actor_id, request, move |outcome| answer.send(outcome));
    });
}

/// Probability that the stale-read server decides a request on the previous version of the
/// record rather than the current one.
pub const STALE_READ_PROBABILITY: f64 = 0.2;

/// Like [`serve_leases`] (but with a task per request), and deliberately broken: with
/// probability [`STALE_READ_PROBABILITY`] (drawn from the seed) a request is decided on the
/// record as it was before its latest write, as a store reading from a lagging replica would,
/// and the decision is written over the current record. Decisions it makes this way do not
/// reach the decision-level checkers; the linearizability check must catch it.
pub fn serve_leases_with_stale_reads(
    env: &SimEnv,
    network: &SimNetwork<LeaseMessage>,
    store: SimLeaseStore,
) {
    let stale = StaleReads {
        rng: Rc::new(RefCell::new(env.rng("lease-net/stale-reads"))),
        previous: Rc::default(),
    };
    let env = env.clone();
    serve(network, move |actor_id, request, answer| {
        let (stale, store) = (stale.clone(), store.clone());
        // Detached: the reply is sent when the store answers.
        env.spawn_detached(async move {
            answer.send(stale.apply(&store, &actor_id, &request).await);
        });
    });
}

/// Where the answer to one request goes, and in what form.
enum Answer {
    /// A request of its own: answered with a message of its own.
    One {
        network: SimNetwork<LeaseMessage>,
        to: HostId,
        request_id: u64,
        wants: Wants,
    },
    /// The `index`th request of a round, answered with the round.
    InRound {
        round: Rc<RoundAnswer>,
        index: usize,
    },
}

impl Answer {
    fn send(self, outcome: Result<Decision, StoreError>) {
        match self {
            Answer::One {
                network,
                to,
                request_id,
                wants,
            } => {
                let answer = match wants {
                    Wants::Reply => LeaseMessage::Reply {
                        request_id,
                        outcome: outcome.map(|decision| decision.reply),
                    },
                    Wants::Decision => LeaseMessage::Decision {
                        request_id,
                        outcome: Box::new(outcome),
                    },
                };
                network.send(STORE_HOST, to, answer);
            }
            Answer::InRound { round, index } => round.answer(index, outcome),
        }
    }
}

/// A round the store is answering: its answers so far, sent together once every request has
/// one (the storage answers each, a crash with `Unavailable`).
struct RoundAnswer {
    network: SimNetwork<LeaseMessage>,
    to: HostId,
    request_id: u64,
    outcomes: RefCell<Vec<Option<RoundOutcome>>>,
    unanswered: Cell<usize>,
}

impl RoundAnswer {
    fn answer(&self, index: usize, outcome: Result<Decision, StoreError>) {
        let answered = {
            let mut outcomes = self.outcomes.borrow_mut();
            assert!(
                outcomes[index].is_none(),
                "request {index} of a round answered twice"
            );
            outcomes[index] = Some(outcome.map(|decision| decision.reply));
            let unanswered = self.unanswered.get() - 1;
            self.unanswered.set(unanswered);
            if unanswered > 0 {
                return;
            }
            std::mem::take(&mut *outcomes)
        };
        let outcomes = answered
            .into_iter()
            .map(|outcome| outcome.expect("every request of the round answered"))
            .collect();
        let answer = LeaseMessage::RoundReplies {
            request_id: self.request_id,
            outcomes,
        };
        self.network.send(STORE_HOST, self.to, answer);
    }
}

/// Sets the store host's handler: each lease request arriving goes to `apply`, with where
/// its answer goes (each request of a round on its own, answered with the round); anything
/// else is ignored.
fn serve(
    network: &SimNetwork<LeaseMessage>,
    apply: impl Fn(ActorId, LeaseRequest, Answer) + 'static,
) {
    let replies = network.clone();
    network.set_handler(STORE_HOST, move |from, message| match message {
        LeaseMessage::Request {
            request_id,
            actor_id,
            request,
            wants,
        } => {
            let answer = Answer::One {
                network: replies.clone(),
                to: from,
                request_id,
                wants,
            };
            apply(actor_id, request, answer);
        }
        LeaseMessage::Round {
            request_id,
            requests,
        } => {
            let round = Rc::new(RoundAnswer {
                network: replies.clone(),
                to: from,
                request_id,
                outcomes: RefCell::new(requests.iter().map(|_| None).collect()),
                unanswered: Cell::new(requests.len()),
            });
            for (index, (actor_id, request)) in requests.into_iter().enumerate() {
                let round = Rc::clone(&round);
                apply(actor_id, request, Answer::InRound { round, index });
            }
        }
        _ => {}
    });
}

/// The version a write created, and the record it replaced.
type PreviousRecord = (u64, Option<LeaseRecord>);

/// The stale-read server's memory: per actor, the record before its latest write, with the
/// version that write created (so a failed write does not leave a wrong "previous").
#[derive(Clone)]
struct StaleReads {
    rng: Rc<RefCell<DeterministicRng>>,
    previous: Rc<RefCell<BTreeMap<ActorId, PreviousRecord>>>,
}

impl StaleReads {
    async fn apply(
        &self,
        store: &SimLeaseStore,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> Result<Decision, StoreError> {
        let decide = store.decide_fn();
        let stale_draw = self.rng.borrow_mut().gen_bool(STALE_READ_PROBABILITY);
        let previous = Rc::clone(&self.previous);
        let key = actor_id.as_str().to_string();
        let step = |current: Option<&Versioned<LeaseRecord>>, now_ms: u64| {
            let version = current.map_or(0, |v| v.version);
            let fresh = current.map(|v| v.value.clone());
            let mut previous = previous.borrow_mut();
            let stale = previous
                .get(actor_id)
                .filter(|(after, _)| *after == version)
                .map(|(_, record)| record.clone());
            let seen = match stale {
                Some(record) if stale_draw => record,
                _ => fresh.clone(),
            };
            let decision = decide(actor_id, seen.as_ref(), request, now_ms);
            // Logged as the request it is, with the reply it got: the check must find that the
            // reply does not follow.
            let decided = (&decision.reply, decision.write.is_some());
            store.log_effect(actor_id, request, current, now_ms, decided);
            if decision.write.is_some() {
                previous.insert(actor_id.clone(), (version + 1, fresh));
            }
            (decision.write.clone(), decision)
        };
        let outcome = store.storage().transact(&key, step).await;
        outcome.map_err(crate::sim_lease_store::store_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::collections::VecDeque;
    use std::task::Waker;

    fn poll<T>(reply: &mut AwaitReply<'_, T>) -> Poll<Option<T>> {
        Pin::new(reply).poll(&mut Context::from_waker(Waker::noop()))
    }

    /// Each awaited id gets its first reply and only that; replies to ids nobody awaits (never,
    /// or no longer) are dropped; freed slots at the front are let go, so the window spans only
    /// the ids still awaited.
    #[test]
    fn replies_reach_only_their_awaited_request() {
        let replies = Replies::default();
        let mut first = replies.expect(10);
        let mut second = replies.expect(11);
        // A gap: id 12 is never awaited.
        let mut fourth = replies.expect(13);
        assert_eq!(replies.slots_kept(), 4);
        assert!(poll(&mut first).is_pending());

        replies.deliver(12, "to nobody");
        replies.deliver(9, "before the window");
        replies.deliver(14, "after the window");
        replies.deliver(11, "second");
        replies.deliver(11, "a duplicate");
        assert_eq!(poll(&mut second), Poll::Ready(Some("second")));
        drop(second);
        assert_eq!(
            replies.slots_kept(),
            4,
            "id 10 is still awaited at the front"
        );

        // Giving up on the front frees it and the vacant slots behind it.
        drop(first);
        assert_eq!(replies.slots_kept(), 1);
        replies.deliver(10, "too late");
        assert!(poll(&mut fourth).is_pending());
        replies.deliver(13, "fourth");
        assert_eq!(fourth.now_or_never(), Some(Some("fourth")));
        assert_eq!(replies.slots_kept(), 0);

        // An empty window starts again at any later id.
        let mut later = replies.expect(1_000);
        replies.deliver(1_000, "later");
        assert_eq!(poll(&mut later), Poll::Ready(Some("later")));
    }

    /// The window's ring wraps around as ids come and go, and grows (in id order) when more
    /// ids are awaited at once than it holds: every reply still reaches its own id.
    #[test]
    fn the_ring_wraps_and_grows_with_each_reply_kept_by_its_id() {
        let replies = Replies::default();
        let mut awaiting = VecDeque::new();
        let mut next_id = 100_u64;
        // Five awaited at a time, the oldest answered each round: the front walks round the
        // ring and stops mid-ring.
        for _ in 0..5 {
            awaiting.push_back((next_id, replies.expect(next_id)));
            next_id += 1;
        }
        for _ in 0..3 * REPLY_SLOTS_MIN + 3 {
            let (id, mut oldest) = awaiting.pop_front().expect("five awaited");
            replies.deliver(id, id * 10);
            assert_eq!(poll(&mut oldest), Poll::Ready(Some(id * 10)));
            drop(oldest);
            awaiting.push_back((next_id, replies.expect(next_id)));
            next_id += 1;
            assert_eq!(replies.slots_kept(), 5);
        }
        // One of them answered early, and one given up on: the slots differ before the ring
        // grows to four times its first size, from a front in mid-ring.
        let (early_id, _) = awaiting[1];
        replies.deliver(early_id, early_id * 10);
        let (given_up_id, given_up) = awaiting.remove(3).expect("five awaited");
        drop(given_up);
        for _ in 0..4 * REPLY_SLOTS_MIN {
            awaiting.push_back((next_id, replies.expect(next_id)));
            next_id += 1;
        }
        // The given-up id is no longer awaited, but the window still spans its vacant slot.
        assert_eq!(replies.slots_kept(), awaiting.len() + 1);
        replies.deliver(given_up_id, 0);
        let (_, mut early) = awaiting.remove(1).expect("the early one");
        assert_eq!(poll(&mut early), Poll::Ready(Some(early_id * 10)));
        for (id, reply) in &mut awaiting {
            assert!(poll(reply).is_pending(), "id {id} has no reply yet");
        }
        // Answered newest first, so the front stays until the end.
        for (id, _) in awaiting.iter().rev() {
            replies.deliver(*id, *id * 10);
        }
        for (id, reply) in &mut awaiting {
            assert_eq!(poll(reply), Poll::Ready(Some(*id * 10)));
        }
        drop(awaiting);
        assert_eq!(replies.slots_kept(), 0);
    }

    #[test]
    #[should_panic(expected = "awaited after")]
    fn an_id_awaited_out_of_order_is_a_bug() {
        let replies = Replies::<()>::default();
        let _second = replies.expect(2);
        let _first = replies.expect(1);
    }

    /// A waker that counts its wakes.
    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountWakes {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The deadline watcher's steps: it wakes exactly the requests whose deadline passed
    /// without a reply, and they give up; a reply that arrives after the deadline but before
    /// the request is polled still wins; with no deadline ahead the watcher waits, a request
    /// with a deadline wakes it, and closing the connection ends it.
    #[test]
    fn the_watcher_wakes_only_requests_past_their_deadline() {
        let replies = Replies::default();
        let (mut first, mut second, mut third) = (
            replies.expect_until(1, 100),
            replies.expect_until(2, 150),
            replies.expect_until(3, 150),
        );
        let request_wakes = std::sync::Arc::new(CountWakes(Default::default()));
        let request_waker = Waker::from(std::sync::Arc::clone(&request_wakes));
        let mut request_cx = Context::from_waker(&request_waker);
        for reply in [&mut first, &mut second, &mut third] {
            assert!(Pin::new(reply).poll(&mut request_cx).is_pending());
        }
        let watcher_wakes = std::sync::Arc::new(CountWakes(Default::default()));
        let watcher_waker = Waker::from(std::sync::Arc::clone(&watcher_wakes));
        let mut watcher_cx = Context::from_waker(&watcher_waker);
        let wakes =
            |count: &std::sync::Arc<CountWakes>| count.0.load(std::sync::atomic::Ordering::Relaxed);

        // Before the first deadline nobody is woken; at it, only the first request.
        assert_eq!(
            replies.poll_deadlines(99, &mut watcher_cx),
            Poll::Ready(Some(100))
        );
        assert_eq!(wakes(&request_wakes), 0);
        assert_eq!(
            replies.poll_deadlines(100, &mut watcher_cx),
            Poll::Ready(Some(150))
        );
        assert_eq!(wakes(&request_wakes), 1);
        assert_eq!(poll(&mut first), Poll::Ready(None), "the first gives up");
        assert!(
            poll(&mut second).is_pending(),
            "the second's deadline is ahead"
        );

        // The second is answered in time; the third's reply comes after its deadline passed
        // but before it is polled: both get their replies. Nothing is ahead: the watcher waits.
        replies.deliver(2, "second");
        assert_eq!(replies.poll_deadlines(150, &mut watcher_cx), Poll::Pending);
        assert_eq!(wakes(&request_wakes), 2, "only the third is woken");
        replies.deliver(3, "third, late");
        assert_eq!(poll(&mut second), Poll::Ready(Some("second")));
        assert_eq!(poll(&mut third), Poll::Ready(Some("third, late")));
        assert_eq!(replies.slots_kept(), 0);

        // A request with a deadline wakes the waiting watcher; closing the connection ends it.
        assert_eq!(wakes(&watcher_wakes), 0);
        let _fourth = replies.expect_until(4, 400);
        assert_eq!(wakes(&watcher_wakes), 1);
        assert_eq!(
            replies.poll_deadlines(200, &mut watcher_cx),
            Poll::Ready(Some(400))
        );
        replies.close();
        assert_eq!(
            replies.poll_deadlines(200, &mut watcher_cx),
            Poll::Ready(None)
        );

        // A request without a deadline (the simulated etcd's) leaves a waiting watcher be.
        let replies = Replies::<()>::default();
        assert_eq!(replies.poll_deadlines(0, &mut watcher_cx), Poll::Pending);
        let _no_deadline = replies.expect(1);
        assert_eq!(wakes(&watcher_wakes), 1);
        replies.close();
        assert_eq!(wakes(&watcher_wakes), 2, "closing wakes it");
    }

    /// A deadline earlier than the last one awaited would let the watcher miss it.
    #[test]
    #[should_panic(expected = "before the last one's")]
    fn a_deadline_earlier_than_the_last_is_a_bug() {
        let replies = Replies::<()>::default();
        let _later = replies.expect_until(1, 200);
        let _earlier = replies.expect_until(2, 100);
    }

    /// Over the simulated network, a request nobody answers gives up when the node's clock
    /// reads its send time plus the timeout, also when that clock jumps meanwhile; the
    /// connection's watcher ends with the connection.
    #[test]
    fn an_unanswered_request_gives_up_at_its_deadline_on_the_nodes_clock() {
        use kelpie_lease::backend::LeaseOp;
        use kelpie_sim::{SimConfig, Simulation};
        Simulation::new(SimConfig::new(1))
            .run(|env| async move {
                // No server: requests reach the store host and nobody answers.
                let network = env.network::<LeaseMessage>(2);
                let clock = env.node_clock(0, 0);
                let tasks_before = env.tasks_alive();
                let truth = SimLeaseStore::new(env.storage());
                let store = NetLeaseStore::connect(network, 1, 1, clock.clone(), 50, truth);
                assert_eq!(env.tasks_alive(), tasks_before + 1, "the watcher runs");
                let actor_id = ActorId::new("actor").unwrap();
                let request = LeaseRequest {
                    op: LeaseOp::Acquire,
                    node_id: kelpie_core::NodeId::new("node-1").unwrap(),
                    lease_duration_ms: 1_000,
                    fencing_token: None,
                };
                let timed_out = |outcome: Result<Decision, StoreError>| match outcome {
                    Err(StoreError::CommitUnknown { reason }) => reason == "no reply within 50 ms",
                    _ => false,
                };

                let start_ms = env.now_ms();
                assert!(timed_out(store.apply(&actor_id, &request).await));
                assert_eq!(env.now_ms() - start_ms, 50);
                // Also where the request wants the reply alone.
                let start_ms = env.now_ms();
                let reply = store.apply_reply(&actor_id, &request).await;
                assert!(timed_out(
                    reply.map(|reply| Decision { write: None, reply })
                ));
                assert_eq!(env.now_ms() - start_ms, 50);

                // 20 ms in, the node's clock jumps 25 ms: it reads the deadline 5 ms later.
                let jump = {
                    let (env, clock) = (env.clone(), clock.clone());
                    env.clone().spawn(async move {
                        env.sleep_ms(20).await;
                        clock.jump_forward(25);
                    })
                };
                let start_ms = env.now_ms();
                assert!(timed_out(store.apply(&actor_id, &request).await));
                assert_eq!(env.now_ms() - start_ms, 25);
                jump.await.unwrap();

                drop(store);
                env.yield_now().await;
                assert_eq!(env.tasks_alive(), tasks_before, "the watcher ended");
                Ok::<(), String>(())
            })
            .expect("the simulation runs");
    }

    /// A node's connection (host 1, timeout 1 s) to a served store, recording its requests.
    fn connect_served(
        env: &SimEnv,
    ) -> (
        SimNetwork<LeaseMessage>,
        SimLeaseStore,
        NetLeaseStore,
        History,
    ) {
        let network = env.network::<LeaseMessage>(2);
        let truth = SimLeaseStore::new(env.storage());
        serve_leases(&network, truth.clone());
        let clock = env.node_clock(0, 0);
        let store = NetLeaseStore::connect(network.clone(), 1, 1, clock, 1_000, truth.clone());
        let history = History::new();
        store.record_history(history.clone());
        (network, truth, store, history)
    }

    /// A request that wants the whole decision gets it, written record included; one that
    /// wants the reply alone gets the reply the store gave. Both are recorded in the history
    /// with the reply the node saw.
    #[test]
    fn the_store_answers_each_request_in_the_form_it_wants() {
        use kelpie_lease::backend::LeaseOp;
        use kelpie_sim::{SimConfig, Simulation};
        Simulation::new(SimConfig::new(1))
            .run(|env| async move {
                let (_, truth, store, history) = connect_served(&env);
                let actor_id = ActorId::new("actor").unwrap();
                let node_id = kelpie_core::NodeId::new("node-1").unwrap();
                let acquire = LeaseRequest {
                    op: LeaseOp::Acquire,
                    node_id: node_id.clone(),
                    lease_duration_ms: 1_000,
                    fencing_token: None,
                };
                let decision = store.apply(&actor_id, &acquire).await.unwrap();
                let lease = decision.reply.clone().unwrap();
                let written = decision.write.expect("an acquire of a free actor writes");
                assert_eq!(written.holder.as_ref(), Some(&node_id));
                assert_eq!(written.fencing_token, lease.fencing_token);
                let stored = truth.load(&actor_id).await.unwrap();
                assert_eq!(stored.record, Some(written));

                let renew = LeaseRequest {
                    op: LeaseOp::Renew,
                    fencing_token: Some(lease.fencing_token),
                    ..acquire
                };
                let renewed = store.apply_reply(&actor_id, &renew).await.unwrap().unwrap();
                assert_eq!(renewed.fencing_token, lease.fencing_token);
                assert_eq!(renewed.holder, node_id);

                let replies: Vec<_> = history
                    .to_vec()
                    .iter()
                    .map(|op| op.reply().cloned())
                    .collect();
                assert_eq!(replies, [Some(Ok(lease)), Some(Ok(renewed))]);
                Ok::<(), String>(())
            })
            .expect("the simulation runs");
    }

    /// A round crosses the network as one message and is answered with one, once the store
    /// has decided each of its requests on its own; the history records each request with the
    /// reply the node saw. A round nobody answers gives up whole, each request unknown.
    #[test]
    fn a_round_travels_as_one_message_and_each_request_is_decided_on_its_own() {
        use kelpie_lease::backend::LeaseOp;
        use kelpie_sim::{SimConfig, Simulation};
        Simulation::new(SimConfig::new(1))
            .run(|env| async move {
                let (network, truth, store, history) = connect_served(&env);
                let actor = |name: &str| ActorId::new(name).unwrap();
                let (me, other) = (
                    kelpie_core::NodeId::new("node-1").unwrap(),
                    kelpie_core::NodeId::new("node-2").unwrap(),
                );
                let request = |op, node_id: &kelpie_core::NodeId, token| LeaseRequest {
                    op,
                    node_id: node_id.clone(),
                    lease_duration_ms: 1_000,
                    fencing_token: token,
                };
                let acquire = |name: &str, node_id| {
                    let store = &store;
                    let acquire = request(LeaseOp::Acquire, node_id, None);
                    let actor_id = actor(name);
                    async move {
                        let reply = store.apply_reply(&actor_id, &acquire).await;
                        reply.unwrap().unwrap().fencing_token
                    }
                };
                let (a, b, c) = (
                    acquire("a", &me).await,
                    acquire("b", &other).await,
                    acquire("c", &me).await,
                );
                // Each answer tells its request apart: the actor it names, a renewal or a
                // release, a grant or a refusal.
                let round = vec![
                    (actor("a"), request(LeaseOp::Renew, &me, Some(a))),
                    (actor("b"), request(LeaseOp::Release, &me, Some(b))),
                    (actor("c"), request(LeaseOp::Release, &me, Some(c))),
                ];
                let sent_before = network.sent();
                let outcomes = store.apply_replies(round.clone()).await;
                assert_eq!(network.sent() - sent_before, 2, "one round, one answer");
                let renewed = outcomes[0].clone().unwrap().unwrap();
                assert_eq!((renewed.actor_id.as_str(), renewed.renewal_count), ("a", 1));
                match &outcomes[1] {
                    Ok(Err(LeaseError::NotHolder {
                        actor_id, holder, ..
                    })) => assert_eq!((actor_id.as_str(), holder), ("b", &Some(other.clone()))),
                    refused => panic!("{refused:?}"),
                }
                let released = outcomes[2].clone().unwrap().unwrap();
                assert_eq!(
                    (released.actor_id.as_str(), released.fencing_token),
                    ("c", c)
                );
                let holder = |name: &str| truth.peek(&actor(name)).and_then(|r| r.holder);
                assert_eq!(
                    [holder("a"), holder("b"), holder("c")],
                    [Some(me.clone()), Some(other), None]
                );
                // The history has each request with the reply to it.
                let recorded = history.to_vec();
                let recorded = &recorded[3..];
                assert_eq!(recorded.len(), round.len());
                for ((op, (actor_id, sent)), outcome) in recorded.iter().zip(&round).zip(&outcomes)
                {
                    assert_eq!((&op.actor_id, &op.request), (actor_id, sent));
                    assert_eq!(op.reply(), outcome.as_ref().ok());
                }

                // Nothing is sent for an empty round.
                let sent_before = network.sent();
                assert!(store.apply_replies(Vec::new()).await.is_empty());
                assert_eq!(network.sent(), sent_before);

                // Cut off from the store: the round gives up after the timeout, whole.
                network.partition(&[1], &[STORE_HOST]);
                let start_ms = env.now_ms();
                let round = vec![
                    (actor("a"), request(LeaseOp::Acquire, &me, None)),
                    (actor("c"), request(LeaseOp::Acquire, &me, None)),
                ];
                let outcomes = store.apply_replies(round).await;
                assert_eq!(env.now_ms() - start_ms, 1_000);
                assert_eq!(outcomes.len(), 2);
                for outcome in &outcomes {
                    assert!(
                        matches!(outcome, Err(StoreError::CommitUnknown { .. })),
                        "{outcome:?}"
                    );
                }
                let unknown = history
                    .to_vec()
                    .iter()
                    .rev()
                    .take(2)
                    .filter(|op| op.reply().is_none())
                    .count();
                assert_eq!(
                    unknown, 2,
                    "each request of the round recorded as unanswered"
                );
                Ok::<(), String>(())
            })
            .expect("the simulation runs");
    }

    /// Also once every earlier request was answered or given up on.
    #[test]
    #[should_panic(expected = "awaited after")]
    fn an_id_awaited_again_after_the_window_emptied_is_a_bug() {
        let replies = Replies::<()>::default();
        drop(replies.expect(5));
        let _again = replies.expect(5);
    }
}
