//! Packed weights in anonymous mappings of their own.
//!
//! The allocator serves blocks of a few megabytes from its heap, and `calloc` clears them
//! there, on the loading thread: for a 7B model that was four gigabytes of page faults and
//! zeroing in a row. A fresh mapping reads as zero without anyone writing it, so its pages are
//! faulted in by the workers that fill them, in parallel. (Asking for transparent huge pages
//! too made loads slower here, 9-13 s against 6-7 s for a 7B model, with no measurable change
//! in decode speed: the kernel compacts memory to find them.)
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use memmap2::MmapMut;

use super::packed::Chunk;

/// Plain data that all-zero bytes are a valid value of.
///
/// # Safety
/// Every all-zero bit pattern is a valid value, any bit pattern written through the slice stays
/// one, and the alignment is at most a page's.
pub(super) unsafe trait Zeroable: Copy {}

// SAFETY: integers and a byte array, aligned to 2, 8 and 64 bytes.
unsafe impl Zeroable for u16 {}
// SAFETY: as above.
unsafe impl Zeroable for u64 {}
// SAFETY: as above.
unsafe impl Zeroable for Chunk {}

/// `len` values of `T` in a mapping of their own.
pub(super) struct Pages<T> {
    map: Option<MmapMut>,
    len: usize,
    _values: PhantomData<T>,
}

impl<T: Zeroable> Pages<T> {
    /// `len` zeros, or `None` when the system cannot map that much.
    pub(super) fn zeroed(len: usize) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let map = if bytes == 0 {
            None
        } else {
            Some(MmapMut::map_anon(bytes).ok()?)
        };
        Some(Self {
            map,
            len,
            _values: PhantomData,
        })
    }
}

impl<T: Zeroable> Deref for Pages<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.map {
            // SAFETY: the mapping holds `len` values of `T` (its size was computed from them),
            // starts on a page boundary (aligned for `T`), is initialised (zero, or values
            // written through `deref_mut`) and lives as long as `self`.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<T>(), self.len) },
            None => &[],
        }
    }
}

impl<T: Zeroable> DerefMut for Pages<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.map {
            // SAFETY: as in `deref`, and the borrow of `self` is unique.
            Some(m) => unsafe {
                std::slice::from_raw_parts_mut(m.as_mut_ptr().cast::<T>(), self.len)
            },
            None => &mut [],
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_pages_read_as_zero_and_keep_what_is_written() {
        let mut p = Pages::<u64>::zeroed(1 << 20).expect("8 MiB mapping");
        assert_eq!(p.len(), 1 << 20);
        assert!(p.iter().all(|&v| v == 0));
        p[12_345] = 7;
        p[(1 << 20) - 1] = u64::MAX;
        assert_eq!((p[12_345], p[(1 << 20) - 1], p[0]), (7, u64::MAX, 0));
        let empty = Pages::<Chunk>::zeroed(0).expect("nothing to map");
        assert!(empty.is_empty());
        assert!(Pages::<Chunk>::zeroed(usize::MAX).is_none());
    }
}
