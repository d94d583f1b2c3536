//! The `tap-ctl` command line (over [`crate::control`]'s client): blktap's getopt surface, output formats and exit codes.
//! `src/bin/tap-ctl.rs` is a thin main around [`run`].
//!
//! Exit status is `abs(errno)` of the failure (0 on success); the error's `strerror` text goes
//! to stderr. Bad options print the command's usage on stderr and exit EINVAL; `-h`/`--help`
//! prints it on stdout and exits 0; an unknown or missing command prints the global usage and
//! exits 0, as blktap does. `--debug` may appear anywhere (see [`strip_debug`]).

use std::io::{Read, Write};
use std::time::Duration;

use crate::control::client::{Client, TapEntry};
use crate::control::msg::{c_hex, OpenFlags, OpenRequest, ResumeRequest, SecretKey};
use crate::control::{tapdev, ControlError};
use crate::util::getopt::{self, Item};

/// The global usage text.
pub const USAGE: &str = "usage: tap-ctl COMMAND [OPTIONS]\n\
COMMAND := { list | allocate | free | create | destroy | spawn | attach | detach | open | close | pause | unpause | stats }\n";

/// Standard streams of one invocation.
pub struct CliIo<'a> {
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
    pub stdin: &'a mut dyn Read,
    /// Whether stdout is a terminal (selects the `list`/`spawn` formats).
    pub tty: bool,
}

/// Remove every `--debug` from `args`; returns the rest and whether it was present.
pub fn strip_debug(args: &[String]) -> (Vec<String>, bool) {
    let debug = args.iter().any(|a| a == "--debug");
    (
        args.iter().filter(|a| *a != "--debug").cloned().collect(),
        debug,
    )
}

/// The TTY `list` row: `printf("%8s %4s %4s %10s %s\n", pid, minor, state, type, file)`.
pub fn format_list_row(e: &TapEntry) -> String {
    let dash = |o: Option<String>| o.unwrap_or_else(|| "-".to_string());
    format!(
        "{:>8} {:>4} {:>4} {:>10} {}\n",
        dash(e.pid.map(|p| p.to_string())),
        dash(e.minor.map(|m| m.to_string())),
        dash(e.state.map(|s| c_hex(s.0))),
        dash(e.disk_type.clone()),
        dash(e.path.clone()),
    )
}

/// The non-TTY `list` line: `pid=%d minor=%d state=%#x args=%s:%s`, unknown fields omitted.
pub fn format_list_dict(e: &TapEntry) -> String {
    let mut parts = Vec::new();
    if let Some(p) = e.pid {
        parts.push(format!("pid={p}"));
    }
    if let Some(m) = e.minor {
        parts.push(format!("minor={m}"));
    }
    if let Some(s) = e.state {
        parts.push(format!("state={}", c_hex(s.0)));
    }
    if let (Some(t), Some(p)) = (&e.disk_type, &e.path) {
        parts.push(format!("args={t}:{p}"));
    }
    let mut s = parts.join(" ");
    s.push('\n');
    s
}

/// One option as the commands see it, from [`crate::util::getopt`]: operands are skipped
/// (GNU getopt permutes them away and tap-ctl takes none), `--help` is `-h` where the
/// command has `-h`, and every getopt error is [`Opt::Bad`].
enum Opt {
    Flag(char),
    Value(char, String),
    Bad,
}

/// The options of `args` against the getopt string `spec` (like `"hp:m:"`), in order.
fn options<'a>(args: &'a [String], spec: &'a str) -> impl Iterator<Item = Opt> + 'a {
    getopt::Getopt::new("tap-ctl", args, spec).filter_map(move |item| match item {
        Ok(Item::Opt(o)) => Some(match o.arg {
            Some(v) => Opt::Value(o.letter, v),
            None => Opt::Flag(o.letter),
        }),
        Ok(Item::Operand(_)) => None,
        Ok(Item::LongHelp) if spec.contains('h') => Some(Opt::Flag('h')),
        Ok(Item::LongHelp) | Err(_) => Some(Opt::Bad),
    })
}

/// Outcome of a command: exit status.
type Status = i32;

