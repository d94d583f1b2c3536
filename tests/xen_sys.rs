//! Kernel ABI of gntdev/evtchn: ioctl numbers and struct layouts, compared with values printed
//! by a C program built against Linux's uapi headers (`xen/gntdev.h`, `xen/evtchn.h`) with
//! gcc -m64 and -m32.

use std::mem::{offset_of, size_of};

use blktap3::xen::sys::*;

#[test]
fn gntdev_ioctl_numbers_match_c() {
    assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
    assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
    if cfg!(target_pointer_width = "64") {
        assert_eq!(IOCTL_GNTDEV_GRANT_COPY, 0x0010_4708);
    } else {
        assert_eq!(IOCTL_GNTDEV_GRANT_COPY, 0x0008_4708);
    }
}

#[test]
fn evtchn_ioctl_numbers_match_c() {
    assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
    assert_eq!(IOCTL_EVTCHN_BIND_UNBOUND_PORT, 0x0004_4502);
    assert_eq!(IOCTL_EVTCHN_UNBIND, 0x0004_4503);
    assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
}

#[test]
fn grant_copy_segment_layout() {
    assert_eq!(size_of::<GntdevGrantCopySegment>(), 24);
    assert_eq!(offset_of!(GntdevGrantCopySegment, dest), 8);
    assert_eq!(offset_of!(GntdevGrantCopySegment, len), 16);
    assert_eq!(offset_of!(GntdevGrantCopySegment, flags), 18);
    assert_eq!(offset_of!(GntdevGrantCopySegment, status), 20);
    assert_eq!(offset_of!(GntCopyForeign, offset), 4);
    assert_eq!(offset_of!(GntCopyForeign, domid), 6);
    let expect = if cfg!(target_pointer_width = "64") {
        16
    } else {
        8
    };
    assert_eq!(size_of::<IoctlGntdevGrantCopy>(), expect);
}

#[test]
fn map_structs_layout() {
    assert_eq!(size_of::<IoctlGntdevMapGrantRef>(), 24);
    assert_eq!(offset_of!(IoctlGntdevMapGrantRef, index), 8);
    assert_eq!(offset_of!(IoctlGntdevMapGrantRef, refs), 16);
    assert_eq!(size_of::<IoctlGntdevUnmapGrantRef>(), 16);
    assert_eq!(offset_of!(IoctlGntdevUnmapGrantRef, count), 8);
}

#[test]
fn real_devices_absent_gives_clean_errors() {
    // No Xen here: opening the real devices must fail with an error, not panic.
    let p = std::path::Path::new("/nonexistent/xen/gntdev");
    assert!(blktap3::xen::gntdev::GntDev::open_path(p).is_err());
    assert!(blktap3::xen::evtchn::EvtchnDev::open_path(p).is_err());
}

// The real implementations against /dev/null: the ioctls reach the kernel, which refuses them
// (ENOTTY), so the argument building and error paths run for real; bounds checks fire first.
mod real_paths {
    use std::path::Path;

    use blktap3::xen::evtchn::EvtchnDev;
    use blktap3::xen::gntdev::GntDev;
    use blktap3::xen::*;

    fn seg(page_off: u16, len: u16, buf_off: usize) -> CopySeg {
        CopySeg {
            gref: GrantRef(8),
            page_off,
            len,
            buf_off,
        }
    }

    #[test]
    fn gntdev_copy_checks_bounds_before_the_ioctl() {
        let g = GntDev::open_path(Path::new("/dev/null")).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = g
            .copy_from_guest(DomId(1), &[seg(0, 512, 0), seg(3585, 512, 0)], &mut buf)
            .unwrap_err();
        assert!(matches!(e, CopyError::OutOfBounds { index: 1 }));
        let e = g
            .copy_to_guest(DomId(1), &[seg(0, 512, 3585)], &buf)
            .unwrap_err();
        assert!(matches!(e, CopyError::OutOfBounds { index: 0 }));
        // In bounds: the ioctl is issued and /dev/null refuses it.
        let e = g
            .copy_from_guest(DomId(1), &[seg(0, 4096, 0)], &mut buf)
            .unwrap_err();
        match e {
            CopyError::Io(io) => assert_eq!(io.raw_os_error(), Some(libc::ENOTTY)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gntdev_map_reports_kernel_errors() {
        let g = GntDev::open_path(Path::new("/dev/null")).unwrap();
        let e = g
            .map(DomId(1), &[GrantRef(8), GrantRef(9)], true)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        assert!(g.map(DomId(1), &[], true).is_err());
        let too_many: Vec<GrantRef> = (0..17).map(GrantRef).collect();
        assert_eq!(
            g.map(DomId(1), &too_many, true).unwrap_err().kind(),
            std::io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn evtchn_calls_reach_the_kernel() {
        let e = EvtchnDev::open_path(Path::new("/dev/null")).unwrap();
        assert_eq!(
            e.bind_interdomain(DomId(1), Port(5))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            e.bind_unbound(DomId(1)).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            e.notify(Port(5)).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            e.unbind(Port(5)).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        // read() of /dev/null returns 0 bytes: a short read is an error, not a port.
        assert!(e.pending().is_err());
        // write() to /dev/null succeeds: unmask writes exactly one u32.
        e.unmask(Port(5)).unwrap();
    }

    #[test]
    fn check_copy_segs_edges() {
        assert!(check_copy_segs(&[seg(0, 4096, 0)], 4096).is_ok());
        assert!(check_copy_segs(&[seg(4095, 1, 4095)], 4096).is_ok());
        assert!(check_copy_segs(&[seg(4095, 2, 0)], 4096).is_err());
        assert!(check_copy_segs(&[seg(0, 1, 4096)], 4096).is_err());
        assert!(check_copy_segs(&[seg(0, 1, usize::MAX)], 4096).is_err());
        assert!(check_copy_segs(&[], 0).is_ok());
    }
}
