//! A VBD (virtual block device): one attached minor, its open image and its state.

use std::path::PathBuf;
use std::sync::Arc;

use crate::control::minors::MarkerLock;
use crate::image::{Image, ImageFormat};

use super::io::{IoEngine, Op};
use super::tag::{Door, IoAcct, Tag};

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

    /// The image format this driver opens.
    pub fn format(self) -> ImageFormat {
        match self {
            DiskType::Aio => ImageFormat::Raw,
            DiskType::Vhd => ImageFormat::Vhd,
        }
    }

    pub fn name(self) -> &'static str {
        self.format().driver_name()
    }

    /// blktap's driver number (stats JSON `driver.type`).
    pub fn number(self) -> u32 {
        self.format().driver_type()
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

/// A request for a VBD that has no image (closed or paused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("minor {0} has no open image")]
pub struct NoImage(pub u16);

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

/// One entry of the stats JSON `"images"` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageStats {
    pub name: String,
    pub hits: [u64; 2],
    pub fail: [u64; 2],
    pub driver_type: u32,
    pub driver_name: &'static str,
}

impl ImageStats {
    /// `{ "name": .., "hits": [ r, w ], "fail": [ r, w ], "driver": { .. } }` (reference §3.1).
    pub fn json(&self) -> String {
        format!(
            "{{ \"name\": {}, \"hits\": [ {}, {} ], \"fail\": [ {}, {} ], \
             \"driver\": {{ \"type\": {}, \"name\": {}, \"status\": null }} }}",
            json_str(&self.name),
            self.hits[0],
            self.hits[1],
            self.fail[0],
            self.fail[1],
            self.driver_type,
            json_str(self.driver_name),
        )
    }
}

