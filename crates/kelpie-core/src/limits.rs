//! Named bounds. Each constant carries its unit in its name; relationships between them are
//! checked at compile time.

/// Longest actor or node id accepted, in bytes.
pub const ID_LENGTH_BYTES_MAX: usize = 128;

/// Shortest lease a user may ask for. Shorter leases cannot survive one network round trip.
pub const LEASE_DURATION_MS_MIN: u64 = 100;
/// Longest lease a user may ask for (one day). Longer leases make a crashed holder block an
/// actor for longer than any operator would accept.
pub const LEASE_DURATION_MS_MAX: u64 = 24 * 60 * 60 * 1000;
/// Lease duration used when none is configured.
pub const LEASE_DURATION_MS_DEFAULT: u64 = 10_000;

const _: () = assert!(LEASE_DURATION_MS_MIN < LEASE_DURATION_MS_DEFAULT);
const _: () = assert!(LEASE_DURATION_MS_DEFAULT < LEASE_DURATION_MS_MAX);