fn fail(io: &mut CliIo<'_>, e: &ControlError) -> Status {
    log::debug!("tap-ctl: {}", crate::util::error_chain(&e));
    let errno = e.errno();
    let _ = writeln!(io.stderr, "{}", crate::control::strerror(errno));
    errno
}

struct Usage(&'static str);

impl Usage {
    fn help(&self, io: &mut CliIo<'_>) -> Status {
        let _ = writeln!(io.stdout, "usage: {}", self.0);
        0
    }
    fn bad(&self, io: &mut CliIo<'_>) -> Status {
        let _ = writeln!(io.stderr, "usage: {}", self.0);
        libc::EINVAL
    }
}

fn parse_num<T: std::str::FromStr>(s: &str) -> Option<T> {
    s.trim().parse::<T>().ok()
}

/// Store the number `v` in `slot`; false (a usage error) if `v` is not one.
fn set_num<T: std::str::FromStr>(slot: &mut Option<T>, v: &str) -> bool {
    *slot = parse_num(v);
    slot.is_some()
}

/// Run `tap-ctl` with `args` (without the program name and without `--debug`).
pub fn run(args: &[String], io: &mut CliIo<'_>) -> Status {
    run_with(&Client::new(), args, io)
}

/// [`run`] against an explicit client (tests).
pub fn run_with(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    let Some(cmd) = args.first() else {
        let _ = io.stdout.write_all(USAGE.as_bytes());
        return 0;
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "list" => cmd_list(client, rest, io),
        "allocate" => cmd_allocate(client, rest, io),
        "free" => cmd_free(client, rest, io),
        "create" => cmd_create(client, rest, io),
        "destroy" => cmd_destroy(client, rest, io),
        "spawn" => cmd_spawn(client, rest, io),
        "attach" => cmd_attach_detach(client, rest, io, true),
        "detach" => cmd_attach_detach(client, rest, io, false),
        "open" => cmd_open(client, rest, io),
        "close" => cmd_close(client, rest, io),
        "pause" => cmd_pause(client, rest, io),
        "unpause" => cmd_unpause(client, rest, io),
        "stats" => cmd_stats(client, rest, io),
        _ => {
            let _ = io.stdout.write_all(USAGE.as_bytes());
            0
        }
    }
}

const LIST_USAGE: Usage = Usage("list [-h] [-p pid] [-m minor] [-t type] [-f file]");

fn cmd_list(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    let (mut pid, mut minor, mut ty, mut file) = (None::<i32>, None::<u16>, None, None);
    for o in options(args, "hp:m:t:f:") {
        match o {
            Opt::Flag('h') => return LIST_USAGE.help(io),
            Opt::Value('p', v) if set_num(&mut pid, &v) => {}
            Opt::Value('m', v) if set_num(&mut minor, &v) => {}
            Opt::Value('t', v) => ty = Some(v),
            Opt::Value('f', v) => file = Some(v),
            _ => return LIST_USAGE.bad(io),
        }
    }
    let entries = match client.list() {
        Ok(e) => e,
        Err(e) => return fail(io, &e),
    };
    for e in entries {
        if minor.is_some() && e.minor != minor {
            continue;
        }
        if pid.is_some() && e.pid != pid {
            continue;
        }
        if ty.is_some() && e.disk_type != ty {
            continue;
        }
        if file.is_some() && e.path != file {
            continue;
        }
        let line = if io.tty {
            format_list_row(&e)
        } else {
            format_list_dict(&e)
        };
        let _ = io.stdout.write_all(line.as_bytes());
    }
    0
}

const ALLOCATE_USAGE: Usage = Usage("allocate [-h]");

fn cmd_allocate(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    for o in options(args, "hd:") {
        match o {
            Opt::Flag('h') => return ALLOCATE_USAGE.help(io),
            Opt::Value('d', _) => {}
            _ => return ALLOCATE_USAGE.bad(io),
        }
    }
    match client.allocate() {
        Ok((_, path)) => {
            let _ = writeln!(io.stdout, "{}", path.display());
            0
        }
        Err(e) => fail(io, &e),
    }
}

const FREE_USAGE: Usage = Usage("free [-h] <-m minor>");

fn cmd_free(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    let mut minor = None::<u16>;
    for o in options(args, "hm:") {
        match o {
            Opt::Flag('h') => return FREE_USAGE.help(io),
            Opt::Value('m', v) if set_num(&mut minor, &v) => {}
            _ => return FREE_USAGE.bad(io),
        }
    }
    let Some(minor) = minor else {
        return FREE_USAGE.bad(io);
    };
    match client.free(minor) {
        Ok(()) => 0,
        Err(e) => fail(io, &e),
    }
}

/// Options shared by `create` and `open`.
#[derive(Default)]
struct OpenOpts {
    params: Option<String>,
    flags: OpenFlags,
    prt_minor: Option<u16>,
    secondary: Option<String>,
    req_timeout: u16,
    log_path: Option<String>,
}

impl OpenOpts {
    /// Apply one open option; `None` if `o` is not one of them, `Some(false)` if its value is bad.
    fn apply(&mut self, o: &Opt) -> Option<bool> {
        match o {
            Opt::Value('a', v) => self.params = Some(v.clone()),
            Opt::Flag('R') => self.flags |= OpenFlags::RDONLY,
            Opt::Flag('D') => self.flags |= OpenFlags::NO_O_DIRECT,
            Opt::Flag('r') => self.flags |= OpenFlags::ADD_LCACHE,
            Opt::Flag('s') => self.flags |= OpenFlags::STANDBY,
            Opt::Value('e', v) => match parse_num(v) {
                Some(m) => {
                    self.prt_minor = Some(m);
                    self.flags |= OpenFlags::REUSE_PRT;
                }
                None => return Some(false),
            },
            Opt::Value('2', v) => {
                self.secondary = Some(v.clone());
                self.flags |= OpenFlags::SECONDARY;
            }
            Opt::Value('t', v) => match parse_num(v) {
                Some(t) => self.req_timeout = t,
                None => return Some(false),
            },
            Opt::Value('C', v) => self.log_path = Some(v.clone()),
            _ => return None,
        }
        Some(true)
    }

    fn request(&self, minor: u16, params: String) -> OpenRequest {
        let mut r = OpenRequest::new(minor, params);
        r.flags = self.flags;
        r.prt_devnum = self.prt_minor.map(u32::from).unwrap_or(0);
        r.secondary = self.secondary.clone();
        r.req_timeout = self.req_timeout;
        r.set_log_path(self.log_path.clone());
        r
    }
}

const CREATE_USAGE: Usage = Usage(
    "create <-a type:/path/to/file> [-d device name] [-R readonly] [-D no O_DIRECT] \
[-r turn on read caching into leaf node] [-e <minor> stack on existing tapdisk for the parent chain] \
[-2 <path> use secondary image (in mirror mode if no -s)] [-s fail over to the secondary image on ENOSPC] \
[-t request timeout in seconds] [-C <path> logpath]",
);

/// Printed after the `create -h` usage.
const CREATE_NOTE: &str = "prints /dev/nbdN when the kernel NBD driver takes the disk \
(and links /dev/xen/blktap-2/tapdev<minor> to it), else the NBD socket path (no tapdev link); \
BLKTAP_NBD_DEVICE=0 always prints the socket path";

fn cmd_create(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    let mut oo = OpenOpts::default();
    for o in options(args, "ha:RDre:2:st:C:d:") {
        match &o {
            Opt::Flag('h') => {
                let st = CREATE_USAGE.help(io);
                let _ = writeln!(io.stdout, "{CREATE_NOTE}");
                return st;
            }
            Opt::Value('d', _) => {}
            _ => match oo.apply(&o) {
                Some(true) => {}
                _ => return CREATE_USAGE.bad(io),
            },
        }
    }
    let Some(params) = oo.params.clone() else {
        return CREATE_USAGE.bad(io);
    };
    match client.create(oo.request(0, params), None) {
        Ok(c) => {
            let _ = writeln!(io.stdout, "{}", c.devname.display());
            0
        }
        Err(e) => fail(io, &e),
    }
}

const DESTROY_USAGE: Usage =
    Usage("destroy [-h] <-p pid> <-m minor> | <-d device> [-t timeout secs]");

/// Printed after the `destroy -h` usage.
const DESTROY_NOTE: &str =
    "-d takes /dev/nbdN, an NBD socket path nbd<pid>.<minor>, /dev/xen/blktap-2/tapdev<minor> \
or tapdisk-<minor>; a VBD whose tapdisk has died is released (device disconnected, tapdev link \
removed, minor freed)";

/// Find (pid, minor) from a device name: `nbd<pid>.<minor>`, a kernel NBD device `nbd<N>`
/// (through its sysfs backend identifier), `tapdev<minor>` (the blktap2-style link, any
/// directory), `tapdisk-<minor>`. For the last two the pid is the live tapdisk serving the
/// minor, else that of a dead one whose VBD is still around: the device the tapdev link
/// points to, or the export socket it left behind.
fn resolve_devname(client: &Client, dev: &str) -> Option<(Option<i32>, u16)> {
    if let Some(index) = crate::nbd::kernel::parse_device_name(dev) {
        let (pid, minor) = client.vbd_of_nbd_device(index)?;
        return Some((Some(pid), minor));
    }
    let base = dev.rsplit('/').next()?;
    if let Some(rest) = base.strip_prefix("nbd") {
        let (p, m) = rest.split_once('.')?;
        return Some((Some(parse_num(p)?), parse_num(m)?));
    }
    let minor = match tapdev::parse_tapdev_name(base) {
        Some(m) => m,
        None => parse_num(base.strip_prefix("tapdisk-")?)?,
    };
    let pid = client
        .list()
        .ok()?
        .into_iter()
        .find(|e| e.minor == Some(minor) && e.pid.is_some())
        .and_then(|e| e.pid)
        .or_else(|| dead_vbd_pid(client, dev, minor));
    Some((pid, minor))
}

/// The pid of a tapdisk that is gone but left VBD `minor` behind: the owner of the kernel
/// device the tapdev link `dev` points to, else the pid in a leftover export socket
/// `nbd<pid>.<minor>`.
fn dead_vbd_pid(client: &Client, dev: &str, minor: u16) -> Option<i32> {
    if dev.contains('/') {
        if let Ok(target) = std::fs::read_link(dev) {
            let owner = crate::nbd::kernel::parse_device_name(&target.to_string_lossy())
                .and_then(|index| client.vbd_of_nbd_device(index));
            if let Some((pid, m)) = owner {
                if m == minor {
                    return Some(pid);
                }
            }
        }
    }
    client.pid_of_minor(minor)
}

fn cmd_destroy(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    let (mut pid, mut minor, mut timeout, mut dev) = (None::<i32>, None::<u16>, None, None);
    for o in options(args, "hp:m:t:d:") {
        match o {
            Opt::Flag('h') => {
                let st = DESTROY_USAGE.help(io);
                let _ = writeln!(io.stdout, "{DESTROY_NOTE}");
                return st;
            }
            Opt::Value('p', v) => pid = parse_num(&v),
            Opt::Value('m', v) => minor = parse_num(&v),
            Opt::Value('t', v) => match parse_num::<u64>(&v) {
                Some(t) => timeout = Some(Duration::from_secs(t)),
                None => return DESTROY_USAGE.bad(io),
            },
            Opt::Value('d', v) => dev = Some(v),
            _ => return DESTROY_USAGE.bad(io),
        }
    }
    if let Some(d) = dev {
        match resolve_devname(client, &d) {
            Some((p, m)) => {
                pid = pid.or(p);
                minor = minor.or(Some(m));
            }
            None => {
                return fail(
                    io,
                    &ControlError::os(format!("no device {d}"), nix::errno::Errno::ENOENT),
                )
            }
        }
    }
    let (Some(pid), Some(minor)) = (pid, minor) else {
        return DESTROY_USAGE.bad(io);
    };
    match client.destroy(pid, minor, false, timeout) {
        Ok(()) => 0,
        Err(e) => fail(io, &e),
    }
}

const SPAWN_USAGE: Usage = Usage("spawn [-h]");

fn cmd_spawn(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    if let Some(o) = options(args, "h").next() {
        return match o {
            Opt::Flag('h') => SPAWN_USAGE.help(io),
            _ => SPAWN_USAGE.bad(io),
        };
    }
    match client.spawn() {
        Ok(pid) => {
            if io.tty {
                let _ = writeln!(io.stdout, "tapdisk spawned with pid {pid}");
            } else {
                let _ = writeln!(io.stdout, "{pid}");
            }
            0
        }
        Err(e) => fail(io, &e),
    }
}

/// Parse `-p pid -m minor` (+ extra options handled by `extra`); both required.
fn pid_minor(
    args: &[String],
    spec: &str,
    mut extra: impl FnMut(&Opt) -> bool,
) -> Result<(i32, u16), bool> {
    let (mut pid, mut minor) = (None::<i32>, None::<u16>);
    for o in options(args, spec) {
        match &o {
            Opt::Flag('h') => return Err(true),
            Opt::Value('p', v) if set_num(&mut pid, v) => {}
            Opt::Value('m', v) if set_num(&mut minor, v) => {}
            _ => {
                if !extra(&o) {
                    return Err(false);
                }
            }
        }
    }
    match (pid, minor) {
        (Some(p), Some(m)) => Ok((p, m)),
        _ => Err(false),
    }
}

fn usage_result(u: &Usage, help: bool, io: &mut CliIo<'_>) -> Status {
    if help {
        u.help(io)
    } else {
        u.bad(io)
    }
}

const ATTACH_USAGE: Usage = Usage("attach [-h] <-p pid> <-m minor>");
const DETACH_USAGE: Usage = Usage("detach [-h] <-p pid> <-m minor>");

fn cmd_attach_detach(client: &Client, args: &[String], io: &mut CliIo<'_>, attach: bool) -> Status {
    let usage = if attach { &ATTACH_USAGE } else { &DETACH_USAGE };
    let (pid, minor) = match pid_minor(args, "hp:m:", |_| false) {
        Ok(v) => v,
        Err(help) => return usage_result(usage, help, io),
    };
    let r = if attach {
        client.attach(pid, minor)
    } else {
        client.detach(pid, minor)
    };
    match r {
        Ok(()) => 0,
        Err(e) => fail(io, &e),
    }
}

const OPEN_USAGE: Usage = Usage(
    "open [-h] <-p pid> <-m minor> <-a type:/path/to/file> [-R readonly] [-D no O_DIRECT] \
[-r turn on read caching into leaf node] [-e <minor> stack on existing tapdisk for the parent chain] \
[-2 <path> use secondary image (in mirror mode if no -s)] [-s fail over to the secondary image on ENOSPC] \
[-t request timeout in seconds] [-C <path> logpath] [-E read encryption key from stdin]",
);

/// Read the `-E` key from stdin: at most 1024 bytes, exactly 32 or 64 accepted.
fn read_key(stdin: &mut dyn Read) -> Result<SecretKey, String> {
    let mut buf = zeroize::Zeroizing::new(vec![0u8; 1025]);
    let mut n = 0;
    while n < 1024 {
        match stdin.read(&mut buf[n..1024]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("failed to read key: {e}")),
        }
    }
    if n != 32 && n != 64 {
        return Err(format!(
            "invalid key length {n} (must be 32 or 64 bytes, for AES-XTS-128/256)"
        ));
    }
    Ok(SecretKey::new(&buf[..n]))
}

