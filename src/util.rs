//! Small helpers shared by the binaries and daemons.

pub mod logging;

/// Whether standard output is a terminal (progress bars and TTY-only formats key off this).
pub fn stdout_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}
