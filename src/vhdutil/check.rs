//! `vhd-util check -n FILE [-i] [-I] [-t] [-p] [-b] [-B] [-s]` (`vhd-util-check.c`):
//! footer (primary and backup), header, differencing header, BAT (overlaps with headers,
//! footer and other blocks), batmap, parent locators and parent uuid, optional bitmap
//! and data checks and allocation statistics. Messages and their order follow blktap;
//! on failure the metadata is dumped as `read -p` would.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::SystemTime;

use super::cli::{OptsExt, UsageSpec};
use super::common::{self, neg};
use super::error::{Error, Result};
use super::scanfmt::basename;
use super::Io;
use crate::image::file::{BlockFile, OsFile};
use crate::image::vhd::format::*;
use crate::image::vhd::ops::vhd_time;
use crate::image::vhd::parent::resolve_locator;
use crate::vout;
use nix::errno::Errno;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "check",
    spec: "n:iItpbBsh",
    text: "options: -n <file> [-i ignore missing primary footers] \
[-I ignore parent uuids] [-t ignore timestamps] \
[-B do not check BAT for overlapping (precludes -s, -b)] \
[-p check parents] [-b check bitmaps] [-s stats] [-h help]\n",
    to_stderr: false,
    h_fails: false,
};

/// Allowed clock skew for timestamps in the future (NFS servers).
const TIMESTAMP_MAX_SLACK: u32 = 1800;

#[derive(Clone, Copy, Default)]
struct Opts {
    ignore_footer: bool,
    ignore_parent_uuid: bool,
    ignore_timestamps: bool,
    check_data: bool,
    no_check_bat: bool,
    collect_stats: bool,
}

struct Stats {
    name: String,
    bitmap: Vec<u8>,
    secs_total: u64,
    secs_allocated: u64,
    secs_written: u64,
}

/// The metadata of the file under check, read raw (the engine's open refuses some of the
/// damage check must report).
struct Raw {
    path: std::path::PathBuf,
    file: OsFile,
    eof: u64,
    footer: Footer,
    header: DynHeader,
    bat: Vec<u32>,
    /// Batmap header when the footer says there is one (creator tap >= 1.2) and it could
    /// be read.
    batmap: Option<BatmapHeader>,
    /// The footer says there is a batmap (libvhd's `vhd_has_batmap`).
    has_batmap: bool,
}

impl Raw {
    fn load(path: &Path, file: OsFile, footer: Footer) -> Result<Raw> {
        let eof = file.len().map_err(|e| Error::io("stat", e))?;
        let mut hb = [0u8; HEADER_SIZE];
        file.read_at(&mut hb, footer.data_offset)
            .map_err(|e| Error::io("read header", e))?;
        let header = DynHeader::decode(&hb);
        let n = u64::from(header.max_bat_size);
        let len = usize::try_from(n * 4).map_err(|_| Error::invalid("BAT too large"))?;
        let mut raw = vec![0u8; len];
        file.read_at(&mut raw, header.table_offset)
            .map_err(|e| Error::io("read BAT", e))?;
        let bat = decode_bat(&raw);
        let has_batmap = super::read::has_batmap_rule(&footer);
        let batmap = if has_batmap {
            let mut b = [0u8; BATMAP_HEADER_SIZE];
            let off = header.table_offset + bat_bytes_padded(header.max_bat_size);
            file.read_at(&mut b, off)
                .ok()
                .map(|()| BatmapHeader::decode(&b))
        } else {
            None
        };
        Ok(Raw {
            path: path.to_path_buf(),
            file,
            eof,
            footer,
            header,
            bat,
            batmap,
            has_batmap,
        })
    }

    fn spb(&self) -> u64 {
        u64::from(self.header.block_size / 512)
    }

    fn bm_secs(&self) -> u64 {
        u64::from(self.header.bitmap_sectors())
    }

    fn is_diff(&self) -> bool {
        self.footer.disk_type == 4
    }

    fn read(&self, off: u64, len: u64) -> Option<Vec<u8>> {
        let end = off.checked_add(len)?;
        if end > self.eof {
            return None;
        }
        common::read_exact(&self.file, &self.path, off, usize::try_from(len).ok()?).ok()
    }

