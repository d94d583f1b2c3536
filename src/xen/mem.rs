//! Raw shared memory: an mmap'd range that another party (a guest, via Xen) may change at any
//! time. It is never exposed as a Rust reference; every access is an atomic (ring indices) or a
//! volatile copy (slot and data bytes), which is what [`SharedMem`] requires.

use std::io;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::blkif::SharedMem;

/// An owned, page-aligned `mmap` of shared memory; `munmap`ed on drop.
#[derive(Debug)]
pub struct MappedRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory with no thread affinity; all accesses go through
// atomics or volatile copies, which are sound to perform from any thread concurrently.
unsafe impl Send for MappedRegion {}
// SAFETY: as above: `&MappedRegion` only permits atomic and volatile accesses.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// A zeroed, private-to-this-process but `MAP_SHARED` anonymous region of `len` bytes.
    pub fn anonymous(len: usize) -> io::Result<MappedRegion> {
        let nz = std::num::NonZeroUsize::new(len).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh anonymous mapping does not alias any existing Rust object.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }?;
        Ok(MappedRegion {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Map `len` bytes of `fd` at `offset` (`MAP_SHARED`).
    pub fn map_fd<F: AsFd>(
        fd: F,
        offset: libc::off_t,
        len: usize,
        writable: bool,
    ) -> io::Result<Self> {
        let nz = std::num::NonZeroUsize::new(len).ok_or(io::ErrorKind::InvalidInput)?;
        let mut prot = ProtFlags::PROT_READ;
        if writable {
            prot |= ProtFlags::PROT_WRITE;
        }
        // SAFETY: a new mapping chosen by the kernel (no MAP_FIXED) cannot alias Rust objects;
        // the file's contents are only reached through atomics/volatile copies.
        let ptr = unsafe { mmap(None, nz, prot, MapFlags::MAP_SHARED, fd, offset) }?;
        Ok(MappedRegion {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Take ownership of an existing mapping.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a live, page-aligned `mmap` owned by nobody else, readable (and
    /// writable if writes will be made), and must stay mapped until this value is dropped,
    /// which `munmap`s it.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> MappedRegion {
        MappedRegion { ptr, len }
    }

    /// Start address (for building ioctl arguments; never dereference it directly).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never, for a successful mapping).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "shared memory access {off}+{len} beyond {}",
            self.len
        );
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4);
        assert!(off.is_multiple_of(4), "unaligned atomic access at {off}");
        // SAFETY: in bounds (checked), 4-aligned (page-aligned base + 4-aligned offset), valid
        // for the lifetime of `&self`; every Rust access to ring index words is atomic.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast::<u32>()) }
    }

    /// Copy `buf.len()` bytes at `off` out of the region (volatile). Panics if out of bounds.
    pub fn read_at(&self, off: usize, buf: &mut [u8]) {
        self.check(off, buf.len());
        // SAFETY: bounds checked above; `buf` is private memory that cannot overlap the mapping
        // (it is a Rust reference, the mapping never is).
        unsafe { volatile_copy_out(self.ptr.as_ptr().add(off), buf) }
    }

    /// Copy `data` into the region at `off` (volatile). Panics if out of bounds.
    pub fn write_at(&self, off: usize, data: &[u8]) {
        self.check(off, data.len());
        // SAFETY: bounds checked above; no Rust reference to the mapping exists.
        unsafe { volatile_copy_in(self.ptr.as_ptr().add(off), data) }
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: we own the mapping (constructor contracts) and no pointer into it outlives
        // `self` (borrows of `self` end before drop).
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            log::error!("munmap of shared region failed: {e}");
        }
    }
}

/// The widest plain load/store the baseline target has: 16-byte SSE2 vectors on x86 (a
/// volatile access of a vector type is one instruction; of a `u128` it is two), else u64.
#[cfg(target_arch = "x86_64")]
type Wide = core::arch::x86_64::__m128i;
#[cfg(target_arch = "x86")]
type Wide = core::arch::x86::__m128i;
#[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
type Wide = u64;
const WIDE: usize = std::mem::size_of::<Wide>();
/// Wide words per unrolled iteration: volatile accesses are never merged or vectorised, so
/// unrolling is what keeps the copies near memory speed.
const UNROLL: usize = 4;

