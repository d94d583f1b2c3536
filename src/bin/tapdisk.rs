//! tapdisk: the blktap3 disk daemon.
//!
//! Spawn protocol (what `tap-ctl spawn` expects): started without `-D`, tapdisk re-executes
//! itself as `tapdisk --daemon-child` in a new session (setsid) with stdin on /dev/null and
//! stdout and stderr on pipes. The child binds its control socket, points its stderr at
//! /dev/null and writes `"<control dir>/ctl<pid>\n"`; the parent copies that line to its own
//! stdout and exits 0. The daemon's pid is the child's. No fork() is needed.
//!
//! Start-up failures are not lost: a child that exits before the line prints its error
//! chain on stderr (the pipe); the parent relays that text to its own stderr (tap-ctl's)
//! and exits with the child's exit status, the errno of the failure (e.g. 20 ENOTDIR when
//! the control directory cannot be created).
//!
//! Logging is `util::logging`: syslog (`LOG_DAEMON`), plus stderr with `-D`. Once running,
//! a daemon's only sink is syslog: if /dev/log cannot be reached its records go to stderr,
//! which is /dev/null by then.
//!
//! `-D` runs in the foreground (logs to stderr as well as syslog). `--open TYPE:PATH`
//! attaches and opens one VBD at start-up (minor `--minor`, default 0), for benchmarks and
//! manual testing without tap-ctl; its NBD socket is `<control dir>/nbd<pid>.<minor>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use log::{error, info, warn, LevelFilter};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use blktap3::control::msg::{OpenFlags, OpenRequest, Reply, Request};
use blktap3::control::server::{serve_connection, ControlServer, MAX_CONNECTIONS};
use blktap3::control::{control_dir, minors, ControlError};
use blktap3::image::crypto::KeySource;
use blktap3::tapdisk::daemon::Config;
use blktap3::tapdisk::io::EngineChoice;
use blktap3::tapdisk::{Tapdisk, TapdiskError};
use blktap3::util::error_chain;
use blktap3::util::logging::{self, LogOptions, Logger};

/// Upper bound of `TAPDISK3_POLL_US`: a longer window only burns more of dom0's CPU.
const MAX_POLL_US: u64 = 10_000;

#[derive(Parser, Debug)]
#[command(
    name = "tapdisk",
    about = "blktap3 disk daemon: serves VBDs (raw, VHD, encrypted VHD) to Xen guests over blkif rings and to dom0 over NBD",
    after_help = "Environment:\n  \
        TAPDISK3_DIRECT_IO=0   open images buffered (through dom0's page cache) instead of with O_DIRECT\n  \
        TAPDISK3_IO=ENGINE     reads and writes from the event loop with uring (io_uring, falling back\n                         to aio), aio (Linux AIO) or threads (worker threads only); default aio.\n                         Where the kernel refuses one, the next runs (the log says which)\n  \
        TAPDISK3_AIO=0         same as TAPDISK3_IO=threads (when TAPDISK3_IO is not set)\n  \
        TAPDISK3_IO_THREADS=N  I/O worker threads (default 4)\n  \
        TAPDISK3_POLL_US=N     poll each guest ring for N microseconds (at most 10000) after its last\n                         request instead of waiting for the guest's event (default 0: off)\n  \
        TAPDISK3_INLINE_IO=0   never run I/O of tmpfs/ramfs images on the event loop\n  \
        TAPDISK3_CRYPTO_KEYDIR comma-separated key directories"
)]
struct Args {
    /// Do not daemonise; also log to stderr.
    #[arg(short = 'D')]
    foreground: bool,
    /// Internal: the re-executed daemon process.
    #[arg(long, hide = true)]
    daemon_child: bool,
    /// Attach and open this image ("aio:/path" or "vhd:/path") at start-up.
    #[arg(long, value_name = "TYPE:PATH")]
    open: Option<String>,
    /// Minor for --open.
    #[arg(long, default_value_t = 0)]
    minor: u16,
    /// Open --open's image read-only.
    #[arg(long)]
    read_only: bool,
    /// Write the daemon's pid to this file (removed at exit).
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Log debug messages.
    #[arg(long)]
    debug: bool,
}

