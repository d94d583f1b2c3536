//! The `tapback` process: command line, logging, daemonising, pid file, signals and the
//! poll loop around [`Backend`].
//!
//! ```text
//! tapback [-d] [-v] [-n NAME] [-p PIDFILE] [-x DOMID] [-b] [-q N] [-h]
//! ```
//!
//! | option | meaning |
//! |---|---|
//! | `-d`, `--debug` | stay in the foreground and log to stderr as well as syslog |
//! | `-v`, `--verbose` | debug-level logging |
//! | `-n`, `--name NAME` | backend type, default `vbd3` (watches `backend/NAME`) |
//! | `-p`, `--pidfile FILE` | write our pid there (removed on a clean exit) |
//! | `-x`, `--domain DOMID` | serve only frontend domain DOMID |
//! | `-b`, `--nobarrier` | advertise `feature-barrier=0` |
//! | `-q`, `--max-queues N` | advertise `multi-queue-max-queues=N` (1..=16, default 4) |
//! | `-h`, `--help` | usage |
//!
//! Environment: `XENSTORED_PATH` names the xenstored socket (or xenbus device) to use instead
//! of the defaults, as libxenstore does; `BLKTAP_CONTROL_DIR` the tapdisk control directory.
//! The hidden option `--no-gntdev-check` lets tapback start where `/dev/xen/gntdev` is absent
//! (tests against a fake xenstored).
//!
//! Daemonising without `fork()` in a Rust process: tapback re-executes itself
//! (`/proc/self/exe`, same arguments) with [`DAEMON_CHILD_ENV`] set and stdout on a pipe. The
//! child calls `setsid()`, sets up everything, writes `ready` on the pipe and points its
//! standard streams at `/dev/null`; the parent exits 0 when it reads `ready`, or with the
//! child's status if the child dies first. Start-up errors therefore still reach the caller's
//! stderr and exit status.
//!
//! SIGTERM and SIGINT end the process cleanly: watches are dropped with the connection, the
//! pid file is removed, devices are left as they are (their rings stay connected in tapdisk;
//! a new tapback takes them over). SIGHUP is ignored.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::control::client::Client;
use crate::control::msg::MAX_QUEUES;
use crate::tapback::{
    Backend, BackendConfig, ControlTapdisks, Result, TapbackError, DEFAULT_MAX_QUEUES,
    DEFAULT_NAME, MAX_RING_ORDER,
};
use crate::util::error_chain;
use crate::util::logging::{self, LogOptions};
use crate::xen::xenstore::client::xenstored_path_from_env;
use crate::xen::xenstore::{XenStore, XsClient};

/// Set in the environment of the re-executed daemon child.
pub const DAEMON_CHILD_ENV: &str = "TAPBACK_DAEMON_CHILD";
/// Overrides the xenstored socket path (libxenstore's variable).
pub use crate::xen::xenstore::client::XENSTORED_PATH_ENV;
/// The grant device tapback requires (tapdisk maps rings through it).
pub const GNTDEV: &str = "/dev/xen/gntdev";

/// The command line.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "tapback",
    about = "xenstore backend for blktap3 vbd3 devices",
    disable_version_flag = true
)]
pub struct Options {
    /// Stay in the foreground and log to stderr too.
    #[arg(short = 'd', long = "debug")]
    pub debug: bool,
    /// Verbose (debug-level) logging.
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// Backend type name (watches backend/NAME).
    #[arg(short = 'n', long = "name", default_value = DEFAULT_NAME)]
    pub name: String,
    /// Write the daemon's pid to this file.
    #[arg(short = 'p', long = "pidfile")]
    pub pidfile: Option<PathBuf>,
    /// Serve only this frontend domain.
    #[arg(short = 'x', long = "domain")]
    pub domid: Option<u16>,
    /// Advertise feature-barrier=0.
    #[arg(short = 'b', long = "nobarrier")]
    pub nobarrier: bool,
    /// Advertise multi-queue-max-queues=N (1..=16; 1: one ring per device).
    #[arg(short = 'q', long = "max-queues", default_value_t = DEFAULT_MAX_QUEUES,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_QUEUES)))]
    pub max_queues: u32,
    /// Start even without /dev/xen/gntdev (tests).
    #[arg(long = "no-gntdev-check", hide = true)]
    pub no_gntdev_check: bool,
}

