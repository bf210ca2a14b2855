//! Leases over the simulated network: nodes reach the store only through [`SimNetwork`].
//!
//! A node's [`NetLeaseStore`] sends each request to the store host and waits for the reply on
//! its own clock, giving up after a timeout with [`StoreError::CommitUnknown`] (the request may
//! have been applied). The server on the store host ([`serve_leases`]) applies each request to the
//! simulated store with the production decision function and sends the reply back. Messages
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
use std::time::Duration;

use crate::sim_thread::SimThread;
use futures_util::future::{select, Either};
use kelpie_core::ActorId;
use kelpie_lease::{
    backend::Decision, backend::LeaseRecord, backend::LeaseRequest, backend::LeaseStore,
    backend::RecordSnapshot, backend::StoreSnapshot, StoreError,
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
    },
    /// The store's answer.
    Reply {
        /// The request answered.
        request_id: u64,
        /// The decision, or the store's failure.
        outcome: Result<Decision, StoreError>,
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

type Pending = Rc<Replies<Result<Decision, StoreError>>>;

/// The replies one node awaits, by request id; [`route_replies`] hands each arriving reply
/// over. One slot per request, not a channel per request (an allocation and several atomic
/// operations each, for every request of a run). A node's request ids only grow, so the slots
/// are a window of consecutive ids: awaiting opens a slot at the end, and a slot freed at the
/// front drops off. A sorted map shifted its large slots on every removal.
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

    /// Extends the window to `request_id`, past its end, and awaits that id.
    fn open(&mut self, request_id: u64) {
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
}

/// The ring's smallest size: most nodes await a few requests at a time.
const REPLY_SLOTS_MIN: usize = 8;

struct ReplySlot<T> {
    awaited: bool,
    reply: Option<T>,
    waker: Option<Waker>,
}

impl<T> ReplySlot<T> {
    fn vacant() -> Self {
        Self {
            awaited: false,
            reply: None,
            waker: None,
        }
    }

    fn is_vacant(&self) -> bool {
        !self.awaited && self.reply.is_none() && self.waker.is_none()
    }
}

impl<T> Default for Replies<T> {
    fn default() -> Self {
        Self {
            slots: RefCell::new(ReplyWindow {
                first_id: 0,
                head: 0,
                len: 0,
                ring: Vec::new(),
            }),
        }
    }
}

impl<T> Replies<T> {
    /// Expects a reply to `request_id`, which is greater than every id awaited before: the
    /// future resolves with the first reply to arrive. Dropping it forgets the request, so a
    /// later reply is dropped, as a real client drops the response to a call it gave up on.
    pub(crate) fn expect(&self, request_id: u64) -> AwaitReply<'_, T> {
        let mut window = self.slots.borrow_mut();
        // Freed slots leave the front with their ids, so this holds for every id ever awaited.
        let end_id = window.first_id + window.len as u64;
        assert!(
            request_id >= end_id,
            "request id {request_id} awaited after id {} was",
            end_id.saturating_sub(1)
        );
        window.open(request_id);
        AwaitReply {
            replies: self,
            request_id,
            answered: false,
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

/// The reply to one request; see [`Replies::expect`].
pub(crate) struct AwaitReply<'a, T> {
    replies: &'a Replies<T>,
    request_id: u64,
    answered: bool,
}

impl<T> Future for AwaitReply<'_, T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        assert!(!self.answered, "a reply awaited after it arrived");
        let mut slots = self.replies.slots.borrow_mut();
        let slot = slots
            .get_mut(self.request_id)
            .expect("an awaited request's slot lives until its reply or its drop");
        if slot.reply.is_none() {
            match &mut slot.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waker => *waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        let reply = slots.free(self.request_id).expect("a reply arrived");
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
            } => Some((request_id, outcome)),
            _ => None,
        };
        route_replies(&network, host, Rc::clone(&pending), reply);
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
    ) -> Result<Decision, StoreError> {
        let history = self.history.borrow().clone();
        let recorded = history.map(|history| {
            let id = history.invoke(&actor_id, &request, self.clock.global_now_ms());
            (history, id)
        });
        let outcome = self.exchange(actor_id, request).await;
        if let Some((history, id)) = recorded {
            let responded_ms = self.clock.global_now_ms();
            let outcome = match &outcome {
                Ok(decision) => OpOutcome::Returned {
                    responded_ms,
                    reply: decision.reply.clone(),
                },
                Err(error) => OpOutcome::Failed {
                    responded_ms,
                    error: error.clone(),
                },
            };
            history.respond(id, outcome);
        }
        outcome
    }

    /// Sends the request and waits for its reply, up to the timeout.
    async fn exchange(
        &self,
        actor_id: ActorId,
        request: LeaseRequest,
    ) -> Result<Decision, StoreError> {
        let request_id = self.next_request_id.get();
        self.next_request_id.set(request_id + 1);
        let reply = self.pending.expect(request_id);
        let message = LeaseMessage::Request {
            request_id,
            actor_id,
            request,
        };
        self.network.send(self.host, STORE_HOST, message);
        let timeout = self
            .clock
            .sleep_local(Duration::from_millis(self.timeout_ms));
        match select(reply, std::pin::pin!(timeout)).await {
            Either::Left((outcome, _)) => outcome,
            // The reply is forgotten with its future: one arriving later is dropped.
            Either::Right(_) => Err(StoreError::CommitUnknown {
                reason: self.timeout_reason.clone(),
            }),
        }
    }
}

