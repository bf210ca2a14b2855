//! Validated identifiers.
//!
//! An id is 1 to [`ID_LENGTH_BYTES_MAX`] bytes of ASCII letters, digits and the punctuation
//! `-`, `_`, `.`, `:`, `/`, `@`. The set is small on purpose: ids appear in store keys (etcd
//! prefixes, SQLite rows), log lines and command lines, and none of those should need quoting.
//! An id of up to [`ID_INLINE_BYTES_MAX`] bytes is stored inline, so cloning or dropping one
//! copies two words and touches no shared counter; a longer one is reference counted, so
//! cloning it is a counter increment, never a copy of the string.

use crate::limits::ID_LENGTH_BYTES_MAX;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

mod repr;
use repr::Repr;

/// Why a string was refused as an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The id was the empty string.
    #[error("{kind} id must not be empty")]
    Empty {
        /// "actor" or "node".
        kind: &'static str,
    },
    /// The id was longer than [`ID_LENGTH_BYTES_MAX`].
    #[error("{kind} id is {length_bytes} bytes long; the limit is {limit_bytes}")]
    TooLong {
        /// "actor" or "node".
        kind: &'static str,
        /// Length of the refused id.
        length_bytes: usize,
        /// The limit it exceeded.
        limit_bytes: usize,
    },
    /// The id contained a character outside the allowed set.
    #[error(
        "{kind} id {id:?} contains {character:?} at byte {position}; allowed are ASCII letters, \
         digits and - _ . : / @"
    )]
    BadCharacter {
        /// "actor" or "node".
        kind: &'static str,
        /// The refused id (truncated to the length limit).
        id: String,
        /// The first offending character.
        character: char,
        /// Its byte offset.
        position: usize,
    },
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@')
}

fn validate(kind: &'static str, id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if id.len() > ID_LENGTH_BYTES_MAX {
        return Err(IdError::TooLong {
            kind,
            length_bytes: id.len(),
            limit_bytes: ID_LENGTH_BYTES_MAX,
        });
    }
    if let Some((position, character)) = id.char_indices().find(|&(_, c)| !is_allowed(c)) {
        return Err(IdError::BadCharacter {
            kind,
            id: id.to_string(),
            character,
            position,
        });
    }
    Ok(())
}

/// Ids this long or shorter are stored inline (see [`ActorId::is_inline`]).
pub const ID_INLINE_BYTES_MAX: usize = repr::INLINE_BYTES_MAX;

