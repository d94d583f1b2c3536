//! Simulations: grant copy checks, grant mapping aliasing, event channels, in-memory xenstore
//! (transactions, conflicts, permissions, watches).

use std::os::fd::AsFd;

use blktap3::blkif::SharedMem;
use blktap3::tapdisk::xenio::segs::{request_copy_segs, BufLayout};
use blktap3::xen::sim::{MemXenStore, SimCopyOp, SimCopyPtr, SimXen};
use blktap3::xen::xenstore::{transaction, Access, Committed, Perm, Tx, XenStore, XsError};
use blktap3::xen::*;
use nix::errno::Errno;

const BACK: DomId = DomId(0);
const GUEST: DomId = DomId(5);

fn seg(gref: GrantRef, page_off: u16, len: u16, buf_off: usize) -> CopySeg {
    CopySeg {
        gref,
        page_off,
        len,
        buf_off,
    }
}

#[test]
fn grant_copy_moves_bytes_both_ways() {
    let xen = SimXen::new();
    let d = xen.create_domain(GUEST, 16).unwrap();
    let p = d.alloc_page().unwrap();
    let g = d.grant(p, BACK, false);
    let pattern: Vec<u8> = (0..4096).map(|i| (i * 7 % 251) as u8).collect();
    d.mem().write_at(p * 4096, &pattern);
    let grants = xen.grants(BACK);
    let mut buf = vec![0u8; 8192];
    grants
        .copy_from_guest(GUEST, &[seg(g, 512, 1024, 4096)], &mut buf)
        .unwrap();
    assert_eq!(&buf[4096..5120], &pattern[512..1536]);
    assert!(buf[..4096].iter().all(|&b| b == 0));
    let src = vec![0xabu8; 512];
    grants
        .copy_to_guest(GUEST, &[seg(g, 3584, 512, 0)], &src)
        .unwrap();
    let mut back = vec![0u8; 512];
    d.mem().read_at(p * 4096 + 3584, &mut back);
    assert_eq!(back, src);
}

#[test]
fn grant_copy_per_segment_errors() {
    let xen = SimXen::new();
    let d = xen.create_domain(GUEST, 16).unwrap();
    let other = xen.create_domain(DomId(9), 4).unwrap();
    let rw = d.grant(d.alloc_page().unwrap(), BACK, false);
    let ro = d.grant(d.alloc_page().unwrap(), BACK, true);
    let not_mine = d.grant(d.alloc_page().unwrap(), DomId(9), false);
    let grants = xen.grants(BACK);
    let mut buf = vec![0u8; 4096 * 4];
    // Reading a read-only grant is fine, writing it is not.
    grants
        .copy_from_guest(GUEST, &[seg(ro, 0, 4096, 0)], &mut buf)
        .unwrap();
    let e = grants
        .copy_to_guest(GUEST, &[seg(rw, 0, 512, 0), seg(ro, 0, 512, 512)], &buf)
        .unwrap_err();
    assert!(
        matches!(
            e,
            CopyError::Segment {
                index: 1,
                status: GrantStatus::PermissionDenied,
                failed: 1
            }
        ),
        "{e:?}"
    );
    // Unknown ref, ref granted to someone else, unknown domain.
    let e = grants
        .copy_from_guest(GUEST, &[seg(GrantRef(999), 0, 512, 0)], &mut buf)
        .unwrap_err();
    assert!(matches!(
        e,
        CopyError::Segment {
            index: 0,
            status: GrantStatus::BadGntRef,
            ..
        }
    ));
    let e = grants
        .copy_from_guest(
            GUEST,
            &[
                seg(rw, 0, 8, 0),
                seg(not_mine, 0, 512, 0),
                seg(GrantRef(3), 0, 1, 0),
            ],
            &mut buf,
        )
        .unwrap_err();
    assert!(matches!(
        e,
        CopyError::Segment {
            index: 1,
            status: GrantStatus::PermissionDenied,
            failed: 2
        }
    ));
    let e = grants
        .copy_from_guest(DomId(77), &[seg(rw, 0, 512, 0)], &mut buf)
        .unwrap_err();
    assert!(matches!(
        e,
        CopyError::Segment {
            status: GrantStatus::BadDomain,
            ..
        }
    ));
    // Revoked grants are gone.
    assert!(d.revoke(rw));
    let e = grants
        .copy_from_guest(GUEST, &[seg(rw, 0, 512, 0)], &mut buf)
        .unwrap_err();
    assert!(matches!(
        e,
        CopyError::Segment {
            status: GrantStatus::BadGntRef,
            ..
        }
    ));
    drop(other);
}

