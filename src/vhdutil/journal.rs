//! Journaled offline resize (`vhd-util resize -j JOURNAL`) and its roll-back
//! (`vhd-util revert -n NAME -j JOURNAL`).
//!
//! Growing a VHD past its BAT moves the metadata that follows the BAT (batmap, parent
//! locators) and the data blocks that sit where the bigger BAT and batmap will go. The
//! journal makes that restartable: before touching the image it records the original
//! bytes of every region the resize overwrites in place (the file prefix up to the new
//! end of metadata, which holds the blocks that move, and the footer) and the original
//! file length, and is fsynced. Blocks are first copied to the end of the file, then the
//! new metadata is written, then the footers; the journal is removed last. Rolling back
//! writes the saved bytes back and truncates the file to its old length, which restores
//! the image exactly whatever step was interrupted.
//!
//! The journal file format is this implementation's own (magic `vhdrsjr1`), not libvhd's:
//! `revert` only understands journals written by this `resize -j`.
//!
//! Failure injection for tests, as blktap: the environment variables
//! `VHD_UTIL_TEST_FAIL_RESIZE_{BEGIN,DATA_MOVED,METADATA_MOVED,END}` make `resize -j`
//! print `Failing at <VAR>` and exit with EINVAL at that point, leaving the journal.

use std::path::Path;

use crate::image::file::{BlockFile, OsFile};
use crate::image::vhd::engine::{align_block_start, VhdImage};
use crate::image::vhd::format::*;
use crate::image::ImageError;

const MAGIC: &[u8; 8] = b"vhdrsjr1";
const HDR: usize = 8 + 8 + 8 + 8;

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl Fn(std::io::Error) -> ImageError + 'a {
    move |e| ImageError::io(path, op, e)
}

/// Journal what a resize overwrites: the file length, the given `prefix` (from offset 0)
/// and the footer at the end of the file.
fn save_journal(
    f: &OsFile,
    path: &Path,
    jpath: &Path,
    orig_len: u64,
    prefix: Vec<u8>,
) -> Result<(), ImageError> {
    let footer_off = orig_len.saturating_sub(FOOTER_SIZE as u64);
    let mut footer = vec![0u8; FOOTER_SIZE];
    f.read_at(&mut footer, footer_off)
        .map_err(io_err(path, "read footer"))?;
    write_journal(
        jpath,
        &Saved {
            orig_len,
            footer_off,
            prefix,
            footer,
        },
    )
}

fn invalid(s: impl Into<String>) -> ImageError {
    ImageError::Invalid(s.into())
}

/// What the journal saves: `prefix` = bytes `[0, prefix.len())`, `footer` = the 512 bytes
/// at `footer_off`, and the original length.
struct Saved {
    orig_len: u64,
    footer_off: u64,
    prefix: Vec<u8>,
    footer: Vec<u8>,
}

