//! A VBD (virtual block device): one attached minor, its open image and its state.

use std::path::PathBuf;
use std::sync::Arc;

use crate::control::minors::MarkerLock;
use crate::image::Image;

/// VBD state flags (reference §4.2), as the control codec defines them.
pub mod state {
    use crate::control::msg::VbdState;
    pub const DEAD: u32 = VbdState::DEAD.0;
    pub const CLOSED: u32 = VbdState::CLOSED.0;
    pub const PAUSE_REQUESTED: u32 = VbdState::PAUSE_REQUESTED.0;
    pub const PAUSED: u32 = VbdState::PAUSED.0;
    pub const SHUTDOWN_REQUESTED: u32 = VbdState::SHUTDOWN_REQUESTED.0;
    pub const RESUME_FAILED: u32 = VbdState::RESUME_FAILED.0;
}

/// `VDISK_READONLY` in the `info` field of OPEN_RSP / DISK_INFO_RSP.
pub const VDISK_READONLY: u32 = 0x4;

pub use crate::control::msg::DiskInfo;

/// Disk types tapdisk knows (`type:` prefix of the params) with blktap's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Aio,
    Vhd,
}

impl DiskType {
    /// Parse a `type` name. Known-but-unimplemented blktap types give ENOSYS, others EINVAL.
    pub fn parse(name: &str) -> Result<DiskType, i32> {
        match name {
            "aio" => Ok(DiskType::Aio),
            "vhd" => Ok(DiskType::Vhd),
            "sync" | "vmdk" | "vhdsync" | "ram" | "qcow" | "bc" | "vhdi" | "log" | "remus"
            | "lc" | "lle" | "llp" | "valve" | "nbd" => Err(libc::ENOSYS),
            _ => Err(libc::EINVAL),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DiskType::Aio => "aio",
            DiskType::Vhd => "vhd",
        }
    }

    /// blktap's driver number (stats JSON `driver.type`).
    pub fn number(self) -> u32 {
        match self {
            DiskType::Aio => 0,
            DiskType::Vhd => 4,
        }
    }
}

/// Split `"type:/path"`.
pub fn parse_params(params: &str) -> Result<(DiskType, PathBuf), i32> {
    let (t, p) = params.split_once(':').ok_or(libc::EINVAL)?;
    if p.is_empty() {
        return Err(libc::EINVAL);
    }
    Ok((DiskType::parse(t)?, PathBuf::from(p)))
}

/// Per-VBD counters (stats JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub rd_secs: u64,
    pub wr_secs: u64,
    pub hits: [u64; 2],
    pub fail: [u64; 2],
}

/// An open image and how it was opened.
#[derive(Debug, Clone)]
pub struct OpenImage {
    pub image: Arc<dyn Image>,
    pub kind: DiskType,
    pub path: PathBuf,
}

/// One attached minor.
#[derive(Debug)]
pub struct Vbd {
    pub minor: u16,
    /// State flags ([`state`]).
    pub state: u32,
    /// The minor's marker file, flocked while attached.
    pub marker: Option<MarkerLock>,
    /// Open flags of the last OPEN.
    pub flags: u32,
    /// `"type:/path"` of the open (or paused) image; empty when closed.
    pub params: String,
    pub image: Option<OpenImage>,
    /// Geometry cached at OPEN; DISK_INFO answers from it, RESUME must match it.
    pub info: Option<DiskInfo>,
    pub stats: Stats,
    /// Last completion (or first submission after idling), for the stuck-I/O watchdog.
    pub last_progress: std::time::Instant,
    /// The watchdog already warned about the current stall.
    pub stalled_logged: bool,
    /// Requests submitted to the I/O engine and not completed yet.
    pub inflight: u32,
    /// An open/pause/resume/close is in progress (other ops get EBUSY).
    pub busy: bool,
}

impl Vbd {
    pub fn new(minor: u16, marker: Option<MarkerLock>) -> Self {
        Vbd {
            minor,
            state: state::CLOSED,
            marker,
            flags: 0,
            params: String::new(),
            image: None,
            info: None,
            stats: Stats::default(),
            last_progress: std::time::Instant::now(),
            stalled_logged: false,
            inflight: 0,
            busy: false,
        }
    }

