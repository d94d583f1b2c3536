//! Control requests in the event loop: one handler per message type, and the completions
//! that finish the asynchronous ones (OPEN and RESUME wait for the image to open, PAUSE and
//! CLOSE for in-flight I/O to drain and the image to close).
//!
//! Every handler checks first, then acts ("parse, then act"): a refused request changes
//! nothing. Failures are [`VbdError`]s carrying their cause; [`Tapdisk::control_ready`]
//! logs them and turns them into the errno of the reply ([`VbdError::errno`]), the one
//! place where errors become numbers.

use super::*;

use crate::control::msg::{Blkif, OpenRequest, ResumeRequest};
use crate::tapdisk::vbd::{Drained, OpenTarget, ParamsError};
use crate::tapdisk::xenio::RingConnError;

/// Why a control request on a VBD failed.
#[derive(Debug, thiserror::Error)]
pub enum VbdError {
    #[error("minor {0} is not attached")]
    NotAttached(u16),
    #[error("minor {0} is already attached")]
    AlreadyAttached(u16),
    /// blktap answers a missing marker with EPERM.
    #[error("minor {0} has no marker file (not allocated)")]
    NoMarker(u16),
    #[error("minor {minor}: marker file")]
    Marker {
        minor: u16,
        #[source]
        source: crate::control::ControlError,
    },
    #[error("minor {0}: an open, pause, resume or close is in progress")]
    Busy(u16),
    #[error("minor {0} is already open")]
    AlreadyOpen(u16),
    #[error("minor {0} is not open")]
    NotOpen(u16),
    #[error("minor {0} is not paused")]
    NotPaused(u16),
    #[error("minor {0} is open or has a ring connected")]
    InUse(u16),
    #[error("minor {0} has no disk")]
    NoDisk(u16),
    #[error("minor {minor}: open flags {flags:#x} (or a secondary) not supported")]
    Flags { minor: u16, flags: u32 },
    #[error("minor {minor}: params {params:?}")]
    Params {
        minor: u16,
        params: String,
        #[source]
        source: ParamsError,
    },
    #[error("minor {minor}: open {params}")]
    Open {
        minor: u16,
        params: String,
        #[source]
        source: ImageError,
    },
    #[error("minor {minor}: opening {params} gave no image")]
    NotAnImage { minor: u16, params: String },
    #[error("minor {minor}: resume onto {params}: disk geometry changed")]
    Geometry { minor: u16, params: String },
    #[error("minor {minor}: nbd listen")]
    Listen {
        minor: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("minor {minor}: close")]
    Close {
        minor: u16,
        #[source]
        source: ImageError,
    },
    /// XENBLKIF_CONNECT for a minor that is not attached.
    #[error("minor {0} is not attached: no ring")]
    NoVbdForRing(u16),
    #[error("minor {minor}: blkif ring")]
    Ring {
        minor: u16,
        #[source]
        source: RingConnError,
    },
    #[error("blkif ring")]
    Disconnect(#[source] RingConnError),
}

impl VbdError {
    /// The errno of the control reply (blktap's numbers).
    pub fn errno(&self) -> i32 {
        match self {
            VbdError::NotAttached(_)
            | VbdError::NotOpen(_)
            | VbdError::NotPaused(_)
            | VbdError::NoDisk(_) => libc::EINVAL,
            VbdError::AlreadyAttached(_) => libc::EEXIST,
            VbdError::NoMarker(_) => libc::EPERM,
            VbdError::Marker { source, .. } => source.errno(),
            VbdError::Busy(_) | VbdError::InUse(_) => libc::EBUSY,
            VbdError::AlreadyOpen(_) => libc::EALREADY,
            VbdError::Flags { .. } => libc::EOPNOTSUPP,
            VbdError::Params { source, .. } => source.errno(),
            VbdError::Open { source, .. } | VbdError::Close { source, .. } => source.errno(),
            VbdError::NotAnImage { .. } => libc::EIO,
            VbdError::Geometry { .. } => libc::EMEDIUMTYPE,
            VbdError::Listen { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            VbdError::NoVbdForRing(_) => libc::ENODEV,
            VbdError::Ring { source, .. } | VbdError::Disconnect(source) => source.errno(),
        }
    }

    /// Refusals by state are routine (tap-ctl probing, retries); failures with a cause
    /// are warned about.
    fn level(&self) -> log::Level {
        match self {
            VbdError::NotAttached(_)
            | VbdError::AlreadyAttached(_)
            | VbdError::Busy(_)
            | VbdError::AlreadyOpen(_)
            | VbdError::NotOpen(_)
            | VbdError::NotPaused(_)
            | VbdError::InUse(_)
            | VbdError::NoDisk(_)
            | VbdError::NoVbdForRing(_) => log::Level::Info,
            _ => log::Level::Warn,
        }
    }
}

/// The answer of a handler: now, or later (the VBD holds the reply channel).
enum Answer {
    Now(Reply),
    Later,
}

type Handled = Result<Answer, VbdError>;

impl Tapdisk {
    pub(super) fn control_ready(&mut self) {
        self.ctl.waker().reset();
        while let Ok((req, reply)) = self.ctl_rx.try_recv() {
            debug!("control request {req:?}");
            match self.control(req, &reply) {
                Ok(Answer::Now(r)) => {
                    let _ = reply.send(r);
                }
                Ok(Answer::Later) => {}
                Err(e) => {
                    let _ = reply.send(reply_error(&e));
                }
            }
        }
    }

