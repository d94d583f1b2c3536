//! `libblktapctl.so.0`: the C ABI of `include/blktap/tap-ctl.h` over [`crate::control`].
//!
//! The cdylib of this crate (`libblktap3.so`) carries the soname `libblktapctl.so.0`
//! (build.rs); installing it under that name makes it a drop-in for libxl's blktap3 code,
//! which needs `tap_ctl_list`, `tap_ctl_list_free`, `tap_ctl_create`, `tap_ctl_destroy` and
//! `tap_ctl_find_minor` (and, patched for this implementation, `tap_ctl_find_device`). Every function returns a negative errno on failure and never lets a
//! panic cross the C boundary (-EIO). Strings handed to C are `malloc`'ed.

use std::ffi::{c_char, c_int, CStr};
use std::mem::offset_of;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::time::Duration;

use crate::control::client::{Client, TapEntry};
use crate::control::msg::{OpenFlags, OpenRequest, ResumeRequest, SecretKey};
use crate::control::ControlError;

/// `struct list_head`.
#[repr(C)]
#[derive(Debug)]
pub struct ListHead {
    pub next: *mut ListHead,
    pub prev: *mut ListHead,
}

/// `struct tap_list` (`tap_list_t`).
#[repr(C)]
#[derive(Debug)]
pub struct TapList {
    pub pid: libc::pid_t,
    pub minor: c_int,
    pub state: c_int,
    pub type_: *mut c_char,
    pub path: *mut c_char,
    pub entry: ListHead,
}

const ENTRY_OFFSET: usize = offset_of!(TapList, entry);

fn neg(e: &ControlError) -> c_int {
    log::debug!("libblktapctl: {}", crate::util::error_chain(&e));
    -e.errno()
}

/// Run `f`, mapping a panic to -EIO.
fn guard(f: impl FnOnce() -> c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(-libc::EIO)
}

fn status(r: Result<(), ControlError>) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => neg(&e),
    }
}

/// A C string argument as `&str` (NULL → `None`; invalid UTF-8 → EINVAL).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn opt_str<'a>(p: *const c_char) -> Result<Option<&'a str>, c_int> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller guarantees a valid NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(Some).map_err(|_| -libc::EINVAL)
}

/// `malloc`'ed copy of `s` (NULL on allocation failure or interior NUL).
fn c_strdup(s: &str) -> *mut c_char {
    if s.as_bytes().contains(&0) {
        return ptr::null_mut();
    }
    let n = s.len();
    // SAFETY: malloc of n + 1 bytes; checked for NULL before use.
    let p = unsafe { libc::malloc(n + 1) } as *mut u8;
    if p.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: `p` has room for n + 1 bytes and does not overlap `s`.
    unsafe {
        ptr::copy_nonoverlapping(s.as_ptr(), p, n);
        *p.add(n) = 0;
    }
    p as *mut c_char
}

fn minor_arg(minor: c_int) -> Result<u16, c_int> {
    u16::try_from(minor).map_err(|_| -libc::EINVAL)
}

fn timeval_arg(tv: *const libc::timeval) -> Option<Duration> {
    if tv.is_null() {
        return None;
    }
    // SAFETY: a non-NULL timeval pointer from the caller points to a valid struct.
    let tv = unsafe { &*tv };
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let usecs = u64::try_from(tv.tv_usec).unwrap_or(0);
    Some(Duration::from_secs(secs) + Duration::from_micros(usecs))
}

/// # Safety
/// `head` points to a writable `struct list_head`.
unsafe fn init_head(head: *mut ListHead) {
    // SAFETY: the caller guarantees `head` is valid for writes.
    unsafe {
        (*head).next = head;
        (*head).prev = head;
    }
}

/// # Safety
/// `item` and `head` are valid; `head` is an initialised list.
unsafe fn add_tail(item: *mut ListHead, head: *mut ListHead) {
    // SAFETY: both nodes are valid and `head` is a well-formed circular list.
    unsafe {
        let prev = (*head).prev;
        (*item).next = head;
        (*item).prev = prev;
        (*prev).next = item;
        (*head).prev = item;
    }
}

