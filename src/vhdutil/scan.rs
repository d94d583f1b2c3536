//! `vhd-util scan [-m glob] [-f] [-c] [-p] [-a] [-v] [-M] FILES...`
//! (`vhd-util-scan.c`). Line formats are in [`super::scanfmt`]. `-l VG` (LVM) is not
//! supported and refused with EOPNOTSUPP.

use super::cli::{OptsExt, UsageSpec};
use super::common::{self, neg};
use super::error::{Error, Result};
use super::glob::glob;
use super::scanfmt::{
    basename, format_line, pretty_lines, ScanEntry, ScanFailure, ScanFlags, ScanInfo,
};
use super::Io;
use crate::image::vhd::format::DiskType;
use crate::{verr, vout};
use nix::errno::Errno;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "scan",
    spec: "m:fcl:pavMh",
    text: "usage: [OPTIONS] FILES\n\
options: [-m match filter] [-f fast] [-c continue on failure] \
[-l LVM volume] [-p pretty print] [-a scan parents] \
[-v verbose] [-h help] [-M show markers]\n",
    to_stderr: false,
    h_fails: false,
};

struct Target {
    name: String,
    size: u64,
    raw: bool,
}

#[derive(Clone, Copy)]
struct Opts {
    fast: bool,
    nofail: bool,
    parents: bool,
    out: ScanFlags,
}

fn stat_target(name: &str, raw: bool) -> Result<Target> {
    let md = std::fs::metadata(name).map_err(|e| Error::io(format!("stat {name}"), e))?;
    Ok(Target {
        name: name.to_string(),
        size: md.len(),
        raw,
    })
}

fn fail(name: &str, code: i32, message: &'static str) -> ScanEntry {
    ScanEntry {
        name: name.to_string(),
        result: Err(ScanFailure { code, message }),
    }
}

/// Scan one target: `(entry, parent path to add with -a, parent is raw)`.
fn scan_one(t: &Target, o: Opts) -> (ScanEntry, Option<(String, bool)>) {
    let name = if o.out.pretty {
        match common::canonpath(&t.name) {
            Ok(n) => n,
            Err(e) => return (fail(&t.name, e.neg(), "resolving name"), None),
        }
    } else {
        t.name.clone()
    };
    if t.raw {
        let info = ScanInfo {
            capacity: t.size,
            size: t.size,
            hidden: 1,
            marker: 0,
            keyhash: None,
            parent: None,
        };
        return (
            ScanEntry {
                name,
                result: Ok(info),
            },
            None,
        );
    }
    let img = match common::open(&t.name, true) {
        Ok(i) => i,
        Err(e) => return (fail(&name, neg(&e), "opening file"), None),
    };
    let hidden = match common::hidden(&img) {
        Ok(h) => h,
        Err(e) => return (fail(&name, neg(&e), "checking 'hidden' field"), None),
    };
    let (mut marker, mut keyhash) = (0u8, None);
    if o.out.markers {
        let r = img.marker().and_then(|m| img.keyhash().map(|k| (m, k)));
        match r {
            Ok((m, k)) => {
                marker = m;
                keyhash = k.is_set().then_some(k.hash);
            }
            Err(e) => return (fail(&name, neg(&e), "checking markers"), None),
        }
    }
    let mut parent = None;
    let mut add = None;
    if img.disk_type() == DiskType::Differencing {
        let raw = common::parent_is_raw(&img);
        let found = if o.fast {
            img.header()
                .map(|h| h.parent_name())
                .filter(|s| !s.is_empty())
        } else {
            common::parent_path(&img).ok().flatten().map(|(p, _)| {
                let s = p.to_string_lossy().into_owned();
                if o.out.pretty {
                    common::canonpath(&s).unwrap_or(s)
                } else {
                    s
                }
            })
        };
        let found = match found {
            Some(p) => Ok(p),
            None => common::preferred_locator_text(&img).map_err(|e| neg(&e)),
        };
        match found {
            Ok(p) => {
                add = Some((p.clone(), raw));
                parent = Some(p);
            }
            Err(e) => return (fail(&name, e, "getting parent"), None),
        }
    }
    let info = ScanInfo {
        capacity: img.footer().curr_size,
        size: t.size,
        hidden,
        marker,
        keyhash,
        parent,
    };
    (
        ScanEntry {
            name,
            result: Ok(info),
        },
        add,
    )
}

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some(p) = USAGE.parse(io, args)? else {
        return Ok(());
    };
    let filter = p.value('m').map(str::to_string);
    if filter.is_none() && p.operands.is_empty() {
        return Err(USAGE.fail(io));
    }
    if p.value('l').is_some() {
        verr!(
            io,
            "scan: LVM volume groups (-l) are not supported by this vhd-util; scan the volumes' device paths instead"
        );
        return Err(Error::os("scan -l (LVM)", Errno::EOPNOTSUPP));
    }
    let pretty = p.flag('p');
    let o = Opts {
        fast: p.flag('f') && !pretty,
        nofail: p.flag('c'),
        parents: p.flag('a'),
        out: ScanFlags {
            verbose: p.flag('v'),
            markers: p.flag('M'),
            pretty,
        },
    };

    // Find the targets: glob matches first, then the named files.
    let mut names: Vec<String> = Vec::new();
    if let Some(f) = &filter {
        names.extend(glob(f));
    }
    names.extend(p.operands.iter().cloned());
    let mut targets: Vec<Target> = Vec::new();
    for n in &names {
        match stat_target(n, false) {
            Ok(t) => targets.push(t),
            Err(e) => {
                vout!(
                    io,
                    "{}",
                    format_line(
                        &fail(n, e.neg(), "failure scanning target"),
                        o.out,
                        0,
                        false
                    )
                );
                if !o.nofail {
                    // OpenXT's wording, on stdout (XenServer's adds ". Check syslog for details"
                    // on stderr).
                    vout!(io, "scan failed: {}", e.neg());
                    return Err(e);
                }
            }
        }
    }
    if targets.is_empty() {
        return Ok(());
    }

    let mut err = Ok(());
    let mut collected: Vec<ScanEntry> = Vec::new();
    let mut i = 0;
    while i < targets.len() {
        let (entry, add) = scan_one(&targets[i], o);
        let this_err = entry.result.as_ref().err().map(|f| f.code).unwrap_or(0);
        if pretty && this_err == 0 {
            collected.push(entry);
        } else {
            vout!(io, "{}", format_line(&entry, o.out, 0, false));
        }
        if o.parents {
            if let Some((pp, raw)) = add {
                let dup = targets.iter().any(|t| basename(&t.name) == basename(&pp));
                if !dup {
                    match stat_target(&pp, raw) {
                        Ok(t) => targets.push(t),
                        Err(e) => vout!(
                            io,
                            "{}",
                            format_line(
                                &fail(&pp, e.neg(), "failure scanning target"),
                                o.out,
                                0,
                                false
                            )
                        ),
                    }
                }
            }
        }
        if this_err != 0 {
            err = Err(Error::os(
                format!("scan {}", targets[i].name),
                Errno::from_raw(-this_err),
            ));
            if !o.nofail {
                break;
            }
        }
        i += 1;
    }
    if pretty {
        for l in pretty_lines(&collected, o.out) {
            vout!(io, "{l}");
        }
    }
    if o.nofail {
        Ok(())
    } else {
        err
    }
}