    /// Route one request to its handler.
    fn control(&mut self, req: Request, reply: &Sender<Reply>) -> Handled {
        match req {
            Request::Pid => Ok(Answer::Now(Reply::Pid(self.cfg.pid))),
            Request::Attach { minor } => self.attach(minor),
            Request::Open(o) => self.open(o, reply),
            Request::Pause { minor } => self.pause(minor, reply),
            Request::Resume(r) => self.resume(r, reply),
            Request::Close { minor } => self.close(minor, false, reply),
            Request::ForceShutdown { minor } => self.close(minor, true, reply),
            Request::Detach { minor } => self.detach(minor),
            Request::List => Ok(Answer::Now(self.list())),
            Request::Stats { minor } => self.stats(minor),
            Request::DiskInfo { minor } => self.disk_info(minor),
            Request::XenblkifConnect { minor, blkif } => self.xenblkif_connect(minor, &blkif),
            Request::XenblkifDisconnect { domid, devid } => {
                self.rings
                    .disconnect(domid, devid)
                    .map_err(VbdError::Disconnect)?;
                Ok(Answer::Now(Reply::XenblkifDisconnect))
            }
        }
    }

    /// Whether an OPEN or RESUME with these flags opens its images with O_DIRECT: unless
    /// the daemon's `TAPDISK3_DIRECT_IO=0` or the request's `NO_O_DIRECT` says otherwise.
    fn direct_io(&self, flags: u32) -> bool {
        self.cfg.direct_io && flags & OpenFlags::NO_O_DIRECT.0 == 0
    }

    fn vbd_mut(&mut self, minor: u16) -> Result<&mut Vbd, VbdError> {
        self.vbds
            .get_mut(&minor)
            .ok_or(VbdError::NotAttached(minor))
    }

    /// ATTACH: take the minor (and lock its marker file).
    fn attach(&mut self, minor: u16) -> Handled {
        if self.vbds.contains_key(&minor) {
            return Err(VbdError::AlreadyAttached(minor));
        }
        let marker = if self.cfg.lock_markers {
            match minors::lock_marker(&self.cfg.ctl_dir, minor, Duration::ZERO) {
                Ok(m) => Some(m),
                Err(e) if e.errno() == libc::ENOENT => return Err(VbdError::NoMarker(minor)),
                Err(source) => return Err(VbdError::Marker { minor, source }),
            }
        } else {
            None
        };
        self.vbds.insert(minor, Vbd::new(minor, marker));
        info!("minor {minor} attached");
        Ok(Answer::Now(Reply::Attach))
    }

    /// OPEN: open the image on a worker; answered by [`Tapdisk::opened`].
    fn open(&mut self, o: OpenRequest, reply: &Sender<Reply>) -> Handled {
        let minor = o.minor;
        let vbd = self.vbd_mut(minor)?;
        if vbd.is_busy() {
            return Err(VbdError::Busy(minor));
        }
        if vbd.is_open() {
            return Err(VbdError::AlreadyOpen(minor));
        }
        let flags = o.flags.0;
        if flags & !SUPPORTED_OPEN_FLAGS.0 != 0 || o.secondary.is_some() {
            return Err(VbdError::Flags { minor, flags });
        }
        let target = parse_target(minor, o.params)?;
        let keys = match o.key {
            Some(k) => KeySource::Explicit(k.into_key_bytes()),
            None => self.cfg.keys.clone(),
        };
        let spec = OpenSpec {
            kind: target.kind,
            path: target.path.clone(),
            read_only: flags & OpenFlags::RDONLY.0 != 0,
            keys,
            direct: self.direct_io(flags),
        };
        let vbd = self.vbd_mut(minor)?;
        vbd.begin_open(target, flags, reply);
        let opener = Arc::clone(&self.cfg.opener);
        self.io.run(
            Tag::Open { minor },
            Box::new(move || opener.open(&spec).map(Output::Image)),
        );
        Ok(Answer::Later)
    }