/// Build one `tap_list` node (calloc'ed, strings malloc'ed). NULL on allocation failure.
fn new_node(e: &TapEntry) -> *mut TapList {
    // SAFETY: calloc of one TapList; checked for NULL before use.
    let node = unsafe { libc::calloc(1, std::mem::size_of::<TapList>()) } as *mut TapList;
    if node.is_null() {
        return node;
    }
    let type_ = e.disk_type.as_deref().map_or(ptr::null_mut(), c_strdup);
    let path = e.path.as_deref().map_or(ptr::null_mut(), c_strdup);
    if (e.disk_type.is_some() && type_.is_null()) || (e.path.is_some() && path.is_null()) {
        // SAFETY: each pointer is NULL or came from malloc/calloc above.
        unsafe {
            libc::free(type_ as *mut libc::c_void);
            libc::free(path as *mut libc::c_void);
            libc::free(node as *mut libc::c_void);
        }
        return ptr::null_mut();
    }
    // SAFETY: `node` is a valid, zeroed, exclusively owned allocation.
    unsafe {
        (*node).pid = e.pid.unwrap_or(-1);
        (*node).minor = e.minor.map_or(-1, c_int::from);
        (*node).state = e.state.map_or(-1, |s| s.0 as c_int);
        (*node).type_ = type_;
        (*node).path = path;
        init_head(ptr::addr_of_mut!((*node).entry));
    }
    node
}

/// Free every node of `list` and re-initialise it.
///
/// # Safety
/// `list` is NULL or an initialised list whose nodes all came from [`tap_ctl_list`].
#[no_mangle]
pub unsafe extern "C" fn tap_ctl_list_free(list: *mut ListHead) {
    if list.is_null() {
        return;
    }
    // SAFETY: per the contract, every node after `list` is the `entry` of a TapList we
    // allocated; we read `next` before freeing each node.
    unsafe {
        let mut cur = (*list).next;
        if cur.is_null() {
            init_head(list);
            return;
        }
        while cur != list {
            let next = (*cur).next;
            let node = (cur as *mut u8).sub(ENTRY_OFFSET) as *mut TapList;
            libc::free((*node).type_ as *mut libc::c_void);
            libc::free((*node).path as *mut libc::c_void);
            libc::free(node as *mut libc::c_void);
            cur = next;
        }
        init_head(list);
    }
}

/// Fill `list` with the rows of `tap-ctl list`.
///
/// # Safety
/// `list` points to a writable `struct list_head` (it is re-initialised).
#[no_mangle]
pub unsafe extern "C" fn tap_ctl_list(list: *mut ListHead) -> c_int {
    if list.is_null() {
        return -libc::EINVAL;
    }
    guard(|| {
        // SAFETY: `list` is non-NULL and writable per the contract.
        unsafe { init_head(list) };
        let rows = match Client::new().list() {
            Ok(r) => r,
            Err(e) => return neg(&e),
        };
        for r in &rows {
            let node = new_node(r);
            if node.is_null() {
                // SAFETY: `list` holds only nodes we just built.
                unsafe { tap_ctl_list_free(list) };
                return -libc::ENOMEM;
            }
            // SAFETY: `node` is valid and `list` is an initialised list.
            unsafe { add_tail(ptr::addr_of_mut!((*node).entry), list) };
        }
        0
    })
}

/// The minor serving `type:path`, or -ENOENT.
///
/// # Safety
/// `type_` and `path` are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn tap_ctl_find_minor(type_: *const c_char, path: *const c_char) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let (t, p) = match unsafe { (opt_str(type_), opt_str(path)) } {
            (Ok(Some(t)), Ok(Some(p))) => (t, p),
            _ => return -libc::EINVAL,
        };
        match Client::new().find_minor(t, p) {
            Ok(m) => c_int::from(m),
            Err(e) => neg(&e),
        }
    })
}

/// The pid of the tapdisk serving `minor`, or -ENOENT.
#[no_mangle]
pub extern "C" fn tap_ctl_find_pid(minor: c_int) -> c_int {
    guard(|| {
        let m = match minor_arg(minor) {
            Ok(m) => m,
            Err(e) => return e,
        };
        match Client::new().list() {
            Ok(rows) => rows
                .into_iter()
                .find(|r| r.minor == Some(m) && r.pid.is_some())
                .and_then(|r| r.pid)
                .unwrap_or(-libc::ENOENT),
            Err(e) => neg(&e),
        }
    })
}

