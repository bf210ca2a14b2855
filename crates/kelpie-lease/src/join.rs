//! Awaiting several requests at once, answers in request order.

use std::future::Future;

use futures_util::StreamExt;

/// The most requests awaited together that are joined ([`futures_util::future::join_all`])
/// rather than put in a set that polls each only when it is woken: for the lease swarm's rounds of two
/// to four, 2-3% less CPU per lease operation (`swarm_bench`, medians of 21 alternated runs).
/// Raised from 8: a sixth of the swarm's renewals go in rounds of more than 8, and up to 16 the
/// set's allocations and atomic operations per request cost more time than polling the pending
/// requests again, though the repolls take more instructions (joined up to 16: about 1.5% less
/// CPU over 200 seeds, 0.5% more instructions per lease op).
pub(crate) const JOINED_REQUESTS_MAX: usize = 16;

/// Awaits every future at once; their outputs in the order the futures came.
pub(crate) async fn join_in_order<F: Future>(
    futures: impl ExactSizeIterator<Item = F>,
) -> Vec<F::Output> {
    let count = futures.len();
    // A few are joined: all polled again at each wake, with the caller's waker. A set gives
    // each its own task, waker and queue entry, whose atomic reference counts and queue cost
    // more than polling a few pending requests again.
    if count <= JOINED_REQUESTS_MAX {
        return futures_util::future::join_all(futures).await;
    }
    // More are polled each when it is woken, not all at every wake: n answers cost about n
    // polls, not n squared. Each is boxed before it joins the set. A set's task holds its
    // future, and building one copied the whole request future (hundreds of bytes) three times
    // on its way into the task's allocation; a boxed request is copied once.
    let mut in_flight: futures_util::stream::FuturesUnordered<_> = futures
        .enumerate()
        .map(|(i, future)| Box::pin(async move { (i, future.await) }))
        .collect();
    let mut answered = Vec::with_capacity(count);
    while let Some(answer) = in_flight.next().await {
        answered.push(answer);
    }
    answered.sort_unstable_by_key(|&(i, _)| i);
    answered.into_iter().map(|(_, output)| output).collect()
}
