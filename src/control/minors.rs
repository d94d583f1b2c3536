//! Minor marker files `<control dir>/tapdisk/tapdisk-<minor>`.
//!
//! A minor is allocated by creating its marker (mode 0600) under an exclusive `flock` on the
//! marker directory, choosing the lowest free number in `0..MAX_MINORS`. While a tapdisk serves
//! the minor (ATTACH until DETACH or exit) it holds an exclusive `flock` on the marker
//! ([`lock_marker`] / [`MarkerLock`]). Freeing takes the directory lock, then a *non-blocking*
//! exclusive lock on the marker (EWOULDBLOCK while a tapdisk holds it) and unlinks it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::{ControlError, Result};

/// Minors are `0..MAX_MINORS`.
pub const MAX_MINORS: u32 = 16384;
/// Marker file name prefix.
pub const MARKER_PREFIX: &str = "tapdisk-";

/// `<dir>/tapdisk`: where markers live.
pub fn marker_dir(control_dir: &Path) -> PathBuf {
    control_dir.join("tapdisk")
}

/// `<dir>/tapdisk/tapdisk-<minor>`.
pub fn marker_path(control_dir: &Path, minor: u16) -> PathBuf {
    marker_dir(control_dir).join(format!("{MARKER_PREFIX}{minor}"))
}

fn check_minor(minor: u16) -> Result<()> {
    if u32::from(minor) >= MAX_MINORS {
        return Err(ControlError::invalid(format!("minor {minor}")));
    }
    Ok(())
}

fn ensure_dirs(control_dir: &Path) -> Result<PathBuf> {
    let md = marker_dir(control_dir);
    if !md.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&md)
            .map_err(|e| ControlError::io(format!("create {}", md.display()), e))?;
    }
    Ok(md)
}

fn lock_file(file: File, arg: FlockArg, what: &Path) -> Result<Flock<File>> {
    let mut file = file;
    loop {
        match Flock::lock(file, arg) {
            Ok(l) => return Ok(l),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(ControlError::os(format!("flock {}", what.display()), e)),
        }
    }
}

/// Exclusive lock on the marker directory (serialises allocate and free).
fn lock_dir(control_dir: &Path) -> Result<Flock<File>> {
    let md = ensure_dirs(control_dir)?;
    let f = File::open(&md).map_err(|e| ControlError::io(format!("open {}", md.display()), e))?;
    lock_file(f, FlockArg::LockExclusive, &md)
}

/// Allocate the lowest free minor: create its marker (0600) and return it with the path.
/// ENOSPC when all minors are taken.
pub fn allocate(control_dir: &Path) -> Result<(u16, PathBuf)> {
    let _dir = lock_dir(control_dir)?;
    for m in 0..MAX_MINORS {
        // MAX_MINORS fits in u16.
        let minor = m as u16;
        let path = marker_path(control_dir, minor);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => return Ok((minor, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(ControlError::io(format!("create {}", path.display()), e)),
        }
    }
    Err(ControlError::os("allocate minor", Errno::ENOSPC))
}

/// Free `minor`: EWOULDBLOCK while a tapdisk holds its marker, ENOENT if it does not exist.
pub fn free(control_dir: &Path, minor: u16) -> Result<()> {
    check_minor(minor)?;
    let _dir = lock_dir(control_dir)?;
    let path = marker_path(control_dir, minor);
    let f =
        File::open(&path).map_err(|e| ControlError::io(format!("open {}", path.display()), e))?;
    let _marker = lock_file(f, FlockArg::LockExclusiveNonblock, &path)?;
    fs::remove_file(&path).map_err(|e| ControlError::io(format!("unlink {}", path.display()), e))
}

/// The allocated minors (existing markers), ascending. An absent directory means none.
pub fn list(control_dir: &Path) -> Result<Vec<u16>> {
    let md = marker_dir(control_dir);
    let rd = match fs::read_dir(&md) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ControlError::io(format!("read {}", md.display()), e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| ControlError::io(format!("read {}", md.display()), e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(num) = name.strip_prefix(MARKER_PREFIX) else {
            continue;
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) || num.len() > 5 {
            continue;
        }
        if let Ok(m) = num.parse::<u16>() {
            if u32::from(m) < MAX_MINORS {
                out.push(m);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// A tapdisk's exclusive lock on a marker; released (not unlinked) on drop.
#[derive(Debug)]
pub struct MarkerLock {
    minor: u16,
    path: PathBuf,
    _lock: Flock<File>,
}

impl MarkerLock {
    /// The locked minor.
    pub fn minor(&self) -> u16 {
        self.minor
    }
    /// The marker path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// For tapdisk's ATTACH: open the existing marker of `minor` and take an exclusive flock on it,
/// retrying for up to `wait` while someone else holds it (a concurrent `free` holds it only
/// for an instant). ENOENT if the marker does not exist, EBUSY if the lock stays taken.
pub fn lock_marker(control_dir: &Path, minor: u16, wait: Duration) -> Result<MarkerLock> {
    check_minor(minor)?;
    let path = marker_path(control_dir, minor);
    let deadline = Instant::now() + wait;
    loop {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| ControlError::io(format!("open {}", path.display()), e))?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                return Ok(MarkerLock {
                    minor,
                    path,
                    _lock: lock,
                })
            }
            Err((_, Errno::EWOULDBLOCK)) | Err((_, Errno::EINTR)) => {
                if Instant::now() >= deadline {
                    return Err(ControlError::os(
                        format!("lock {}", path.display()),
                        Errno::EBUSY,
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((_, e)) => return Err(ControlError::os(format!("lock {}", path.display()), e)),
        }
    }
}

/// Whether some process holds the marker lock of `minor` (probe with a non-blocking lock).
pub fn is_locked(control_dir: &Path, minor: u16) -> Result<bool> {
    let path = marker_path(control_dir, minor);
    let f =
        File::open(&path).map_err(|e| ControlError::io(format!("open {}", path.display()), e))?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(_) => Ok(false),
        Err((_, Errno::EWOULDBLOCK)) => Ok(true),
        Err((_, e)) => Err(ControlError::os(format!("lock {}", path.display()), e)),
    }
}
