//! The 16 bytes an id is stored in: a short id inline, a long one reference counted.
//!
//! An id of up to [`INLINE_BYTES_MAX`] bytes is kept in the value itself, padded with zero
//! bytes (an id never contains one, so the padding also gives its length): cloning or dropping
//! it copies two words and touches no shared counter. A longer id is an `Arc<str>`: the value
//! holds [`HEAP_MARKER`], the length and the string's data pointer, and cloning it takes a
//! count. The representation is decided by the length alone, so two ids are equal exactly
//! when their two words are, unless both are long and were built apart; then their strings
//! are compared. The first word is never zero (an id's first byte, or the marker, is not),
//! which keeps `Option<ActorId>` at 16 bytes too.
//!
//! Why not a small-string crate: `smol_str` (24 bytes), `ecow` (16 bytes, but 24 in an
//! `Option`) and `lean_string` (16 bytes) were each measured in `swarm_bench` in this type's
//! place and gained nothing: their equality and hashing read the string through a branch on
//! its representation, where most of the simulator's comparisons are of an id with a copy of
//! itself, and their long-string paths are inlined at every clone and drop.

use std::num::NonZeroU64;
use std::sync::Arc;

/// Ids this long or shorter are stored inline.
pub(super) const INLINE_BYTES_MAX: usize = 16;

/// The first byte of a reference-counted id: a control character, never an id's first byte.
const HEAP_MARKER: u8 = 0x01;

/// An id's two words: the 16 bytes in memory order, each word native-endian. Inline: the id's
/// bytes, zero-padded. Long: [`HEAP_MARKER`] and the length as the first word's first two
/// bytes (the rest zero), the string's exposed data address as the second word.
#[repr(C)]
pub(super) struct Repr {
    head: NonZeroU64,
    tail: u64,
}

const _: () = assert!(std::mem::size_of::<Repr>() == INLINE_BYTES_MAX);
const _: () = assert!(std::mem::size_of::<Option<Repr>>() == INLINE_BYTES_MAX);
const _: () = assert!(crate::limits::ID_LENGTH_BYTES_MAX <= u8::MAX as usize);

impl Repr {
    /// Stores `id`, which is not empty and contains no zero byte (the caller validated it).
    pub(super) fn new(id: &str) -> Self {
        let bytes = id.as_bytes();
        assert!(!bytes.is_empty(), "an id is not empty");
        assert!(!bytes.contains(&0), "an id contains no zero byte");
        let mut all = [0u8; INLINE_BYTES_MAX];
        if bytes.len() <= INLINE_BYTES_MAX {
            all[..bytes.len()].copy_from_slice(bytes);
        } else {
            let length = u8::try_from(bytes.len()).expect("ids are at most 255 bytes long");
            let data = Arc::into_raw(Arc::<str>::from(id)).cast::<u8>();
            all[0] = HEAP_MARKER;
            all[1] = length;
            all[8..].copy_from_slice(&(data.expose_provenance() as u64).to_ne_bytes());
        }
        let word = |from: usize| u64::from_ne_bytes(all[from..from + 8].try_into().expect("8"));
        let repr = Self {
            head: NonZeroU64::new(word(0)).expect("an id's first byte is not zero"),
            tail: word(8),
        };
        assert_eq!(repr.as_bytes(), bytes);
        repr
    }

    /// Whether the id is stored inline.
    #[inline]
    pub(super) fn is_inline(&self) -> bool {
        self.head.get().to_ne_bytes()[0] != HEAP_MARKER
    }

    /// Whether the two words are equal: the same short id, or clones of one long id.
    #[inline]
    pub(super) fn identical(&self, other: &Self) -> bool {
        self.head == other.head && self.tail == other.tail
    }

    /// Whether both are clones of one long id: equal without reading the string.
    #[inline]
    pub(super) fn same_allocation(&self, other: &Self) -> bool {
        !self.is_inline() && self.identical(other)
    }

    /// Byte-wise (so `str`) order where both are inline: their zero-padded bytes as two
    /// big-endian words (padding sorts before every byte, so a prefix sorts first).
    #[inline]
    pub(super) fn cmp_inline(&self, other: &Self) -> Option<std::cmp::Ordering> {
        if !(self.is_inline() && other.is_inline()) {
            return None;
        }
        let key = |repr: &Self| {
            (
                u64::from_be_bytes(repr.head.get().to_ne_bytes()),
                u64::from_be_bytes(repr.tail.to_ne_bytes()),
            )
        };
        Some(key(self).cmp(&key(other)))
    }

    /// A short id's two words, which are what it hashes; `None` for a long one, which hashes
    /// its string (a short and a long id are never equal, so both are consistent with `Eq`).
    #[inline]
    pub(super) fn inline_words(&self) -> Option<[u64; 2]> {
        self.is_inline().then_some([self.head.get(), self.tail])
    }