impl LeaseStore for NetLeaseStore {
    async fn apply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> Result<Decision, StoreError> {
        let inner = Rc::clone(&self.inner);
        let call = inner.call(actor_id.clone(), request.clone());
        SimThread::new(call).await
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

/// Where the answer to one request goes.
struct Answer {
    network: SimNetwork<LeaseMessage>,
    to: HostId,
    request_id: u64,
}

impl Answer {
    fn send(self, outcome: Result<Decision, StoreError>) {
        let reply = LeaseMessage::Reply {
            request_id: self.request_id,
            outcome,
        };
        self.network.send(STORE_HOST, self.to, reply);
    }
}

/// Sets the store host's handler: each lease request arriving goes to `apply`, with where
/// its answer goes; anything else is ignored.
fn serve(
    network: &SimNetwork<LeaseMessage>,
    apply: impl Fn(ActorId, LeaseRequest, Answer) + 'static,
) {
    let replies = network.clone();
    network.set_handler(STORE_HOST, move |from, message| {
        if let LeaseMessage::Request {
            request_id,
            actor_id,
            request,
        } = message
        {
            let answer = Answer {
                network: replies.clone(),
                to: from,
                request_id,
            };
            apply(actor_id, request, answer);
        }
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
            // Logged as the request it is: the check must find that its reply does not follow.
            store.log_effect(actor_id, request, current, now_ms);
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

    fn poll<T>(reply: &mut AwaitReply<'_, T>) -> Poll<T> {
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
        assert_eq!(poll(&mut second), Poll::Ready("second"));
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
        assert_eq!(fourth.now_or_never(), Some("fourth"));
        assert_eq!(replies.slots_kept(), 0);

        // An empty window starts again at any later id.
        let mut later = replies.expect(1_000);
        replies.deliver(1_000, "later");
        assert_eq!(poll(&mut later), Poll::Ready("later"));
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
            assert_eq!(poll(&mut oldest), Poll::Ready(id * 10));
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
        assert_eq!(poll(&mut early), Poll::Ready(early_id * 10));
        for (id, reply) in &mut awaiting {
            assert!(poll(reply).is_pending(), "id {id} has no reply yet");
        }
        // Answered newest first, so the front stays until the end.
        for (id, _) in awaiting.iter().rev() {
            replies.deliver(*id, *id * 10);
        }
        for (id, reply) in &mut awaiting {
            assert_eq!(poll(reply), Poll::Ready(*id * 10));
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

    /// Also once every earlier request was answered or given up on.
    #[test]
    #[should_panic(expected = "awaited after")]
    fn an_id_awaited_again_after_the_window_emptied_is_a_bug() {
        let replies = Replies::<()>::default();
        drop(replies.expect(5));
        let _again = replies.expect(5);
    }
}
