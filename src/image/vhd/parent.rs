//! Parent locators: resolving them to a path (reading) and producing them (writing).
//!
//! Reading tries the locators in table order (MacX, W2ku, W2ru; others are skipped). An
//! absolute readable path is used as is; a relative one is resolved against the
//! canonicalised directory of the child and must be readable. The resulting path is not
//! canonicalised further (key files are named after its basename).
//!
//! Writing follows libvhd: MacX `file://./p.vhd` (UTF-8), W2ku and W2ru `.\p.vhd`
//! (UTF-16LE), each padded to 512 bytes with `data_space` in bytes.

use std::path::{Component, Path, PathBuf};

use super::engine::VhdImage;
use super::format::*;
use crate::image::ImageError;

/// A child's link to its parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    /// Resolved path (not canonicalised beyond the child's directory).
    pub path: PathBuf,
    /// The locator text it came from (unresolved, `/` separators).
    pub locator: String,
    /// The parent is a raw image (null parent uuid).
    pub raw: bool,
    /// The parent uuid recorded in the child.
    pub uuid: [u8; 16],
}

/// Drop `.` components (keeps `..`: symlinks are not resolved).
fn normalise(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

fn readable(p: &Path) -> bool {
    std::fs::File::open(p).is_ok()
}

/// The decoded locator strings of a header, in table order (undecodable ones skipped).
pub fn locator_texts(img: &VhdImage) -> Result<Vec<(u32, String)>, ImageError> {
    let Some(h) = img.header() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for l in &h.loc {
        if !matches!(l.code, PLAT_MACX | PLAT_W2KU | PLAT_W2RU) {
            continue;
        }
        let Ok(data) = img.locator_data(l) else {
            continue;
        };
        if let Ok(s) = decode_locator(l.code, &data) {
            out.push((l.code, s));
        }
    }
    Ok(out)
}

/// Resolve `text` (a decoded locator) for a child at `child`.
pub fn resolve_locator(child: &Path, text: &str) -> Option<PathBuf> {
    let p = Path::new(text);
    if p.is_absolute() {
        return readable(p).then(|| p.to_path_buf());
    }
    let dir = child.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = match dir {
        Some(d) => d.canonicalize().ok()?,
        None => std::env::current_dir().ok()?,
    };
    let cand = normalise(&dir.join(p));
    readable(&cand).then_some(cand)
}

/// The parent of a differencing disk (None for fixed/dynamic disks).
pub fn resolve_parent(img: &VhdImage) -> Result<Option<ParentRef>, ImageError> {
    let Some(h) = img.header() else {
        return Ok(None);
    };
    if !img.is_differencing() {
        return Ok(None);
    }
    let texts = locator_texts(img)?;
    let raw = h.prt_uuid == [0; 16];
    for (_, t) in &texts {
        if let Some(p) = resolve_locator(img.path(), t) {
            return Ok(Some(ParentRef {
                path: p,
                locator: t.clone(),
                raw,
                uuid: h.prt_uuid,
            }));
        }
    }
    let what = match texts.first() {
        Some((_, t)) => format!("{}: parent {t}", img.path().display()),
        None => format!("{}: no usable parent locator", img.path().display()),
    };
    Err(ImageError::Io {
        path: what,
        op: "resolve parent",
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
    })
}

/// Relative path from directory `from` to `to` (both absolute and canonical), as libvhd
/// writes it: `./x` when `to` is inside `from`, `../..` style otherwise.
pub fn relative_path(from: &Path, to: &Path) -> String {
    let a: Vec<_> = from.components().collect();
    let b: Vec<_> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..a.len() {
        parts.push("..".into());
    }
    if parts.is_empty() {
        parts.push(".".into());
    }
    for c in &b[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    parts.join("/")
}

/// The three locator payloads libvhd writes for a parent at relative path `rel`.
pub fn locator_payloads(rel: &str) -> Vec<(u32, Vec<u8>)> {
    vec![
        (PLAT_MACX, encode_macx(rel)),
        (PLAT_W2KU, encode_w2u(rel)),
        (PLAT_W2RU, encode_w2u(rel)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_like_libvhd() {
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/p.vhd")),
            "./p.vhd"
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/x/p.vhd")),
            "../x/p.vhd"
        );
        assert_eq!(
            relative_path(Path::new("/a/b/c"), Path::new("/p")),
            "../../../p"
        );
    }

    #[test]
    fn normalise_drops_cur_dir_only() {
        assert_eq!(
            normalise(Path::new("/a/./b/../c")),
            PathBuf::from("/a/b/../c")
        );
    }
}