    /// libvhd's `vhd_get_batmap`: the header (cookie, version) and the checksum of the
    /// part of the map the disk size covers. `Err` is the errno libvhd returns.
    fn get_batmap(&self) -> Result<(BatmapHeader, Vec<u8>)> {
        let unreadable = || Error::os("read batmap", Errno::EIO);
        let bh = self.batmap.ok_or_else(unreadable)?;
        if let Err(e) = bh.validate() {
            return Err(Error::invalid(format!("batmap: {e}")));
        }
        let len = batmap_checksum_len(self.footer.curr_size, usize::MAX) as u64;
        let map = self.read(bh.batmap_offset, len).ok_or_else(unreadable)?;
        if batmap_checksum(&map, self.footer.curr_size, bh.batmap_version) != bh.checksum {
            return Err(Error::invalid("batmap checksum"));
        }
        Ok((bh, map))
    }

    fn locator_data(&self, l: &Locator) -> Option<Vec<u8>> {
        let space = l.space_bytes()?;
        if u64::from(l.data_len) > space {
            return None;
        }
        self.read(l.data_offset, u64::from(l.data_len))
    }
}

struct Ctx {
    opts: Opts,
    /// Most recent first (blktap list_add).
    stats: Vec<Stats>,
    primary_footer_missing: bool,
}

fn now() -> u32 {
    vhd_time(SystemTime::now())
}

fn validate_footer(o: &Opts, f: &Footer) -> Option<&'static str> {
    if f.cookie != FOOTER_COOKIE {
        return Some("invalid cookie");
    }
    if f.compute_checksum() != f.checksum {
        let old_tap = f.hidden != 0
            && f.crtr_app[..3] == *b"tap"
            && (f.crtr_ver == 0x0000_0001 || f.crtr_ver == 0x0001_0001);
        let mut g = *f;
        g.hidden = 0;
        if !(old_tap && g.compute_checksum() == f.checksum) {
            return Some("invalid checksum");
        }
    }
    if f.features & 0x2 == 0 {
        return Some("invalid 'reserved' feature");
    }
    if f.features & !0x3 != 0 {
        return Some("invalid extra features");
    }
    if f.ff_version != FF_VERSION {
        return Some("invalid file format version");
    }
    if f.disk_type != 3 && f.disk_type != 4 && f.data_offset != u64::MAX {
        return Some("invalid data offset");
    }
    if !o.ignore_timestamps && f.timestamp > now().saturating_add(TIMESTAMP_MAX_SLACK) {
        return Some("creation time in future");
    }
    if f.crtr_app[..3] == *b"tap" && f.crtr_ver > CREATOR_VERSION {
        return Some("unsupported tap creator version");
    }
    if chs_geometry(f.curr_size) < f.geometry {
        return Some("geometry too large");
    }
    if !matches!(f.disk_type, 2..=4) {
        return Some("invalid type");
    }
    if f.saved > 1 {
        return Some("invalid 'saved' state");
    }
    if f.hidden > 1 {
        return Some("invalid 'hidden' state");
    }
    if f.reserved.iter().any(|&b| b != 0) {
        return Some("invalid 'reserved' bits");
    }
    if f.uuid == [0; 16] {
        return Some("invalid (NULL) uuid");
    }
    None
}

fn validate_header(h: &DynHeader, eof: u64) -> Option<&'static str> {
    if h.cookie != HEADER_COOKIE {
        return Some("invalid cookie");
    }
    if h.compute_checksum() != h.checksum {
        return Some("invalid checksum");
    }
    if h.hdr_ver != HEADER_VERSION {
        return Some("invalid header version");
    }
    if h.data_offset != u64::MAX {
        return Some("invalid data offset");
    }
    let bat_end = h.table_offset.saturating_add(u64::from(h.max_bat_size) * 4);
    if h.table_offset == 0
        || !h.table_offset.is_multiple_of(512)
        || bat_end > eof.saturating_sub(FOOTER_SIZE as u64)
    {
        return Some("invalid table offset");
    }
    if h.block_size.count_ones() != 1 {
        return Some("invalid block size");
    }
    if h.res1 != 0 || h.res2.iter().any(|&b| b != 0) {
        return Some("invalid reserved bits");
    }
    None
}