/// What stops tapdisk from starting (or running).
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}")]
    Sys(&'static str, #[source] nix::Error),
    #[error(transparent)]
    Tapdisk(#[from] TapdiskError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("start control thread")]
    Thread(#[source] std::io::Error),
    #[error("write pidfile {0}")]
    Pidfile(String, #[source] std::io::Error),
}

impl MainError {
    /// The errno the process exits with.
    fn errno(&self) -> i32 {
        match self {
            MainError::Sys(_, e) => *e as i32,
            MainError::Tapdisk(TapdiskError::Sys { source, .. })
            | MainError::Thread(source)
            | MainError::Pidfile(_, source) => source.raw_os_error().unwrap_or(libc::EIO),
            MainError::Control(e) => e.errno(),
        }
    }
}

/// An errno as an exit status (1 when it does not fit).
fn exit_status(errno: i32) -> ExitCode {
    ExitCode::from(u8::try_from(errno).ok().filter(|&c| c != 0).unwrap_or(1))
}

/// Parent side of the spawn: start the daemon child, relay its socket line, or, if it
/// fails to start, relay what it said on stderr and its exit status.
fn spawn_daemon() -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("tapdisk: cannot find own executable: {e}");
            return exit_status(e.raw_os_error().unwrap_or(libc::EIO));
        }
    };
    // args_os: a non-UTF-8 argument (a --pidfile path) must reach the child unchanged;
    // env::args() would panic on it.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--daemon-child".into());
    let mut child = match Command::new(&exe)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tapdisk: spawn {}: {e}", exe.display());
            return exit_status(e.raw_os_error().unwrap_or(libc::EIO));
        }
    };
    // Drain the child's stderr on the side so it can never block on a full pipe.
    let said = child.stderr.take().map(|err| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let mut err = err;
            let _ = err.by_ref().take(64 << 10).read_to_string(&mut text);
            let _ = std::io::copy(&mut err, &mut std::io::sink());
            text
        })
    });
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.ends_with('\n') {
        print!("{line}");
        let _ = std::io::stdout().flush();
        return ExitCode::SUCCESS;
    }
    // No readiness line: the child is exiting (its stdout is closed).
    let status = child.wait();
    let said = said.and_then(|t| t.join().ok()).unwrap_or_default();
    let said = said.trim_end();
    if !said.is_empty() {
        eprintln!("{said}");
    }
    match status {
        Ok(s) => {
            if said.is_empty() {
                eprintln!("tapdisk: daemon failed to start ({s})");
            }
            s.code().map_or(ExitCode::from(1), exit_status)
        }
        Err(e) => {
            eprintln!("tapdisk: daemon failed to start: wait: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.foreground && !args.daemon_child {
        return spawn_daemon();
    }
    if args.daemon_child {
        // New session: no controlling terminal, not in tap-ctl's process group.
        let _ = nix::unistd::setsid();
        let _ = std::env::set_current_dir("/");
    }
    let level = if args.debug {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    let logger = Logger::new(&LogOptions::daemon("tapdisk", level, args.foreground));
    let logs_to_stderr = logger.has_stderr();
    logging::install(logger);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = error_chain(&e);
            error!("{msg}");
            // Before the readiness line, stderr is the spawner's pipe: say it there too.
            if !logs_to_stderr {
                eprintln!("tapdisk: {msg}");
            }
            exit_status(e.errno())
        }
    }
}

