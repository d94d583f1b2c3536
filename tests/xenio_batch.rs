//! The blkif path batches: every request a wake-up finds has its guest data copied with one
//! grant-copy call ([`GrantCopier::copy_batch`]), never one call per request, and completed
//! reads go back to the guest in batches too. Checked with a grant copier that counts calls
//! around the simulated one.

mod common;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use blktap3::tapdisk::xenio::{RingMem, XenEnv, XenOpener};
use blktap3::tapdisk::SimXenOpener;
use blktap3::xen::{CopyError, CopySeg, DomId, EventChannel, GrantCopier, GrantRef, GuestCopy};
use common::xenio::*;

#[derive(Debug, Default)]
struct Counts {
    /// `copy_from_guest` / `copy_to_guest` calls (one per request: what batching removed).
    single: AtomicUsize,
    /// `copy_batch` calls with at least one copy that reads from the guest.
    batches_in: AtomicUsize,
    /// `copy_batch` calls with at least one copy that writes to the guest.
    batches_out: AtomicUsize,
    /// Copies inside batches, by direction.
    copies_in: AtomicUsize,
    copies_out: AtomicUsize,
}

struct CountingEnv {
    inner: Box<dyn XenEnv>,
    counts: Arc<Counts>,
}

impl XenEnv for CountingEnv {
    fn evtchn(&self) -> &dyn EventChannel {
        self.inner.evtchn()
    }
    fn grants(&self) -> &dyn GrantCopier {
        self
    }
    fn map_ring(&self, dom: DomId, refs: &[GrantRef]) -> io::Result<RingMem> {
        self.inner.map_ring(dom, refs)
    }
}

impl GrantCopier for CountingEnv {
    fn copy_from_guest(
        &self,
        dom: DomId,
        segs: &[CopySeg],
        dst: &mut [u8],
    ) -> Result<(), CopyError> {
        self.counts.single.fetch_add(1, Ordering::SeqCst);
        self.inner.grants().copy_from_guest(dom, segs, dst)
    }
    fn copy_to_guest(&self, dom: DomId, segs: &[CopySeg], src: &[u8]) -> Result<(), CopyError> {
        self.counts.single.fetch_add(1, Ordering::SeqCst);
        self.inner.grants().copy_to_guest(dom, segs, src)
    }
    fn copy_batch(&self, dom: DomId, copies: &mut [GuestCopy<'_>]) {
        use blktap3::xen::CopyBuf;
        let ins = copies
            .iter()
            .filter(|c| matches!(c.buf, CopyBuf::FromGuest(_)))
            .count();
        let outs = copies.len() - ins;
        if ins > 0 {
            self.counts.batches_in.fetch_add(1, Ordering::SeqCst);
        }
        if outs > 0 {
            self.counts.batches_out.fetch_add(1, Ordering::SeqCst);
        }
        self.counts.copies_in.fetch_add(ins, Ordering::SeqCst);
        self.counts.copies_out.fetch_add(outs, Ordering::SeqCst);
        self.inner.grants().copy_batch(dom, copies)
    }
}

#[derive(Debug)]
struct CountingOpener {
    sim: SimXenOpener,
    counts: Arc<Counts>,
}

impl XenOpener for CountingOpener {
    fn open(&self) -> io::Result<Box<dyn XenEnv>> {
        Ok(Box::new(CountingEnv {
            inner: self.sim.open()?,
            counts: Arc::clone(&self.counts),
        }))
    }
}

#[test]
fn a_wake_up_copies_its_whole_batch_with_one_grant_copy_call() {
    let counts = Arc::new(Counts::default());
    let rig = Rig::start_with_xen(|xen, cfg| {
        cfg.xen = Arc::new(CountingOpener {
            sim: SimXenOpener {
                xen: xen.clone(),
                dom: BE,
            },
            counts: Arc::clone(&counts),
        });
    });
    let path = rig.path("disk.raw");
    let size = 8 << 20;
    let mut model = make_raw(&path, size, 7);
    rig.open(0, &format!("aio:{}", path.display()), None);
    let mut front = rig.frontend(1, 51712, 0, None, 2);

    // 16 writes of 8 KiB, one kick.
    let mut rng = Rng(3);
    let mut ids = Vec::new();
    for i in 0..16u64 {
        let mut data = vec![0u8; 8192];
        rng.fill(&mut data);
        let sector = i * 64;
        model[(sector * 512) as usize..][..8192].copy_from_slice(&data);
        ids.push(front.submit_write(sector, &data).unwrap());
    }
    let before = counts.batches_in.load(Ordering::SeqCst);
    front.kick().unwrap();
    let done = wait(&mut front, 16);
    assert!(done.iter().all(|c| c.status == 0), "{done:?}");
    assert_eq!(counts.single.load(Ordering::SeqCst), 0);
    assert_eq!(
        counts.batches_in.load(Ordering::SeqCst) - before,
        1,
        "16 writes found by one wake-up: one grant-copy call"
    );
    assert_eq!(counts.copies_in.load(Ordering::SeqCst), 16);

    // 16 reads back, one kick: the data goes to the guest in batches, never one call per
    // request through the single-copy entry points.
    let mut reads = Vec::new();
    for i in 0..16u64 {
        reads.push((front.submit_read(i * 64, 16).unwrap(), i * 64));
    }
    front.kick().unwrap();
    let done = wait(&mut front, 16);
    for c in &done {
        assert_eq!(c.status, 0);
        let sector = reads.iter().find(|r| r.0 == c.id).unwrap().1;
        assert_eq!(
            c.data.as_deref().unwrap(),
            &model[(sector * 512) as usize..][..8192]
        );
    }
    assert_eq!(counts.single.load(Ordering::SeqCst), 0);
    assert_eq!(counts.copies_out.load(Ordering::SeqCst), 16);
    assert!(counts.batches_out.load(Ordering::SeqCst) <= 16);
}
