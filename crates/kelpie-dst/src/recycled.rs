//! Vectors whose allocation outlives them: a dropped [`Recycled`] vector, emptied, is kept on
//! its thread for the next one of its kind. A sweep builds one history and one store log per
//! seed, each growing to thousands of entries; growing each from empty copied it over and over
//! (about 1% of a swarm seed each) and touched fresh memory.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::thread::LocalKey;

/// Largest allocation kept for the next vector; a larger one is freed.
pub(crate) const SPARE_BYTES_MAX: usize = 256 << 20;

/// Where the spare allocation of one kind of vector is kept: a `thread_local!` of an empty
/// `RefCell<Vec<T>>`.
pub(crate) type Spare<T> = LocalKey<RefCell<Vec<T>>>;

/// A vector that takes its kind's spare allocation when made and leaves its own, emptied,
/// when dropped (the larger of the two is kept).
pub(crate) struct Recycled<T: 'static> {
    items: Vec<T>,
    spare: &'static Spare<T>,
}

impl<T: 'static> Recycled<T> {
    /// An empty vector, with the spare allocation if there is one.
    pub(crate) fn new(spare: &'static Spare<T>) -> Self {
        // `try_`: at thread exit the spare may be gone already.
        let items = spare
            .try_with(|spare| std::mem::take(&mut *spare.borrow_mut()))
            .unwrap_or_default();
        debug_assert!(items.is_empty());
        Self { items, spare }
    }
}

impl<T> Deref for Recycled<T> {
    type Target = Vec<T>;

    fn deref(&self) -> &Vec<T> {
        &self.items
    }
}

impl<T> DerefMut for Recycled<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.items
    }
}

impl<T> Drop for Recycled<T> {
    fn drop(&mut self) {
        let mut items = std::mem::take(&mut self.items);
        items.clear();
        if items.capacity().saturating_mul(std::mem::size_of::<T>()) > SPARE_BYTES_MAX {
            return;
        }
        // `try_`: at thread exit the spare may be gone already; the vector is freed then.
        let _ = self.spare.try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if items.capacity() > spare.capacity() {
                *spare = items;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static SPARE_NUMBERS: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    }

    /// A new vector starts empty even where it reuses the allocation of a dropped one, and a
    /// vector in use is never shared with another; of two dropped, the larger is kept.
    #[test]
    fn a_new_vector_reuses_a_dropped_ones_allocation_empty() {
        let mut first = Recycled::new(&SPARE_NUMBERS);
        first.extend(0..100);
        let (capacity, address) = (first.capacity(), first.as_ptr());
        let mut alive = Recycled::new(&SPARE_NUMBERS);
        alive.push(5);
        assert_ne!(alive.as_ptr(), address, "in use");
        drop(first);
        let mut small = Recycled::new(&SPARE_NUMBERS);
        small.push(1);
        drop(small);
        let mut second = Recycled::new(&SPARE_NUMBERS);
        assert!(second.is_empty());
        assert_eq!((second.capacity(), second.as_ptr()), (capacity, address));
        second.push(7);
        assert_eq!((&second[..], &alive[..]), (&[7][..], &[5][..]));
    }
}
