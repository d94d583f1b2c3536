//! Small helpers shared by the binaries and daemons.

pub mod abuf;
pub mod getopt;
pub mod logging;

pub use abuf::AlignedBuf;

/// Whether standard output is a terminal (progress bars and TTY-only formats key off this).
pub fn stdout_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}

/// An on/off environment switch: unset, or anything but `0`, `no`, `off` or `false` (any
/// case, surrounding blanks ignored), is on.
pub fn switched_on(value: Option<&std::ffi::OsStr>) -> bool {
    let Some(v) = value.and_then(|v| v.to_str()) else {
        return true;
    };
    !["0", "no", "off", "false"]
        .iter()
        .any(|n| v.trim().eq_ignore_ascii_case(n))
}

/// An error with its causes, `outer: cause: root cause`: the Display of `e`, then the
/// Display of each source that the text so far does not already end with.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_switch_values() {
        use std::ffi::OsStr;
        assert!(switched_on(None));
        for on in ["1", "yes", "", "on"] {
            assert!(switched_on(Some(OsStr::new(on))), "{on:?}");
        }
        for off in ["0", "no", "OFF", "False", " 0\n"] {
            assert!(!switched_on(Some(OsStr::new(off))), "{off:?}");
        }
    }

    /// A two-level error like control's and tapback's (the test stays inside util).
    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("connect /x/ctl1")]
        Io(#[source] std::io::Error),
    }
    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("tapdisk control")]
        Control(#[from] Inner),
    }

    #[test]
    fn error_chain_appends_each_cause_once() {
        let e = Inner::Io(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.to_string(), "connect /x/ctl1");
        assert_eq!(
            error_chain(&e),
            "connect /x/ctl1: No such file or directory (os error 2)"
        );
        let t = Outer::from(e);
        assert_eq!(t.to_string(), "tapdisk control");
        assert_eq!(
            error_chain(&t),
            "tapdisk control: connect /x/ctl1: No such file or directory (os error 2)"
        );
        let plain = std::io::Error::other("x");
        assert_eq!(error_chain(&plain), "x");
    }
}