#[test]
fn grant_copy_bounds_are_checked_before_copying() {
    let xen = SimXen::new();
    let d = xen.create_domain(GUEST, 4).unwrap();
    let g = d.grant(d.alloc_page().unwrap(), BACK, false);
    let grants = xen.grants(BACK);
    let mut buf = vec![0x11u8; 1024];
    for bad in [
        seg(g, 4000, 200, 0),
        seg(g, 0, 1024, 1),
        seg(g, 0, 8, usize::MAX - 2),
    ] {
        let e = grants
            .copy_from_guest(GUEST, &[seg(g, 0, 512, 0), bad], &mut buf)
            .unwrap_err();
        assert!(matches!(e, CopyError::OutOfBounds { index: 1 }), "{e:?}");
        // Nothing copied, not even the good first segment.
        assert!(buf.iter().all(|&b| b == 0x11));
    }
    let e = grants
        .copy_to_guest(GUEST, &[seg(g, 4096, 1, 0)], &buf)
        .unwrap_err();
    assert!(matches!(e, CopyError::OutOfBounds { index: 0 }));
}

#[test]
fn hypervisor_level_copy_reports_bad_copy_arg() {
    // Below the safe wrapper: an op crossing the page end gets GNTST_bad_copy_arg, like Xen.
    let xen = SimXen::new();
    let d = xen.create_domain(GUEST, 4).unwrap();
    let g = d.grant(d.alloc_page().unwrap(), BACK, false);
    let mut buf = vec![0u8; 8192];
    let mut ops = [
        SimCopyOp {
            source: SimCopyPtr::Foreign(GUEST, g, 4000),
            dest: SimCopyPtr::Local(0),
            len: 200,
            status: GrantStatus::Okay,
        },
        SimCopyOp {
            source: SimCopyPtr::Foreign(GUEST, g, 0),
            dest: SimCopyPtr::Local(8000),
            len: 400,
            status: GrantStatus::Okay,
        },
        SimCopyOp {
            source: SimCopyPtr::Local(0),
            dest: SimCopyPtr::Local(1),
            len: 1,
            status: GrantStatus::Okay,
        },
        SimCopyOp {
            source: SimCopyPtr::Foreign(GUEST, g, 0),
            dest: SimCopyPtr::Local(0),
            len: 4096,
            status: GrantStatus::BadPage,
        },
    ];
    xen.grant_copy(BACK, &mut ops, &mut buf);
    let st: Vec<GrantStatus> = ops.iter().map(|o| o.status).collect();
    assert_eq!(
        st,
        vec![
            GrantStatus::BadCopyArg,
            GrantStatus::BadVirtAddr,
            GrantStatus::GeneralError,
            GrantStatus::Okay
        ]
    );
    assert_eq!(GrantStatus::from_i16(-10), GrantStatus::BadCopyArg);
    assert_eq!(GrantStatus::from_i16(-99).to_i16(), -99);
}