/// The device of the VBD `minor` of a live tapdisk: `*devname` gets a malloc'ed
/// `/dev/nbdN` if the kernel NBD driver has its export, else the export's socket path.
/// -ENOENT if no live tapdisk serves `minor` (or it has nothing open), -EINVAL for a
/// negative minor or a NULL `devname`. For libxl, to reuse an existing tapdisk without
/// assuming a device name.
///
/// # Safety
/// `devname` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tap_ctl_find_device(minor: c_int, devname: *mut *mut c_char) -> c_int {
    if devname.is_null() {
        return -libc::EINVAL;
    }
    guard(|| {
        let m = match minor_arg(minor) {
            Ok(m) => m,
            Err(e) => return e,
        };
        match Client::new().find_device(m) {
            Ok(path) => {
                let p = c_strdup(&path.to_string_lossy());
                if p.is_null() {
                    return -libc::ENOMEM;
                }
                // SAFETY: `devname` is non-NULL and writable per the contract.
                unsafe { *devname = p };
                0
            }
            Err(e) => neg(&e),
        }
    })
}

/// Build an OPEN request from C arguments.
///
/// # Safety
/// String pointers are NULL or NUL-terminated; `key` is NULL or valid for `key_size` bytes.
#[allow(clippy::too_many_arguments)]
unsafe fn open_request(
    params: *const c_char,
    flags: c_int,
    prt_minor: c_int,
    secondary: *const c_char,
    timeout: c_int,
    logpath: *const c_char,
    key_size: u8,
    key: *const u8,
) -> Result<OpenRequest, c_int> {
    // SAFETY: forwarded caller contract.
    let params = unsafe { opt_str(params) }?.ok_or(-libc::EINVAL)?;
    // SAFETY: forwarded caller contract.
    let secondary = unsafe { opt_str(secondary) }?;
    // SAFETY: forwarded caller contract.
    let logpath = unsafe { opt_str(logpath) }?;
    let mut req = OpenRequest::new(0, params);
    req.flags = OpenFlags(flags as u32 & OpenFlags::ALL.0);
    if prt_minor >= 0 {
        req.prt_devnum = prt_minor as u32;
        req.flags |= OpenFlags::REUSE_PRT;
    }
    if let Some(s) = secondary {
        req.secondary = Some(s.to_string());
        req.flags |= OpenFlags::SECONDARY;
    }
    req.req_timeout = u16::try_from(timeout.max(0)).unwrap_or(u16::MAX);
    req.set_log_path(logpath.map(str::to_string));
    if key_size > 0 {
        if key.is_null() {
            return Err(-libc::EINVAL);
        }
        // SAFETY: `key` is valid for `key_size` bytes per the contract.
        let k = unsafe { std::slice::from_raw_parts(key, usize::from(key_size)) };
        req.set_key(Some(SecretKey::new(k)));
    } else {
        req.set_key(None);
    }
    Ok(req)
}

/// allocate + spawn + attach + open; `*devname` gets a malloc'ed device path.
///
/// # Safety
/// `params` is a NUL-terminated string, `secondary` NULL or one, `devname` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tap_ctl_create(
    params: *const c_char,
    devname: *mut *mut c_char,
    flags: c_int,
    prt_minor: c_int,
    secondary: *const c_char,
    timeout: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let req = match unsafe {
            open_request(
                params,
                flags,
                prt_minor,
                secondary,
                timeout,
                ptr::null(),
                0,
                ptr::null(),
            )
        } {
            Ok(r) => r,
            Err(e) => return e,
        };
        match Client::new().create(req, None) {
            Ok(c) => {
                if !devname.is_null() {
                    let p = c_strdup(&c.devname.to_string_lossy());
                    if p.is_null() {
                        return -libc::ENOMEM;
                    }
                    // SAFETY: `devname` is non-NULL and writable per the contract.
                    unsafe { *devname = p };
                }
                0
            }
            Err(e) => neg(&e),
        }
    })
}