fn cmd_open(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    let mut oo = OpenOpts::default();
    let mut want_key = false;
    let (pid, minor) = match pid_minor(args, "hp:m:a:RDre:2:st:C:E", |o| match o {
        Opt::Flag('E') => {
            want_key = true;
            true
        }
        _ => oo.apply(o) == Some(true),
    }) {
        Ok(v) => v,
        Err(help) => return usage_result(&OPEN_USAGE, help, io),
    };
    let Some(params) = oo.params.clone() else {
        return OPEN_USAGE.bad(io);
    };
    let mut req = oo.request(minor, params);
    if want_key {
        match read_key(io.stdin) {
            Ok(k) => req.set_key(Some(k)),
            Err(msg) => {
                let _ = writeln!(io.stderr, "{msg}");
                return 1;
            }
        }
    }
    match client.open(pid, req, None) {
        Ok(_) => 0,
        Err(e) => fail(io, &e),
    }
}

const CLOSE_USAGE: Usage = Usage("close [-h] <-p pid> <-m minor> [-f force] [-t timeout secs]");

fn parse_timeout(o: &Opt, timeout: &mut Option<Duration>) -> bool {
    match o {
        Opt::Value('t', v) => match parse_num::<u64>(v) {
            Some(t) => {
                *timeout = Some(Duration::from_secs(t));
                true
            }
            None => false,
        },
        _ => false,
    }
}