/// Read the footer at `off` (a private copy).
fn footer_at(file: &dyn BlockFile, off: u64) -> std::io::Result<Footer> {
    let mut b = [0u8; FOOTER_SIZE];
    file.read_at(&mut b, off)?;
    Ok(Footer::decode(&b))
}

/// An I/O failure: print blktap's `<what>: -errno` and fail with its cause.
fn io_fail(io: &mut Io, what: &str, e: std::io::Error) -> Error {
    let e = Error::io(what, e);
    vout!(io, "{what}: {}", e.neg());
    e
}

/// The image is inconsistent: print blktap's message and fail (EINVAL).
fn bad(io: &mut Io, msg: String) -> Error {
    vout!(io, "{msg}");
    Error::invalid(msg)
}

/// A failure blktap reports by `errno`: print its message and fail.
fn os_fail(io: &mut Io, msg: String, errno: Errno) -> Error {
    vout!(io, "{msg}");
    Error::os(msg, errno)
}

fn check_footer(io: &mut Io, ctx: &mut Ctx, file: &dyn BlockFile) -> Result<Footer> {
    let eof = file
        .len()
        .map_err(|e| io_fail(io, "error calculating end of file", e))?;
    let size = if eof % 512 != 0 { 511 } else { 512 };
    if eof < size {
        return Err(os_fail(
            io,
            format!("error reading primary footer: {}", -libc::EIO),
            Errno::EIO,
        ));
    }
    let mut b = [0u8; FOOTER_SIZE];
    file.read_at(&mut b[..size as usize], eof - size)
        .map_err(|e| io_fail(io, "error reading primary footer", e))?;
    let primary = Footer::decode(&b);
    let mut skip_backup = false;
    if let Some(msg) = validate_footer(&ctx.opts, &primary) {
        ctx.primary_footer_missing = true;
        if !ctx.opts.ignore_footer {
            return Err(bad(io, format!("primary footer invalid: {msg}")));
        }
    } else if primary.disk_type == 2 {
        skip_backup = true;
    }
    if skip_backup {
        return Ok(primary);
    }
    let backup = footer_at(file, 0).map_err(|e| io_fail(io, "error reading backup footer", e))?;
    if let Some(msg) = validate_footer(&ctx.opts, &backup) {
        return Err(bad(io, format!("backup footer invalid: {msg}")));
    }
    if primary != backup {
        if ctx.opts.ignore_footer {
            return Ok(backup);
        }
        let old_tap = backup.hidden != 0
            && backup.crtr_app[..3] == *b"tap"
            && (backup.crtr_ver == 0x0000_0001 || backup.crtr_ver == 0x0001_0001);
        let mut b0 = backup;
        b0.hidden = 0;
        if !(old_tap && b0 == primary) {
            return Err(bad(
                io,
                "primary and backup footers do not match".to_string(),
            ));
        }
    }
    Ok(primary)
}

fn check_header(io: &mut Io, file: &dyn BlockFile, footer: &Footer) -> Result<()> {
    let mut b = [0u8; HEADER_SIZE];
    if let Err(e) = file.read_at(&mut b, footer.data_offset) {
        return Err(io_fail(io, "error reading header", e));
    }
    let h = DynHeader::decode(&b);
    let eof = file.len().unwrap_or(0);
    if let Some(msg) = validate_header(&h, eof) {
        return Err(bad(io, format!("header is invalid: {msg}")));
    }
    Ok(())
}

fn check_differencing_header(io: &mut Io, o: &Opts, r: &Raw) -> Result<()> {
    let h = &r.header;
    let msg = if r.is_diff() {
        if !o.ignore_timestamps && h.prt_ts > now().saturating_add(TIMESTAMP_MAX_SLACK) {
            Some("parent creation time in future")
        } else {
            None
        }
    } else if h.prt_name.iter().any(|&b| b != 0) {
        Some("invalid non-null parent name")
    } else if h.loc.iter().any(|l| *l != Locator::default()) {
        Some("invalid non-null parent locators")
    } else if h.prt_uuid != [0; 16] {
        Some("invalid non-null parent uuid")
    } else if h.prt_ts != 0 {
        Some("invalid non-zero parent timestamp")
    } else {
        None
    };
    if let Some(m) = msg {
        return Err(bad(io, format!("differencing header is invalid: {m}")));
    }
    Ok(())
}

