//! Packed weights in mappings of their own: anonymous ones, or a packed-weight cache file's
//! (`model::pack_cache`).
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

use memmap2::{Mmap, MmapMut};

use super::packed::Chunk;

/// Plain data: every bit pattern is a valid value.
///
/// # Safety
/// Every bit pattern of `size_of::<Self>()` bytes is a valid value (all-zero pages and bytes
/// read from a file are both values), there are no padding bytes, and the alignment is at most
/// a page's.
pub(super) unsafe trait Plain: Copy {}

// SAFETY: integers and a byte array of its alignment's size (no padding), aligned to 2, 8 and
// 64 bytes.
unsafe impl Plain for u16 {}
// SAFETY: as above.
unsafe impl Plain for u64 {}
// SAFETY: as above.
unsafe impl Plain for Chunk {}

enum Map {
    Writable(MmapMut),
    /// A mapping of a cache file's pages: read, never written.
    ReadOnly(Mmap),
}

/// `len` values of `T` in a mapping of their own.
pub(super) struct Pages<T> {
    map: Option<Map>,
    len: usize,
    _values: PhantomData<T>,
}

impl<T: Plain> Pages<T> {
    /// `len` zeros in fresh anonymous pages, or `None` when the system cannot map that much.
    pub(super) fn zeroed(len: usize) -> Option<Self> {
        let bytes = Self::bytes(len)?;
        let map = if bytes == 0 {
            None
        } else {
            Some(Map::Writable(MmapMut::map_anon(bytes).ok()?))
        };
        Some(Self {
            map,
            len,
            _values: PhantomData,
        })
    }

    /// `len` values read from `map` (its first `len * size_of::<T>()` bytes), or `None` when it
    /// is shorter. The values cannot be written: [`DerefMut`] gives an empty slice.
    pub(super) fn read_only(map: Option<Mmap>, len: usize) -> Option<Self> {
        let bytes = Self::bytes(len)?;
        let map = match map {
            _ if bytes == 0 => None,
            Some(m) if m.len() >= bytes => Some(Map::ReadOnly(m)),
            _ => return None,
        };
        Some(Self {
            map,
            len,
            _values: PhantomData,
        })
    }

    /// Bytes of `len` values.
    pub(super) fn bytes(len: usize) -> Option<usize> {
        len.checked_mul(std::mem::size_of::<T>())
    }

    /// The values' bytes (to write them to a file).
    pub(super) fn as_bytes(&self) -> &[u8] {
        match self.start() {
            // SAFETY: the same memory as `deref`'s slice, `len * size_of::<T>()` bytes of it
            // (that product was checked when the pages were mapped); `Plain` types have no
            // padding bytes, so every byte is initialised.
            Some(p) => unsafe {
                std::slice::from_raw_parts(p, self.len * std::mem::size_of::<T>())
            },
            None => &[],
        }
    }

    fn start(&self) -> Option<*const u8> {
        match &self.map {
            Some(Map::Writable(m)) => Some(m.as_ptr()),
            Some(Map::ReadOnly(m)) => Some(m.as_ptr()),
            None => None,
        }
    }
}

impl<T: Plain> Deref for Pages<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self.start() {
            // SAFETY: the mapping holds at least `len` values of `T` (checked when it was
            // taken), starts on a page boundary (aligned for `T`), is initialised (zeros, bytes
            // of a file, or values written through `deref_mut`; any bytes are values of `T`)
            // and lives as long as `self`. A cache file's pages could change under the view if
            // another program wrote to the file; llmgenie writes cache files whole and renames
            // them into place, never writing one that is mapped.
            Some(p) => unsafe { std::slice::from_raw_parts(p.cast::<T>(), self.len) },
            None => &[],
        }
    }
}

impl<T: Plain> DerefMut for Pages<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.map {
            // SAFETY: as in `deref`, and the borrow of `self` is unique.
            Some(Map::Writable(m)) => unsafe {
                std::slice::from_raw_parts_mut(m.as_mut_ptr().cast::<T>(), self.len)
            },
            Some(Map::ReadOnly(_)) | None => &mut [],
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