    /// Whether NBD requests may be started now.
    pub fn accepts_io(&self) -> bool {
        self.image.is_some()
            && self.state
                & (state::CLOSED
                    | state::PAUSED
                    | state::PAUSE_REQUESTED
                    | state::SHUTDOWN_REQUESTED
                    | state::DEAD)
                == 0
    }

    /// Open or paused (not CLOSED): DETACH is refused.
    pub fn is_open(&self) -> bool {
        self.state & state::CLOSED == 0
    }

    /// The stats object in blktap's exact formatting (reference §3.1).
    pub fn stats_json(&self) -> String {
        self.stats_json_with(None)
    }

    /// As [`stats_json`](Self::stats_json), with the `"xenbus"` object of connected rings.
    pub fn stats_json_with(&self, xenbus: Option<&str>) -> String {
        let mut s = String::from("{ ");
        s += &format!("\"name\": {}, ", json_str(&self.params));
        s += &format!(
            "\"secs\": [ {}, {} ], ",
            self.stats.rd_secs, self.stats.wr_secs
        );
        s += "\"images\": [ ";
        if let Some(img) = &self.image {
            s += &format!(
                "{{ \"name\": {}, \"hits\": [ {}, {} ], \"fail\": [ {}, {} ], \
                 \"driver\": {{ \"type\": {}, \"name\": {}, \"status\": null }} }}",
                json_str(&img.path.to_string_lossy()),
                self.stats.hits[0],
                self.stats.hits[1],
                self.stats.fail[0],
                self.stats.fail[1],
                img.kind.number(),
                json_str(img.kind.name()),
            );
            s += " ";
        }
        s += "], ";
        if let Some(x) = xenbus {
            s += &format!("\"xenbus\": {x}, ");
        }
        s += "\"FIXME_enospc_redirect_count\": 0, \"nbd_mirror_failed\": 0, ";
        s += &format!("\"reqs_outstanding\": {}, ", self.inflight);
        s += "\"read_caching\": \"false\" }";
        s
    }
}

/// A JSON string literal.
pub fn json_str(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s += "\\\"",
            '\\' => s += "\\\\",
            '\n' => s += "\\n",
            c if (c as u32) < 0x20 => s += &format!("\\u{:04x}", c as u32),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tapdisk::mem::MemImage;

    #[test]
    fn params_parse_and_errors() {
        assert_eq!(
            parse_params("aio:/x"),
            Ok((DiskType::Aio, PathBuf::from("/x")))
        );
        assert_eq!(
            parse_params("vhd:/a:b"),
            Ok((DiskType::Vhd, PathBuf::from("/a:b")))
        );
        assert_eq!(parse_params("qcow:/x"), Err(libc::ENOSYS));
        assert_eq!(parse_params("foo:/x"), Err(libc::EINVAL));
        assert_eq!(parse_params("/x"), Err(libc::EINVAL));
        assert_eq!(parse_params("aio:"), Err(libc::EINVAL));
    }

    #[test]
    fn stats_json_has_blktap_shape() {
        let mut v = Vbd::new(3, None);
        v.params = "vhd:/p/leaf.vhd".into();
        v.state = 0;
        v.image = Some(OpenImage {
            image: Arc::new(MemImage::new(8, false)),
            kind: DiskType::Vhd,
            path: "/p/leaf.vhd".into(),
        });
        v.stats = Stats {
            rd_secs: 8,
            wr_secs: 16,
            hits: [1, 2],
            fail: [0, 1],
        };
        assert_eq!(
            v.stats_json(),
            "{ \"name\": \"vhd:/p/leaf.vhd\", \"secs\": [ 8, 16 ], \"images\": [ { \"name\": \
             \"/p/leaf.vhd\", \"hits\": [ 1, 2 ], \"fail\": [ 0, 1 ], \"driver\": { \"type\": 4, \
             \"name\": \"vhd\", \"status\": null } } ], \"FIXME_enospc_redirect_count\": 0, \
             \"nbd_mirror_failed\": 0, \"reqs_outstanding\": 0, \"read_caching\": \"false\" }"
        );
        assert!(v.accepts_io());
        v.state |= state::PAUSE_REQUESTED;
        assert!(!v.accepts_io());
        assert_eq!(json_str("a\"b\\\n"), "\"a\\\"b\\\\\\n\"");
    }
}