/// End of metadata in bytes (header, BAT, batmap, locators), as libvhd computes it.
fn end_of_headers(r: &Raw) -> u64 {
    // Offsets and sizes are unvalidated here (the locators are checked later): saturate.
    let h = &r.header;
    let mut eom = r.footer.data_offset.saturating_add(HEADER_SIZE as u64);
    eom = eom.max(
        h.table_offset
            .saturating_add(bat_bytes_padded(h.max_bat_size)),
    );
    if let Some(bh) = r.batmap.filter(|b| b.cookie == BATMAP_COOKIE) {
        let hdr_off = h
            .table_offset
            .saturating_add(bat_bytes_padded(h.max_bat_size));
        eom = eom.max(hdr_off.saturating_add(BATMAP_HEADER_SIZE as u64));
        eom = eom.max(
            bh.batmap_offset
                .saturating_add(u64::from(bh.batmap_size) * 512),
        );
    }
    for l in h.loc.iter().filter(|l| l.code != PLAT_NONE) {
        eom = eom.max(l.data_offset.saturating_add(l.space_bytes().unwrap_or(0)));
    }
    eom
}

fn check_bitmap(io: &mut Io, ctx: &mut Ctx, r: &Raw, block: u32) -> Result<()> {
    let spb = r.spb() as u32;
    let sector = u64::from(block) * u64::from(spb);
    let e = u64::from(r.bat[block as usize]);
    let Some(bitmap) = r.read(e * 512, r.bm_secs() * 512) else {
        return Err(os_fail(
            io,
            format!("error reading bitmap {:#x}", block),
            Errno::EIO,
        ));
    };
    let data = if ctx.opts.check_data {
        match r.read((e + r.bm_secs()) * 512, u64::from(spb) * 512) {
            Some(d) => Some(d),
            None => {
                return Err(os_fail(
                    io,
                    format!("error reading data block {:#x}", block),
                    Errno::EIO,
                ));
            }
        }
    } else {
        None
    };
    let mut err = Ok(());
    for i in 0..spb {
        let set = bit_test(&bitmap, u64::from(i));
        if ctx.opts.collect_stats && set {
            if let Some(s) = ctx.stats.first_mut() {
                s.secs_written += 1;
                bit_set(&mut s.bitmap, sector + u64::from(i), true);
            }
        }
        if let Some(d) = &data {
            let start = i as usize * 512;
            if d[start..start + 512].iter().any(|&b| b != 0) && !set {
                err = Err(bad(
                    io,
                    format!("sector {i:#x} of block {block:#x} has data where bitmap is clear"),
                ));
            }
        }
    }
    err
}

