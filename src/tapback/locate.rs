//! Finding the tapdisk that serves a device, and the tapdisk operations tapback needs.
//!
//! The toolstack names the disk in the backend directory with one of three keys, tried in
//! this order (the first that resolves wins, so arrival order does not matter):
//!
//! 1. `physical-device-path` = `<control dir>/nbd<pid>.<minor>`: the NBD socket `tap-ctl
//!    create` returned. The pid and minor are parsed from the name and checked with LIST.
//! 2. `physical-device` = hex `major:minor` of the block device `tap-ctl create` returned.
//!    For a kernel NBD device (major 43) the socket is looked up through the device's sysfs
//!    `backend` identifier, or, on kernels without it (before Linux 5.14, e.g. OpenXT 8's
//!    4.14), through the `tapdev<minor>` link tap-ctl keeps to `/dev/nbdN`
//!    ([`Client::vbd_of_nbd_device`]); anything else is not resolvable and falls through.
//! 3. `tapdisk-params` = `type:/path`: the VBD of any tapdisk whose LIST shows that image.

use crate::nbd::kernel::parse_device_name;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::client::Client;
use crate::control::msg::{split_params, Blkif, DiskInfo, ListEntry};
use crate::control::{nbd_from_socket_name, nbd_socket_path, ControlError};
use crate::tapback::{Result, TapbackError};
use crate::util::error_chain;

/// Backend key holding the NBD socket path.
pub const KEY_PHYSICAL_DEVICE_PATH: &str = "physical-device-path";
/// Backend key holding the hex `major:minor` of the block device.
pub const KEY_PHYSICAL_DEVICE: &str = "physical-device";
/// Backend key holding `type:/path` of the image.
pub const KEY_TAPDISK_PARAMS: &str = "tapdisk-params";
/// Major number of the Linux NBD block driver.
pub const NBD_MAJOR: u32 = 43;

/// The VBD serving a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapLocation {
    /// tapdisk process id.
    pub pid: i32,
    /// VBD minor inside that tapdisk.
    pub minor: u16,
    /// The key it was found through.
    pub source: &'static str,
}

/// The tapdisk operations tapback uses. The real implementation is [`ControlTapdisks`];
/// tests use a fake that records calls.
pub trait TapdiskOps {
    /// The VBDs of tapdisk `pid` (LIST).
    fn list_pid(&self, pid: i32) -> std::result::Result<Vec<ListEntry>, ControlError>;
    /// Every live tapdisk and its VBDs.
    fn list_all(&self) -> std::result::Result<Vec<(i32, Vec<ListEntry>)>, ControlError>;
    /// DISK_INFO of a VBD.
    fn disk_info(&self, pid: i32, minor: u16) -> std::result::Result<DiskInfo, ControlError>;
    /// XENBLKIF_CONNECT.
    fn connect(&self, pid: i32, minor: u16, blkif: &Blkif)
        -> std::result::Result<(), ControlError>;
    /// XENBLKIF_DISCONNECT of the ring of (domid, devid).
    fn disconnect(&self, pid: i32, domid: u32, devid: u32)
        -> std::result::Result<(), ControlError>;
    /// The NBD socket path behind block device `major:minor`, if the host can tell.
    fn block_device_socket(&self, major: u32, minor: u32) -> Option<String> {
        let _ = (major, minor);
        None
    }
}

/// Parse a `physical-device` value: hex `major:minor`. Empty means absent (`Ok(None)`).
pub fn parse_physical_device(s: &str) -> std::result::Result<Option<(u32, u32)>, String> {
    let t = s.trim_end_matches('\0').trim();
    if t.is_empty() {
        return Ok(None);
    }
    let bad = || format!("{t:?} is not hex major:minor");
    let (ma, mi) = t.split_once(':').ok_or_else(bad)?;
    let hex = |x: &str| {
        if x.is_empty() || x.len() > 8 || !x.bytes().all(|b| b.is_ascii_hexdigit()) {
            None
        } else {
            u32::from_str_radix(x, 16).ok()
        }
    };
    match (hex(ma), hex(mi)) {
        (Some(a), Some(b)) => Ok(Some((a, b))),
        _ => Err(bad()),
    }
}

/// The locator keys as read from the backend directory (`None` = absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocatorKeys {
    pub physical_device_path: Option<String>,
    pub physical_device: Option<String>,
    pub tapdisk_params: Option<String>,
}

