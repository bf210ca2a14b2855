//! [`SimNetwork`]: hosts exchanging messages with random latency, partitions and faults.
//!
//! Messages in flight are not tasks and have no wakers: they sit in buckets keyed by their
//! delivery instant, and the executor asks the network for its next instant when nothing is
//! ready. Within one instant, messages are delivered in the order they were sent, so delivery
//! order is deterministic. Each host has a mailbox with one consumer (`recv`), or a handler
//! ([`SimNetwork::set_handler`]) called with each message at its delivery instant, for a host
//! that would only pass its messages on (a server submitting them to a store, a client handing
//! replies to the calls awaiting them): no task, and no step, per message.
//!
//! Loss, duplication and delay spikes are [`FaultType`]s drawn per message; partitions are
//! set by the scenario and every message they drop is counted as
//! [`FaultType::NetworkPartition`].

use crate::env::SimEnv;
use crate::executor::TaskRef;
use crate::fault::FaultType;
use crate::in_flight::InFlightQueue;
use crate::rng::DeterministicRng;
use crate::runtime::{EventSource, SourceDeadline};
use crate::trace::event;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A host's index in its network, `0..hosts`.
pub type HostId = usize;

/// Most hosts one network may have; the partition matrix is quadratic in it.
pub const NETWORK_HOSTS_MAX: usize = 1024;
/// A delay fault adds an extra delay of up to this many times the configured maximum.
pub const NETWORK_DELAY_SPIKE_FACTOR: u64 = 10;

/// The shape of a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Number of hosts.
    pub hosts: usize,
    /// Shortest one-way latency, in simulated ms.
    pub latency_ms_min: u64,
    /// Longest one-way latency, in simulated ms (before delay faults).
    pub latency_ms_max: u64,
    /// Messages a host's mailbox holds; one arriving at a full mailbox is dropped and counted
    /// as [`FaultType::NetworkQueueOverflow`], as a real bounded socket buffer would.
    pub mailbox_capacity: usize,
}

/// Mailbox capacity of networks built from the run's configuration.
pub const NETWORK_MAILBOX_CAPACITY_DEFAULT: usize = 4_096;

/// Why a message was dropped, folded into the trace.
const OUTCOME_DELIVERED: u64 = 0;
const OUTCOME_PARTITIONED: u64 = 1;
const OUTCOME_LOST: u64 = 2;
const OUTCOME_OVERFLOW: u64 = 3;

struct InFlight<M> {
    from: u32,
    to: u32,
    message: M,
}

struct Mailbox<M> {
    queue: VecDeque<(HostId, M)>,
    /// The waker of the last `recv` that found the mailbox empty. Kept after it is woken, so
    /// that the same receiver waiting again needs no new clone of it.
    waiter: Option<Waker>,
    /// `waiter`'s task, when `waiter` is the own waker of a task of this network's runtime:
    /// woken straight into the ready queue, the same as waking `waiter` but cheaper.
    waiter_task: Option<TaskRef>,
    /// Whether `waiter` waits for a message: set by a `recv` that found the mailbox empty,
    /// cleared by the delivery that wakes it.
    waiting: bool,
    /// Whether the host's messages go to its handler instead of this mailbox: whether
    /// `NetworkInner::handlers` has one for it, mirrored here (set with it) so that a delivery
    /// reads it with the queue, without borrowing the handlers.
    handled: bool,
}

struct NetworkState<M> {
    rng: DeterministicRng,
    mailboxes: Vec<Mailbox<M>>,
    /// `blocked[from * hosts + to]`: whether the link from `from` to `to` is cut.
    blocked: Vec<bool>,
    any_blocked: bool,
    sent: u64,
    delivered: u64,
    dropped: u64,
    in_flight_count: u64,
    /// Messages delivered to hosts with a handler, in delivery order, waiting for the handlers
    /// to be called once the delivery burst is over (a handler may send).
    to_handle: Vec<(HostId, HostId, M)>,
    /// Reused buffer of the hosts whose waiting receiver to wake after a delivery burst, in
    /// the order their first message arrived. A receiver that is a task of the runtime is
    /// woken on delivery instead, while this is empty (so wakes keep their order).
    hosts_to_wake: Vec<HostId>,
}