fn check_bat(io: &mut Io, ctx: &mut Ctx, r: &Raw, name: &str) -> Result<()> {
    let h = &r.header;
    if ctx.opts.collect_stats {
        let total = r.spb() * u64::from(h.max_bat_size);
        let mut bitmap = Vec::new();
        let ok = usize::try_from(total.div_ceil(8)).ok().is_some_and(|n| {
            bitmap.try_reserve_exact(n).is_ok() && {
                bitmap.resize(n, 0);
                true
            }
        });
        if !ok {
            return Err(os_fail(
                io,
                format!("failed to allocate stats for {name}"),
                Errno::ENOMEM,
            ));
        }
        ctx.stats.insert(
            0,
            Stats {
                name: name.to_string(),
                bitmap,
                secs_total: total,
                secs_allocated: 0,
                secs_written: 0,
            },
        );
    }
    let mut eof = r.eof;
    if !eof.is_multiple_of(512) {
        if eof % 512 != 511 {
            return Err(bad(io, format!("invalid file size: {:#x}", eof)));
        }
        eof += 1;
    }
    let bat = &r.bat;
    // libvhd's vhd_end_of_headers reads and validates the batmap first.
    if r.has_batmap {
        if let Err(e) = r.get_batmap() {
            vout!(io, "error calculating end of metadata: {}", e.neg());
            return Err(e);
        }
    }
    let eoh = end_of_headers(r) >> 9;
    let eof = (eof.saturating_sub(FOOTER_SIZE as u64)) >> 9;
    let block_size = r.spb() + r.bm_secs();
    let vhd_blks = r.footer.curr_size >> 21;
    if vhd_blks > u64::from(h.max_bat_size) {
        return Err(bad(
            io,
            format!(
                "VHD size ({vhd_blks} blocks) exceeds BAT size ({})",
                h.max_bat_size
            ),
        ));
    }
    let n = (vhd_blks as usize).min(bat.len());
    // Allocated entries sorted by offset make the overlap test O(n log n).
    let mut sorted: Vec<(u64, usize)> = bat[..n]
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != BAT_UNUSED)
        .map(|(i, &e)| (u64::from(e), i))
        .collect();
    sorted.sort_unstable();
    for (i, &off) in bat.iter().enumerate().take(n) {
        if off == BAT_UNUSED {
            continue;
        }
        let o = u64::from(off);
        if o < eoh {
            return Err(bad(
                io,
                format!("block {i} (offset {:#x}) clobbers headers", off),
            ));
        }
        if o + block_size > eof
            && !(ctx.primary_footer_missing && ctx.opts.ignore_footer && o + block_size == eof + 1)
        {
            return Err(bad(
                io,
                format!("block {i} (offset {:#x}) clobbers footer", off),
            ));
        }
        if ctx.opts.no_check_bat {
            continue;
        }
        let pos = sorted.partition_point(|&(x, _)| x < o);
        let neighbours = [pos.checked_sub(1), Some(pos), Some(pos + 1)];
        for (jo, j) in neighbours
            .into_iter()
            .flatten()
            .filter_map(|k| sorted.get(k).copied())
        {
            if j == i {
                continue;
            }
            let overlap = o == jo
                || (o > jo && o < jo + block_size)
                || (o + block_size > jo && o + block_size < jo + block_size);
            if overlap {
                return Err(bad(
                    io,
                    format!(
                        "block {i} (offset {:#x}) clobbers block {j} (offset {:#x})",
                        off, jo
                    ),
                ));
            }
        }
        if ctx.opts.check_data || ctx.opts.collect_stats {
            if ctx.opts.collect_stats {
                if let Some(s) = ctx.stats.first_mut() {
                    s.secs_allocated += r.spb();
                }
            }
            check_bitmap(io, ctx, r, i as u32)?;
        }
    }
    Ok(())
}

fn check_batmap(io: &mut Io, r: &Raw) -> Result<()> {
    let h = &r.header;
    let Some(bh) = r.batmap else {
        return Err(os_fail(
            io,
            format!("error reading batmap: {}", -libc::EIO),
            Errno::EIO,
        ));
    };
    let eof = r.eof;
    let msg = if bh.cookie != BATMAP_COOKIE {
        Some("invalid cookie")
    } else if bh.batmap_version > BATMAP_VERSION {
        Some("unsupported batmap version")
    } else {
        let len = u64::from(bh.batmap_size) * 512;
        let map = r.read(bh.batmap_offset, len);
        match map {
            Some(m)
                if batmap_checksum(&m, r.footer.curr_size, bh.batmap_version) != bh.checksum =>
            {
                Some("invalid checksum")
            }
            _ if bh.batmap_size == 0 => Some("invalid size zero"),
            _ if (u64::from(bh.batmap_size) << 12) < u64::from(h.max_bat_size) => {
                Some("batmap-BAT size mismatch")
            }
            _ if bh.batmap_offset == 0 || !bh.batmap_offset.is_multiple_of(512) => {
                Some("invalid batmap offset")
            }
            _ if bh.batmap_offset.saturating_add(len) > eof.saturating_sub(FOOTER_SIZE as u64) => {
                Some("invalid batmap size")
            }
            None => Some("invalid batmap size"),
            Some(m) => {
                let bat = &r.bat;
                for i in 0..(r.footer.curr_size >> 21) {
                    if bit_test(&m, i)
                        && bat.get(i as usize).copied().unwrap_or(BAT_UNUSED) == BAT_UNUSED
                    {
                        return Err(bad(io, format!("batmap shows unallocated block {i} full")));
                    }
                }
                None
            }
        }
    };
    if let Some(m) = msg {
        return Err(bad(io, format!("batmap is invalid: {m}")));
    }
    Ok(())
}

