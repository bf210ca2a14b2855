//! Leases over the simulated network: nodes reach the store only through [`SimNetwork`].
//!
//! A node's [`NetLeaseStore`] sends each request to the store host and waits for the reply on
//! its own clock, giving up after a timeout with [`StoreError::CommitUnknown`] (the request may
//! have been applied). A [`LeaseServer`] on the store host applies each request to the
//! simulated store with the production decision function and sends the reply back. Messages
//! can be lost, duplicated, delayed and partitioned; a duplicated or delayed request is
//! harmless because acquire is idempotent and renew and release carry the fencing token.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use futures_channel::oneshot;
use futures_util::future::{select, Either};
use kelpie_core::ActorId;
use kelpie_registry::{
    DecideFn, Decision, LeaseRequest, LeaseStore, RecordSnapshot, StoreError, StoreSnapshot,
};
use send_wrapper::SendWrapper;

use crate::clock::SimClock;
use crate::network::{HostId, SimNetwork};
use crate::sim_lease_store::SimLeaseStore;
use crate::SimEnv;

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
        /// The request.
        request: LeaseRequest,
        /// The protocol's decision function (replaced only in mutation tests).
        decide: DecideFn,
    },
    /// The store's answer.
    Reply {
        /// The request answered.
        request_id: u64,
        /// The decision, or the store's failure.
        outcome: Result<Decision, StoreError>,
    },
}

type Pending = Rc<RefCell<BTreeMap<u64, oneshot::Sender<Result<Decision, StoreError>>>>>;

struct NetInner {
    network: SimNetwork<LeaseMessage>,
    host: HostId,
    clock: SimClock,
    timeout_ms: u64,
    pending: Pending,
    next_request_id: Cell<u64>,
    truth: SimLeaseStore,
}

/// A node's view of the lease store, across the simulated network.
pub struct NetLeaseStore {
    inner: SendWrapper<Rc<NetInner>>,
}

impl NetLeaseStore {
    /// The store as seen from `host` (incarnation `incarnation`), timing out requests after
    /// `timeout_ms` on the node's `clock`. Spawns the task that routes replies; it stops when
    /// the node's tasks are aborted (a crash). `truth` serves administrative scans.
    pub fn connect(
        env: &SimEnv,
        network: SimNetwork<LeaseMessage>,
        host: HostId,
        incarnation: u32,
        clock: SimClock,
        timeout_ms: u64,
        truth: SimLeaseStore,
    ) -> (Self, crate::JoinHandle<()>) {
        let pending: Pending = Rc::default();
        let router = env.spawn(route_replies(network.clone(), host, Rc::clone(&pending)));
        let first_id = u64::from(incarnation) << 32;
        let inner = NetInner {
            network,
            host,
            clock,
            timeout_ms,
            pending,
            next_request_id: Cell::new(first_id),
            truth,
        };
        (
            Self {
                inner: SendWrapper::new(Rc::new(inner)),
            },
            router,
        )
    }
}

async fn route_replies(network: SimNetwork<LeaseMessage>, host: HostId, pending: Pending) {
    loop {
        let (_, message) = network.recv(host).await;
        if let LeaseMessage::Reply {
            request_id,
            outcome,
        } = message
        {
            // A reply nobody waits for (timed out, duplicated, or for an earlier incarnation)
            // is dropped, as a real client drops a response to a cancelled call.
            if let Some(waiter) = pending.borrow_mut().remove(&request_id) {
                let _ = waiter.send(outcome);
            }
        }
    }
}

impl NetInner {
    async fn call(
        self: Rc<Self>,
        actor_id: ActorId,
        request: LeaseRequest,
        decide: DecideFn,
    ) -> Result<Decision, StoreError> {
        let request_id = self.next_request_id.get();
        self.next_request_id.set(request_id + 1);
        let (sender, receiver) = oneshot::channel();
        self.pending.borrow_mut().insert(request_id, sender);
        let message = LeaseMessage::Request {
            request_id,
            actor_id,
            request,
            decide,
        };
        self.network.send(self.host, STORE_HOST, message);
        let timeout = self
            .clock
            .sleep_local(Duration::from_millis(self.timeout_ms));
        match select(receiver, std::pin::pin!(timeout)).await {
            Either::Left((Ok(outcome), _)) => outcome,
            Either::Left((Err(_), _)) => Err(StoreError::Unavailable {
                reason: "node stopped".into(),
            }),
            Either::Right(_) => {
                self.pending.borrow_mut().remove(&request_id);
                Err(StoreError::CommitUnknown {
                    reason: format!("no reply within {} ms", self.timeout_ms),
                })
            }
        }
    }
}

impl LeaseStore for NetLeaseStore {
    async fn apply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
        decide: DecideFn,
    ) -> Result<Decision, StoreError> {
        let inner = Rc::clone(&self.inner);
        let call = inner.call(actor_id.clone(), request.clone(), decide);
        SendWrapper::new(call).await
    }

    async fn load(&self, actor_id: &ActorId) -> Result<RecordSnapshot, StoreError> {
        let truth = self.inner.truth.clone();
        let actor_id = actor_id.clone();
        SendWrapper::new(async move { truth.load(&actor_id).await }).await
    }

    async fn scan(&self) -> Result<StoreSnapshot, StoreError> {
        let truth = self.inner.truth.clone();
        SendWrapper::new(async move { truth.scan().await }).await
    }
}

/// Serves lease requests arriving at [`STORE_HOST`]: each is applied to the simulated store
/// on its own task (so one slow write does not hold up the others) and answered.
pub async fn serve_leases(env: SimEnv, network: SimNetwork<LeaseMessage>, store: SimLeaseStore) {
    loop {
        let (from, message) = network.recv(STORE_HOST).await;
        let LeaseMessage::Request {
            request_id,
            actor_id,
            request,
            decide,
        } = message
        else {
            continue;
        };
        let (network, store) = (network.clone(), store.clone());
        // Dropping the handle detaches the task: the reply is sent when the store answers.
        drop(env.spawn(async move {
            let outcome = store.apply_local(&actor_id, &request, decide).await;
            network.send(
                STORE_HOST,
                from,
                LeaseMessage::Reply {
                    request_id,
                    outcome,
                },
            );
        }));
    }
}