fn write_journal(jpath: &Path, s: &Saved) -> Result<(), ImageError> {
    let f = OsFile::create_new(jpath).map_err(io_err(jpath, "create journal"))?;
    let mut b = Vec::with_capacity(HDR + s.prefix.len() + s.footer.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&s.orig_len.to_be_bytes());
    b.extend_from_slice(&(s.prefix.len() as u64).to_be_bytes());
    b.extend_from_slice(&s.footer_off.to_be_bytes());
    b.extend_from_slice(&s.prefix);
    b.extend_from_slice(&s.footer);
    f.write_at(&b, 0).map_err(io_err(jpath, "write journal"))?;
    f.sync().map_err(io_err(jpath, "fsync journal"))?;
    // Make the journal's directory entry durable too.
    let dir = jpath
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn read_journal(jpath: &Path) -> Result<Saved, ImageError> {
    let b = std::fs::read(jpath).map_err(io_err(jpath, "read journal"))?;
    if b.len() < HDR || &b[..8] != MAGIC {
        return Err(invalid(format!(
            "{} is not a vhd-util resize journal",
            jpath.display()
        )));
    }
    let u = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let (orig_len, plen, footer_off) = (u(8), u(16), u(24));
    let plen = usize::try_from(plen).map_err(|_| invalid("journal too large"))?;
    if HDR
        .checked_add(plen)
        .and_then(|n| n.checked_add(FOOTER_SIZE))
        != Some(b.len())
    {
        return Err(invalid(format!("{}: truncated journal", jpath.display())));
    }
    Ok(Saved {
        orig_len,
        footer_off,
        prefix: b[HDR..HDR + plen].to_vec(),
        footer: b[HDR + plen..].to_vec(),
    })
}

/// Roll the image back to the state recorded in the journal, then delete the journal.
pub fn revert(path: &Path, jpath: &Path) -> Result<(), ImageError> {
    let s = read_journal(jpath)?;
    let f = OsFile::open(path, true).map_err(io_err(path, "open"))?;
    f.write_at(&s.prefix, 0)
        .map_err(io_err(path, "restore metadata"))?;
    f.write_at(&s.footer, s.footer_off)
        .map_err(io_err(path, "restore footer"))?;
    if f.resizable() {
        f.set_len(s.orig_len).map_err(io_err(path, "truncate"))?;
    }
    f.sync().map_err(io_err(path, "fsync"))?;
    std::fs::remove_file(jpath).map_err(io_err(jpath, "remove journal"))
}

/// A failure-injection point (blktap's `TEST_FAIL_AT`).
pub fn fail_point(name: &str) -> bool {
    std::env::var_os(name).is_some()
}

/// Grow the dynamic/differencing VHD at `path` to `new_size` bytes (a multiple of its
/// block size) with a journal at `jpath`. `fail` is called at each injection point and
/// returns true to stop there (simulated crash: the journal stays).
pub fn grow(
    path: &Path,
    jpath: &Path,
    new_size: u64,
    fail: &mut dyn FnMut(&str) -> bool,
) -> Result<bool, ImageError> {
    let img = VhdImage::open(path, &Default::default())?;
    let (Some(h), Some((bh, map))) = (img.header(), img.batmap()) else {
        return Err(invalid(
            "journaled resize needs a dynamic or differencing VHD with a batmap",
        ));
    };
    let footer = img.footer();
    let bat = img.bat();
    drop(img);
    let bs = u64::from(h.block_size);
    let spb = bs / 512;
    let bm = u64::from(h.bitmap_sectors());
    let new_max = u32::try_from(new_size.div_ceil(bs)).map_err(|_| invalid("too many blocks"))?;
    if new_size > MAX_VIRTUAL_SIZE {
        return Err(invalid(format!("{new_size} bytes is beyond the VHD limit")));
    }
    let f = OsFile::open(path, true).map_err(io_err(path, "open"))?;
    let orig_len = f.len().map_err(io_err(path, "stat"))?;

    // New metadata layout after the (bigger) BAT.
    let t = h.table_offset;
    let bat_len = bat_bytes_padded(new_max.max(h.max_bat_size));
    let mut bmh = BatmapHeader::new(t + bat_len, new_max.max(h.max_bat_size));
    bmh.marker = bh.marker;
    bmh.keyhash = bh.keyhash;
    let map_len = u64::from(bmh.batmap_size) * 512;
    let mut meta_end = bmh.batmap_offset + map_len;
    let mut loc = h.loc;
    let mut loc_moves = Vec::new();
    for l in loc.iter_mut().filter(|l| l.code != PLAT_NONE) {
        let space = l
            .space_bytes()
            .filter(|&s| s <= 1 << 20)
            .ok_or_else(|| invalid("bad parent locator data space"))?;
        let mut data = vec![0u8; usize::try_from(space).map_err(|_| invalid("locator"))?];
        f.read_at(&mut data, l.data_offset)
            .map_err(io_err(path, "read parent locator"))?;
        l.data_offset = meta_end;
        loc_moves.push((meta_end, data));
        meta_end += space;
    }
    let meta_end_secs = meta_end.div_ceil(512);

    // Blocks in the way move to the end of the data.
    let mut cursor = meta_end_secs;
    for &e in bat.iter().filter(|&&e| e != BAT_UNUSED) {
        cursor = cursor.max(u64::from(e) + bm + spb);
    }
    let mut new_bat = bat.clone();
    new_bat.resize(new_max.max(h.max_bat_size) as usize, BAT_UNUSED);
    let mut moves = Vec::new();
    for (i, e) in new_bat.iter_mut().enumerate() {
        if *e != BAT_UNUSED && u64::from(*e) < meta_end_secs {
            cursor = align_block_start(cursor, h.bitmap_sectors());
            if cursor + bm + spb > u64::from(u32::MAX) {
                return Err(ImageError::NoSpace(
                    "blocks would pass the 2 TiB limit".into(),
                ));
            }
            moves.push((i, u64::from(*e), cursor));
            *e = cursor as u32;
            cursor += bm + spb;
        }
    }
    let data_end = new_bat
        .iter()
        .filter(|&&e| e != BAT_UNUSED)
        .map(|&e| u64::from(e) + bm + spb)
        .max()
        .unwrap_or(0)
        .max(meta_end_secs)
        * 512;

    // Journal: the prefix we overwrite in place, and the footer.
    let prefix_len = usize::try_from(meta_end.min(orig_len)).map_err(|_| invalid("prefix"))?;
    let mut prefix = vec![0u8; prefix_len];
    f.read_at(&mut prefix, 0).map_err(io_err(path, "read"))?;
    save_journal(&f, path, jpath, orig_len, prefix)?;
    if fail("VHD_UTIL_TEST_FAIL_RESIZE_BEGIN") {
        return Ok(false);
    }

    // 1. Copy the blocks that move (their old copies stay valid until step 2).
    let blk_bytes = usize::try_from((bm + spb) * 512).map_err(|_| invalid("block size"))?;
    let mut buf = vec![0u8; blk_bytes];
    for &(_, from, to) in &moves {
        f.read_at(&mut buf, from * 512)
            .map_err(io_err(path, "read block"))?;
        f.write_at(&buf, to * 512)
            .map_err(io_err(path, "move block"))?;
    }
    f.sync().map_err(io_err(path, "fsync"))?;
    if fail("VHD_UTIL_TEST_FAIL_RESIZE_DATA_MOVED") {
        return Ok(false);
    }

    // 2. New metadata: BAT, batmap, locators, header.
    let mut raw = encode_bat(&new_bat);
    raw.resize(bat_len as usize, 0);
    f.write_at(&raw, t).map_err(io_err(path, "write BAT"))?;
    let mut newmap = vec![0u8; map_len as usize];
    let n = newmap.len().min(map.len());
    newmap[..n].copy_from_slice(&map[..n]);
    bmh.checksum = batmap_checksum(&newmap, new_size, bmh.batmap_version);
    f.write_at(&bmh.encode(), t + bat_len)
        .map_err(io_err(path, "write batmap header"))?;
    f.write_at(&newmap, bmh.batmap_offset)
        .map_err(io_err(path, "write batmap"))?;
    for (off, data) in &loc_moves {
        f.write_at(data, *off)
            .map_err(io_err(path, "write parent locator"))?;
    }
    let mut nh = h.clone();
    nh.max_bat_size = new_max.max(h.max_bat_size);
    nh.loc = loc;
    f.write_at(&nh.encode(), footer.data_offset)
        .map_err(io_err(path, "write header"))?;
    f.sync().map_err(io_err(path, "fsync"))?;
    if fail("VHD_UTIL_TEST_FAIL_RESIZE_METADATA_MOVED") {
        return Ok(false);
    }

    // 3. Footers with the new size, file cut after the data.
    let mut nf = footer;
    nf.curr_size = new_size;
    nf.geometry = chs_geometry(new_size);
    let fb = nf.encode();
    f.write_at(&fb, data_end)
        .map_err(io_err(path, "write footer"))?;
    f.set_len(data_end + FOOTER_SIZE as u64)
        .map_err(io_err(path, "truncate"))?;
    f.sync().map_err(io_err(path, "fsync"))?;
    f.write_at(&fb, 0)
        .map_err(io_err(path, "write backup footer"))?;
    f.sync().map_err(io_err(path, "fsync"))?;
    if fail("VHD_UTIL_TEST_FAIL_RESIZE_END") {
        return Ok(false);
    }
    std::fs::remove_file(jpath).map_err(io_err(jpath, "remove journal"))?;
    Ok(true)
}

/// Grow a fixed disk to `new_size` bytes: extend the file and move the footer, journaled
/// the same way (the old footer and length are saved).
pub fn grow_fixed(
    path: &Path,
    jpath: &Path,
    new_size: u64,
    fail: &mut dyn FnMut(&str) -> bool,
) -> Result<bool, ImageError> {
    let img = VhdImage::open(path, &Default::default())?;
    let footer = img.footer();
    drop(img);
    let f = OsFile::open(path, true).map_err(io_err(path, "open"))?;
    let orig_len = f.len().map_err(io_err(path, "stat"))?;
    save_journal(&f, path, jpath, orig_len, Vec::new())?;
    if fail("VHD_UTIL_TEST_FAIL_RESIZE_BEGIN") {
        return Ok(false);
    }
    // The old footer becomes guest data: zero it.
    f.write_at(&[0u8; FOOTER_SIZE], footer.curr_size)
        .map_err(io_err(path, "clear old footer"))?;
    let mut nf = footer;
    nf.curr_size = new_size;
    nf.geometry = chs_geometry(new_size);
    f.set_len(new_size + FOOTER_SIZE as u64)
        .map_err(io_err(path, "extend"))?;
    f.write_at(&nf.encode(), new_size)
        .map_err(io_err(path, "write footer"))?;
    f.sync().map_err(io_err(path, "fsync"))?;
    if fail("VHD_UTIL_TEST_FAIL_RESIZE_END") {
        return Ok(false);
    }
    std::fs::remove_file(jpath).map_err(io_err(jpath, "remove journal"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_round_trip_and_rejects_garbage() {
        let d = tempfile::tempdir().unwrap();
        let j = d.path().join("j");
        let s = Saved {
            orig_len: 4096,
            footer_off: 3584,
            prefix: vec![7u8; 1536],
            footer: vec![9u8; 512],
        };
        write_journal(&j, &s).unwrap();
        let r = read_journal(&j).unwrap();
        assert_eq!((r.orig_len, r.footer_off), (4096, 3584));
        assert_eq!(r.prefix, s.prefix);
        assert_eq!(r.footer, s.footer);
        // Exclusive creation: an existing journal is never overwritten.
        assert!(write_journal(&j, &s).is_err());
        std::fs::write(&j, b"not a journal").unwrap();
        assert!(read_journal(&j).is_err());
        let mut b = std::fs::read(d.path().join("j")).unwrap();
        b.truncate(4);
        std::fs::write(&j, &b).unwrap();
        assert!(read_journal(&j).is_err());
        // A prefix length that overflows the size arithmetic (regression: panicked).
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&(u64::MAX - 100).to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.resize(HDR + 512 + 100, 0);
        std::fs::write(&j, &b).unwrap();
        assert!(read_journal(&j).is_err());
    }
}