fn check_parent_locators(io: &mut Io, ctx: &Ctx, r: &Raw) -> Result<()> {
    let h = &r.header;
    let pname = h.parent_name();
    let eof = r.eof;
    let mut seen: Vec<u32> = Vec::new();
    let mut found = 0;
    for (i, l) in h.loc.iter().enumerate() {
        let valid_code = matches!(
            l.code,
            PLAT_NONE | PLAT_WI2R | PLAT_WI2K | PLAT_W2RU | PLAT_W2KU | PLAT_MAC | PLAT_MACX
        );
        let msg = if !valid_code {
            Some("invalid platform code")
        } else if l.code == PLAT_NONE {
            (*l != Locator::default()).then_some("non-zero locator")
        } else if l.data_offset == 0 {
            Some("invalid data offset")
        } else if l.data_space == 0 {
            Some("invalid data space")
        } else if l.data_len == 0 {
            Some("invalid data length")
        } else if l
            .space_bytes()
            .and_then(|s| l.data_offset.checked_add(s))
            .is_none_or(|e| e > eof.saturating_sub(FOOTER_SIZE as u64))
        {
            Some("invalid size")
        } else if l.res != 0 {
            Some("invalid reserved bits")
        } else {
            None
        };
        if let Some(m) = msg {
            return Err(bad(io, format!("invalid parent locator {i}: {m}")));
        }
        if l.code == PLAT_NONE {
            continue;
        }
        if seen.contains(&l.code) {
            return Err(bad(
                io,
                format!("duplicate platform code in locator {i}: {:#x}", l.code),
            ));
        }
        seen.push(l.code);
        if !matches!(l.code, PLAT_MACX | PLAT_W2RU | PLAT_W2KU) {
            continue;
        }
        let ppath = match r
            .locator_data(l)
            .ok_or_else(|| Error::os(format!("read parent locator {i}"), Errno::EIO))
            .and_then(|d| {
                decode_locator(l.code, &d)
                    .map_err(|e| Error::invalid(format!("parent locator {i}: {e}")))
            }) {
            Ok(p) => p,
            Err(e) => {
                vout!(io, "error reading parent locator {i}: {}", e.neg());
                return Err(e);
            }
        };
        let file = basename(&ppath);
        if file != pname {
            return Err(bad(
                io,
                format!("parent locator {i} name ({file}) does not match header name ({pname})"),
            ));
        }
        let Some(location) = resolve_locator(&r.path, &ppath) else {
            // libvhd's vhd_find_parent fails (ENOENT) when the resolved path is not
            // readable, before check's own "points to missing file" test can run.
            return Err(os_fail(
                io,
                format!("error resolving {ppath}: {}", -libc::ENOENT),
                Errno::ENOENT,
            ));
        };
        let raw = h.prt_uuid == [0; 16];
        if !raw && !ctx.opts.ignore_parent_uuid {
            let loc = location.to_string_lossy().into_owned();
            let msg = match common::open(&loc, true) {
                Err(_) => Some("error opening parent"),
                Ok(p) if p.footer().uuid != h.prt_uuid => Some("invalid parent uuid"),
                Ok(_) => None,
            };
            if let Some(m) = msg {
                return Err(bad(io, format!("invalid parent {loc}: {m}")));
            }
        }
        found += 1;
    }
    if found == 0 {
        return Err(bad(io, format!("could not find parent {pname}")));
    }
    Ok(())
}

/// blktap runs `read -p` here. A file whose header could be read is dumped from the raw
/// metadata, as libvhd's lenient open would show it (the engine refuses to open some of
/// the damage check reports, e.g. a BAT entry past the end of the file).
fn dump_metadata(io: &mut Io, name: &str, raw: Option<&Raw>) {
    vout!(io, "{name} appears invalid; dumping metadata");
    match raw {
        Some(r) => dump_raw(io, r),
        None => {
            let args: Vec<String> = ["-p", "-n", name].iter().map(|s| s.to_string()).collect();
            let _ = super::read::run(io, &args);
        }
    }
}