/// close + detach + free.
///
/// # Safety
/// `timeout` is NULL or points to a valid `struct timeval`.
#[no_mangle]
pub unsafe extern "C" fn tap_ctl_destroy(
    pid: c_int,
    minor: c_int,
    force: c_int,
    timeout: *const libc::timeval,
) -> c_int {
    guard(|| {
        let m = match minor_arg(minor) {
            Ok(m) => m,
            Err(e) => return e,
        };
        status(Client::new().destroy(pid, m, force != 0, timeval_arg(timeout)))
    })
}

/// Allocate a minor; `*devname` (if non-NULL) gets the malloc'ed marker path.
///
/// # Safety
/// `minor` and `devname` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tap_ctl_allocate(minor: *mut c_int, devname: *mut *mut c_char) -> c_int {
    guard(|| match Client::new().allocate() {
        Ok((m, path)) => {
            if !devname.is_null() {
                let p = c_strdup(&path.to_string_lossy());
                if p.is_null() {
                    let _ = Client::new().free(m);
                    return -libc::ENOMEM;
                }
                // SAFETY: `devname` is non-NULL and writable per the contract.
                unsafe { *devname = p };
            }
            if !minor.is_null() {
                // SAFETY: `minor` is non-NULL and writable per the contract.
                unsafe { *minor = c_int::from(m) };
            }
            0
        }
        Err(e) => neg(&e),
    })
}

/// Free a minor (-EWOULDBLOCK while a tapdisk holds it).
#[no_mangle]
pub extern "C" fn tap_ctl_free(minor: c_int) -> c_int {
    guard(|| match minor_arg(minor) {
        Ok(m) => status(Client::new().free(m)),
        Err(e) => e,
    })
}

/// Spawn a tapdisk; returns its pid.
#[no_mangle]
pub extern "C" fn tap_ctl_spawn() -> c_int {
    guard(|| match Client::new().spawn() {
        Ok(p) => p,
        Err(e) => neg(&e),
    })
}

/// PID of tapdisk `pid` as it reports it.
#[no_mangle]
pub extern "C" fn tap_ctl_get_pid(pid: c_int) -> libc::pid_t {
    guard(|| match Client::new().get_pid(pid, None) {
        Ok(p) => p,
        Err(e) => neg(&e),
    })
}

/// ATTACH.
#[no_mangle]
pub extern "C" fn tap_ctl_attach(pid: c_int, minor: c_int) -> c_int {
    guard(|| match minor_arg(minor) {
        Ok(m) => status(Client::new().attach(pid, m)),
        Err(e) => e,
    })
}

/// DETACH.
#[no_mangle]
pub extern "C" fn tap_ctl_detach(pid: c_int, minor: c_int) -> c_int {
    guard(|| match minor_arg(minor) {
        Ok(m) => status(Client::new().detach(pid, m)),
        Err(e) => e,
    })
}

/// OPEN.
///
/// # Safety
/// Strings are NULL or NUL-terminated (`params` must not be NULL); `encryption_key` is NULL
/// or valid for `key_size` bytes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tap_ctl_open(
    pid: c_int,
    minor: c_int,
    params: *const c_char,
    flags: c_int,
    prt_minor: c_int,
    secondary: *const c_char,
    timeout: c_int,
    logpath: *const c_char,
    key_size: u8,
    encryption_key: *const u8,
) -> c_int {
    guard(|| {
        let m = match minor_arg(minor) {
            Ok(m) => m,
            Err(e) => return e,
        };
        // SAFETY: forwarded caller contract.
        let mut req = match unsafe {
            open_request(
                params,
                flags,
                prt_minor,
                secondary,
                timeout,
                logpath,
                key_size,
                encryption_key,
            )
        } {
            Ok(r) => r,
            Err(e) => return e,
        };
        req.minor = m;
        req.devnum = u32::from(m);
        status(Client::new().open(pid, req, None).map(|_| ()))
    })
}

/// CLOSE (or FORCE_SHUTDOWN).
///
/// # Safety
/// `timeout` is NULL or points to a valid `struct timeval`.
#[no_mangle]
pub unsafe extern "C" fn tap_ctl_close(
    pid: c_int,
    minor: c_int,
    force: c_int,
    timeout: *const libc::timeval,
) -> c_int {
    guard(|| match minor_arg(minor) {
        Ok(m) => status(Client::new().close(pid, m, force != 0, timeval_arg(timeout))),
        Err(e) => e,
    })
}

