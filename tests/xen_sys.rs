//! Kernel ABI of gntdev/evtchn: ioctl numbers and struct layouts, compared with values printed
//! by a C program built against Linux's uapi headers (`xen/gntdev.h`, `xen/evtchn.h`) with
//! gcc -m64 and -m32.

use std::mem::{offset_of, size_of};

use blktap3::xen::sys::*;

#[test]
fn gntdev_ioctl_numbers_match_c() {
    assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF as u64, 0x0018_4700);
    assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF as u64, 0x0010_4701);
    if cfg!(target_pointer_width = "64") {
        assert_eq!(IOCTL_GNTDEV_GRANT_COPY as u64, 0x0010_4708);
    } else {
        assert_eq!(IOCTL_GNTDEV_GRANT_COPY as u64, 0x0008_4708);
    }
}

#[test]
fn evtchn_ioctl_numbers_match_c() {
    assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN as u64, 0x0008_4501);
    assert_eq!(IOCTL_EVTCHN_BIND_UNBOUND_PORT as u64, 0x0004_4502);
    assert_eq!(IOCTL_EVTCHN_UNBIND as u64, 0x0004_4503);
    assert_eq!(IOCTL_EVTCHN_NOTIFY as u64, 0x0004_4504);
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