#[test]
fn grant_map_aliases_guest_pages_contiguously() {
    let xen = SimXen::new();
    let d = xen.create_domain(GUEST, 8).unwrap();
    // Grant pages in a scattered order.
    let pages = [5usize, 2, 7];
    let refs: Vec<GrantRef> = pages.iter().map(|&p| d.grant(p, BACK, false)).collect();
    let m = xen.grants(BACK).map(GUEST, &refs, true).unwrap();
    assert_eq!(m.size(), 3 * 4096);
    // Guest writes show up in the mapping and vice versa: shared memory, not a copy.
    d.mem().write_at(2 * 4096 + 100, b"hello");
    let mut got = [0u8; 5];
    m.read_bytes(4096 + 100, &mut got);
    assert_eq!(&got, b"hello");
    m.store_u32(2 * 4096, 0xfeed_f00d, std::sync::atomic::Ordering::Release);
    assert_eq!(
        d.mem()
            .load_u32(7 * 4096, std::sync::atomic::Ordering::Acquire),
        0xfeed_f00d
    );
    // A mapped grant cannot be revoked until unmapped.
    assert!(!d.revoke(refs[0]));
    drop(m);
    assert!(d.revoke(refs[0]));
}

#[test]
fn grant_map_refuses_bad_refs_and_ro_write_maps() {
    let xen = SimXen::new();
    let d = xen.create_domain(GUEST, 4).unwrap();
    let ro = d.grant(0, BACK, true);
    let g = xen.grants(BACK);
    assert_eq!(
        g.map(GUEST, &[ro], true).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    assert!(g.map(GUEST, &[ro], false).is_ok());
    assert_eq!(
        g.map(GUEST, &[GrantRef(1234)], false)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        g.map(DomId(42), &[ro], false).unwrap_err().raw_os_error(),
        Some(libc::ESRCH)
    );
    assert!(g.map(GUEST, &[], false).is_err());
}

fn readable(fd: &impl AsFd) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap() > 0
}

#[test]
fn event_channels_bind_notify_mask_unmask() {
    let xen = SimXen::new();
    let front = xen.evtchn(GUEST).unwrap();
    let back = xen.evtchn(BACK).unwrap();
    let remote = front.alloc_unbound(BACK).unwrap();
    // Only the named domain may bind.
    let stranger = xen.evtchn(DomId(3)).unwrap();
    assert!(stranger.bind_interdomain(GUEST, remote).is_err());
    let local = back.bind_interdomain(GUEST, remote).unwrap();
    // Bound ports start pending once.
    assert!(readable(&back));
    assert_eq!(back.pending().unwrap(), Some(local));
    assert_eq!(back.pending().unwrap(), None);
    assert!(!readable(&back));
    // Masked until unmask: a notify now stays pending and is delivered on unmask.
    front.notify(remote).unwrap();
    front.notify(remote).unwrap();
    assert!(!readable(&back));
    back.unmask(local).unwrap();
    assert!(readable(&back));
    assert_eq!(back.pending().unwrap(), Some(local));
    assert_eq!(
        back.pending().unwrap(),
        None,
        "two notifies while masked coalesce into one"
    );
    back.unmask(local).unwrap();
    // Backend → frontend.
    back.notify(local).unwrap();
    assert_eq!(front.pending().unwrap(), Some(remote));
    // Unbind: the peer can no longer notify; notify on a foreign port is refused.
    back.unbind(local).unwrap();
    assert_eq!(
        front.notify(remote).unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN)
    );
    assert!(back.notify(remote).is_err());
}

fn xs_pair() -> (MemXenStore, impl XenStore, impl XenStore) {
    let store = MemXenStore::new();
    let a = store.connect(DomId(0)).unwrap();
    let b = store.connect(DomId(0)).unwrap();
    (store, a, b)
}