impl OpenImage {
    /// The chain's images, leaf first. Requests are counted per VBD, not per layer: the
    /// leaf carries the VBD's hits and failures (every request enters the chain there),
    /// parents report zeros. An image that does not list its layers is described by the
    /// path and type it was opened with.
    pub fn image_stats(&self, stats: &Stats) -> Vec<ImageStats> {
        let layers = self.image.layers();
        if layers.is_empty() {
            return vec![ImageStats {
                name: self.path.to_string_lossy().into_owned(),
                hits: stats.hits,
                fail: stats.fail,
                driver_type: self.kind.number(),
                driver_name: self.kind.name(),
            }];
        }
        layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| ImageStats {
                name: l.path.to_string_lossy().into_owned(),
                hits: if i == 0 { stats.hits } else { [0; 2] },
                fail: if i == 0 { stats.fail } else { [0; 2] },
                driver_type: l.format.driver_type(),
                driver_name: l.format.driver_name(),
            })
            .collect()
    }
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

    /// Start a guest request (from a ring or an NBD client) on the image: it counts in
    /// flight, so PAUSE and CLOSE wait for it, until [`end_io`](Self::end_io) is called with
    /// its completion. The only way the front doors submit guest I/O.
    pub(crate) fn begin_io(
        &mut self,
        io: &IoEngine<Tag>,
        door: Door,
        acct: IoAcct,
        op: Op,
    ) -> Result<(), NoImage> {
        let Some(img) = &self.image else {
            return Err(NoImage(self.minor));
        };
        if self.inflight == 0 {
            self.last_progress = std::time::Instant::now();
        }
        self.inflight += 1;
        let tag = Tag::Io {
            minor: self.minor,
            acct,
            door,
        };
        io.submit(tag, Arc::clone(&img.image), op);
        Ok(())
    }

    /// A request started by [`begin_io`](Self::begin_io) completed (`ok`: without error):
    /// no longer in flight, counted in the stats.
    pub(crate) fn end_io(&mut self, acct: IoAcct, ok: bool) {
        self.inflight = self.inflight.saturating_sub(1);
        self.last_progress = std::time::Instant::now();
        let dir = usize::from(acct.write);
        if ok {
            self.stats.hits[dir] += 1;
            if acct.write {
                self.stats.wr_secs += acct.sectors;
            } else {
                self.stats.rd_secs += acct.sectors;
            }
        } else {
            self.stats.fail[dir] += 1;
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
            s += &img
                .image_stats(&self.stats)
                .iter()
                .map(ImageStats::json)
                .collect::<Vec<_>>()
                .join(", ");
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

    #[test]
    fn stats_json_lists_the_whole_chain_leaf_first() {
        use crate::image::vhd::ops::{snapshot, SnapshotOptions};
        use crate::image::{open, ImageFormat, OpenOptions};
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 2 << 20]).unwrap();
        let mid = d.path().join("mid.vhd");
        let opts = SnapshotOptions {
            raw_parent: true,
            ..Default::default()
        };
        snapshot(&mid, &base, &opts).unwrap();
        let leaf = d.path().join("leaf.vhd");
        let exact = SnapshotOptions {
            link_exact: true,
            ..Default::default()
        };
        snapshot(&leaf, &mid, &exact).unwrap();
        let image = open(&leaf, ImageFormat::Vhd, &OpenOptions::default()).unwrap();
        let (b, m, l) = (base.display(), mid.display(), leaf.display());
        let mut v = Vbd::new(1, None);
        v.params = format!("vhd:{l}");
        v.state = 0;
        v.image = Some(OpenImage {
            image: Arc::from(image),
            kind: DiskType::Vhd,
            path: leaf.clone(),
        });
        v.stats = Stats {
            rd_secs: 3,
            wr_secs: 5,
            hits: [7, 2],
            fail: [1, 0],
        };
        let img = |name: &std::path::Display<'_>, hits: &str, fail: &str, t: u32, n: &str| {
            format!(
                "{{ \"name\": \"{name}\", \"hits\": [ {hits} ], \"fail\": [ {fail} ], \
                 \"driver\": {{ \"type\": {t}, \"name\": \"{n}\", \"status\": null }} }}"
            )
        };
        let expect = format!(
            "{{ \"name\": \"vhd:{l}\", \"secs\": [ 3, 5 ], \"images\": [ {}, {}, {} ], \
             \"FIXME_enospc_redirect_count\": 0, \"nbd_mirror_failed\": 0, \
             \"reqs_outstanding\": 0, \"read_caching\": \"false\" }}",
            img(&l, "7, 2", "1, 0", 4, "vhd"),
            img(&m, "0, 0", "0, 0", 4, "vhd"),
            img(&b, "0, 0", "0, 0", 0, "aio"),
        );
        assert_eq!(v.stats_json(), expect);
        // Two deep: a VHD over a raw parent.
        let two = open(&mid, ImageFormat::Vhd, &OpenOptions::default()).unwrap();
        v.params = format!("vhd:{m}");
        v.image = Some(OpenImage {
            image: Arc::from(two),
            kind: DiskType::Vhd,
            path: mid.clone(),
        });
        let expect = format!(
            "{{ \"name\": \"vhd:{m}\", \"secs\": [ 3, 5 ], \"images\": [ {}, {} ], \
             \"FIXME_enospc_redirect_count\": 0, \"nbd_mirror_failed\": 0, \
             \"reqs_outstanding\": 0, \"read_caching\": \"false\" }}",
            img(&m, "7, 2", "1, 0", 4, "vhd"),
            img(&b, "0, 0", "0, 0", 0, "aio"),
        );
        assert_eq!(v.stats_json(), expect);
        // A raw leaf alone is one aio image.
        let raw = open(&base, ImageFormat::Raw, &OpenOptions::default()).unwrap();
        v.image = Some(OpenImage {
            image: Arc::from(raw),
            kind: DiskType::Aio,
            path: base.clone(),
        });
        let one = v.image.as_ref().unwrap().image_stats(&v.stats);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].json(), img(&b, "7, 2", "1, 0", 0, "aio"));
    }
}