fn verify<T: TapdiskOps + ?Sized>(
    t: &T,
    pid: i32,
    minor: u16,
    source: &'static str,
) -> std::result::Result<TapLocation, String> {
    match t.list_pid(pid) {
        Ok(vbds) => match vbds.iter().find(|v| v.minor == minor) {
            Some(v) if v.params.is_empty() => Err(format!(
                "{source}: tapdisk {pid} minor {minor} has no image open"
            )),
            Some(_) => Ok(TapLocation { pid, minor, source }),
            None => Err(format!(
                "{source}: tapdisk {pid} does not serve minor {minor}"
            )),
        },
        Err(e) => Err(format!("{source}: tapdisk {pid}: {}", error_chain(&e))),
    }
}

/// Find the VBD for a device from its locator keys (see the module docs for the order).
pub fn locate_tapdisk<T: TapdiskOps + ?Sized>(t: &T, keys: &LocatorKeys) -> Result<TapLocation> {
    let mut why = Vec::new();
    if let Some(p) = keys
        .physical_device_path
        .as_deref()
        .filter(|p| !p.is_empty())
    {
        match nbd_from_socket_name(p) {
            Some((pid, minor)) => match verify(t, pid, minor, KEY_PHYSICAL_DEVICE_PATH) {
                Ok(loc) => return Ok(loc),
                Err(e) => why.push(e),
            },
            None => why.push(format!(
                "{KEY_PHYSICAL_DEVICE_PATH}: {p:?} is not nbd<pid>.<minor>"
            )),
        }
    }
    if let Some(p) = keys.physical_device.as_deref() {
        match parse_physical_device(p) {
            Ok(None) => {}
            Ok(Some((major, minor))) => {
                match t
                    .block_device_socket(major, minor)
                    .as_deref()
                    .and_then(nbd_from_socket_name)
                {
                    Some((pid, m)) => match verify(t, pid, m, KEY_PHYSICAL_DEVICE) {
                        Ok(loc) => return Ok(loc),
                        Err(e) => why.push(e),
                    },
                    None => why.push(format!(
                        "{KEY_PHYSICAL_DEVICE}: {major:x}:{minor:x} is not a known tapdisk device"
                    )),
                }
            }
            Err(e) => why.push(format!("{KEY_PHYSICAL_DEVICE}: {e}")),
        }
    }
    if let Some(p) = keys.tapdisk_params.as_deref().filter(|p| !p.is_empty()) {
        let p = p.trim_end_matches('\0').trim();
        match split_params(p) {
            Ok(_) => match t.list_all().map_err(|e| error_chain(&e)) {
                Ok(all) => {
                    let hit = all.iter().find_map(|(pid, vbds)| {
                        vbds.iter().find(|v| v.params == p).map(|v| (*pid, v.minor))
                    });
                    match hit {
                        Some((pid, minor)) => {
                            return Ok(TapLocation {
                                pid,
                                minor,
                                source: KEY_TAPDISK_PARAMS,
                            })
                        }
                        None => why.push(format!("{KEY_TAPDISK_PARAMS}: no tapdisk serves {p}")),
                    }
                }
                Err(e) => why.push(format!("{KEY_TAPDISK_PARAMS}: {e}")),
            },
            Err(e) => why.push(format!("{KEY_TAPDISK_PARAMS}: {e}")),
        }
    }
    if why.is_empty() {
        why.push(format!(
            "none of {KEY_PHYSICAL_DEVICE_PATH}, {KEY_PHYSICAL_DEVICE}, {KEY_TAPDISK_PARAMS} is set"
        ));
    }
    Err(TapbackError::NoTapdisk(why.join("; ")))
}

/// The real tapdisk operations, over the control sockets. Every request is bounded by the
/// client's timeout so that a wedged tapdisk cannot stall tapback.
#[derive(Clone, Debug)]
pub struct ControlTapdisks {
    client: Client,
    sysfs: PathBuf,
}

/// Default bound on one control exchange.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

impl ControlTapdisks {
    /// Over `client`'s control directory, with `/sys` for block device lookups. A client
    /// without a timeout gets [`CONTROL_TIMEOUT`].
    pub fn new(client: Client) -> Self {
        let client = match client.timeout() {
            Some(_) => client,
            None => client.with_timeout(CONTROL_TIMEOUT),
        };
        ControlTapdisks {
            client,
            sysfs: PathBuf::from("/sys"),
        }
    }

    /// Use another timeout per control exchange.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.client = self.client.with_timeout(timeout);
        self
    }

    /// Use another sysfs root (tests).
    pub fn with_sysfs(mut self, root: impl Into<PathBuf>) -> Self {
        self.sysfs = root.into();
        self
    }

    /// The control directory.
    pub fn dir(&self) -> &Path {
        self.client.dir()
    }
}

impl TapdiskOps for ControlTapdisks {
    fn list_pid(&self, pid: i32) -> std::result::Result<Vec<ListEntry>, ControlError> {
        self.client.list_pid(pid, None)
    }