fn cmd_close(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    let mut force = false;
    let mut timeout = None;
    let (pid, minor) = match pid_minor(args, "hp:m:ft:", |o| match o {
        Opt::Flag('f') => {
            force = true;
            true
        }
        o => parse_timeout(o, &mut timeout),
    }) {
        Ok(v) => v,
        Err(help) => return usage_result(&CLOSE_USAGE, help, io),
    };
    match client.close(pid, minor, force, timeout) {
        Ok(()) => 0,
        Err(e) => fail(io, &e),
    }
}

const PAUSE_USAGE: Usage = Usage("pause [-h] <-p pid> <-m minor> [-t timeout secs]");

fn cmd_pause(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    let mut timeout = None;
    let (pid, minor) = match pid_minor(args, "hp:m:t:", |o| parse_timeout(o, &mut timeout)) {
        Ok(v) => v,
        Err(help) => return usage_result(&PAUSE_USAGE, help, io),
    };
    match client.pause(pid, minor, timeout) {
        Ok(()) => 0,
        Err(e) => fail(io, &e),
    }
}

const UNPAUSE_USAGE: Usage = Usage(
    "unpause [-h] <-p pid> <-m minor> [-a type:/path/to/file] [-2 secondary] \
[-c </path/to/logfile> insert log layer to track changed blocks]",
);