fn run(args: &Args) -> Result<(), MainError> {
    // Block the signals we handle before any thread starts, so they all inherit the mask.
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| MainError::Sys("sigprocmask", e))?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| MainError::Sys("signalfd", e))?;

    let dir = control_dir();
    let mut cfg = Config::new(&dir);
    cfg.keys = KeySource::from_env();
    if let Some(n) = std::env::var("TAPDISK3_IO_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        cfg.io_threads = n.clamp(1, 64);
    }
    cfg.inline_io = blktap3::util::switched_on(std::env::var_os("TAPDISK3_INLINE_IO").as_deref());
    cfg.direct_io = blktap3::util::switched_on(std::env::var_os("TAPDISK3_DIRECT_IO").as_deref());
    cfg.io_engine = EngineChoice::from_env(
        std::env::var_os("TAPDISK3_IO").as_deref(),
        std::env::var_os("TAPDISK3_AIO").as_deref(),
    )
    .unwrap_or_else(|e| {
        warn!("{e}: using the default engine");
        EngineChoice::Auto
    });
    if let Ok(v) = std::env::var("TAPDISK3_POLL_US") {
        match v.trim().parse::<u64>() {
            Ok(us) => {
                if us > MAX_POLL_US {
                    warn!("TAPDISK3_POLL_US={us}: at most {MAX_POLL_US} is used");
                }
                cfg.ring_poll = std::time::Duration::from_micros(us.min(MAX_POLL_US));
            }
            Err(e) => warn!("TAPDISK3_POLL_US={v:?}: {e}: ring polling stays off"),
        }
    }
    let pid = cfg.pid;
    let mut td = Tapdisk::new(cfg)?;
    td.set_signal_fd(sigfd)?;
    let server = Arc::new(ControlServer::bind(&dir, pid)?);
    let active = Arc::new(AtomicUsize::new(0));
    {
        let server = Arc::clone(&server);
        let active = Arc::clone(&active);
        let h = td.handle();
        std::thread::Builder::new()
            .name("td-ctl".into())
            .spawn(move || control_thread(&server, &active, &h))
            .map_err(MainError::Thread)?;
    }
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{pid}\n"))
            .map_err(|e| MainError::Pidfile(p.display().to_string(), e))?;
    }
    if let Some(params) = args.open.clone() {
        let h = td.handle();
        let (minor, ro, dir) = (args.minor, args.read_only, dir.clone());
        std::thread::spawn(move || {
            // Create the marker if needed (tap-ctl allocate would have).
            let marker = minors::marker_path(&dir, minor);
            if let Some(d) = marker.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            if !marker.exists() {
                let _ = std::fs::write(&marker, b"");
            }
            let r = h.call(Request::Attach { minor });
            if r != Reply::Attach {
                error!("--open: attach minor {minor}: {r:?}");
                return;
            }
            let mut o = OpenRequest::new(minor, params.clone());
            if ro {
                o.flags = OpenFlags::RDONLY;
            }
            match h.call(Request::Open(o)) {
                Reply::Open(i) => info!("--open: {params}: {} sectors", i.sectors),
                r => error!("--open: {params}: {r:?}"),
            }
        });
    }
    // The parent exits after reading the readiness line: from then on never write to its
    // pipes. stderr first (nothing after this point is a start-up failure), stdout after
    // the line.
    let null = if args.daemon_child {
        std::fs::File::options().write(true).open("/dev/null").ok()
    } else {
        None
    };
    if let Some(null) = &null {
        let _ = nix::unistd::dup2_stderr(null);
    }
    // The readiness line tap-ctl waits for.
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", server.path().display());
        let _ = out.flush();
    }
    if let Some(null) = &null {
        let _ = nix::unistd::dup2_stdout(null);
    }
    info!("tapdisk {pid} listening on {}", server.path().display());
    let res = td.run().map_err(MainError::from);
    drop(td);
    // Let replies already handed to the control thread (the last DETACH) reach their peer.
    let deadline = Instant::now() + Duration::from_secs(2);
    while active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(server.path());
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    info!("tapdisk {pid} exiting");
    res
}

/// Accept control connections; serve each on its own thread (at most MAX_CONNECTIONS).
fn control_thread(
    server: &ControlServer,
    active: &Arc<AtomicUsize>,
    h: &blktap3::tapdisk::CtlHandle,
) {
    loop {
        while active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            std::thread::sleep(Duration::from_millis(5));
        }
        let stream = match server.accept() {
            Ok(s) => s,
            Err(e) => {
                warn!("control: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Release pairs with the Acquire loads above and at exit.
        active.fetch_add(1, Ordering::AcqRel);
        let active2 = Arc::clone(active);
        let h = h.clone();
        let spawned = std::thread::Builder::new()
            .name("td-ctl-conn".into())
            .spawn(move || {
                serve_connection(stream, &mut |r| h.call(r));
                active2.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