/// Copy from shared memory with volatile loads: `WIDE` bytes at a time once aligned.
///
/// # Safety
/// `src..src+dst.len()` must be valid for reads for the duration of the call.
unsafe fn volatile_copy_out(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let d = dst.as_mut_ptr();
    let mut i = 0;
    while i < n && !(src as usize + i).is_multiple_of(WIDE) {
        // SAFETY: `src + i` with `i < n` is readable per the function contract.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
    while i + UNROLL * WIDE <= n {
        // SAFETY: `src + i .. src + i + UNROLL * WIDE` is readable (inside the readable
        // length n) and WIDE-aligned (the head loop stopped at an aligned address and i only
        // grows by multiples of WIDE since); the stores go to `dst[i..i + UNROLL * WIDE]`,
        // in bounds, unaligned stores.
        unsafe {
            let p = src.add(i).cast::<Wide>();
            let w = [
                p.read_volatile(),
                p.add(1).read_volatile(),
                p.add(2).read_volatile(),
                p.add(3).read_volatile(),
            ];
            for (k, v) in w.into_iter().enumerate() {
                d.add(i + k * WIDE).cast::<Wide>().write_unaligned(v);
            }
        }
        i += UNROLL * WIDE;
    }
    while i + WIDE <= n {
        // SAFETY: as above, for one word.
        unsafe {
            let v = src.add(i).cast::<Wide>().read_volatile();
            d.add(i).cast::<Wide>().write_unaligned(v);
        }
        i += WIDE;
    }
    while i < n {
        // SAFETY: `src + i` with `i < n` is readable per the function contract.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
}

/// Copy into shared memory with volatile stores.
///
/// # Safety
/// `dst..dst+src.len()` must be valid for writes for the duration of the call.
unsafe fn volatile_copy_in(dst: *mut u8, src: &[u8]) {
    let n = src.len();
    let s = src.as_ptr();
    let mut i = 0;
    while i < n && !(dst as usize + i).is_multiple_of(WIDE) {
        // SAFETY: `dst + i` with `i < n` is writable per the function contract.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
    while i + UNROLL * WIDE <= n {
        // SAFETY: `dst + i .. dst + i + UNROLL * WIDE` is writable (inside n) and
        // WIDE-aligned (as in volatile_copy_out); the loads read `src[i..]` in bounds,
        // unaligned.
        unsafe {
            let q = s.add(i).cast::<Wide>();
            let w = [
                q.read_unaligned(),
                q.add(1).read_unaligned(),
                q.add(2).read_unaligned(),
                q.add(3).read_unaligned(),
            ];
            let p = dst.add(i).cast::<Wide>();
            for (k, v) in w.into_iter().enumerate() {
                p.add(k).write_volatile(v);
            }
        }
        i += UNROLL * WIDE;
    }
    while i + WIDE <= n {
        // SAFETY: as above, for one word.
        unsafe {
            let v = s.add(i).cast::<Wide>().read_unaligned();
            dst.add(i).cast::<Wide>().write_volatile(v);
        }
        i += WIDE;
    }
    while i < n {
        // SAFETY: `dst + i` with `i < n` is writable per the function contract.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
}

impl SharedMem for MappedRegion {
    fn size(&self) -> usize {
        self.len
    }
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        self.word(off).load(order)
    }
    fn store_u32(&self, off: usize, val: u32, order: Ordering) {
        self.word(off).store(val, order)
    }
    fn read_bytes(&self, off: usize, buf: &mut [u8]) {
        self.read_at(off, buf)
    }
    fn write_bytes(&self, off: usize, data: &[u8]) {
        self.write_at(off, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every start offset and length around the word and unroll sizes copies exactly the
    /// bytes asked for, both ways, and nothing next to them.
    #[test]
    fn copies_at_every_alignment_and_length_touch_only_their_bytes() {
        let r = MappedRegion::anonymous(4096).unwrap();
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let lens = [0usize, 1, 7, 8, 15, 16, 17, 63, 64, 65, 127, 200, 1000];
        for off in 0..48usize {
            for &len in &lens {
                r.write_at(0, &pattern);
                let mut out = vec![0xEEu8; len + 2];
                r.read_at(off, &mut out[1..=len]);
                assert_eq!(&out[1..=len], &pattern[off..off + len], "read {off}+{len}");
                assert_eq!((out[0], out[len + 1]), (0xEE, 0xEE));
                let data: Vec<u8> = (0..len).map(|i| !(i as u8)).collect();
                r.write_at(off, &data);
                let mut all = vec![0u8; 4096];
                r.read_at(0, &mut all);
                assert_eq!(&all[off..off + len], &data[..], "write {off}+{len}");
                assert_eq!(&all[..off], &pattern[..off]);
                assert_eq!(&all[off + len..], &pattern[off + len..]);
            }
        }
    }
}
