//! Lease throughput and memory on one core: `cargo bench -p kelpie-lease --bench lease`.
//!
//! Prints operations per second for acquire, renew and release alone, for a mixed loop
//! (acquire, renew, release per actor over 100,000 actors), and the heap bytes per held lease
//! at one million leases, counted by a wrapping global allocator. The store runs on the real
//! monotonic clock, as it would in a process, and every future completes on its first poll, so
//! each operation is polled once with a no-op waker instead of going through a runtime.

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use kelpie_core::{ActorId, NodeId, TokioClock};
use kelpie_lease::{backend::MemoryLeaseStore, LeaseConfig, LeaseManager, MemoryLeaseManager};

/// Actors in the throughput loops.
const ACTORS_THROUGHPUT_COUNT: usize = 100_000;
/// Held leases in the memory measurement.
const LEASES_MEMORY_COUNT: usize = 1_000_000;
/// Repetitions of each throughput loop; the best is reported.
const ROUNDS_COUNT: usize = 5;

struct CountingAllocator;

static ALLOCATED_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn ready<T>(future: impl Future<Output = T>) -> T {
    let mut context = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut context) {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("memory store futures complete on first poll"),
    }
}

fn manager(capacity: usize) -> MemoryLeaseManager {
    let store = MemoryLeaseStore::with_capacity(Arc::new(TokioClock::new()), capacity);
    MemoryLeaseManager::new(store, LeaseConfig::default())
}

fn actors(count: usize) -> Vec<ActorId> {
    (0..count)
        .map(|i| ActorId::new(format!("actor-{i:07}")).unwrap())
        .collect()
}

/// Runs `body` over every actor, after `setup` each round, and returns operations per
/// second for the best round.
#[allow(clippy::disallowed_methods)] // A benchmark measures real time by definition.
fn best_ops_per_sec(
    ops_per_actor: usize,
    actors: &[ActorId],
    mut setup: impl FnMut(&ActorId),
    mut body: impl FnMut(&ActorId),
) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..ROUNDS_COUNT {
        actors.iter().for_each(&mut setup);
        let start = std::time::Instant::now();
        actors.iter().for_each(&mut body);
        best = best.min(start.elapsed());
    }
    (actors.len() * ops_per_actor) as f64 / best.as_secs_f64()
}

/// Whether the measurement `name` runs: all do unless the command line names some
/// (`acquire`, `renew`, `release`, `mixed`, `throughput` for those four, `memory`).
fn selected(name: &str) -> bool {
    const NAMES: [&str; 6] = [
        "acquire",
        "renew",
        "release",
        "mixed",
        "throughput",
        "memory",
    ];
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| NAMES.contains(&arg.as_str()))
        .collect();
    let throughput = name != "memory";
    chosen.is_empty()
        || chosen
            .iter()
            .any(|c| c == name || (throughput && c == "throughput"))
}

fn throughput() {
    let actors = actors(ACTORS_THROUGHPUT_COUNT);
    let node = NodeId::new("node-1").unwrap();
    let leases = manager(actors.len());
    let acquire = |a: &ActorId| {
        ready(leases.acquire(a, &node)).unwrap();
    };
    let release = |a: &ActorId| {
        ready(leases.release(a, &node)).unwrap();
    };
    let renew = |a: &ActorId| {
        ready(leases.renew(a, &node)).unwrap();
    };
    let release_if_held = |a: &ActorId| {
        let _ = ready(leases.release(a, &node));
    };
    let report = |name: &str, label: &str, ops_per_sec: &dyn Fn() -> f64| {
        if selected(name) {
            println!("{:<46} {:>14.0}", label, ops_per_sec());
        }
    };
    println!(
        "{:<46} {:>14}",
        "operation (100,000 actors, one core)", "ops/s"
    );
    report("acquire", "acquire (free lease, new token)", &|| {
        best_ops_per_sec(1, &actors, release_if_held, acquire)
    });
    report("renew", "renew", &|| {
        best_ops_per_sec(1, &actors, acquire, renew)
    });
    report("release", "release", &|| {
        best_ops_per_sec(1, &actors, acquire, release)
    });
    report(
        "mixed",
        "mixed (acquire, renew, release per actor)",
        &|| {
            // Every lease is free at the start of each round, as the previous round released it.
            actors.iter().for_each(release_if_held);
            best_ops_per_sec(
                3,
                &actors,
                |_| {},
                |a| {
                    acquire(a);
                    renew(a);
                    release(a);
                },
            )
        },
    );
}

/// Heap bytes the memory store keeps per held lease, counted from a zero baseline: the count
/// starts before the actor ids are built, and the caller's ids are dropped before it ends, so
/// the figure is everything the store holds and nothing else: its own copy of each actor id
/// (the id's allocation, 32 bytes for the 13-byte ids here), the entry with the record (holder,
/// fencing token, acquisition, expiry and renewal count; 48 bytes, in a vector that grows by
/// doubling) and its slot in the hash index (4 bytes and a control byte, at most 7/8 full),
/// and the one holder id all the leases share.
fn memory() {
    let before_bytes = ALLOCATED_BYTES.load(Ordering::Relaxed);
    let actors = actors(LEASES_MEMORY_COUNT);
    let node = NodeId::new("node-1").unwrap();
    let leases = manager(0);
    for actor in &actors {
        ready(leases.acquire(actor, &node)).unwrap();
    }
    drop(actors);
    let held = ready(leases.leases_held_by(&node)).unwrap().len();
    assert_eq!(held, LEASES_MEMORY_COUNT, "every lease is held");
    drop(node);
    let after_bytes = ALLOCATED_BYTES.load(Ordering::Relaxed);
    let per_lease = (after_bytes - before_bytes) as f64 / LEASES_MEMORY_COUNT as f64;
    println!(
        "{:<46} {:>14.1}",
        "store heap bytes per held lease (1M, from zero)", per_lease
    );
    drop(leases);
}

fn main() {
    // `cargo bench` passes `--bench`; further arguments name the measurements to run (see
    // `selected`), e.g. `cargo bench -p kelpie-lease --bench lease -- mixed`, or the built
    // binary under `perf record`. Any other argument is ignored.
    if ["acquire", "renew", "release", "mixed"]
        .iter()
        .any(|name| selected(name))
    {
        throughput();
    }
    if selected("memory") {
        memory();
    }
}