struct NetworkInner<M> {
    env: SimEnv,
    config: NetworkConfig,
    /// Whether the run's fault mix has any fault drawn per message.
    faults_configured: bool,
    /// [`delivery_ms_max`] of `config`, computed once: every send checks against it.
    delivery_ms_max: u64,
    state: RefCell<NetworkState<M>>,
    /// Per host, the handler its messages go to (see [`SimNetwork::set_handler`]). Apart from
    /// `state`, which a handler's sends borrow.
    handlers: RefCell<Vec<Option<Handler<M>>>>,
    /// Messages in flight, by delivery instant, in send order within an instant. Apart from
    /// `state`, so that a delivery walks the queue while it fills the mailboxes.
    in_flight: RefCell<InFlightQueue<InFlight<M>>>,
    /// `in_flight`'s earliest instant, published to the runtime after every change.
    next_delivery_ms: SourceDeadline,
}

/// A host's handler: called with the sender and each message delivered to the host.
type Handler<M> = Box<dyn Fn(HostId, M)>;

/// A shared handle to a simulated network carrying messages of type `M`.
pub struct SimNetwork<M> {
    inner: Rc<NetworkInner<M>>,
}

impl<M> Clone for SimNetwork<M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<M: Clone + 'static> SimNetwork<M> {
    /// A network of `hosts` hosts with the run's configured latency range.
    pub fn new(env: &SimEnv, hosts: usize) -> Self {
        let config = env.config();
        let (latency_ms_min, latency_ms_max) =
            (config.network_latency_ms_min, config.network_latency_ms_max);
        Self::with_config(
            env,
            NetworkConfig {
                hosts,
                latency_ms_min,
                latency_ms_max,
                mailbox_capacity: NETWORK_MAILBOX_CAPACITY_DEFAULT,
            },
        )
    }

    /// A network with an explicit shape.
    ///
    /// # Panics
    /// If there are no hosts or more than [`NETWORK_HOSTS_MAX`], or the latency range is empty.
    pub fn with_config(env: &SimEnv, config: NetworkConfig) -> Self {
        assert!(
            (1..=NETWORK_HOSTS_MAX).contains(&config.hosts),
            "a network needs 1..={NETWORK_HOSTS_MAX} hosts, got {}",
            config.hosts
        );
        assert!(
            config.latency_ms_min <= config.latency_ms_max,
            "network latency range {}..={} ms is empty",
            config.latency_ms_min,
            config.latency_ms_max
        );
        let id = env.runtime().next_component_id("network");
        let mailboxes = (0..config.hosts)
            .map(|_| Mailbox {
                queue: VecDeque::new(),
                waiter: None,
                waiter_task: None,
                waiting: false,
                handled: false,
            })
            .collect();
        let state = NetworkState {
            rng: env.rng(&format!("network/{id}")),
            mailboxes,
            blocked: vec![false; config.hosts * config.hosts],
            any_blocked: false,
            sent: 0,
            delivered: 0,
            dropped: 0,
            in_flight_count: 0,
            to_handle: Vec::new(),
            hosts_to_wake: Vec::new(),
        };
        let per_message = [
            FaultType::NetworkMessageLoss,
            FaultType::NetworkDuplicate,
            FaultType::NetworkReorder,
            FaultType::NetworkDelay,
        ];
        let faults_configured = per_message
            .iter()
            .any(|&fault| env.fault_probability(fault).is_some());
        let inner = Rc::new(NetworkInner {
            env: env.clone(),
            delivery_ms_max: delivery_ms_max(&config),
            config,
            faults_configured,
            state: RefCell::new(state),
            handlers: RefCell::new((0..config.hosts).map(|_| None).collect()),
            in_flight: RefCell::new(InFlightQueue::new(delivery_ms_max(&config))),
            next_delivery_ms: SourceDeadline::default(),
        });
        let source: Rc<dyn EventSource> = inner.clone();
        env.runtime()
            .add_source(Rc::downgrade(&source), inner.next_delivery_ms.clone());
        Self { inner }
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.inner.config.hosts
    }

    /// The simulation this network runs in (to spawn the tasks of a protocol over it).
    pub fn env(&self) -> &SimEnv {
        &self.inner.env
    }

    /// The longest a message can take from send to delivery: the configured latency plus
    /// the largest delay spike. A message not delivered by then never will be.
    pub fn delivery_ms_max(&self) -> u64 {
        self.inner.delivery_ms_max
    }

    /// Sends `message` from `from` to `to`. It arrives after a random latency unless a
    /// partition or a loss fault drops it; a duplicate fault sends a second copy.
    ///
    /// # Panics
    /// If either host is out of range.
    #[inline(always)]
    pub fn send(&self, from: HostId, to: HostId, message: M) {
        let inner = &*self.inner;
        let hosts = inner.config.hosts;
        assert!(
            from < hosts && to < hosts,
            "send {from}->{to} on a network of {hosts} hosts"
        );
        let mut state = inner.state.borrow_mut();
        state.sent += 1;
        if state.any_blocked && state.blocked[from * hosts + to] {
            state.drop_message(&inner.env, route_word(from, to), OUTCOME_PARTITIONED);
            return;
        }
        // Without network faults in the run's mix there is nothing to draw (an unconfigured
        // fault neither draws nor traces), so the draws are skipped outright.
        if inner.faults_configured {
            self.send_with_faults(&mut state, from, to, message);
        } else {
            self.enqueue(&mut state, from, to, message);
        }
    }

    /// [`Self::send`] when the run's fault mix has per-message network faults: draws loss,
    /// then duplication, then enqueues the copies.
    #[cold]
    #[inline(never)]
    fn send_with_faults(&self, state: &mut NetworkState<M>, from: HostId, to: HostId, message: M) {
        let env = &self.inner.env;
        if env.should_inject(FaultType::NetworkMessageLoss) {
            state.drop_message(env, route_word(from, to), OUTCOME_LOST);
            return;
        }
        if env.should_inject(FaultType::NetworkDuplicate) {
            self.enqueue(state, from, to, message.clone());
        }
        self.enqueue(state, from, to, message);
    }

    /// Puts one copy of a message in flight, after a latency drawn from the network's stream.
    #[inline(always)]
    fn enqueue(&self, state: &mut NetworkState<M>, from: HostId, to: HostId, message: M) {
        let inner = &*self.inner;
        let config = &inner.config;
        let mut latency_ms = state
            .rng
            .between(config.latency_ms_min, config.latency_ms_max);
        if inner.faults_configured {
            latency_ms = self.latency_with_faults_ms(state, latency_ms);
        }
        assert!(
            latency_ms <= inner.delivery_ms_max,
            "a message drew {latency_ms} ms, beyond delivery_ms_max {} ms that checkers rely on",
            inner.delivery_ms_max
        );
        let runtime = inner.env.runtime();
        let now_ms = runtime.shared.now_ms();
        let deliver_at_ms = now_ms.saturating_add(latency_ms);
        // Host indices fit u32: there are at most NETWORK_HOSTS_MAX of them.
        let item = InFlight {
            from: from as u32,
            to: to as u32,
            message,
        };
        let earliest = inner
            .in_flight
            .borrow_mut()
            .push(now_ms, deliver_at_ms, item);
        if earliest {
            inner.next_delivery_ms.set(Some(deliver_at_ms));
        }
        state.in_flight_count += 1;
        runtime
            .trace
            .event(event::NET_SEND, route_word(from, to), deliver_at_ms);
    }

    /// `latency_ms` after the reorder and delay faults, drawn in that order: a reordered
    /// message takes the shortest latency, a delayed one a spike on top of its latency.
    #[cold]
    #[inline(never)]
    fn latency_with_faults_ms(&self, state: &mut NetworkState<M>, latency_ms: u64) -> u64 {
        let env = &self.inner.env;
        let config = &self.inner.config;
        if env.should_inject(FaultType::NetworkReorder) {
            return config.latency_ms_min;
        }
        if env.should_inject(FaultType::NetworkDelay) {
            let spike_base_ms = config.latency_ms_max.max(1);
            return latency_ms
                + state
                    .rng
                    .between(spike_base_ms, spike_base_ms * NETWORK_DELAY_SPIKE_FACTOR);
        }
        latency_ms
    }

    /// Waits for the next message to `host`; returns the sender and the message. Each host's
    /// mailbox has one consumer: a second concurrent `recv` on the same host replaces the
    /// first one's waker.
    pub fn recv(&self, host: HostId) -> Recv<'_, M> {
        assert!(
            host < self.hosts(),
            "recv on host {host} of a network of {} hosts",
            self.hosts()
        );
        Recv {
            network: self,
            host,
        }
    }

    /// From now on, calls `handle(from, message)` with each message delivered to `host`, at
    /// its delivery instant, instead of queueing it in the host's mailbox: for a host whose
    /// receiver would only pass each message on. `handle` runs as an event, not a task (it may
    /// send, submit storage operations and wake tasks); the messages delivered at one instant
    /// are handled in delivery order, and the handler is dropped with the run. Replaces the
    /// host's previous handler; messages already in its mailbox stay there.
    ///
    /// # Panics
    /// If `host` is out of range, or if called by a handler (handlers are set by tasks).
    pub fn set_handler(&self, host: HostId, handle: impl Fn(HostId, M) + 'static) {
        assert!(
            host < self.hosts(),
            "a handler for host {host} of a network of {} hosts",
            self.hosts()
        );
        let previous = self.inner.handlers.borrow_mut()[host].replace(Box::new(handle));
        self.inner.state.borrow_mut().mailboxes[host].handled = true;
        // Dropped outside the borrow: it may hold handles that lead back here.
        drop(previous);
    }

    /// The next message to `host`, if one has arrived.
    pub fn try_recv(&self, host: HostId) -> Option<(HostId, M)> {
        self.inner.state.borrow_mut().mailboxes[host]
            .queue
            .pop_front()
    }

    /// Cuts every link between a host of `a` and a host of `b`, both ways.
    pub fn partition(&self, a: &[HostId], b: &[HostId]) {
        self.partition_one_way(a, b);
        self.partition_one_way(b, a);
    }

    /// Cuts every link from a host of `from` to a host of `to` (replies still flow back).
    pub fn partition_one_way(&self, from: &[HostId], to: &[HostId]) {
        let hosts = self.hosts();
        let mut state = self.inner.state.borrow_mut();
        for &source in from {
            for &target in to {
                assert!(
                    source < hosts && target < hosts,
                    "partition of host out of range"
                );
                state.blocked[source * hosts + target] = true;
                self.inner.env.trace(route_word(source, target));
            }
        }
        state.any_blocked = state.blocked.iter().any(|&cut| cut);
    }

    /// Restores every link.
    pub fn heal(&self) {
        let mut state = self.inner.state.borrow_mut();
        state.blocked.fill(false);
        state.any_blocked = false;
        self.inner.env.trace(u64::MAX);
    }

    /// Whether messages from `from` currently reach `to`.
    pub fn is_reachable(&self, from: HostId, to: HostId) -> bool {
        let state = self.inner.state.borrow();
        !state.blocked[from * self.hosts() + to]
    }

    /// Messages sent so far (each `send` counts once, even if duplicated or dropped).
    pub fn sent(&self) -> u64 {
        self.inner.state.borrow().sent
    }

    /// Messages delivered into mailboxes so far (duplicates count).
    pub fn delivered(&self) -> u64 {
        self.inner.state.borrow().delivered
    }

    /// Messages dropped by partitions or loss faults so far.
    pub fn dropped(&self) -> u64 {
        self.inner.state.borrow().dropped
    }

    /// Messages currently in flight.
    pub fn in_flight(&self) -> u64 {
        self.inner.state.borrow().in_flight_count
    }
}

