//! `vhd-util modify -n NAME [-p NEW_PARENT [-m]] [-s PHYS_BYTES] [-z]`
//! (`vhd-util-modify.c`, libvhd `vhd_change_parent`, `vhd_set_phys_size`): the
//! "dangerous" metadata edits.
//!
//! - `-z`: empty the BAT and batmap of a dynamic disk and truncate the file after the
//!   metadata (all data is lost); fixed disks: ENOSYS;
//! - `-s`: write the footer so the file is PHYS_BYTES long (refused below the end of
//!   the data);
//! - `-p`: reparent a differencing disk (parent uuid, timestamp, name, and the existing
//!   MacX/W2ku/W2ru locators rewritten in place; ENAMETOOLONG if a new path does not fit).

use std::path::Path;
use std::time::UNIX_EPOCH;

use super::cli::{OptsExt, UsageSpec, EINVAL};
use super::common::{self, neg};
use super::Io;
use crate::image::vhd::engine::VhdImage;
use crate::image::vhd::format::*;
use crate::image::vhd::ops::vhd_time;
use crate::image::vhd::parent::{locator_payloads, relative_path};
use crate::image::ImageError;
use crate::{verr, vout};

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "modify",
    spec: "n:s:p:mzh",
    text: "*** Dangerous operations, use with care ***\n\
options: <-n name> [-p NEW_PARENT set parent [-m raw]] \
[-s NEW_SIZE set size] [-z zero (kill data)] [-h help]\n",
    to_stderr: false,
    h_status: EINVAL,
};

fn zero_bat(img: &VhdImage) -> Result<(), ImageError> {
    let Some(h) = img.header() else {
        return Err(ImageError::Invalid("not dynamic".into()));
    };
    if img.disk_type() == DiskType::Fixed {
        return Err(ImageError::Invalid("not dynamic".into()));
    }
    let bat_len = pad512(u64::from(h.max_bat_size) * 4);
    let ff = vec![0xFFu8; bat_len as usize];
    img.write_raw(&ff, h.table_offset)?;
    let mut eoh = (h.table_offset + bat_len).max(img.footer().data_offset + HEADER_SIZE as u64);
    if let Some((mut bh, map)) = img.batmap() {
        let zero = vec![0u8; map.len()];
        img.write_raw(&zero, bh.batmap_offset)?;
        bh.checksum = batmap_checksum(&zero, img.footer().curr_size, bh.batmap_version);
        let hdr_off = h.table_offset + bat_len;
        img.write_raw(&bh.encode(), hdr_off)?;
        eoh = eoh
            .max(hdr_off + BATMAP_HEADER_SIZE as u64)
            .max(bh.batmap_offset + map.len() as u64);
    }
    for l in h.loc.iter().filter(|l| l.code != PLAT_NONE) {
        eoh = eoh.max(l.data_offset + l.space_bytes().unwrap_or(0));
    }
    img.file()
        .sync()
        .map_err(|e| ImageError::io(img.path(), "fdatasync", e))?;
    if img.file().resizable() {
        let mut f = img.footer();
        img.write_raw(&f.encode(), eoh)?;
        img.file()
            .sync()
            .map_err(|e| ImageError::io(img.path(), "fdatasync", e))?;
        img.file()
            .set_len(eoh + FOOTER_SIZE as u64)
            .map_err(|e| ImageError::io(img.path(), "truncate", e))?;
    }
    Ok(())
}

fn set_phys_size(img: &VhdImage, size: i64) -> Result<(), ImageError> {
    let phys = common::phys_size(img)?;
    let Ok(size) = u64::try_from(size) else {
        return Err(ImageError::Invalid("negative size".into()));
    };
    if size < phys {
        return Err(ImageError::Invalid(format!(
            "new size ({size}) < phys size ({phys})"
        )));
    }
    let mut f = img.footer();
    img.write_raw(&f.encode(), size - FOOTER_SIZE as u64)?;
    img.file()
        .sync()
        .map_err(|e| ImageError::io(img.path(), "fdatasync", e))
}