fn dump_raw(io: &mut Io, r: &Raw) {
    use super::dump::{BatmapView, LocatorView};
    use super::read::{print_meta, BatmapDump};
    let locs: Vec<LocatorView> = r
        .header
        .loc
        .iter()
        .enumerate()
        .map(|(i, l)| LocatorView::of(i, l, r.locator_data(l)))
        .collect();
    let view = |bh: BatmapHeader| {
        let computed = r
            .read(bh.batmap_offset, u64::from(bh.batmap_size) * 512)
            .map_or(0, |m| {
                batmap_checksum(&m, r.footer.curr_size, bh.batmap_version)
            });
        let kh = &bh.keyhash;
        let mut nonce = [0u8; 32];
        let mut hash = [0u8; 32];
        nonce.copy_from_slice(&kh[1..33]);
        hash.copy_from_slice(&kh[33..65]);
        BatmapView {
            offset: bh.batmap_offset,
            size_secs: bh.batmap_size,
            version: bh.batmap_version,
            checksum: bh.checksum,
            computed_checksum: computed,
            keyhash: Ok((kh[0] == 1).then_some((nonce, hash))),
        }
    };
    let batmap = if !r.has_batmap {
        BatmapDump::Absent
    } else {
        match r.get_batmap() {
            Ok((bh, _)) => BatmapDump::Valid(view(bh)),
            Err(_) => BatmapDump::Invalid(r.batmap.filter(|b| b.validate().is_ok()).map(view)),
        }
    };
    print_meta(io, &r.footer, Some(&r.header), &locs, batmap, false);
}

fn check_vhd(io: &mut Io, ctx: &mut Ctx, name: &str) -> Result {
    let md = match std::fs::metadata(name) {
        Ok(m) => m,
        Err(e) => {
            let n = e.raw_os_error().unwrap_or(libc::EIO);
            vout!(io, "cannot stat {name}: {n}");
            return Err(Error::io(format!("stat {name}"), e));
        }
    };
    if !md.is_file() && !md.file_type().is_block_device() {
        return Err(bad(
            io,
            format!("{name} is not a regular file or block device"),
        ));
    }
    let file = match OsFile::open(Path::new(name), false) {
        Ok(f) => f,
        Err(e) => {
            vout!(io, "error opening {name}");
            return Err(Error::io(format!("open {name}"), e));
        }
    };
    let mut loaded: Option<Raw> = None;
    let r = (|| -> Result<bool> {
        let footer = check_footer(io, ctx, &file)?;
        if footer.disk_type != 3 && footer.disk_type != 4 {
            return Ok(false);
        }
        check_header(io, &file, &footer)?;
        let raw = loaded.insert(Raw::load(Path::new(name), file, footer)?);
        check_differencing_header(io, &ctx.opts, raw)?;
        check_bat(io, ctx, raw, name)?;
        if raw.has_batmap {
            check_batmap(io, raw)?;
        }
        if raw.is_diff() {
            check_parent_locators(io, ctx, raw)?;
        }
        Ok(true)
    })();
    match r {
        Ok(dynamic) => {
            if dynamic && !ctx.opts.collect_stats {
                vout!(io, "{name} is valid");
            }
            Ok(())
        }
        Err(e) => {
            dump_metadata(io, name, loaded.as_ref());
            Err(e)
        }
    }
}

fn check_parents(io: &mut Io, ctx: &mut Ctx, name: &str) -> Result {
    let mut cur = name.to_string();
    let mut err = Ok(());
    for _ in 0..common::MAX_CHAIN {
        let img = match common::open(&cur, true) {
            Ok(i) => i,
            Err(e) => {
                err = Err(e.into());
                break;
            }
        };
        if !img.is_differencing() || common::parent_is_raw(&img) {
            break;
        }
        let parent = match common::parent_path(&img) {
            Ok(Some((p, _))) => p.to_string_lossy().into_owned(),
            Ok(None) => break,
            Err(e) => {
                vout!(io, "error getting parent: {}", neg(&e));
                err = Err(e.into());
                break;
            }
        };
        cur = parent;
        err = check_vhd(io, ctx, &cur);
        if err.is_err() {
            break;
        }
    }
    if let Err(e) = &err {
        vout!(io, "error checking parents: {}", e.neg());
    }
    err
}

