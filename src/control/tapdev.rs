//! blktap2 compatibility links: `<tapdev dir>/tapdev<minor>` → `/dev/nbdN`.
//!
//! blktap2 gave every VBD a block device `/dev/xen/blktap-2/tapdev<minor>`, and OpenXT's dom0
//! scripts (and OpenXT 8's libxl for an existing tapdisk) still name disks that way. We have
//! no blktap kernel driver: a VBD reaches dom0 as a kernel NBD device. So when `create`
//! attaches `/dev/nbdN` to VBD `minor`, it also makes `tapdev<minor>` a symlink to it, and
//! `destroy` removes it again (see [`crate::control::client::Client`]).
//!
//! Rules:
//! - Only symlinks are ever replaced or removed; anything else at that name (a real blktap2
//!   device node, a directory) is left alone and [`link`] fails with `EEXIST`.
//! - The link is made atomically (a temporary link renamed over the name), so a reader sees
//!   either no link, the old one or the new one.
//! - A VBD served only through its NBD socket gets no link: opening a socket fails with
//!   ENXIO, and scripts `stat`, `mount` or `dd` a tapdev as a block device; a missing name
//!   (ENOENT) says more.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// File name prefix of the links (`tapdev<minor>`).
pub const TAPDEV_PREFIX: &str = "tapdev";

/// `<dir>/tapdev<minor>`.
pub fn tapdev_path(dir: &Path, minor: u16) -> PathBuf {
    dir.join(format!("{TAPDEV_PREFIX}{minor}"))
}

/// The minor of a name `tapdev<minor>` (any directory), else `None`.
pub fn parse_tapdev_name(name: &str) -> Option<u16> {
    let base = name.trim().rsplit('/').next()?;
    let digits = base.strip_prefix(TAPDEV_PREFIX)?;
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Make `<dir>/tapdev<minor>` a symlink to `target`, creating `dir` (mode 0755, parents
/// too) if needed and replacing an older symlink of that name. `EEXIST` if something other
/// than a symlink has the name.
pub fn link(dir: &Path, minor: u16, target: &Path) -> io::Result<()> {
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    let path = tapdev_path(dir, minor);
    match fs::symlink_metadata(&path) {
        Ok(m) if !m.file_type().is_symlink() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a symlink", path.display()),
            ))
        }
        _ => {}
    }
    let tmp = dir.join(format!(
        ".{TAPDEV_PREFIX}{minor}.{}.tmp",
        std::process::id()
    ));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(target, &tmp)?;
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// Where `<dir>/tapdev<minor>` points, if it is a symlink.
pub fn target(dir: &Path, minor: u16) -> Option<PathBuf> {
    fs::read_link(tapdev_path(dir, minor)).ok()
}

/// Remove `<dir>/tapdev<minor>` if it is a symlink and, with `only_to`, if it points there.
/// Returns whether a link was removed; a missing name is `Ok(false)`.
pub fn unlink(dir: &Path, minor: u16, only_to: Option<&Path>) -> io::Result<bool> {
    let path = tapdev_path(dir, minor);
    let points_to = match fs::read_link(&path) {
        Ok(t) => t,
        // Missing, or not a symlink (EINVAL): not ours.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
        Err(e) => return Err(e),
    };
    if only_to.is_some_and(|want| want != points_to) {
        return Ok(false);
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let d = Path::new("/dev/xen/blktap-2");
        assert_eq!(
            tapdev_path(d, 7),
            PathBuf::from("/dev/xen/blktap-2/tapdev7")
        );
        assert_eq!(parse_tapdev_name("/dev/xen/blktap-2/tapdev7"), Some(7));
        assert_eq!(parse_tapdev_name("tapdev0"), Some(0));
        assert_eq!(parse_tapdev_name("tapdev65535"), Some(65535));
        for bad in [
            "tapdev",
            "tapdev-1",
            "tapdev65536",
            "tapdev1x",
            "nbd3",
            "tapdisk-3",
        ] {
            assert_eq!(parse_tapdev_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn link_creates_the_directory_replaces_old_links_and_unlink_checks_the_target() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("xen/blktap-2");
        link(&dir, 3, Path::new("/dev/nbd5")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(target(&dir, 3), Some(PathBuf::from("/dev/nbd5")));
        // A stale link of the same minor is replaced, no temporary is left behind.
        link(&dir, 3, Path::new("/dev/nbd9")).unwrap();
        assert_eq!(target(&dir, 3), Some(PathBuf::from("/dev/nbd9")));
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["tapdev3".to_string()]);
        // Not the expected target: kept.
        assert!(!unlink(&dir, 3, Some(Path::new("/dev/nbd5"))).unwrap());
        assert!(target(&dir, 3).is_some());
        assert!(unlink(&dir, 3, Some(Path::new("/dev/nbd9"))).unwrap());
        assert_eq!(target(&dir, 3), None);
        assert!(!unlink(&dir, 3, None).unwrap());
        // Missing directory: nothing to remove.
        assert!(!unlink(&t.path().join("none"), 1, None).unwrap());
    }

    #[test]
    fn something_else_under_the_name_is_never_touched() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        fs::write(tapdev_path(dir, 1), b"a regular file").unwrap();
        let e = link(dir, 1, Path::new("/dev/nbd0")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(!unlink(dir, 1, None).unwrap());
        assert_eq!(fs::read(tapdev_path(dir, 1)).unwrap(), b"a regular file");
        fs::create_dir(tapdev_path(dir, 2)).unwrap();
        assert!(link(dir, 2, Path::new("/dev/nbd0")).is_err());
        assert!(!unlink(dir, 2, None).unwrap());
        assert!(tapdev_path(dir, 2).is_dir());
    }
}
