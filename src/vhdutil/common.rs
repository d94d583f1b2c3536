//! Helpers shared by the commands: opening VHDs the way libvhd's tools do, parent
//! resolution, chain depth, the "hidden" quirk.

use std::path::{Path, PathBuf};

use crate::image::file::BlockFile;
use crate::image::vhd::engine::{VhdImage, VhdOpenOptions};
use crate::image::vhd::format::{DiskType, Footer, FOOTER_SIZE, PLAT_MACX, PLAT_NONE, PLAT_W2RU};
use crate::image::vhd::parent::{locator_texts, resolve_parent};
use crate::image::ImageError;

/// Longest chain we follow (guards against parent cycles).
pub const MAX_CHAIN: i32 = 1024;

/// Negative errno of an image error (blktap's return convention).
pub fn neg(e: &ImageError) -> i32 {
    -e.errno()
}

/// Open one VHD without its parent.
pub fn open(path: &str, read_only: bool) -> Result<VhdImage, ImageError> {
    open_opts(path, read_only, false)
}

/// Open one VHD, optionally from the backup footer.
pub fn open_opts(path: &str, read_only: bool, backup: bool) -> Result<VhdImage, ImageError> {
    let opts = VhdOpenOptions {
        read_only,
        use_backup_footer: backup,
        ..Default::default()
    };
    VhdImage::open(Path::new(path), &opts)
}

/// Resolved parent path of a differencing disk (`vhd_parent_locator_get`).
pub fn parent_path(img: &VhdImage) -> Result<Option<(PathBuf, bool)>, ImageError> {
    Ok(resolve_parent(img)?.map(|p| (p.path, p.raw)))
}

/// Whether the differencing disk's parent is raw (null parent uuid).
pub fn parent_is_raw(img: &VhdImage) -> bool {
    img.is_differencing() && img.header().is_some_and(|h| h.prt_uuid == [0; 16])
}

/// The unresolved text of the first decodable locator (`vhd_parent_locator_unresolved_get`).
pub fn parent_unresolved(img: &VhdImage) -> Result<String, ImageError> {
    locator_texts(img)?
        .into_iter()
        .next()
        .map(|(_, t)| t)
        .ok_or_else(|| ImageError::Invalid("no readable parent locator".into()))
}

/// The locator scan prefers when the parent cannot be resolved: MacX, else the last W2ru,
/// else the first non-empty one (blktap's `vhd_util_scan_get_parent_locator`). Returns its
/// decoded text.
pub fn preferred_locator_text(img: &VhdImage) -> Result<String, ImageError> {
    let h = img
        .header()
        .ok_or_else(|| ImageError::Invalid("no header".into()))?;
    let mut pick = None;
    for l in &h.loc {
        if l.code == PLAT_MACX {
            pick = Some(*l);
            break;
        }
        if l.code == PLAT_W2RU {
            pick = Some(*l);
        }
        if pick.is_none() && l.code != PLAT_NONE {
            pick = Some(*l);
        }
    }
    let l = pick.ok_or_else(|| ImageError::Invalid("no parent locator".into()))?;
    let data = img.locator_data(&l)?;
    crate::image::vhd::format::decode_locator(l.code, &data)
        .map_err(|e| ImageError::Invalid(e.to_string()))
}

/// `vhd_hidden`: tap 0.1/1.1 dynamic disks keep the real value in the backup footer (old
/// tools did not update the primary's checksum).
pub fn hidden(img: &VhdImage) -> Result<u8, ImageError> {
    let f = img.footer();
    if img.disk_type() != DiskType::Fixed
        && f.creator_is_tap()
        && (f.crtr_ver == 0x0000_0001 || f.crtr_ver == 0x0001_0001)
    {
        let mut b = [0u8; FOOTER_SIZE];
        img.file()
            .read_at(&mut b, 0)
            .map_err(|e| ImageError::io(img.path(), "read backup footer", e))?;
        return Ok(Footer::decode(&b).hidden);
    }
    Ok(f.hidden)
}

/// libvhd's physical size: end of metadata and data plus the footer; for fixed disks the
/// file size.
pub fn phys_size(img: &VhdImage) -> Result<u64, ImageError> {
    if img.disk_type() == DiskType::Fixed {
        return img
            .file()
            .len()
            .map_err(|e| ImageError::io(img.path(), "stat", e));
    }
    Ok(img.physical_size())
}

/// Read `len` bytes at `off` of a file (a private copy for validation).
pub fn read_exact(
    file: &dyn BlockFile,
    path: &Path,
    off: u64,
    len: usize,
) -> Result<Vec<u8>, ImageError> {
    let mut b = vec![0u8; len];
    file.read_at(&mut b, off)
        .map_err(|e| ImageError::io(path, "read", e))?;
    Ok(b)
}

/// `canonpath`: the absolute, symlink-free path (ENOENT etc. when it does not exist).
pub fn canonpath(p: &str) -> Result<String, super::error::Error> {
    std::fs::canonicalize(p)
        .map(|c| c.to_string_lossy().into_owned())
        .map_err(|e| super::error::Error::io(format!("resolve {p}"), e))
}

/// Whether `img` or any VHD above it carries a key hash: its data sectors are then
/// encrypted (an unkeyed child uses the nearest keyed ancestor's key).
pub fn chain_keyed(img: &VhdImage) -> Result<bool, ImageError> {
    if img.keyhash()?.is_set() {
        return Ok(true);
    }
    let mut next = parent_path(img)?;
    for _ in 0..MAX_CHAIN {
        let Some((p, raw)) = next else {
            return Ok(false);
        };
        if raw {
            return Ok(false);
        }
        let cur = VhdImage::open(&p, &VhdOpenOptions::default())?;
        if cur.keyhash()?.is_set() {
            return Ok(true);
        }
        next = parent_path(&cur)?;
    }
    Err(ImageError::Invalid("parent chain too long (cycle?)".into()))
}

/// An error with its sources (`a.vhd: create: File exists (os error 17)`), for stderr.
pub fn describe(e: &ImageError) -> String {
    crate::util::error_chain(e)
}

/// Close an image opened read-write after an operation whose outcome is `ret`: the
/// operation's error wins over the close's.
pub fn close_rw(img: &VhdImage, ret: super::error::Result) -> super::error::Result {
    use crate::image::Image;
    let closed = img.close();
    ret?;
    Ok(closed?)
}
