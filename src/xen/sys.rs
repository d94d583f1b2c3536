//! Kernel ABI of `/dev/xen/gntdev` and `/dev/xen/evtchn` (Linux `include/uapi/xen/gntdev.h`,
//! `evtchn.h`), with ioctl numbers computed by nix from the struct sizes exactly like the C
//! `_IOC(_IOC_NONE, type, nr, sizeof(struct ...))` definitions.

use std::ffi::{c_uint, c_void};
use std::mem::size_of;

use nix::sys::ioctl::ioctl_num_type;

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevGrantRef {
    pub domid: u32,
    pub gref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` (a variable-length struct: `refs[1]` is followed by
/// `count - 1` more entries in the caller's buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoctlGntdevMapGrantRef {
    pub count: u32,
    pub pad: u32,
    /// Out: the offset to pass to mmap.
    pub index: u64,
    pub refs: [GntdevGrantRef; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoctlGntdevUnmapGrantRef {
    pub index: u64,
    pub count: u32,
    pub pad: u32,
}

/// The `foreign` arm of `gntdev_grant_copy_segment`'s source/dest union.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntCopyForeign {
    pub gref: u32,
    pub offset: u16,
    pub domid: u16,
}

/// The source/dest union: a local virtual address or a foreign grant.
#[repr(C)]
#[derive(Clone, Copy)]
pub union GntCopyPtr {
    pub virt: *mut c_void,
    pub foreign: GntCopyForeign,
}

/// `struct gntdev_grant_copy_segment` (24 bytes on x86_64 and i686).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GntdevGrantCopySegment {
    pub source: GntCopyPtr,
    pub dest: GntCopyPtr,
    pub len: u16,
    pub flags: u16,
    /// Out: `GNTST_*`.
    pub status: i16,
}

/// `struct ioctl_gntdev_grant_copy` (16 bytes on x86_64, 8 on i686).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoctlGntdevGrantCopy {
    pub count: c_uint,
    pub segments: *mut GntdevGrantCopySegment,
}

/// `GNTCOPY_source_gref`: the source is a foreign grant.
pub const GNTCOPY_SOURCE_GREF: u16 = 1;
/// `GNTCOPY_dest_gref`: the destination is a foreign grant.
pub const GNTCOPY_DEST_GREF: u16 = 2;

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoctlEvtchnBindInterdomain {
    pub remote_domain: c_uint,
    pub remote_port: c_uint,
}

/// `struct ioctl_evtchn_bind_unbound_port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoctlEvtchnBindUnboundPort {
    pub remote_domain: c_uint,
}

/// `struct ioctl_evtchn_unbind` / `struct ioctl_evtchn_notify` (same shape).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoctlEvtchnPort {
    pub port: c_uint,
}

const NONE: u8 = nix::sys::ioctl::NONE;

/// `_IOC(_IOC_NONE, 'G', 0, sizeof(struct ioctl_gntdev_map_grant_ref))`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: ioctl_num_type =
    nix::ioc!(NONE, b'G', 0, size_of::<IoctlGntdevMapGrantRef>());
/// `_IOC(_IOC_NONE, 'G', 1, sizeof(struct ioctl_gntdev_unmap_grant_ref))`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: ioctl_num_type =
    nix::ioc!(NONE, b'G', 1, size_of::<IoctlGntdevUnmapGrantRef>());
/// `_IOC(_IOC_NONE, 'G', 8, sizeof(struct ioctl_gntdev_grant_copy))`.
pub const IOCTL_GNTDEV_GRANT_COPY: ioctl_num_type =
    nix::ioc!(NONE, b'G', 8, size_of::<IoctlGntdevGrantCopy>());
/// `_IOC(_IOC_NONE, 'E', 1, sizeof(struct ioctl_evtchn_bind_interdomain))`.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: ioctl_num_type =
    nix::ioc!(NONE, b'E', 1, size_of::<IoctlEvtchnBindInterdomain>());
/// `_IOC(_IOC_NONE, 'E', 2, sizeof(struct ioctl_evtchn_bind_unbound_port))`.
pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: ioctl_num_type =
    nix::ioc!(NONE, b'E', 2, size_of::<IoctlEvtchnBindUnboundPort>());
/// `_IOC(_IOC_NONE, 'E', 3, sizeof(struct ioctl_evtchn_unbind))`.
pub const IOCTL_EVTCHN_UNBIND: ioctl_num_type =
    nix::ioc!(NONE, b'E', 3, size_of::<IoctlEvtchnPort>());
/// `_IOC(_IOC_NONE, 'E', 4, sizeof(struct ioctl_evtchn_notify))`.
pub const IOCTL_EVTCHN_NOTIFY: ioctl_num_type =
    nix::ioc!(NONE, b'E', 4, size_of::<IoctlEvtchnPort>());

// Layout guards (`gntdev.h` / `evtchn.h`), on every target we build for.
const _: () = {
    assert!(size_of::<GntdevGrantRef>() == 8);
    assert!(size_of::<IoctlGntdevMapGrantRef>() == 24);
    assert!(size_of::<IoctlGntdevUnmapGrantRef>() == 16);
    assert!(size_of::<GntCopyPtr>() == 8);
    assert!(size_of::<GntdevGrantCopySegment>() == 24);
    assert!(size_of::<IoctlGntdevGrantCopy>() == 4 + (size_of::<usize>() - 4) + size_of::<usize>());
    assert!(size_of::<IoctlEvtchnBindInterdomain>() == 8);
    assert!(size_of::<IoctlEvtchnPort>() == 4);
};