macro_rules! define_id {
    ($name:ident, $kind:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone)]
        pub struct $name(Repr);

        // Consistent with `Eq`: a short id hashes its two words, a long one its string (the
        // two are never equal). Not the string's hash, so ids do not implement `Borrow<str>`.
        impl std::hash::Hash for $name {
            #[inline]
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                match self.0.inline_words() {
                    // One 128-bit word: one round of a hasher's mixing, not two.
                    Some([head, tail]) => {
                        state.write_u128(u128::from(head) | u128::from(tail) << 64)
                    }
                    None => self.0.as_str().hash(state),
                }
            }
        }

        // Ids are compared far more often than built: two short ones (or two clones of a
        // long one) by their two words, without reading a string.
        impl PartialEq for $name {
            #[inline]
            fn eq(&self, other: &Self) -> bool {
                self.0 == other.0
            }
        }

        impl Eq for $name {}

        impl Ord for $name {
            #[inline]
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                if let Some(order) = self.0.cmp_inline(&other.0) {
                    return order;
                }
                if self.0.identical(&other.0) {
                    return std::cmp::Ordering::Equal;
                }
                self.0.as_bytes().cmp(other.0.as_bytes())
            }
        }

        impl PartialOrd for $name {
            #[inline]
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl $name {
            /// Validates `id` and wraps it.
            pub fn new(id: impl AsRef<str>) -> Result<Self, IdError> {
                let id = id.as_ref();
                validate($kind, id)?;
                Ok(Self(Repr::new(id)))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }

            /// Whether the id is stored inline (at most [`ID_INLINE_BYTES_MAX`] bytes): its
            /// clones are copies, compared by their two words.
            #[inline]
            pub fn is_inline(&self) -> bool {
                self.0.is_inline()
            }

            /// Whether `self` and `other` are clones of one long id, sharing its allocation,
            /// which makes them equal without reading their bytes. Equal ids built separately
            /// do not, nor do short (inline) ones; a map can swap its key for the caller's
            /// clone of a long id so that later lookups with that clone compare no bytes.
            #[inline]
            pub fn same_allocation(&self, other: &Self) -> bool {
                self.0.same_allocation(&other.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.0.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Self::new(&*raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

define_id!(
    ActorId,
    "actor",
    "The id of a virtual actor: what a lease is held on."
);
define_id!(NodeId, "node", "The id of a node: who holds a lease.");

#[cfg(test)]
mod tests {
    use super::*;

    /// `id`'s hash with a fixed hasher.
    fn hash(id: &impl std::hash::Hash) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
    }

    #[test]
    fn short_ids_are_inline_and_clones_of_long_ones_share_an_allocation() {
        let short = ActorId::new("actor-1").unwrap();
        assert!(short.is_inline());
        assert!(!short.same_allocation(&short.clone()));
        assert_eq!(short, short.clone());
        assert!(NodeId::new("a".repeat(ID_INLINE_BYTES_MAX))
            .unwrap()
            .is_inline());
        let long_name = "a".repeat(ID_INLINE_BYTES_MAX + 1);
        let long = ActorId::new(&long_name).unwrap();
        let built_apart = ActorId::new(&long_name).unwrap();
        assert!(!long.is_inline());
        assert!(long.same_allocation(&long.clone()));
        assert_eq!(long, built_apart);
        assert!(!long.same_allocation(&built_apart));
        let n = NodeId::new(format!("node-{long_name}")).unwrap();
        assert!(n.same_allocation(&n.clone()));
        assert!(!n.same_allocation(&NodeId::new(n.as_str()).unwrap()));
        // Equal ids hash alike, short or long, built apart or cloned.
        for name in ["a", "actor-1", &"b".repeat(ID_INLINE_BYTES_MAX), &long_name] {
            let (one, other) = (ActorId::new(name).unwrap(), ActorId::new(name).unwrap());
            assert_eq!(hash(&one), hash(&other), "{name}");
            assert_eq!(hash(&one), hash(&one.clone()), "{name}");
        }
        assert_ne!(hash(&short), hash(&ActorId::new("actor-2").unwrap()));
    }

    /// Ids order, compare and read back exactly as their strings do, short (inline) or long,
    /// and whether or not two long ones share an allocation.
    #[test]
    fn ids_order_as_their_strings() {
        let words = [
            "a",
            "b",
            "ab",
            "actor-9",
            "actor-10",
            "actor-1",
            "node-0@1",
            "node-0@12",
            "a-very-long-actor-identifier-1",
            "a-very-long-actor-identifier-2",
            "a-very-long",
        ];
        for x in words {
            for y in words {
                let (a, b) = (ActorId::new(x).unwrap(), ActorId::new(y).unwrap());
                assert_eq!(a.cmp(&b), x.cmp(y), "{x} vs {y}");
                assert_eq!(a == b, x == y, "{x} vs {y}");
                assert_eq!(a.cmp(&a.clone()), std::cmp::Ordering::Equal);
                assert_eq!(a.as_str(), x);
            }
        }
    }

    /// Ids order as their strings on every pair of a few thousand over a small alphabet (long
    /// common prefixes, every length around the 8 and 16 byte bounds, short and long ids
    /// mixed).
    #[test]
    fn order_agrees_with_str_order() {
        let mut words = Vec::new();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let length = 1 + (state >> 33) as usize % 20;
            let word: String = (0..length)
                .map(|i| ['a', 'b', '0'][((state >> (i % 30)) % 3) as usize])
                .collect();
            words.push(format!("actor-{word}"));
            words.push(word);
        }
        let ids: Vec<ActorId> = words.iter().map(|w| ActorId::new(w).unwrap()).collect();
        for (x, a) in words.iter().zip(&ids) {
            for (y, b) in words.iter().zip(&ids).step_by(7) {
                let expected = x.cmp(y);
                assert_eq!(a.cmp(b), expected, "{x:?} vs {y:?}");
                assert_eq!(b.cmp(a), expected.reverse());
            }
        }
    }

    /// Random ids of the allowed characters, every length to the limit, and near-equal pairs
    /// of them (a copy, a copy with one or two bytes changed, a prefix): each reads back,
    /// compares, orders and hashes as its string, and a clone outlives its original.
    #[test]
    fn random_ids_behave_as_their_strings() {
        const ALLOWED: &[u8] =
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@";
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |bound: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize % bound
        };
        for _ in 0..3_000 {
            let length = 1 + next(ID_LENGTH_BYTES_MAX);
            let x: String = (0..length)
                .map(|_| ALLOWED[next(ALLOWED.len())] as char)
                .collect();
            let mut change = |s: &str| {
                let mut bytes = s.as_bytes().to_vec();
                bytes[next(length)] = ALLOWED[next(ALLOWED.len())];
                String::from_utf8(bytes).unwrap()
            };
            let changed = change(&x);
            let changed_twice = change(&changed);
            let prefix = x[..1 + next(length)].to_string();
            let a = NodeId::new(&x).unwrap();
            assert_eq!(a.as_str(), x);
            assert_eq!(a.is_inline(), x.len() <= ID_INLINE_BYTES_MAX);
            for y in [&x, &changed, &changed_twice, &prefix] {
                let b = NodeId::new(y).unwrap();
                assert_eq!(a == b, x == *y, "{x} vs {y}");
                assert_eq!(a.cmp(&b), x.cmp(y), "{x} vs {y}");
                if x == *y {
                    assert_eq!(hash(&a), hash(&b), "{x}");
                }
            }
            let clone = a.clone();
            drop(a);
            assert_eq!(clone.as_str(), x);
            assert_eq!(hash(&clone), hash(&NodeId::new(&x).unwrap()));
        }
    }

    #[test]
    fn accepts_the_documented_character_set() {
        let id = ActorId::new("Az09-_.:/@").unwrap();
        assert_eq!(id.as_str(), "Az09-_.:/@");
        assert_eq!(id.to_string(), "Az09-_.:/@");
    }

    #[test]
    fn refuses_empty_long_and_bad_ids() {
        assert_eq!(NodeId::new(""), Err(IdError::Empty { kind: "node" }));
        let long = "a".repeat(ID_LENGTH_BYTES_MAX + 1);
        assert!(matches!(
            ActorId::new(&long),
            Err(IdError::TooLong {
                length_bytes: 129,
                ..
            })
        ));
        assert!(ActorId::new("a".repeat(ID_LENGTH_BYTES_MAX)).is_ok());
        let err = ActorId::new("has space").unwrap_err();
        assert!(matches!(
            err,
            IdError::BadCharacter {
                character: ' ',
                position: 3,
                ..
            }
        ));
        assert!(err.to_string().contains("has space"));
        assert!(ActorId::new("é").is_err());
    }
}