/// PAUSE.
///
/// # Safety
/// `timeout` is NULL or points to a valid `struct timeval`.
#[no_mangle]
pub unsafe extern "C" fn tap_ctl_pause(
    pid: c_int,
    minor: c_int,
    timeout: *const libc::timeval,
) -> c_int {
    guard(|| match minor_arg(minor) {
        Ok(m) => status(Client::new().pause(pid, m, timeval_arg(timeout))),
        Err(e) => e,
    })
}

/// RESUME.
///
/// # Safety
/// String pointers are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tap_ctl_unpause(
    pid: c_int,
    minor: c_int,
    params: *const c_char,
    flags: c_int,
    secondary: *const c_char,
    logpath: *const c_char,
) -> c_int {
    guard(|| {
        let m = match minor_arg(minor) {
            Ok(m) => m,
            Err(e) => return e,
        };
        // SAFETY: forwarded caller contract.
        let strs = unsafe { (opt_str(params), opt_str(secondary), opt_str(logpath)) };
        let (Ok(params), Ok(secondary), Ok(logpath)) = strs else {
            return -libc::EINVAL;
        };
        let mut f = OpenFlags(flags as u32 & OpenFlags::ALL.0);
        f.set(
            OpenFlags::SECONDARY,
            secondary.is_some() || f.contains(OpenFlags::SECONDARY),
        );
        let req = ResumeRequest {
            minor: m,
            flags: f,
            params: params.map(str::to_string),
            secondary: secondary.map(str::to_string),
            log_path: logpath.map(str::to_string),
        };
        status(Client::new().unpause(pid, req, None))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_header() {
        use std::mem::{align_of, size_of};
        // struct tap_list { pid_t; int; int; char *; char *; struct list_head; }
        let p = size_of::<*mut u8>();
        assert_eq!(offset_of!(TapList, type_), 12.max(p).next_multiple_of(p));
        assert_eq!(ENTRY_OFFSET, offset_of!(TapList, path) + p);
        assert_eq!(size_of::<ListHead>(), 2 * p);
        assert_eq!(align_of::<TapList>(), p);
    }

    #[test]
    fn list_nodes_round_trip_and_free() {
        let mut head = ListHead {
            next: ptr::null_mut(),
            prev: ptr::null_mut(),
        };
        let hp: *mut ListHead = &mut head;
        // SAFETY: `hp` points to a live ListHead for the whole test.
        unsafe { init_head(hp) };
        let rows = [
            TapEntry {
                pid: Some(5),
                minor: Some(2),
                state: Some(crate::control::msg::VbdState(0x20)),
                disk_type: Some("vhd".into()),
                path: Some("/a".into()),
            },
            TapEntry {
                minor: Some(7),
                ..TapEntry::default()
            },
        ];
        for r in &rows {
            let n = new_node(r);
            assert!(!n.is_null());
            // SAFETY: `n` is a fresh node, `hp` an initialised list.
            unsafe { add_tail(ptr::addr_of_mut!((*n).entry), hp) };
        }
        // SAFETY: walking the list we built.
        unsafe {
            let first = ((*hp).next as *mut u8).sub(ENTRY_OFFSET) as *mut TapList;
            assert_eq!((*first).pid, 5);
            assert_eq!((*first).minor, 2);
            assert_eq!((*first).state, 0x20);
            assert_eq!(CStr::from_ptr((*first).type_).to_str().unwrap(), "vhd");
            assert_eq!(CStr::from_ptr((*first).path).to_str().unwrap(), "/a");
            let second = ((*first).entry.next as *mut u8).sub(ENTRY_OFFSET) as *mut TapList;
            assert_eq!((*second).pid, -1);
            assert_eq!((*second).minor, 7);
            assert_eq!((*second).state, -1);
            assert!((*second).type_.is_null());
            assert_eq!((*second).entry.next, hp);
            tap_ctl_list_free(hp);
            assert_eq!((*hp).next, hp);
        }
    }
}