fn pct(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        (num as f32 / den as f32 * 100.0) as f64
    }
}

fn print_stats(io: &mut Io, ctx: &Ctx) {
    // ctx.stats is most-recent first; blktap walks from the head (the last checked image,
    // i.e. the root when -p was given) down to the leaf.
    let Some(head) = ctx.stats.first() else {
        return;
    };
    vout!(
        io,
        "{}: secs allocated: {:#x} secs written: {:#x} ({:.2}%)",
        basename(&head.name),
        head.secs_allocated,
        head.secs_written,
        pct(head.secs_written, head.secs_allocated)
    );
    let mut chain = head.bitmap.clone();
    let mut prev = head;
    for cur in ctx.stats.iter().skip(1) {
        let (mut up, mut uc) = (0u64, 0u64);
        for i in 0..head.secs_total.min(cur.secs_total) {
            if bit_test(&cur.bitmap, i) {
                if !bit_test(&prev.bitmap, i) {
                    up += 1;
                }
                if !bit_test(&chain, i) {
                    uc += 1;
                }
                bit_set(&mut chain, i, true);
            }
        }
        vout!(
            io,
            "{}: secs allocated: {:#x} secs written: {:#x} ({:.2}%) secs not in parent: {:#x} ({:.2}%) secs not in ancestors: {:#x} ({:.2}%)",
            basename(&cur.name),
            cur.secs_allocated,
            cur.secs_written,
            pct(cur.secs_written, cur.secs_allocated),
            up,
            pct(up, cur.secs_written),
            uc,
            pct(uc, cur.secs_written)
        );
        prev = cur;
    }
}

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some((p, name)) = USAGE.parse_named(io, args)? else {
        return Ok(());
    };
    let opts = Opts {
        ignore_footer: p.flag('i'),
        ignore_parent_uuid: p.flag('I'),
        ignore_timestamps: p.flag('t'),
        check_data: p.flag('b'),
        no_check_bat: p.flag('B'),
        collect_stats: p.flag('s'),
    };
    if (opts.collect_stats || opts.check_data) && opts.no_check_bat {
        return Err(USAGE.fail(io));
    }
    let mut ctx = Ctx {
        opts,
        stats: Vec::new(),
        primary_footer_missing: false,
    };
    check_vhd(io, &mut ctx, &name)?;
    let mut err = Ok(());
    if p.flag('p') {
        err = check_parents(io, &mut ctx, &name);
    }
    if opts.collect_stats {
        print_stats(io, &ctx);
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_validation_messages() {
        let o = Opts {
            ignore_timestamps: true,
            ..Default::default()
        };
        let good = Footer::new(DiskType::Dynamic, 10 << 20, [7; 16], 0);
        assert_eq!(validate_footer(&o, &good), None);
        let mut f = good;
        f.uuid = [0; 16];
        f.checksum = f.compute_checksum();
        assert_eq!(validate_footer(&o, &f), Some("invalid (NULL) uuid"));
        let mut f = good;
        f.hidden = 2;
        f.checksum = f.compute_checksum();
        assert_eq!(validate_footer(&o, &f), Some("invalid 'hidden' state"));
        let mut f = good;
        f.checksum ^= 1;
        assert_eq!(validate_footer(&o, &f), Some("invalid checksum"));
        let mut f = good;
        f.geometry = u32::MAX;
        f.checksum = f.compute_checksum();
        assert_eq!(validate_footer(&o, &f), Some("geometry too large"));
        let mut f = good;
        f.timestamp = u32::MAX;
        f.checksum = f.compute_checksum();
        assert_eq!(
            validate_footer(&Opts::default(), &f),
            Some("creation time in future")
        );
        assert_eq!(validate_footer(&o, &f), None);
    }

    #[test]
    fn header_validation_messages() {
        let good = DynHeader::new(5, 2 << 20);
        assert_eq!(validate_header(&good, 1 << 20), None);
        assert_eq!(validate_header(&good, 2048), Some("invalid table offset"));
        let mut h = good.clone();
        h.block_size = 3 << 20;
        h.checksum = h.compute_checksum();
        assert_eq!(validate_header(&h, 1 << 20), Some("invalid block size"));
    }
}