fn change_parent(img: &VhdImage, new_parent: &str, raw: bool) -> Result<(), i32> {
    if !img.is_differencing() {
        return Err(EINVAL);
    }
    let ppath = common::canonpath(new_parent)?;
    let md = std::fs::metadata(&ppath).map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO))?;
    use std::os::unix::fs::FileTypeExt;
    if !md.is_file() && !md.file_type().is_block_device() {
        return Err(EINVAL);
    }
    let uuid = if raw {
        [0u8; 16]
    } else {
        let p = common::open(&ppath, true).map_err(|e| neg(&e))?;
        p.footer().uuid
    };
    let ts = vhd_time(md.modified().unwrap_or(UNIX_EPOCH));
    let child = Path::new(img.path());
    let cdir = match child.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.canonicalize(),
        None => std::env::current_dir(),
    }
    .map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO))?;
    let rel = relative_path(&cdir, Path::new(&ppath));
    let payloads = locator_payloads(&rel);
    let Some(h) = img.header() else {
        return Err(EINVAL);
    };
    let mut locs = h.loc;
    for l in locs.iter_mut() {
        let Some((_, data)) = payloads.iter().find(|(c, _)| *c == l.code) else {
            continue;
        };
        let space = l.space_bytes().ok_or(EINVAL)?;
        if data.len() as u64 > space {
            return Err(-libc::ENAMETOOLONG);
        }
        let mut buf = data.clone();
        buf.resize(space as usize, 0);
        img.write_raw(&buf, l.data_offset).map_err(|e| neg(&e))?;
        l.data_len = u32::try_from(data.len()).map_err(|_| -libc::ENAMETOOLONG)?;
    }
    let name = Path::new(&ppath)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    img.update_header(|hh| {
        hh.prt_uuid = uuid;
        hh.prt_ts = ts;
        hh.set_parent_name(&name);
        hh.loc = locs;
    })
    .map_err(|e| neg(&e))?;
    Ok(())
}

pub fn run(io: &mut Io, args: &[String]) -> i32 {
    let p = match USAGE.parse(io, args) {
        Ok(p) => p,
        Err(s) => return s,
    };
    let Some(name) = p.value('n') else {
        return USAGE.fail(io, EINVAL);
    };
    if !p.operands.is_empty() {
        return USAGE.fail(io, EINVAL);
    }
    let newsize = match p.value('s') {
        None => None,
        Some(s) => match super::getopt::parse_u64_strict(s).and_then(|v| i64::try_from(v).ok()) {
            Some(v) => Some(v),
            None => {
                verr!(io, "Invalid size '{s}'");
                return USAGE.fail(io, EINVAL);
            }
        },
    };
    let img = match common::open(name, false) {
        Ok(i) => i,
        Err(e) => {
            vout!(io, "error opening {name}: {}", neg(&e));
            return neg(&e);
        }
    };
    let mut err = 0;
    if p.flag('z') {
        err = if img.disk_type() == DiskType::Fixed {
            -libc::ENOSYS
        } else {
            match zero_bat(&img) {
                Ok(()) => 0,
                Err(e) => neg(&e),
            }
        };
        if err != 0 {
            vout!(io, "failed to zero VHD: {err}");
        }
    }
    if let Some(sz) = newsize {
        err = match set_phys_size(&img, sz) {
            Ok(()) => 0,
            Err(e) => neg(&e),
        };
        if err != 0 {
            vout!(io, "failed to set physical size to {sz}: {err}");
        }
    }
    if let Some(np) = p.value('p') {
        if let Err(e) = change_parent(&img, np, p.flag('m')) {
            vout!(io, "failed to set parent to '{np}': {e}");
            err = e;
        }
    }
    // Metadata was written behind the engine's back: do not let close rewrite anything.
    drop(img);
    err
}
