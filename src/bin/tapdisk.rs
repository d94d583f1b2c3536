//! tapdisk: the blktap3 disk daemon.
//!
//! Spawn protocol (what `tap-ctl spawn` expects): started without `-D`, tapdisk re-executes
//! itself as `tapdisk --daemon-child` in a new session (setsid) with stdin and stderr on
//! /dev/null and stdout on a pipe. The child binds its control socket and writes
//! `"<control dir>/ctl<pid>\n"`; the parent copies that line to its own stdout and exits 0
//! (1 if the child failed). The daemon's pid is the child's. No fork() is needed.
//!
//! `-D` runs in the foreground (logs to stderr as well as syslog). `--open TYPE:PATH`
//! attaches and opens one VBD at start-up (minor `--minor`, default 0), for benchmarks and
//! manual testing without tap-ctl; its NBD socket is `<control dir>/nbd<pid>.<minor>`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use log::{error, info, warn, LevelFilter, Log, Metadata, Record};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use blktap3::control::msg::{OpenFlags, OpenRequest, Reply, Request};
use blktap3::control::server::{serve_connection, ControlServer, MAX_CONNECTIONS};
use blktap3::control::{control_dir, minors};
use blktap3::image::crypto::KeySource;
use blktap3::tapdisk::daemon::Config;
use blktap3::tapdisk::Tapdisk;

#[derive(Parser, Debug)]
#[command(name = "tapdisk", about = "blktap3 disk daemon: serves VBDs over NBD")]
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

/// syslog, plus stderr in the foreground.
struct Logger {
    syslog: Option<syslog::BasicLogger>,
    stderr: bool,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        if let Some(s) = &self.syslog {
            s.log(r);
        }
        if self.stderr {
            eprintln!(
                "tapdisk[{}]: {}: {}",
                std::process::id(),
                r.level(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

fn init_logging(stderr: bool, debug: bool) {
    let fmt = syslog::Formatter3164 {
        facility: syslog::Facility::LOG_DAEMON,
        hostname: None,
        process: "tapdisk".into(),
        pid: std::process::id(),
    };
    let syslog = syslog::unix(fmt).ok().map(syslog::BasicLogger::new);
    let logger = Logger { syslog, stderr };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(if debug {
            LevelFilter::Debug
        } else {
            LevelFilter::Info
        });
    }
}

/// Parent side of the spawn: start the daemon child, relay its socket line.
fn spawn_daemon() -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("tapdisk: cannot find own executable: {e}");
            return ExitCode::from(1);
        }
    };
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--daemon-child".into());
    let mut child = match Command::new(exe)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tapdisk: spawn: {e}");
            return ExitCode::from(1);
        }
    };
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.ends_with('\n') {
        print!("{line}");
        let _ = std::io::stdout().flush();
        ExitCode::SUCCESS
    } else {
        let _ = child.wait();
        eprintln!("tapdisk: daemon failed to start");
        ExitCode::from(1)
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
    init_logging(args.foreground, args.debug);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            if args.foreground {
                eprintln!("tapdisk: {e}");
            }
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
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
        .map_err(|e| format!("sigprocmask: {e}"))?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("signalfd: {e}"))?;

    let dir = control_dir();
    let mut cfg = Config::new(&dir);
    cfg.keys = KeySource::from_env();
    if let Some(n) = std::env::var("TAPDISK3_IO_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        cfg.io_threads = n.clamp(1, 64);
    }
    let pid = cfg.pid;
    let mut td =
        Tapdisk::new(cfg).map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    td.set_signal_fd(sigfd).map_err(|e| e.to_string())?;
    let server = Arc::new(ControlServer::bind(&dir, pid).map_err(|e| e.to_string())?);
    let active = Arc::new(AtomicUsize::new(0));
    {
        let server = Arc::clone(&server);
        let active = Arc::clone(&active);
        let h = td.handle();
        std::thread::Builder::new()
            .name("td-ctl".into())
            .spawn(move || control_thread(&server, &active, &h))
            .map_err(|e| format!("control thread: {e}"))?;
    }
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{pid}\n")).map_err(|e| format!("{}: {e}", p.display()))?;
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
    // The readiness line tap-ctl waits for.
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", server.path().display());
        let _ = out.flush();
    }
    if args.daemon_child {
        // The parent exits after reading the line; never write to that pipe again.
        if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
        }
    }
    info!("tapdisk {pid} listening on {}", server.path().display());
    let res = td.run().map_err(|e| e.to_string());
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