    /// PAUSE: stop taking guest requests, drain, close the image; answered by
    /// [`Tapdisk::closed`].
    fn pause(&mut self, minor: u16, reply: &Sender<Reply>) -> Handled {
        let vbd = self.vbd_mut(minor)?;
        if vbd.is_busy() {
            return Err(VbdError::Busy(minor));
        }
        if vbd.is_paused() {
            return Ok(Answer::Now(Reply::Pause));
        }
        if !vbd.is_open() {
            return Err(VbdError::NotOpen(minor));
        }
        vbd.begin_pause(reply);
        self.set_listening(minor, false);
        self.refresh_conns(minor);
        self.progress(minor);
        Ok(Answer::Later)
    }

    /// RESUME: reopen the image (the same params or new ones, retried); answered by
    /// [`Tapdisk::opened`].
    fn resume(&mut self, r: ResumeRequest, reply: &Sender<Reply>) -> Handled {
        let minor = r.minor;
        if r.flags.0 & !SUPPORTED_OPEN_FLAGS.0 != 0 || r.secondary.is_some() {
            return Err(VbdError::Flags {
                minor,
                flags: r.flags.0,
            });
        }
        let keys = self.cfg.keys.clone();
        let direct = self.direct_io(r.flags.0);
        let vbd = self.vbd_mut(minor)?;
        if vbd.is_busy() {
            return Err(VbdError::Busy(minor));
        }
        if !vbd.is_paused() {
            return Err(VbdError::NotPaused(minor));
        }
        let params = r
            .params
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| vbd.params().to_string());
        let target = parse_target(minor, params)?;
        let spec = OpenSpec {
            kind: target.kind,
            path: target.path.clone(),
            read_only: vbd.read_only(),
            keys,
            direct,
        };
        vbd.begin_resume(target, reply);
        let opener = Arc::clone(&self.cfg.opener);
        self.io.run(
            Tag::Resume { minor },
            Box::new(move || {
                let mut tries = 0;
                loop {
                    tries += 1;
                    match opener.open(&spec) {
                        Ok(i) => return Ok(Output::Image(i)),
                        Err(e) if tries >= RESUME_TRIES => return Err(e),
                        Err(e) => {
                            warn!("resume: reopen {} failed: {e}", spec.path.display());
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            }),
        );
        Ok(Answer::Later)
    }

    /// CLOSE (`force`: FORCE_SHUTDOWN, NBD clients dropped at once rather than let finish):
    /// stop the NBD export, drain, close the image; answered by [`Tapdisk::closed`].
    fn close(&mut self, minor: u16, force: bool, reply: &Sender<Reply>) -> Handled {
        let vbd = self.vbd_mut(minor)?;
        if vbd.is_busy() {
            return Err(VbdError::Busy(minor));
        }
        if !vbd.is_open() {
            return Ok(Answer::Now(Reply::Close));
        }
        vbd.begin_close(reply);
        self.remove_listener(minor);
        for id in self.conn_ids(minor) {
            if force {
                self.drop_conn(id);
            } else if let Some(c) = self.conns.get_mut(&id) {
                c.ending = true;
            }
        }
        self.refresh_conns(minor);
        self.progress(minor);
        Ok(Answer::Later)
    }

    /// DETACH: give the minor back (the last one ends the daemon).
    fn detach(&mut self, minor: u16) -> Handled {
        let vbd = self.vbd_mut(minor)?;
        if vbd.is_busy() || vbd.is_open() || self.rings.has_live(minor) {
            return Err(VbdError::InUse(minor));
        }
        self.vbds.remove(&minor);
        info!("minor {minor} detached");
        if self.vbds.is_empty() && self.exit_when_empty {
            self.exit = true;
        }
        Ok(Answer::Now(Reply::Detach))
    }

    /// LIST: every VBD with its wire state and params.
    fn list(&self) -> Reply {
        Reply::List(
            self.vbds
                .values()
                .map(|v| ListEntry {
                    minor: v.minor(),
                    state: v.wire_state(),
                    params: v.params().to_string(),
                })
                .collect(),
        )
    }

    /// STATS of one VBD or (no minor) of all, in blktap's JSON.
    fn stats(&self, minor: Option<u16>) -> Handled {
        let json = |v: &Vbd| v.stats_json_with(self.rings.stats_json(v.minor()).as_deref());
        let text = match minor {
            Some(m) => json(self.vbds.get(&m).ok_or(VbdError::NotAttached(m))?),
            None => {
                let all: Vec<String> = self.vbds.values().map(json).collect();
                format!("[ {} ]", all.join(", "))
            }
        };
        Ok(Answer::Now(Reply::Stats(text.into_bytes())))
    }

    /// DISK_INFO: the geometry cached at OPEN.
    fn disk_info(&self, minor: u16) -> Handled {
        match self.vbds.get(&minor).and_then(Vbd::info) {
            Some(i) => Ok(Answer::Now(Reply::DiskInfo(i))),
            None => Err(VbdError::NoDisk(minor)),
        }
    }

    /// XENBLKIF_CONNECT: map a guest's ring and serve it for `minor`.
    fn xenblkif_connect(&mut self, minor: u16, blkif: &Blkif) -> Handled {
        if !self.vbds.contains_key(&minor) {
            return Err(VbdError::NoVbdForRing(minor));
        }
        self.rings
            .connect(&self.reactor, minor, blkif)
            .map_err(|source| VbdError::Ring { minor, source })?;
        Ok(Answer::Now(Reply::XenblkifConnect))
    }

    // ---- completions of the asynchronous requests ------------------------------------

    /// Move a draining PAUSE/CLOSE on once nothing is in flight: close the image.
    pub(super) fn progress(&mut self, minor: u16) {
        let Some(vbd) = self.vbds.get_mut(&minor) else {
            return;
        };
        match vbd.drained() {
            Drained::Wait => {}
            Drained::CloseImage(Some(img)) => self.io.run(
                Tag::CloseImage { minor },
                Box::new(move || img.image.close().map(|_| Output::Done)),
            ),
            // Closing a paused VBD: the image is already closed.
            Drained::CloseImage(None) => self.closed(minor, Ok(Output::Done)),
        }
    }

    /// The image of a PAUSE or CLOSE is closed: answer it.
    pub(super) fn closed(&mut self, minor: u16, res: Result<Output, ImageError>) {
        let Some((pause, reply)) = self.vbds.get_mut(&minor).and_then(Vbd::image_closed) else {
            return;
        };
        if !pause {
            for id in self.conn_ids(minor) {
                self.drop_conn(id);
            }
        }
        info!("minor {minor} {}", if pause { "paused" } else { "closed" });
        let r = match res {
            Ok(_) if pause => Ok(Reply::Pause),
            Ok(_) => Ok(Reply::Close),
            Err(source) => Err(VbdError::Close { minor, source }),
        };
        answer(Some(reply), r);
    }

    /// The image of an OPEN (`resume` false) or RESUME is open (or not): start serving it
    /// and answer.
    pub(super) fn opened(&mut self, minor: u16, resume: bool, res: Result<Output, ImageError>) {
        let Some(target) = self
            .vbds
            .get(&minor)
            .and_then(|v| v.opening(resume))
            .cloned()
        else {
            // Nobody waits (cannot happen); do not leak an open image.
            if let Ok(Output::Image(img)) = res {
                self.close_unused(img);
            }
            return;
        };
        let params = target.params.clone();
        let image = match res {
            Ok(Output::Image(i)) => i,
            Ok(_) => return self.open_failed(minor, false, VbdError::NotAnImage { minor, params }),
            Err(source) => {
                return self.open_failed(
                    minor,
                    true,
                    VbdError::Open {
                        minor,
                        params,
                        source,
                    },
                )
            }
        };
        let ii = image.info();
        let info = DiskInfo {
            sectors: ii.size_sectors,
            sector_size: ii.sector_size,
            info: if ii.read_only { VDISK_READONLY } else { 0 },
        };
        if resume {
            let cached = self.vbds.get(&minor).and_then(Vbd::info);
            if cached
                .is_some_and(|c| c.sectors != info.sectors || c.sector_size != info.sector_size)
            {
                self.close_unused(image);
                return self.open_failed(minor, true, VbdError::Geometry { minor, params });
            }
        } else if let Err(source) = self.listen(minor) {
            self.close_unused(image);
            return self.open_failed(minor, false, VbdError::Listen { minor, source });
        }
        let open = OpenImage {
            image,
            kind: target.kind,
            path: target.path,
        };
        let reply = self
            .vbds
            .get_mut(&minor)
            .and_then(|v| v.open_succeeded(open, info));
        if resume {
            self.set_listening(minor, true);
            self.refresh_conns(minor);
        }
        self.rings.wake_minor(minor);
        info!(
            "minor {minor} {} {params}: {} sectors",
            if resume { "resumed on" } else { "opened" },
            info.sectors
        );
        let r = if resume {
            Reply::Resume
        } else {
            Reply::Open(info)
        };
        answer(reply, Ok(r));
    }

    /// An OPEN or RESUME failed (`resume_failed`: a RESUME's reopen failed, LIST shows it).
    fn open_failed(&mut self, minor: u16, resume_failed: bool, e: VbdError) {
        let reply = self
            .vbds
            .get_mut(&minor)
            .and_then(|v| v.open_failed(resume_failed));
        answer(reply, Err(e));
    }

    fn close_unused(&mut self, img: Arc<dyn Image>) {
        self.io.run(
            Tag::CloseUnused,
            Box::new(move || img.close().map(|_| Output::Done)),
        );
    }
}

/// Parse OPEN/RESUME params into what to open.
fn parse_target(minor: u16, params: String) -> Result<OpenTarget, VbdError> {
    match parse_params(&params) {
        Ok((kind, path)) => Ok(OpenTarget { params, kind, path }),
        Err(source) => Err(VbdError::Params {
            minor,
            params,
            source,
        }),
    }
}

/// Answer a request that waited for I/O (its VBD held `reply`).
fn answer(reply: Option<Sender<Reply>>, r: Result<Reply, VbdError>) {
    let r = r.unwrap_or_else(|e| reply_error(&e));
    if let Some(tx) = reply {
        let _ = tx.send(r);
    }
}

/// Log a failed request with its cause and give the reply that carries its errno.
fn reply_error(e: &VbdError) -> Reply {
    log::log!(e.level(), "{}", crate::util::error_chain(e));
    Reply::Error(e.errno())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply carries blktap's errno; the log line carries the whole cause.
    #[test]
    fn errors_keep_their_cause_and_map_to_blktaps_errno() {
        let enoent = || std::io::Error::from_raw_os_error(libc::ENOENT);
        let cases: Vec<(VbdError, i32, &str)> = vec![
            (
                VbdError::NotAttached(3),
                libc::EINVAL,
                "minor 3 is not attached",
            ),
            (VbdError::Busy(3), libc::EBUSY, "in progress"),
            (VbdError::InUse(3), libc::EBUSY, "ring connected"),
            (VbdError::NoMarker(3), libc::EPERM, "no marker"),
            (
                VbdError::Params {
                    minor: 3,
                    params: "qcow:/x".into(),
                    source: parse_params("qcow:/x").unwrap_err(),
                },
                libc::ENOSYS,
                "\"qcow\" is not implemented",
            ),
            (
                VbdError::Ring {
                    minor: 3,
                    source: RingConnError::Map {
                        domid: 1,
                        devid: 51712,
                        source: enoent(),
                    },
                },
                libc::ENOENT,
                "ring 1/51712: map: No such file",
            ),
            (
                VbdError::Ring {
                    minor: 3,
                    source: RingConnError::Order(9),
                },
                libc::EINVAL,
                "order 9",
            ),
            (
                VbdError::Disconnect(RingConnError::NotConnected { domid: 1, devid: 2 }),
                libc::ENODEV,
                "ring 1/2 is not connected",
            ),
            (
                VbdError::Listen {
                    minor: 3,
                    source: std::io::Error::other("no errno"),
                },
                libc::EIO,
                "nbd listen: no errno",
            ),
            (
                VbdError::Geometry {
                    minor: 3,
                    params: "aio:/x".into(),
                },
                libc::EMEDIUMTYPE,
                "geometry changed",
            ),
        ];
        for (e, errno, text) in cases {
            assert_eq!(e.errno(), errno, "{e:?}");
            let chain = crate::util::error_chain(&e);
            assert!(chain.contains(text), "{chain:?} lacks {text:?}");
            assert_eq!(reply_error(&e), Reply::Error(errno));
        }
    }
}