    fn list_all(&self) -> std::result::Result<Vec<(i32, Vec<ListEntry>)>, ControlError> {
        self.client.list_all()
    }

    fn disk_info(&self, pid: i32, minor: u16) -> std::result::Result<DiskInfo, ControlError> {
        self.client.info(pid, minor, None)
    }

    fn connect(
        &self,
        pid: i32,
        minor: u16,
        blkif: &Blkif,
    ) -> std::result::Result<(), ControlError> {
        self.client.connect_xenblkif(pid, minor, blkif.clone())
    }

    fn disconnect(
        &self,
        pid: i32,
        domid: u32,
        devid: u32,
    ) -> std::result::Result<(), ControlError> {
        self.client.disconnect_xenblkif(pid, domid, devid, None)
    }

    /// Through the device's sysfs `backend` identifier (Linux 5.14 and later), else through
    /// the control client's record of which VBD the device serves
    /// ([`Client::vbd_of_nbd_device`]: the `tapdev<minor>` link to `/dev/nbdN`), which is
    /// all a kernel without the identifier (OpenXT 8's Linux 4.14) leaves.
    fn block_device_socket(&self, major: u32, minor: u32) -> Option<String> {
        if major != NBD_MAJOR {
            return None;
        }
        let dev = self.sysfs.join(format!("dev/block/{major}:{minor}"));
        if let Ok(s) = std::fs::read_to_string(dev.join("backend")) {
            let s = s.trim();
            if nbd_from_socket_name(s).is_some() {
                return Some(s.to_owned());
            }
        }
        let index = nbd_index_of_sysfs_device(&dev)?;
        let (pid, vbd_minor) = self.client.vbd_of_nbd_device(index)?;
        nbd_socket_path(self.client.dir(), pid, vbd_minor)
            .to_str()
            .map(str::to_owned)
    }
}

/// The index N of the whole NBD device `nbdN` that a `/sys/dev/block/<major>:<minor>` entry
/// stands for: the name its link points to (`../../devices/virtual/block/nbdN`), else the
/// `DEVNAME` of its `uevent`. A partition (`nbdNpM`) is not a device tap-ctl hands out, so
/// it gives `None`. The block minor of `nbdN` depends on the driver's `max_part`, which
/// sysfs has already applied.
fn nbd_index_of_sysfs_device(dev: &Path) -> Option<u32> {
    if let Ok(target) = std::fs::read_link(dev) {
        return target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_device_name);
    }
    let uevent = std::fs::read_to_string(dev.join("uevent")).ok()?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .and_then(parse_device_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_device_names() {
        assert_eq!(parse_device_name("nbd0"), Some(0));
        assert_eq!(parse_device_name("nbd15\n"), Some(15));
        for bad in ["nbd", "nbd1p1", "sda", "nbd-1", "xnbd1", "nbd1234567890"] {
            assert_eq!(parse_device_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sysfs_device_index_from_link_or_uevent() {
        let t = tempfile::tempdir().unwrap();
        let block = t.path().join("devices/virtual/block");
        for n in ["nbd3", "nbd3p1"] {
            std::fs::create_dir_all(block.join(n)).unwrap();
        }
        let devs = t.path().join("dev/block");
        std::fs::create_dir_all(&devs).unwrap();
        std::os::unix::fs::symlink("../../devices/virtual/block/nbd3", devs.join("43:96")).unwrap();
        std::os::unix::fs::symlink("../../devices/virtual/block/nbd3p1", devs.join("43:97"))
            .unwrap();
        assert_eq!(nbd_index_of_sysfs_device(&devs.join("43:96")), Some(3));
        assert_eq!(nbd_index_of_sysfs_device(&devs.join("43:97")), None);
        assert_eq!(nbd_index_of_sysfs_device(&devs.join("43:98")), None);
        // A plain directory (no link): its uevent names the device.
        std::fs::create_dir_all(devs.join("43:64")).unwrap();
        std::fs::write(
            devs.join("43:64/uevent"),
            "MAJOR=43\nMINOR=64\nDEVNAME=nbd2\n",
        )
        .unwrap();
        assert_eq!(nbd_index_of_sysfs_device(&devs.join("43:64")), Some(2));
    }

    #[test]
    fn physical_devices() {
        assert_eq!(parse_physical_device("2b:0"), Ok(Some((43, 0))));
        assert_eq!(parse_physical_device("fe:1A"), Ok(Some((0xfe, 0x1a))));
        assert_eq!(parse_physical_device(""), Ok(None));
        assert_eq!(parse_physical_device(" \0"), Ok(None));
        for bad in ["2b", ":1", "2b:", "zz:1", "1:2:3", "123456789:1", "-1:2"] {
            assert!(parse_physical_device(bad).is_err(), "{bad:?}");
        }
    }
}