impl Options {
    /// The backend configuration these options select.
    pub fn backend_config(&self) -> BackendConfig {
        BackendConfig {
            name: self.name.clone(),
            only_domid: self.domid,
            barrier: !self.nobarrier,
            max_ring_order: MAX_RING_ORDER,
            max_queues: self.max_queues,
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed {
    /// Run with these options.
    Run(Options),
    /// Print this text (help) to stdout and exit 0.
    Help(String),
}

/// Parse the arguments (without the program name).
pub fn parse_args(args: &[String]) -> Result<Parsed> {
    let argv = std::iter::once("tapback".to_owned()).chain(args.iter().cloned());
    match Options::try_parse_from(argv) {
        Ok(o) => {
            if !crate::tapback::backend::valid_name(&o.name) {
                return Err(TapbackError::Usage(format!(
                    "bad backend name {:?}",
                    o.name
                )));
            }
            Ok(Parsed::Run(o))
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            Ok(Parsed::Help(e.to_string()))
        }
        Err(e) => Err(TapbackError::Usage(e.to_string().trim_end().to_owned())),
    }
}

/// syslog, plus stderr in the foreground (or when syslog is unreachable).
fn init_logging(opts: &Options) {
    let level = if opts.verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    logging::init(&LogOptions::daemon("tapback", level, opts.debug));
}

/// Connect to xenstore ([`XsClient::open`]: `$XENSTORED_PATH` if set, a socket or a
/// xenbus device node, else the standard sockets, else `/dev/xen/xenbus`).
pub fn open_xenstore() -> Result<XsClient> {
    let op = match xenstored_path_from_env() {
        Some(p) => format!("connect {}", p.display()),
        None => "connect to xenstore".to_owned(),
    };
    XsClient::open().map_err(|source| TapbackError::Io { op, source })
}

/// The pid file, held under an exclusive `flock` while we run (a second tapback with the same
/// pid file refuses to start) and removed when dropped.
struct PidFile {
    path: PathBuf,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl PidFile {
    fn write(path: &Path) -> Result<PidFile> {
        let io = |op: &str, source: std::io::Error| TapbackError::Io {
            op: format!("{op} {}", path.display()),
            source,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("open", e))?;
        let mut lock = match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(l) => l,
            Err((mut f, Errno::EWOULDBLOCK)) => {
                let mut other = String::new();
                let _ = std::io::Read::read_to_string(&mut f, &mut other);
                return Err(TapbackError::Io {
                    op: format!(
                        "{} is held by a running tapback (pid {})",
                        path.display(),
                        other.trim()
                    ),
                    source: std::io::Error::from_raw_os_error(libc::EEXIST),
                });
            }
            Err((_, e)) => return Err(io("lock", e.into())),
        };
        lock.set_len(0).map_err(|e| io("truncate", e))?;
        writeln!(lock, "{}", std::process::id()).map_err(|e| io("write", e))?;
        Ok(PidFile {
            path: path.to_owned(),
            _lock: lock,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Parent side of daemonising: start the child and wait for `ready`. Returns the exit code.
fn spawn_daemon(args: &[String]) -> Result<i32> {
    let exe = std::env::current_exe().map_err(|e| TapbackError::Io {
        op: "find own executable".to_owned(),
        source: e,
    })?;
    let mut child = Command::new(exe)
        .args(args)
        .env(DAEMON_CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| TapbackError::Io {
            op: "start the daemon".to_owned(),
            source: e,
        })?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.trim() == "ready" {
        return Ok(0);
    }
    let status = child.wait().map_err(|e| TapbackError::Io {
        op: "wait for the daemon".to_owned(),
        source: e,
    })?;
    Ok(status.code().unwrap_or(1).max(1))
}

/// Child side of daemonising, once everything is set up: report ready, drop the terminal.
fn detach_stdio() {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = nix::unistd::dup2_stdin(null.as_fd());
        let _ = nix::unistd::dup2_stdout(null.as_fd());
        let _ = nix::unistd::dup2_stderr(null.as_fd());
    }
}

/// Run tapback with `args` (without the program name). Returns the exit status: 0, or the
/// errno of the failure.
pub fn main_with_args(args: &[String]) -> i32 {
    let opts = match parse_args(args) {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help(h)) => {
            print!("{h}");
            return 0;
        }
        Err(e) => {
            eprintln!("tapback: {}", error_chain(&e));
            return e.errno();
        }
    };
    if !opts.no_gntdev_check && !Path::new(GNTDEV).exists() {
        eprintln!("tapback: {GNTDEV} is missing: not a Xen backend domain");
        return libc::ENODEV;
    }
    let child = std::env::var_os(DAEMON_CHILD_ENV).is_some();
    if !opts.debug && !child {
        return match spawn_daemon(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("tapback: {}", error_chain(&e));
                e.errno()
            }
        };
    }
    if child {
        // We are not a process-group leader (the parent is), so this succeeds.
        if let Err(e) = nix::unistd::setsid() {
            eprintln!("tapback: setsid: {e}");
        }
        let _ = std::env::set_current_dir("/");
    }
    init_logging(&opts);
    match run(&opts, child) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{}", error_chain(&e));
            if opts.debug || child {
                eprintln!("tapback: {}", error_chain(&e));
            }
            e.errno()
        }
    }
}

fn run(opts: &Options, daemon_child: bool) -> Result<()> {
    let sig_err = |op: &str, e: Errno| TapbackError::Io {
        op: op.to_owned(),
        source: e.into(),
    };
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGHUP);
    mask.thread_block()
        .map_err(|e| sig_err("block signals", e))?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| sig_err("signalfd", e))?;