/// The longest a message can take on `config`'s links: the slowest latency plus a spike.
fn delivery_ms_max(config: &NetworkConfig) -> u64 {
    config.latency_ms_max + config.latency_ms_max.max(1) * NETWORK_DELAY_SPIKE_FACTOR
}

/// A route folded into one trace word.
fn route_word(from: HostId, to: HostId) -> u64 {
    ((from as u64) << 32) | to as u64
}

impl<M> NetworkState<M> {
    /// Counts and traces a message that will not be delivered. Rare next to deliveries, so
    /// kept out of the send and delivery loops.
    #[cold]
    #[inline(never)]
    fn drop_message(&mut self, env: &SimEnv, route: u64, outcome: u64) {
        self.dropped += 1;
        if outcome == OUTCOME_PARTITIONED {
            env.record_fault(FaultType::NetworkPartition);
        }
        if outcome == OUTCOME_OVERFLOW {
            env.record_fault(FaultType::NetworkQueueOverflow);
        }
        env.runtime()
            .trace
            .event(event::NET_DELIVER, route, outcome);
    }

    /// Delivers one message that arrived (or drops it); notes its host if the receiver was
    /// waiting.
    #[inline]
    fn deliver(&mut self, env: &SimEnv, config: &NetworkConfig, arrived: InFlight<M>) {
        let InFlight { from, to, message } = arrived;
        let (from, to) = (from as usize, to as usize);
        self.in_flight_count -= 1;
        let route = route_word(from, to);
        if self.any_blocked && self.blocked[from * config.hosts + to] {
            self.drop_message(env, route, OUTCOME_PARTITIONED);
            return;
        }
        // A handled host's mailbox stays empty, so it never overflows.
        if self.mailboxes[to].queue.len() >= config.mailbox_capacity {
            self.drop_message(env, route, OUTCOME_OVERFLOW);
            return;
        }
        self.delivered += 1;
        env.runtime()
            .trace
            .event(event::NET_DELIVER, route, OUTCOME_DELIVERED);
        let mailbox = &mut self.mailboxes[to];
        if mailbox.handled {
            self.to_handle.push((from, to, message));
            return;
        }
        mailbox.queue.push_back((from, message));
        if mailbox.waiting {
            mailbox.waiting = false;
            // Waking a task only queues it (no code of the scenario runs), so it may happen
            // here, inside the borrow; once one waker is deferred, the rest wait their turn.
            match &mailbox.waiter_task {
                Some(task) if self.hosts_to_wake.is_empty() => env.runtime().wake_task(task),
                _ => self.hosts_to_wake.push(to),
            }
        }
    }
}

