//! What a lease looks like in etcd, and reading it back.
//!
//! One key per held lease: `<prefix><actor id>`, whose value is the holder's node id and which
//! is attached to the holder's session lease. The key exists exactly while the lease is held:
//! release deletes it, and etcd deletes it when the session lease expires. Everything else is
//! etcd's own metadata:
//!
//! - the fencing token is the key's `create_revision`, the cluster revision of the transaction
//!   that created it. Revisions are cluster-wide and strictly increase with every write, so a
//!   key re-created after a delete (release or expiry) always has a larger `create_revision`
//!   than any earlier incarnation, while writes to an existing key (renewals) leave it as is;
//! - the renewal count is the key's `version` minus one: version counts the writes to the key
//!   since it was created, and only the creating acquire and the renewals write it.

use kelpie_core::{ActorId, FencingToken, NodeId};

use super::api::EtcdKeyValue;
use crate::error::StoreError;
use crate::lease::Lease;

/// A lease key's name under a prefix.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
    /// Mutation: the token is the key's `mod_revision`.
    #[cfg(feature = "mutations")]
    pub mod_revision_token: bool,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            #[cfg(feature = "mutations")]
            mod_revision_token: false,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key of `actor_id`'s lease.
    pub fn actor_key(&self, actor_id: &ActorId) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.prefix.len() + actor_id.as_str().len());
        key.extend_from_slice(self.prefix.as_bytes());
        key.extend_from_slice(actor_id.as_str().as_bytes());
        key
    }

    /// The first key after every key under the prefix, for range reads.
    pub fn prefix_end(&self) -> Vec<u8> {
        let mut end = self.prefix.as_bytes().to_vec();
        // Increment the last byte that can be; a prefix of only 0xff bytes (not valid UTF-8,
        // so impossible here) would need the "all keys from" range instead.
        while let Some(last) = end.pop() {
            if last < u8::MAX {
                end.push(last + 1);
                return end;
            }
        }
        vec![0]
    }

    /// The actor whose lease `key` is.
    fn actor_of(&self, key: &[u8]) -> Result<ActorId, StoreError> {
        let name = key
            .strip_prefix(self.prefix.as_bytes())
            .and_then(|rest| std::str::from_utf8(rest).ok())
            .ok_or_else(|| corrupt(key, "not a lease key under the prefix"))?;
        ActorId::new(name).map_err(|e| corrupt(key, &e.to_string()))
    }

    /// Reads a lease key back, checking it is one Kelpie wrote.
    pub fn decode(&self, kv: &EtcdKeyValue) -> Result<StoredLease, StoreError> {
        let key = kv.key.as_slice();
        let actor_id = self.actor_of(key)?;
        let holder = std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|v| NodeId::new(v).ok())
            .ok_or_else(|| corrupt(key, "the value is not a node id"))?;
        #[cfg(feature = "mutations")]
        let token_revision = match self.mod_revision_token {
            true => kv.mod_revision,
            false => kv.create_revision,
        };
        #[cfg(not(feature = "mutations"))]
        let token_revision = kv.create_revision;
        let token = u64::try_from(token_revision)
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| corrupt(key, "create_revision is not positive"))?;
        let renewal_count = u64::try_from(kv.version)
            .ok()
            .and_then(|v| v.checked_sub(1))
            .ok_or_else(|| corrupt(key, "version is not positive"))?;
        if kv.lease == 0 {
            // A key with no etcd lease never expires, so it is not one of ours.
            return Err(corrupt(key, "not attached to an etcd lease"));
        }
        Ok(StoredLease {
            actor_id,
            holder,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            fencing_token: FencingToken(token),
            session_lease_id: kv.lease,
            renewal_count,
        })
    }
}

/// A lease key as etcd returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StoredLease {
    pub actor_id: ActorId,
    pub holder: NodeId,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub fencing_token: FencingToken,
    /// The etcd lease (the holder's session) the key is attached to.
    pub session_lease_id: i64,
    pub renewal_count: u64,
}

impl StoredLease {
    /// The lease, with times on the manager's clock.
    pub fn lease(&self, acquired_at_ms: u64, expires_at_ms: u64) -> Lease {
        Lease {
            actor_id: self.actor_id.clone(),
            holder: self.holder.clone(),
            fencing_token: self.fencing_token,
            acquired_at_ms,
            expires_at_ms,
            renewal_count: self.renewal_count,
        }
    }
}

fn corrupt(key: &[u8], reason: &str) -> StoreError {
    StoreError::Corrupt {
        location: format!("etcd key {:?}", String::from_utf8_lossy(key)),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefix_plus_actor_and_prefix_end_bounds_them() {
        let keys = Keys::new("/kelpie/leases/");
        let actor = ActorId::new("a/b:c").unwrap();
        assert_eq!(keys.actor_key(&actor), b"/kelpie/leases/a/b:c".to_vec());
        assert_eq!(keys.actor_of(&keys.actor_key(&actor)).unwrap(), actor);
        assert_eq!(keys.prefix_end(), b"/kelpie/leases0".to_vec());
        assert!(keys.actor_key(&actor) < keys.prefix_end());
        assert!(keys.actor_of(b"/other/x").is_err());
        assert!(keys.actor_of(b"/kelpie/leases/bad key").is_err());
    }
}