#[test]
fn xenstore_basic_ops() {
    let (_s, xs, _) = xs_pair();
    assert_eq!(xs.read(Tx::NONE, "/a/b").unwrap(), None);
    xs.write(Tx::NONE, "/a/b/c", b"v1").unwrap();
    assert_eq!(xs.read(Tx::NONE, "/a/b/c").unwrap().unwrap(), b"v1");
    assert_eq!(
        xs.read(Tx::NONE, "/a/b").unwrap().unwrap(),
        b"",
        "parents are created empty"
    );
    xs.write(Tx::NONE, "/a/b/d", b"").unwrap();
    let mut dir = xs.directory(Tx::NONE, "/a/b").unwrap();
    dir.sort();
    assert_eq!(dir, vec!["c", "d"]);
    assert!(matches!(
        xs.directory(Tx::NONE, "/nope"),
        Err(XsError::Errno(Errno::ENOENT))
    ));
    xs.mkdir(Tx::NONE, "/a/e").unwrap();
    xs.rm(Tx::NONE, "/a/b").unwrap();
    assert_eq!(xs.read(Tx::NONE, "/a/b/c").unwrap(), None);
    xs.rm(Tx::NONE, "/a/b").unwrap(); // absent, parent exists: fine
    assert!(matches!(
        xs.rm(Tx::NONE, "/x/y"),
        Err(XsError::Errno(Errno::ENOENT))
    ));
    for bad in ["", "/a//b", "/a/", "/a b"] {
        assert!(
            matches!(
                xs.write(Tx::NONE, bad, b"x"),
                Err(XsError::Errno(Errno::EINVAL))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn xenstore_relative_paths_are_under_the_domain_home() {
    let store = MemXenStore::new();
    let dom0 = store.connect(DomId(0)).unwrap();
    dom0.write(Tx::NONE, "backend/vbd3/1/51712/state", b"1")
        .unwrap();
    assert_eq!(
        dom0.read(Tx::NONE, "/local/domain/0/backend/vbd3/1/51712/state")
            .unwrap()
            .unwrap(),
        b"1"
    );
}

#[test]
fn xenstore_transactions_commit_abort_and_conflict() {
    let (_s, a, b) = xs_pair();
    a.write(Tx::NONE, "/t/x", b"0").unwrap();
    // Commit applies atomically; reads inside see own writes; others don't until commit.
    let tx = a.begin().unwrap();
    a.write(tx, "/t/x", b"1").unwrap();
    a.write(tx, "/t/y", b"2").unwrap();
    assert_eq!(a.read(tx, "/t/x").unwrap().unwrap(), b"1");
    assert_eq!(b.read(Tx::NONE, "/t/x").unwrap().unwrap(), b"0");
    assert_eq!(a.end(tx, true).unwrap(), Committed::Done);
    assert_eq!(b.read(Tx::NONE, "/t/y").unwrap().unwrap(), b"2");
    // Abort drops everything.
    let tx = a.begin().unwrap();
    a.rm(tx, "/t/x").unwrap();
    assert_eq!(a.end(tx, false).unwrap(), Committed::Done);
    assert_eq!(b.read(Tx::NONE, "/t/x").unwrap().unwrap(), b"1");
    // Conflict: b changes a node a read inside its transaction.
    let tx = a.begin().unwrap();
    assert_eq!(a.read(tx, "/t/x").unwrap().unwrap(), b"1");
    b.write(Tx::NONE, "/t/x", b"b-wins").unwrap();
    a.write(tx, "/t/z", b"never").unwrap();
    assert_eq!(a.end(tx, true).unwrap(), Committed::Retry);
    assert_eq!(b.read(Tx::NONE, "/t/z").unwrap(), None);
    // Creating a child under a listed directory also conflicts.
    let tx = a.begin().unwrap();
    a.directory(tx, "/t").unwrap();
    b.write(Tx::NONE, "/t/new", b"").unwrap();
    assert_eq!(a.end(tx, true).unwrap(), Committed::Retry);
    // Untouched nodes do not conflict.
    let tx = a.begin().unwrap();
    a.write(tx, "/u/1", b"x").unwrap();
    b.write(Tx::NONE, "/t/x", b"again").unwrap();
    assert_eq!(a.end(tx, true).unwrap(), Committed::Done);
    // Transactions belong to their connection.
    let tx = a.begin().unwrap();
    assert!(matches!(
        b.read(tx, "/t/x"),
        Err(XsError::Errno(Errno::ENOENT))
    ));
    assert!(matches!(
        b.end(tx, true),
        Err(XsError::Errno(Errno::ENOENT))
    ));
}

#[test]
fn transaction_helper_retries_on_conflict() {
    let (_s, a, b) = xs_pair();
    a.write(Tx::NONE, "/c/n", b"0").unwrap();
    let mut attempts = 0;
    let v = transaction(&a, |tx| {
        attempts += 1;
        let n: u32 = String::from_utf8(a.read(tx, "/c/n")?.unwrap())
            .unwrap()
            .parse()
            .unwrap();
        if attempts < 3 {
            // Someone else bumps the counter meanwhile.
            b.write(Tx::NONE, "/c/n", (n + 10).to_string().as_bytes())?;
        }
        a.write(tx, "/c/n", (n + 1).to_string().as_bytes())?;
        Ok(n + 1)
    })
    .unwrap();
    assert_eq!(attempts, 3);
    assert_eq!(v, 21);
    assert_eq!(a.read(Tx::NONE, "/c/n").unwrap().unwrap(), b"21");
    // Non-EAGAIN errors abort and propagate.
    let e = transaction(&a, |_tx| -> Result<(), XsError> {
        Err(XsError::Errno(Errno::EACCES))
    })
    .unwrap_err();
    assert!(matches!(e, XsError::Errno(Errno::EACCES)));
}

#[test]
fn xenstore_permissions() {
    let store = MemXenStore::new();
    let dom0 = store.connect(DomId(0)).unwrap();
    let guest = store.connect(DomId(5)).unwrap();
    let spy = store.connect(DomId(6)).unwrap();
    dom0.write(Tx::NONE, "/local/domain/5/device/vbd/1/state", b"1")
        .unwrap();
    dom0.set_perms(
        Tx::NONE,
        "/local/domain/5/device/vbd/1/state",
        &[
            Perm {
                dom: DomId(5),
                access: Access::None,
            },
            Perm {
                dom: DomId(0),
                access: Access::Read,
            },
        ],
    )
    .unwrap();
    // The owner can write; another guest can neither read nor write.
    guest
        .write(Tx::NONE, "/local/domain/5/device/vbd/1/state", b"3")
        .unwrap();
    assert!(matches!(
        spy.read(Tx::NONE, "/local/domain/5/device/vbd/1/state"),
        Err(XsError::Errno(Errno::EACCES))
    ));
    assert!(matches!(
        spy.write(Tx::NONE, "/local/domain/5/device/vbd/1/state", b"6"),
        Err(XsError::Errno(Errno::EACCES))
    ));
    // A guest cannot create nodes where it has no write access.
    assert!(matches!(
        guest.write(Tx::NONE, "/local/domain/0/evil", b"x"),
        Err(XsError::Errno(Errno::EACCES))
    ));
    // Only the owner changes permissions.
    assert!(matches!(
        spy.set_perms(
            Tx::NONE,
            "/local/domain/5/device/vbd/1/state",
            &[Perm {
                dom: DomId(6),
                access: Access::Both
            }]
        ),
        Err(XsError::Errno(Errno::EACCES))
    ));
    let perms = dom0
        .get_perms(Tx::NONE, "/local/domain/5/device/vbd/1/state")
        .unwrap();
    assert_eq!(
        perms[0],
        Perm {
            dom: DomId(5),
            access: Access::None
        }
    );
    // Nodes a guest creates under a dir it may write become guest-owned.
    dom0.write(Tx::NONE, "/local/domain/5/data", b"").unwrap();
    dom0.set_perms(
        Tx::NONE,
        "/local/domain/5/data",
        &[
            Perm {
                dom: DomId(0),
                access: Access::None,
            },
            Perm {
                dom: DomId(5),
                access: Access::Both,
            },
        ],
    )
    .unwrap();
    guest
        .write(Tx::NONE, "/local/domain/5/data/x", b"1")
        .unwrap();
    assert_eq!(
        dom0.get_perms(Tx::NONE, "/local/domain/5/data/x").unwrap()[0].dom,
        DomId(5)
    );
    assert!(matches!(
        spy.read(Tx::NONE, "/local/domain/5/data/x"),
        Err(XsError::Errno(Errno::EACCES))
    ));
}

#[test]
fn watches_fire_on_registration_and_changes_below() {
    let (_s, a, b) = xs_pair();
    a.watch("/w/dev", "tok").unwrap();
    let ev = a.take_watch_events().unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].path.as_str(), ev[0].token.as_str()),
        ("/w/dev", "tok")
    );
    assert!(matches!(
        a.watch("/w/dev", "tok"),
        Err(XsError::Errno(Errno::EEXIST))
    ));
    // The fd signals pending events.
    assert!(!readable(&a));
    b.write(Tx::NONE, "/w/dev/1/state", b"4").unwrap();
    assert!(readable(&a));
    let paths: Vec<String> = a
        .take_watch_events()
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert!(paths.contains(&"/w/dev/1/state".to_owned()), "{paths:?}");
    assert!(!readable(&a));
    // Sibling paths do not fire.
    b.write(Tx::NONE, "/w/devices", b"x").unwrap();
    assert!(a.take_watch_events().unwrap().is_empty());
    // Removing an ancestor fires with the watched path.
    a.watch("/w/dev/1/state", "st").unwrap();
    a.take_watch_events().unwrap();
    b.rm(Tx::NONE, "/w/dev").unwrap();
    let ev = a.take_watch_events().unwrap();
    assert!(ev.iter().any(|e| e.path == "/w/dev" && e.token == "tok"));
    assert!(ev
        .iter()
        .any(|e| e.path == "/w/dev/1/state" && e.token == "st"));
    // Transaction writes fire at commit, not before.
    let tx = b.begin().unwrap();
    b.write(tx, "/w/dev/2", b"").unwrap();
    assert!(a.take_watch_events().unwrap().is_empty());
    b.end(tx, true).unwrap();
    assert!(a
        .take_watch_events()
        .unwrap()
        .iter()
        .any(|e| e.path == "/w/dev/2"));
    a.unwatch("/w/dev", "tok").unwrap();
    assert!(matches!(
        a.unwatch("/w/dev", "tok"),
        Err(XsError::Errno(Errno::ENOENT))
    ));
    b.write(Tx::NONE, "/w/dev/3", b"").unwrap();
    assert!(a.take_watch_events().unwrap().is_empty());
}

#[test]
fn relative_watches_report_relative_paths() {
    let store = MemXenStore::new();
    let dom0 = store.connect(DomId(0)).unwrap();
    dom0.watch("backend/vbd3", "master").unwrap();
    let ev = dom0.take_watch_events().unwrap();
    assert_eq!(ev[0].path, "backend/vbd3");
    dom0.write(Tx::NONE, "/local/domain/0/backend/vbd3/7/51712/state", b"1")
        .unwrap();
    let ev = dom0.take_watch_events().unwrap();
    assert!(
        ev.iter().any(|e| e.path == "backend/vbd3/7/51712/state"),
        "{ev:?}"
    );
}

#[test]
fn request_copy_segs_layouts() {
    use blktap3::blkif::{abi::op, parse_request, Abi, ParseConfig, Parsed, Segment, WireRequest};
    let segs = [
        Segment {
            gref: 10,
            first_sect: 2,
            last_sect: 7,
        },
        Segment {
            gref: 11,
            first_sect: 0,
            last_sect: 0,
        },
    ];
    let mut slot = [0u8; 112];
    WireRequest::Direct {
        op: op::WRITE,
        nr_segments: 2,
        handle: 0,
        id: 1,
        sector: 0,
        segments: &segs,
    }
    .encode(Abi::X86_64, &mut slot);
    let Ok(Parsed::Ready(r)) = parse_request(Abi::X86_64, &slot, &ParseConfig::new(100)) else {
        panic!()
    };
    let packed = request_copy_segs(&r, BufLayout::Packed);
    assert_eq!(
        packed,
        vec![
            seg(GrantRef(10), 1024, 3072, 0),
            seg(GrantRef(11), 0, 512, 3072)
        ]
    );
    let paged = request_copy_segs(&r, BufLayout::PagePerSegment);
    assert_eq!(
        paged,
        vec![
            seg(GrantRef(10), 1024, 3072, 1024),
            seg(GrantRef(11), 0, 512, 4096)
        ]
    );
}

mod region_copies {
    use blktap3::xen::MappedRegion;
    use proptest::prelude::*;

    proptest! {
        // The volatile copy routines (head bytes, unrolled words, single words, tail bytes)
        // against a plain Vec model, at every alignment.
        #[test]
        fn volatile_copies_match_a_vec_model(ops in proptest::collection::vec((0usize..8192, 0usize..300, any::<u8>()), 1..40)) {
            let r = MappedRegion::anonymous(8192 + 512).unwrap();
            let mut model = vec![0u8; 8192 + 512];
            for (off, len, seed) in ops {
                let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8).wrapping_mul(13)).collect();
                r.write_at(off, &data);
                model[off..off + len].copy_from_slice(&data);
                let mut back = vec![0u8; len + 7];
                let start = off.saturating_sub(3);
                r.read_at(start, &mut back);
                prop_assert_eq!(&back[..], &model[start..start + len + 7]);
            }
        }
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn out_of_bounds_access_panics_instead_of_touching_memory() {
        let r = MappedRegion::anonymous(4096).unwrap();
        let mut b = [0u8; 8];
        r.read_at(4090, &mut b);
    }
}

