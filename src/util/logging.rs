//! The one `log` backend of the binaries: syslog (`LOG_DAEMON`, RFC 3164) and/or stderr.
//!
//! Daemons log to syslog, plus stderr in the foreground; when syslog cannot be reached
//! (containers, tests) stderr is used so nothing is lost. CLI tools log to stderr only.

use std::sync::Mutex;

type Syslog = syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>;

/// Where and what to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogOptions {
    /// Program name: the syslog tag and, with `prefix_stderr`, the stderr prefix.
    pub ident: String,
    /// Most verbose level logged.
    pub level: log::LevelFilter,
    /// Send records to syslog.
    pub syslog: bool,
    /// Also write records to stderr (forced on when syslog is off or unreachable).
    pub stderr: bool,
    /// Start stderr lines with `<ident>: `.
    pub prefix_stderr: bool,
}

impl LogOptions {
    /// A daemon: syslog, plus stderr (prefixed) when `foreground`.
    pub fn daemon(ident: &str, level: log::LevelFilter, foreground: bool) -> LogOptions {
        LogOptions {
            ident: ident.to_owned(),
            level,
            syslog: true,
            stderr: foreground,
            prefix_stderr: true,
        }
    }

    /// A command-line tool: stderr only, lines `<level>: <message>`.
    pub fn stderr_only(ident: &str, level: log::LevelFilter) -> LogOptions {
        LogOptions {
            ident: ident.to_owned(),
            level,
            syslog: false,
            stderr: true,
            prefix_stderr: false,
        }
    }
}

/// The logger [`init`] installs.
pub struct Logger {
    syslog: Option<Mutex<Syslog>>,
    stderr: bool,
    prefix: Option<String>,
    level: log::LevelFilter,
}

impl Logger {
    /// Build the logger of `opts` (connects to syslog if asked).
    pub fn new(opts: &LogOptions) -> Logger {
        let syslog = if opts.syslog {
            let fmt = syslog::Formatter3164 {
                facility: syslog::Facility::LOG_DAEMON,
                hostname: None,
                process: opts.ident.clone(),
                pid: std::process::id(),
            };
            syslog::unix(fmt).ok().map(Mutex::new)
        } else {
            None
        };
        Logger {
            stderr: opts.stderr || syslog.is_none(),
            syslog,
            prefix: opts.prefix_stderr.then(|| opts.ident.clone()),
            level: opts.level,
        }
    }

    /// Whether records reach syslog.
    pub fn has_syslog(&self) -> bool {
        self.syslog.is_some()
    }

    /// Whether records are written to stderr.
    pub fn has_stderr(&self) -> bool {
        self.stderr
    }

    /// The stderr line of a record (without the newline).
    pub fn stderr_line(&self, level: log::Level, msg: &str) -> String {
        let lvl = level.as_str().to_lowercase();
        match &self.prefix {
            Some(p) => format!("{p}: {lvl}: {msg}"),
            None => format!("{lvl}: {msg}"),
        }
    }
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = r.args().to_string();
        if self.stderr {
            // Not eprintln!, which panics when the write fails: a daemon whose stderr is a
            // file on a full disk (or a closed pipe) must go on serving, not die logging.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "{}",
                self.stderr_line(r.level(), &msg)
            );
        }
        if let Some(s) = &self.syslog {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            let _ = match r.level() {
                log::Level::Error => s.err(&msg),
                log::Level::Warn => s.warning(&msg),
                log::Level::Info => s.info(&msg),
                log::Level::Debug | log::Level::Trace => s.debug(&msg),
            };
        }
    }

    fn flush(&self) {}
}

/// Install the logger of `opts` as the process's `log` backend. Returns false (and
/// changes nothing) if a logger was already installed.
pub fn init(opts: &LogOptions) -> bool {
    install(Logger::new(opts))
}

/// Install an already built logger (to ask it first where records go, e.g. whether
/// stderr is one of its sinks). Returns false if a logger was already installed.
pub fn install(logger: Logger) -> bool {
    let level = logger.level;
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Log;

    #[test]
    fn stderr_lines_and_levels() {
        let cli = Logger::new(&LogOptions::stderr_only("tap-ctl", log::LevelFilter::Debug));
        assert!(!cli.has_syslog());
        assert!(cli.has_stderr());
        assert_eq!(cli.stderr_line(log::Level::Debug, "x y"), "debug: x y");
        let mut o = LogOptions::daemon("tapback", log::LevelFilter::Info, false);
        o.syslog = false;
        let d = Logger::new(&o);
        // No syslog: stderr is forced on so nothing is lost.
        assert!(d.has_stderr());
        assert_eq!(
            d.stderr_line(log::Level::Warn, "gone"),
            "tapback: warn: gone"
        );
        let meta = |l| log::Metadata::builder().level(l).build();
        assert!(d.enabled(&meta(log::Level::Info)));
        assert!(!d.enabled(&meta(log::Level::Debug)));
    }
}
