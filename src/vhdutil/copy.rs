//! `vhd-util copy -n NAME -N NEW [-k KEYFILE | -E]` (`vhd-util-copy.c`): copy a VHD into
//! a new one, optionally encrypting the new one with the given key (`-E`: key on stdin).
//!
//! The source is read through the image layer (its parents, and its keys from
//! `TAPDISK3_CRYPTO_KEYDIR`), so the copy holds plaintext guest data, re-encrypted with
//! the new key if one is given. Difference from blktap: the copy is always a standalone
//! disk (dynamic, or fixed for a fixed source) holding everything the chain exposes;
//! blktap copied only the leaf's blocks into a parentless "differencing" disk.

use std::io::Read;
use std::path::Path;

use super::chain::open_chain_or_report;
use super::cli::{OptsExt, UsageSpec};
use super::common::neg;
use super::error::{Error, Result};
use super::progress::{progress_style, with_progress};
use super::Io;
use crate::image::chain::{open_vhd_chain, OpenOptions};
use crate::image::crypto::{KeyBytes, KeyHash, KeySource};
use crate::image::vhd::format::{DiskType, DEFAULT_BLOCK_SIZE};
use crate::image::vhd::ops::ProgressFn;
use crate::image::vhd::ops::{create, CreateOptions};
use crate::image::{Image, ImageError, SECTOR_SIZE};
use crate::{verr, vout};
use nix::errno::Errno;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "copy",
    spec: "n:N:k:Eh",
    text: "options: -n <name> -N <new VHD name> \
[-k <keyfile> | -E (pass encryption key on stdin)] [-h help] \n",
    to_stderr: false,
    h_fails: true,
};

fn read_key(io: &mut Io, src: &mut dyn Read) -> Result<KeyBytes> {
    let mut key = KeyBytes::new(Vec::new());
    if let Err(e) = src.take(1025).read_to_end(&mut key) {
        return Err(Error::io("read key", e));
    }
    if key.len() != 32 && key.len() != 64 {
        verr!(io, "Unsupported keysize, use either 256 bit or 512 bit key");
        // blktap's status for this case: -1.
        return Err(Error::os(
            format!("key of {} bytes (must be 32 or 64)", key.len()),
            Errno::EPERM,
        ));
    }
    Ok(key)
}

fn copy_data(io: &mut Io, src: &dyn Image, dst: &dyn Image) -> std::result::Result<(), ImageError> {
    let style = progress_style(io, false);
    with_progress(io, style, |progress| copy_allocated(src, dst, progress))
}

/// Copy the allocated, non-zero data of `src` to `dst` in 2 MiB pieces; progress counts
/// sectors.
fn copy_allocated(
    src: &dyn Image,
    dst: &dyn Image,
    progress: ProgressFn<'_>,
) -> std::result::Result<(), ImageError> {
    let size = src.info().size_sectors;
    let step = u64::from(DEFAULT_BLOCK_SIZE) / SECTOR_SIZE;
    let mut buf = Vec::new();
    for ext in src.block_status(0, size)? {
        if !ext.allocated {
            continue;
        }
        let mut s = ext.sector;
        let end = ext.sector + ext.nsectors;
        while s < end {
            progress(s, size);
            let n = step.min(end - s);
            buf.resize((n * SECTOR_SIZE) as usize, 0);
            src.read(s, &mut buf)?;
            if buf.iter().any(|&b| b != 0) {
                dst.write(s, &buf)?;
            }
            s += n;
        }
    }
    dst.flush()
}

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some(p) = USAGE.parse(io, args)? else {
        return Ok(());
    };
    let (name, new) = (p.value('n'), p.value('N'));
    let (Some(name), Some(new)) = (name, new) else {
        verr!(io, "Must supply both existing and new VHD names");
        return Err(USAGE.fail(io));
    };
    if p.value('k').is_some() && p.flag('E') {
        verr!(io, "Only supply -E or -k once");
        // blktap's status for this case: 1.
        return Err(Error::os("both -E and -k", Errno::EPERM));
    }
    let key = if let Some(k) = p.value('k') {
        let mut f = match std::fs::File::open(k) {
            Ok(f) => f,
            Err(e) => {
                let n = e.raw_os_error().unwrap_or(libc::EIO);
                vout!(io, "Failed to open key file {k}: {n}");
                return Err(Error::io(format!("open key file {k}"), e));
            }
        };
        Some(read_key(io, &mut f)?)
    } else if p.flag('E') {
        Some(read_key(io, &mut std::io::stdin())?)
    } else {
        None
    };

    let src = open_chain_or_report(io, name, true)?;
    if Path::new(new).exists() {
        vout!(io, "VHD file {new} already exists, chose a different name");
        return Err(Error::invalid(format!("{new} already exists")));
    }
    let size = src.footer().curr_size;
    let fixed = src.disk_type() == DiskType::Fixed;
    let copts = CreateOptions {
        size,
        fixed,
        block_size: src.header().map_or(DEFAULT_BLOCK_SIZE, |h| h.block_size),
        max_size: None,
    };
    if let Err(e) = create(Path::new(new), &copts) {
        vout!(io, "error creating {new}: {}", neg(&e));
        return Err(e.into());
    }
    let fail = |io: &mut Io, what: &str, e: ImageError| -> Result {
        vout!(io, "{what}: {}", neg(&e));
        verr!(io, "{}", super::common::describe(&e));
        let _ = std::fs::remove_file(new);
        Err(e.into())
    };
    let mut opts = OpenOptions {
        read_only: false,
        ..Default::default()
    };
    if let Some(k) = &key {
        if fixed {
            let _ = std::fs::remove_file(new);
            verr!(io, "copy: fixed VHDs cannot carry a key hash");
            return Err(Error::invalid("fixed VHDs cannot carry a key hash"));
        }
        let meta = match super::common::open(new, false) {
            Ok(m) => m,
            Err(e) => return fail(io, &format!("error opening {new}"), e),
        };
        let kh = KeyHash::for_key(k, &[0u8; 32]);
        if let Err(e) = meta.set_keyhash(&kh).and_then(|()| meta.close()) {
            return fail(io, "failed to set keyhash", e);
        }
        opts.keys = KeySource::Explicit(k.clone());
    }
    let dst = match open_vhd_chain(Path::new(new), &opts) {
        Ok(d) => d,
        Err(e) => return fail(io, &format!("error opening {new}"), e),
    };
    let r = copy_data(io, &src, &dst);
    let c = dst.close();
    let _ = src.close();
    match r.and(c) {
        Ok(()) => Ok(()),
        Err(e) => fail(io, "Failed to copy", e),
    }
}
