//! [`AlignedBuf`]: an owned byte buffer whose start is aligned to [`ALIGN`] (a page), so
//! that it can be handed to the kernel for direct I/O (`O_DIRECT`, Linux AIO) as it is.
//!
//! The bytes live in a `Vec` of page-sized, page-aligned chunks viewed as one byte slice
//! (zerocopy's `IntoBytes`/`FromBytes`, no unsafe_code here): growing or shrinking keeps the
//! alignment, and moving the `AlignedBuf` never moves the bytes.

use std::fmt;
use std::ops::{Deref, DerefMut};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Alignment of every [`AlignedBuf`] (bytes): the page, which covers every direct-I/O
/// memory alignment Linux asks for (`statx` `stx_dio_mem_align` is at most the page).
pub const ALIGN: usize = crate::PAGE_SIZE;

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

const ZERO_PAGE: Page = Page([0u8; ALIGN]);

/// An owned, page-aligned byte buffer of any length (see the module doc).
#[derive(Clone, Default)]
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf {
            pages: vec![ZERO_PAGE; len.div_ceil(ALIGN)],
            len,
        }
    }

    /// A copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can hold without allocating.
    pub fn capacity(&self) -> usize {
        self.pages.len() * ALIGN
    }

    /// Change the length. Bytes kept keep their value; bytes beyond the old capacity read
    /// as zero; bytes between the old length and the old capacity keep whatever they held
    /// (a recycled buffer: callers overwrite what they use).
    pub fn set_len(&mut self, len: usize) {
        let pages = len.div_ceil(ALIGN);
        if pages > self.pages.len() {
            self.pages.resize(pages, ZERO_PAGE);
        }
        self.len = len;
    }

    /// Shrink the allocation to fit the length.
    pub fn shrink_to_fit(&mut self) {
        self.pages.truncate(self.len.div_ceil(ALIGN));
        self.pages.shrink_to_fit();
    }

    /// A copy as a plain `Vec<u8>`.
    pub fn to_vec(&self) -> Vec<u8> {
        self.as_ref().to_vec()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.pages.as_bytes()[..self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.pages.as_mut_bytes()[..self.len]
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl Eq for AlignedBuf {}

impl PartialEq<[u8]> for AlignedBuf {
    fn eq(&self, other: &[u8]) -> bool {
        self[..] == *other
    }
}

impl PartialEq<Vec<u8>> for AlignedBuf {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self[..] == other[..]
    }
}

impl From<&[u8]> for AlignedBuf {
    fn from(d: &[u8]) -> Self {
        AlignedBuf::from_slice(d)
    }
}

impl From<Vec<u8>> for AlignedBuf {
    fn from(d: Vec<u8>) -> Self {
        AlignedBuf::from_slice(&d)
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_page_and_keep_it_through_resizes() {
        for len in [0usize, 1, 511, 512, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % ALIGN, 0, "{len}");
            }
            b.set_len(len + 3 * ALIGN + 7);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b[len..].iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn set_len_keeps_contents_and_from_slice_copies() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let mut b = AlignedBuf::from_slice(&data);
        assert_eq!(b, data);
        b.set_len(100);
        assert_eq!(&b[..], &data[..100]);
        // Within the capacity the old bytes come back (recycled buffer).
        b.set_len(5000);
        assert_eq!(b, data);
        b[0] = 0xff;
        assert_eq!(b.to_vec()[0], 0xff);
        assert_eq!(b.capacity(), 2 * ALIGN);
        b.set_len(10);
        b.shrink_to_fit();
        assert_eq!(b.capacity(), ALIGN);
    }
}