    let xs = open_xenstore()?;
    let tap = ControlTapdisks::new(Client::new());
    let _pid = opts.pidfile.as_deref().map(PidFile::write).transpose()?;
    let mut backend = Backend::new(xs, tap, opts.backend_config(), Instant::now())?;
    log::info!("tapback {} started", std::process::id());
    if daemon_child {
        detach_stdio();
    }
    serve(&mut backend, &sigfd)
}

/// The poll loop: watch events, retry timers, signals. Returns on SIGTERM/SIGINT.
pub fn serve<X: XenStore, T: crate::tapback::TapdiskOps>(
    backend: &mut Backend<X, T>,
    sigfd: &SignalFd,
) -> Result<()> {
    loop {
        backend.handle_events(Instant::now())?;
        backend.tick(Instant::now());
        let timeout = match backend.next_deadline() {
            // Events already taken off the socket (during tick's xenstore calls) would not
            // wake the poll below.
            _ if backend.more_events() || backend.xs().has_pending_events() => PollTimeout::ZERO,
            None => PollTimeout::NONE,
            Some(t) => {
                let ms = t.saturating_duration_since(Instant::now()).as_millis() + 1;
                PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX))
            }
        };
        let mut fds = [
            PollFd::new(backend.xs().as_fd(), PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                return Err(TapbackError::Io {
                    op: "poll".to_owned(),
                    source: e.into(),
                })
            }
        }
        let xs_hup = fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR));
        while let Ok(Some(si)) = sigfd.read_signal() {
            match Signal::try_from(si.ssi_signo as i32) {
                Ok(Signal::SIGTERM) | Ok(Signal::SIGINT) => {
                    log::info!("tapback exiting on signal {}", si.ssi_signo);
                    return Ok(());
                }
                _ => log::debug!("ignoring signal {}", si.ssi_signo),
            }
        }
        if xs_hup {
            // handle_events reports the closed connection as an error.
            backend.handle_events(Instant::now())?;
            return Err(TapbackError::Io {
                op: "xenstore".to_owned(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed> {
        parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options() {
        let Parsed::Run(o) = p(&[]).unwrap() else {
            panic!()
        };
        assert_eq!(o.name, "vbd3");
        assert!(!o.debug && !o.verbose && !o.nobarrier && o.domid.is_none());
        assert!(o.backend_config().barrier);
        let Parsed::Run(o) = p(&["-dvb", "-n", "vbd9", "-p", "/run/t.pid", "-x", "7"]).unwrap()
        else {
            panic!()
        };
        assert!(o.debug && o.verbose && o.nobarrier);
        assert_eq!(o.name, "vbd9");
        assert_eq!(o.pidfile, Some(PathBuf::from("/run/t.pid")));
        assert_eq!(o.domid, Some(7));
        let c = o.backend_config();
        assert!(!c.barrier);
        assert_eq!(c.only_domid, Some(7));
        assert!(matches!(p(&["-h"]).unwrap(), Parsed::Help(_)));
        assert!(matches!(p(&["--help"]).unwrap(), Parsed::Help(_)));
        for bad in [
            &["-x", "abc"][..],
            &["-x", "70000"],
            &["-q"],
            &["-n", "a/b"],
            &["-n"],
        ] {
            let e = p(bad).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{bad:?}");
        }
    }
}