#[test]
fn grant_copy_batch_gives_each_copy_its_own_result() {
    let xen = SimXen::new();
    let d = xen.create_domain(GUEST, 16).unwrap();
    let p = d.alloc_page().unwrap();
    let g = d.grant(p, BACK, false);
    let ro = d.grant(d.alloc_page().unwrap(), BACK, true);
    let pattern: Vec<u8> = (0..4096).map(|i| (i * 13 % 251) as u8).collect();
    d.mem().write_at(p * 4096, &pattern);
    let grants = xen.grants(BACK);
    let (mut a, mut b, mut c) = (vec![0u8; 1024], vec![0u8; 512], vec![0u8; 512]);
    let out = vec![0x77u8; 256];
    let s_a = [seg(g, 0, 512, 0), seg(g, 2048, 512, 512)];
    let s_b = [seg(GrantRef(9999), 0, 512, 0)];
    let s_c = [seg(g, 0, 1024, 0)]; // longer than its buffer
    let s_out = [seg(ro, 0, 256, 0), seg(g, 3840, 256, 0)];
    let mut copies = [
        GuestCopy::new(&s_a, CopyBuf::FromGuest(&mut a)),
        GuestCopy::new(&s_b, CopyBuf::FromGuest(&mut b)),
        GuestCopy::new(&s_c, CopyBuf::FromGuest(&mut c)),
        GuestCopy::new(&s_out, CopyBuf::ToGuest(&out)),
    ];
    grants.copy_batch(GUEST, &mut copies);
    assert!(copies[0].result.is_ok());
    assert!(matches!(
        copies[1].result,
        Err(CopyError::Segment {
            index: 0,
            status: GrantStatus::BadGntRef,
            failed: 1
        })
    ));
    assert!(matches!(
        copies[2].result,
        Err(CopyError::OutOfBounds { index: 0 })
    ));
    // The read-only grant refuses the write; the other segment of that copy went through.
    assert!(matches!(
        copies[3].result,
        Err(CopyError::Segment {
            index: 0,
            status: GrantStatus::PermissionDenied,
            failed: 1
        })
    ));
    drop(copies);
    assert_eq!(&a[..512], &pattern[..512]);
    assert_eq!(&a[512..], &pattern[2048..2560]);
    assert!(
        c.iter().all(|&x| x == 0),
        "an out-of-bounds copy copies nothing"
    );
    let mut tail = vec![0u8; 256];
    d.mem().read_at(p * 4096 + 3840, &mut tail);
    assert_eq!(tail, out);
    // An unknown domain fails every copy.
    let mut e = vec![0u8; 512];
    let mut copies = [GuestCopy::new(&s_b, CopyBuf::FromGuest(&mut e))];
    grants.copy_batch(DomId(77), &mut copies);
    assert!(matches!(
        copies[0].result,
        Err(CopyError::Segment {
            status: GrantStatus::BadDomain,
            ..
        })
    ));
}