impl<M> EventSource for NetworkInner<M> {
    fn next_deadline_ms(&self) -> Option<u64> {
        self.in_flight.borrow().next_deadline_ms()
    }

    fn fire_due(&self, now_ms: u64) {
        {
            let mut state = self.state.borrow_mut();
            let mut in_flight = self.in_flight.borrow_mut();
            // Each message goes straight from the queue to its mailbox (or its handler's list).
            while let Some(arrived) = in_flight.pop_due(now_ms) {
                state.deliver(&self.env, &self.config, arrived);
            }
            self.next_delivery_ms.set(in_flight.next_deadline_ms());
            // Usually every receiver was a task, woken on delivery, and no host has a handler.
            if state.hosts_to_wake.is_empty() && state.to_handle.is_empty() {
                return;
            }
        }
        self.finish_burst();
    }

    fn teardown(&self) {
        // Dropped outside the borrow: a handler may hold this network.
        let handlers = std::mem::take(&mut *self.handlers.borrow_mut());
        drop(handlers);
    }
}

impl<M> NetworkInner<M> {
    /// After a delivery burst, outside the borrows: calls the handlers with their messages
    /// (a handler may send), then wakes the receivers that wait behind a waker of their own.
    /// Out of line, so that the delivery loop stays small where neither is needed.
    #[inline(never)]
    fn finish_burst(&self) {
        let mut to_handle = std::mem::take(&mut self.state.borrow_mut().to_handle);
        if !to_handle.is_empty() {
            let handlers = self.handlers.borrow();
            for (from, to, message) in to_handle.drain(..) {
                let handle = handlers[to].as_ref().expect("a handled host has a handler");
                handle(from, message);
            }
            drop(handlers);
            self.state.borrow_mut().to_handle = to_handle;
        }
        let mut hosts = std::mem::take(&mut self.state.borrow_mut().hosts_to_wake);
        // Woken in delivery order, so a waker may touch the network. Each waker is lent out
        // for its wake and put back unless a newer one replaced it meanwhile: waking by
        // reference and keeping it spares a clone per wait.
        for &host in &hosts {
            let waiter = self.state.borrow_mut().mailboxes[host].waiter.take();
            if let Some(waker) = waiter {
                waker.wake_by_ref();
                let slot = &mut self.state.borrow_mut().mailboxes[host].waiter;
                if slot.is_none() {
                    *slot = Some(waker);
                }
            }
        }
        hosts.clear();
        self.state.borrow_mut().hosts_to_wake = hosts;
    }
}