fn cmd_unpause(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    let mut params = None;
    let mut secondary = None;
    let mut log_path = None;
    let (pid, minor) = match pid_minor(args, "hp:m:a:2:c:", |o| {
        match o {
            Opt::Value('a', v) => params = Some(v.clone()),
            Opt::Value('2', v) => secondary = Some(v.clone()),
            Opt::Value('c', v) => log_path = Some(v.clone()),
            _ => return false,
        }
        true
    }) {
        Ok(v) => v,
        Err(help) => return usage_result(&UNPAUSE_USAGE, help, io),
    };
    let mut flags = OpenFlags::empty();
    flags.set(OpenFlags::SECONDARY, secondary.is_some());
    flags.set(OpenFlags::ADD_LOG, log_path.is_some());
    let req = ResumeRequest {
        minor,
        flags,
        params,
        secondary,
        log_path,
    };
    match client.unpause(pid, req, None) {
        Ok(()) => 0,
        Err(e) => fail(io, &e),
    }
}

const STATS_USAGE: Usage = Usage("stats [-h] <-p pid> <-m minor>");

fn cmd_stats(client: &Client, args: &[String], io: &mut CliIo<'_>) -> Status {
    let (mut pid, mut minor) = (None::<i32>, None::<u16>);
    for o in options(args, "hp:m:") {
        match o {
            Opt::Flag('h') => return STATS_USAGE.help(io),
            Opt::Value('p', v) if set_num(&mut pid, &v) => {}
            Opt::Value('m', v) if set_num(&mut minor, &v) => {}
            _ => return STATS_USAGE.bad(io),
        }
    }
    let Some(pid) = pid else {
        return STATS_USAGE.bad(io);
    };
    match client.stats(pid, minor, None) {
        Ok(json) => {
            let _ = io.stdout.write_all(&json);
            let _ = io.stdout.write_all(b"\n\n");
            0
        }
        Err(e) => fail(io, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::msg::VbdState;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn opts(args: &[&str], spec: &str) -> Vec<String> {
        let a = s(args);
        options(&a, spec)
            .map(|o| match o {
                Opt::Flag(c) => format!("{c}"),
                Opt::Value(c, v) => format!("{c}={v}"),
                Opt::Bad => "?".into(),
            })
            .collect()
    }

    #[test]
    fn getopt_spellings() {
        assert_eq!(opts(&["-p", "5", "-m3"], "hp:m:"), vec!["p=5", "m=3"]);
        assert_eq!(
            opts(&["-RDs", "-a", "vhd:/x"], "a:RDs"),
            vec!["R", "D", "s", "a=vhd:/x"]
        );
        assert_eq!(opts(&["-Ra", "vhd:/x"], "a:R"), vec!["R", "a=vhd:/x"]);
        assert_eq!(opts(&["-2", "vhd:/y"], "2:"), vec!["2=vhd:/y"]);
        assert_eq!(opts(&["-x"], "h"), vec!["?"]);
        assert_eq!(opts(&["-p"], "p:"), vec!["?"]);
        assert_eq!(opts(&["--help"], "hp:"), vec!["h"]);
        assert_eq!(opts(&["--bogus"], "hp:"), vec!["?"]);
        assert_eq!(
            opts(&["junk", "-p", "1", "--", "-m", "2"], "p:m:"),
            vec!["p=1"]
        );
        assert_eq!(opts(&["-p", "-m"], "p:m:"), vec!["p=-m"]);
    }

    #[test]
    fn list_formats() {
        let entry =
            |pid, minor, state: Option<u32>, ty: Option<&str>, path: Option<&str>| TapEntry {
                pid,
                minor,
                state: state.map(VbdState),
                disk_type: ty.map(str::to_string),
                path: path.map(str::to_string),
            };
        // (entry, TTY row, non-TTY line)
        let cases = [
            (
                entry(
                    Some(1234),
                    Some(0),
                    Some(0),
                    Some("vhd"),
                    Some("/storage/a.vhd"),
                ),
                "    1234    0    0        vhd /storage/a.vhd\n",
                "pid=1234 minor=0 state=0 args=vhd:/storage/a.vhd\n",
            ),
            (
                entry(Some(77), Some(12), Some(VbdState::CLOSED.0), None, None),
                "      77   12  0x2          - -\n",
                "pid=77 minor=12 state=0x2\n",
            ),
            (
                entry(Some(5), None, None, None, None),
                "       5    -    -          - -\n",
                "pid=5\n",
            ),
            (
                entry(None, Some(3), None, None, None),
                "       -    3    -          - -\n",
                "minor=3\n",
            ),
            (
                entry(
                    Some(123456789),
                    Some(16383),
                    Some(0x220),
                    Some("x-chain-long"),
                    Some("/p"),
                ),
                "123456789 16383 0x220 x-chain-long /p\n",
                "pid=123456789 minor=16383 state=0x220 args=x-chain-long:/p\n",
            ),
        ];
        for (e, row, dict) in cases {
            assert_eq!(format_list_row(&e), row);
            assert_eq!(format_list_dict(&e), dict);
        }
    }

    #[test]
    fn key_from_stdin_must_be_32_or_64_bytes() {
        for (n, ok) in [
            (0, false),
            (31, false),
            (32, true),
            (33, false),
            (64, true),
            (2000, false),
        ] {
            let data = vec![1u8; n];
            let r = read_key(&mut &data[..]);
            assert_eq!(r.is_ok(), ok, "{n}");
            if ok {
                assert_eq!(r.unwrap().len(), n);
            }
        }
    }

    /// Run tap-ctl `args` against `client`: (status, stdout, stderr).
    fn run_client(
        client: &Client,
        args: &[&str],
        stdin: &[u8],
        tty: bool,
    ) -> (i32, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut inp = stdin;
        let st = {
            let mut io = CliIo {
                stdout: &mut out,
                stderr: &mut err,
                stdin: &mut inp,
                tty,
            };
            run_with(client, &s(args), &mut io)
        };
        (
            st,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn run_capture(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
        let d = tempfile::tempdir().unwrap();
        run_client(&Client::with_dir(d.path()), args, stdin, false)
    }

    #[test]
    fn usage_paths() {
        let (st, out, _) = run_capture(&[], b"");
        assert_eq!((st, out.as_str()), (0, USAGE));
        let (st, out, _) = run_capture(&["frobnicate"], b"");
        assert_eq!((st, out.as_str()), (0, USAGE));
        let (st, out, _) = run_capture(&["attach", "-h"], b"");
        assert_eq!(st, 0);
        assert!(out.starts_with("usage: attach"));
        let (st, out, err) = run_capture(&["attach", "-p", "1"], b"");
        assert_eq!(st, libc::EINVAL);
        assert!(out.is_empty());
        assert!(err.starts_with("usage: attach"));
        let (st, _, err) = run_capture(&["open", "-p", "1", "-m", "2"], b"");
        assert_eq!(st, libc::EINVAL);
        assert!(err.starts_with("usage: open"));
        let (st, _, err) = run_capture(&["pause", "-p", "1", "-m", "2", "-t", "x"], b"");
        assert_eq!(st, libc::EINVAL);
        assert!(err.starts_with("usage: pause"));
        for cmd in [
            "list", "allocate", "free", "create", "destroy", "spawn", "attach", "detach", "open",
            "close", "pause", "unpause", "stats",
        ] {
            let (st, out, _) = run_capture(&[cmd, "--help"], b"");
            assert_eq!(st, 0, "{cmd}");
            assert!(out.starts_with(&format!("usage: {cmd}")), "{cmd}: {out}");
        }
        let (_, out, _) = run_capture(&["create", "-h"], b"");
        assert!(out.contains("BLKTAP_NBD_DEVICE=0"), "{out}");
    }

    #[test]
    fn errors_exit_with_errno_and_strerror() {
        // No tapdisk with that pid: connect fails with ENOENT.
        let (st, _, err) = run_capture(&["attach", "-p", "99999", "-m", "1"], b"");
        assert_eq!(st, libc::ENOENT);
        assert_eq!(err, "No such file or directory\n");
        let (st, _, err) = run_capture(&["free", "-m", "4"], b"");
        assert_eq!(st, libc::ENOENT);
        assert_eq!(err, "No such file or directory\n");
        // Bad key length exits 1 before any connection is made.
        let (st, _, err) = run_capture(
            &["open", "-p", "99999", "-m", "1", "-a", "vhd:/x", "-E"],
            &[0u8; 16],
        );
        assert_eq!(st, 1);
        assert!(err.contains("invalid key length 16"));
    }

    #[test]
    fn spawn_output_tty_and_not() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let script = d.path().join("fake-tapdisk");
        std::fs::write(&script, "#!/bin/sh\necho \"$BLKTAP_CONTROL_DIR/ctl4321\"\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let client = Client::with_dir(d.path()).with_tapdisk(&script);
        for (tty, want) in [(true, "tapdisk spawned with pid 4321\n"), (false, "4321\n")] {
            let (st, out, _) = run_client(&client, &["spawn"], b"", tty);
            assert_eq!((st, out.as_str()), (0, want));
        }
    }

    #[test]
    fn allocate_list_free_without_tapdisks() {
        let d = tempfile::tempdir().unwrap();
        let client = Client::with_dir(d.path());
        let run = |args: &[&str], tty: bool| {
            let (st, out, _) = run_client(&client, args, b"", tty);
            (st, out)
        };
        let (st, out) = run(&["allocate"], false);
        assert_eq!(st, 0);
        assert_eq!(out, format!("{}/tapdisk/tapdisk-0\n", d.path().display()));
        run(&["allocate"], false);
        assert_eq!(run(&["list"], false), (0, "minor=0\nminor=1\n".into()));
        assert_eq!(
            run(&["list"], true),
            (
                0,
                "       -    0    -          - -\n       -    1    -          - -\n".into()
            )
        );
        assert_eq!(run(&["list", "-m", "1"], false), (0, "minor=1\n".into()));
        assert_eq!(run(&["list", "-p", "3"], false), (0, String::new()));
        assert_eq!(run(&["free", "-m", "0"], false).0, 0);
        assert_eq!(run(&["list"], false), (0, "minor=1\n".into()));
    }
}