    /// The id's bytes.
    #[inline]
    pub(super) fn as_bytes(&self) -> &[u8] {
        if !self.is_inline() {
            return self.heap_bytes();
        }
        // The padding is the last bytes in memory: the top bytes of the words read as
        // little-endian.
        let high = u64::from_le_bytes(self.tail.to_ne_bytes());
        let length = if high != 0 {
            16 - (high.leading_zeros() / 8) as usize
        } else {
            8 - (u64::from_le_bytes(self.head.get().to_ne_bytes()).leading_zeros() / 8) as usize
        };
        // SAFETY: `Repr` is `repr(C)` over two words (16 bytes, no padding, all initialized),
        // so it can be read as bytes for as long as it is borrowed.
        let all = unsafe { &*std::ptr::from_ref(self).cast::<[u8; INLINE_BYTES_MAX]>() };
        &all[..length]
    }

    /// The id as a string slice.
    #[inline]
    pub(super) fn as_str(&self) -> &str {
        // SAFETY: the bytes are a `str`'s: copied whole (inline) or its own (long).
        unsafe { std::str::from_utf8_unchecked(self.as_bytes()) }
    }

    /// A long id's string, as `Arc::into_raw` gave it.
    fn heap_str(&self) -> *const str {
        debug_assert!(!self.is_inline());
        let length = usize::from(self.head.get().to_ne_bytes()[1]);
        let data = std::ptr::with_exposed_provenance::<u8>(self.tail as usize);
        std::ptr::slice_from_raw_parts(data, length) as *const str
    }

    /// A long id's bytes; out of line, as every path of a long id is, so that the short path
    /// stays a few instructions wherever an id is cloned, dropped, compared or read.
    #[cold]
    #[inline(never)]
    fn heap_bytes(&self) -> &[u8] {
        // SAFETY: the string is alive while `self` holds its reference count.
        unsafe { &*self.heap_str() }.as_bytes()
    }

    /// Two long ids built apart: their strings compared.
    #[cold]
    #[inline(never)]
    fn heap_eq(&self, other: &Self) -> bool {
        self.heap_bytes() == other.heap_bytes()
    }

    /// Takes a count of a long id's string for a clone.
    #[cold]
    #[inline(never)]
    fn count_clone(&self) {
        // SAFETY: the pointer came from `Arc::into_raw` and `self` holds one count, so the
        // allocation is alive; the clone being made owns the new count.
        unsafe { Arc::increment_strong_count(self.heap_str()) };
    }

    /// Gives back a long id's count, once, as it is dropped.
    #[cold]
    #[inline(never)]
    fn drop_count(&mut self) {
        // SAFETY: the pointer came from `Arc::into_raw` and `self` owns one count, given back
        // here once (from `drop`).
        drop(unsafe { Arc::from_raw(self.heap_str()) });
    }
}

impl PartialEq for Repr {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.identical(other) || (!self.is_inline() && !other.is_inline() && self.heap_eq(other))
    }
}

impl Eq for Repr {}

impl Clone for Repr {
    #[inline]
    fn clone(&self) -> Self {
        if !self.is_inline() {
            self.count_clone();
        }
        Self {
            head: self.head,
            tail: self.tail,
        }
    }
}

impl Drop for Repr {
    #[inline]
    fn drop(&mut self) {
        if !self.is_inline() {
            self.drop_count();
        }
    }
}

// A long id shares an `Arc<str>`, which is `Send` and `Sync`; a short one is plain bytes. The
// words are integers, so `Repr` is both without saying so; checked here for the reader.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Repr>();
    send_sync::<Arc<str>>();
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length from 1 to 40 bytes round-trips, is inline exactly up to 16 bytes, and
    /// equals exactly the ids of the same string, inline or not; short ids order as their
    /// strings; clones of a long id share its allocation and keep it alive after the original
    /// is dropped.
    #[test]
    fn every_length_round_trips_compares_and_orders_as_its_string() {
        let alphabet = b"ab-9";
        let strings: Vec<String> = (1..=40)
            .flat_map(|length| {
                (0..alphabet.len()).map(move |shift| {
                    (0..length)
                        .map(|i| alphabet[(i * 7 + shift) % alphabet.len()] as char)
                        .collect()
                })
            })
            .collect();
        let reprs: Vec<Repr> = strings.iter().map(|s| Repr::new(s)).collect();
        for (s, repr) in strings.iter().zip(&reprs) {
            assert_eq!(repr.as_str(), s);
            assert_eq!(repr.is_inline(), s.len() <= INLINE_BYTES_MAX, "{s}");
            let apart = Repr::new(s);
            assert!(*repr == apart);
            assert!(!repr.same_allocation(&apart));
            let clone = repr.clone();
            assert!(*repr == clone);
            assert_eq!(repr.same_allocation(&clone), !repr.is_inline());
            for (t, other) in strings.iter().zip(&reprs) {
                assert_eq!(*repr == *other, s == t, "{s} vs {t}");
                if let Some(order) = repr.cmp_inline(other) {
                    assert_eq!(order, s.cmp(t), "{s} vs {t}");
                }
            }
        }
        let long = Repr::new(&"x".repeat(100));
        let clone = long.clone();
        drop(long);
        assert_eq!(clone.as_str(), "x".repeat(100));
    }

    #[test]
    #[should_panic(expected = "no zero byte")]
    fn a_zero_byte_is_a_bug() {
        let _ = Repr::new("a\0b");
    }
}