/// The future returned by [`SimNetwork::recv`].
#[must_use = "a Recv does nothing unless awaited"]
pub struct Recv<'a, M> {
    network: &'a SimNetwork<M>,
    host: HostId,
}

impl<M> Future for Recv<'_, M> {
    type Output = (HostId, M);

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(HostId, M)> {
        let mut state = self.network.inner.state.borrow_mut();
        let mailbox = &mut state.mailboxes[self.host];
        if let Some(item) = mailbox.queue.pop_front() {
            return Poll::Ready(item);
        }
        match &mailbox.waiter {
            Some(waiter) if waiter.will_wake(cx.waker()) => {}
            _ => {
                mailbox.waiter = Some(cx.waker().clone());
                mailbox.waiter_task = self.network.inner.env.runtime().polling_task(cx.waker());
            }
        }
        mailbox.waiting = true;
        Poll::Pending
    }
}

impl<M> fmt::Debug for SimNetwork<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state.borrow();
        f.debug_struct("SimNetwork")
            .field("hosts", &self.inner.config.hosts)
            .field("sent", &state.sent)
            .field("delivered", &state.delivered)
            .field("dropped", &state.dropped)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::{FaultConfig, FaultType, SimConfig, Simulation};
    use std::cell::Cell;
    use std::future::Future;
    use std::pin::Pin;
    use std::rc::Rc;
    use std::sync::Arc;
    use std::task::{Context, Wake, Waker};

    /// A waker that is not a task's own: it forwards to one, as a combinator's would.
    struct Forward(Waker);

    impl Wake for Forward {
        fn wake(self: Arc<Self>) {
            self.0.wake_by_ref();
        }
    }

    /// Receivers woken through their task (directly) and through a combinator's waker
    /// (deferred) in the same delivery bursts all get every message, deterministically.
    #[test]
    fn receivers_behind_other_wakers_are_woken_too() {
        const MESSAGES: u32 = 50;
        let config = SimConfig::new(5).with_check_determinism(true);
        Simulation::new(config)
            .run(|env| async move {
                let network = env.network::<u32>(4);
                let received = Rc::new(Cell::new(0));
                for host in 1..4 {
                    let (network, received) = (network.clone(), received.clone());
                    drop(env.spawn(async move {
                        loop {
                            let mut recv = network.recv(host);
                            // Host 2 waits behind a waker of its own, so it is woken after
                            // the delivery burst, and so is any host after it in the burst.
                            let _message = if host == 2 {
                                std::future::poll_fn(|cx| {
                                    let waker = Waker::from(Arc::new(Forward(cx.waker().clone())));
                                    Pin::new(&mut recv).poll(&mut Context::from_waker(&waker))
                                })
                                .await
                            } else {
                                recv.await
                            };
                            received.set(received.get() + 1);
                        }
                    }));
                }
                for round in 0..MESSAGES {
                    (1..4).for_each(|to| network.send(0, to, round));
                    env.sleep_ms(3).await;
                }
                env.sleep_ms(1_000).await;
                assert_eq!(received.get(), 3 * MESSAGES);
                Ok::<(), String>(())
            })
            .unwrap();
    }

    #[test]
    fn certain_duplication_delivers_twice_and_certain_loss_delivers_nothing() {
        for (fault, expected_delivered) in [
            (FaultType::NetworkDuplicate, 20),
            (FaultType::NetworkMessageLoss, 0),
        ] {
            let config = SimConfig::new(3).with_check_determinism(false);
            let report = Simulation::new(config)
                .with_fault(FaultConfig::new(fault, 1.0).unwrap())
                .run(move |env| async move {
                    let network = env.network::<u32>(2);
                    (0..10).for_each(|i| network.send(0, 1, i));
                    env.sleep_ms(1_000).await;
                    assert_eq!(network.delivered(), expected_delivered, "{fault}");
                    assert_eq!(network.in_flight(), 0);
                    Ok::<(), String>(())
                })
                .unwrap();
            assert_eq!(report.fault_fired(fault), 10);
        }
    }

    /// A host with a handler gets each message at its delivery instant, in delivery order,
    /// with no task: the handler may send (here, an echo back), and a partition keeps
    /// messages from it as from a mailbox. Replacing the handler takes effect for the next
    /// delivery.
    #[test]
    fn a_handler_gets_each_message_at_its_delivery_instant() {
        let config = SimConfig::new(7)
            .with_check_determinism(true)
            .with_network_latency_ms(5, 5);
        Simulation::new(config)
            .run(|env| async move {
                let network = env.network::<u32>(2);
                let handled = Rc::new(std::cell::RefCell::new(Vec::new()));
                let (echo, seen, clock) = (network.clone(), handled.clone(), env.clone());
                network.set_handler(1, move |from, message| {
                    seen.borrow_mut().push((from, message, clock.now_ms()));
                    echo.send(1, from, message + 100);
                });
                (0..3).for_each(|i| network.send(0, 1, i));
                env.sleep_ms(2).await;
                network.send(0, 1, 3);
                env.sleep_ms(20).await;
                let expected = vec![(0, 0, 5), (0, 1, 5), (0, 2, 5), (0, 3, 7)];
                assert_eq!(*handled.borrow(), expected);
                let echoes: Vec<u32> = std::iter::from_fn(|| network.try_recv(0))
                    .map(|(_, message)| message)
                    .collect();
                assert_eq!(echoes, [100, 101, 102, 103], "the handler's sends arrived");
                assert_eq!(
                    network.try_recv(1),
                    None,
                    "nothing went to host 1's mailbox"
                );

                network.partition(&[0], &[1]);
                network.send(0, 1, 4);
                env.sleep_ms(20).await;
                assert_eq!(
                    handled.borrow().len(),
                    4,
                    "partitioned away from the handler"
                );
                network.heal();

                let replaced = Rc::new(Cell::new(0));
                let count = replaced.clone();
                network.set_handler(1, move |_, _| count.set(count.get() + 1));
                network.send(0, 1, 5);
                env.sleep_ms(20).await;
                assert_eq!((handled.borrow().len(), replaced.get()), (4, 1));
                Ok::<(), String>(())
            })
            .unwrap();
    }

    /// A handler holding its own network (as a server that replies does) is dropped with the
    /// run, and the network with it.
    #[test]
    fn a_handler_is_dropped_with_the_run() {
        let config = SimConfig::new(1).with_check_determinism(false);
        let dropped = crate::sim::dropped_with_the_run(config, |env| {
            let network = env.network::<u32>(2);
            let held = network.clone();
            network.set_handler(1, move |from, message| held.send(1, from, message));
            Rc::downgrade(&network.inner)
        });
        assert!(dropped, "the network and its handler were dropped");
    }
}
