//! Shared command-line plumbing: option parsing with blktap's usage and exit-status
//! conventions.

use super::error::{Error, Result};
use super::Io;
use crate::util::getopt::{getopt, Parsed};

/// How a command prints its usage and what `-h` returns.
pub struct UsageSpec {
    /// Command name (getopt's program name in error messages).
    pub cmd: &'static str,
    /// getopt option string.
    pub spec: &'static str,
    /// The usage text (printed as is; ends with a newline).
    pub text: &'static str,
    /// blktap prints usage on stderr for `key`, stdout for everything else.
    pub to_stderr: bool,
    /// `-h` is a failure (blktap: EINVAL for some commands, success for others).
    pub h_fails: bool,
}

impl UsageSpec {
    /// Print the usage text.
    pub fn print(&self, io: &mut Io) {
        if self.to_stderr {
            let _ = io.err.write_all(self.text.as_bytes());
        } else {
            let _ = io.out.write_all(self.text.as_bytes());
        }
    }

    /// Print usage and return [`Error::Usage`] (for `return Err(u.fail(io))`).
    pub fn fail(&self, io: &mut Io) -> Error {
        self.print(io);
        Error::Usage
    }

    /// Parse `args`. `Ok(None)`: usage was printed for `-h` or `--help` and the command is
    /// done (blktap: success, or [`Error::Usage`] for `-h` where `h_fails`); getopt errors
    /// print glibc's message on stderr, then usage ([`Error::Usage`]).
    pub fn parse(&self, io: &mut Io, args: &[String]) -> Result<Option<Parsed>> {
        match getopt(self.cmd, args, self.spec) {
            Err(e) => {
                let _ = writeln!(io.err, "{e}");
                Err(self.fail(io))
            }
            Ok(p) if p.long_help => {
                self.print(io);
                Ok(None)
            }
            Ok(p) if p.opts.iter().any(|o| o.letter == 'h') => {
                self.print(io);
                if self.h_fails {
                    Err(Error::Usage)
                } else {
                    Ok(None)
                }
            }
            Ok(p) => Ok(Some(p)),
        }
    }

    /// [`UsageSpec::parse`] for the commands working on one image: `-n NAME` is required
    /// and operands are refused (usage). Returns the options and NAME.
    pub fn parse_named(&self, io: &mut Io, args: &[String]) -> Result<Option<(Parsed, String)>> {
        Ok(self
            .parse_required(io, args, ['n'])?
            .map(|(p, [name])| (p, name)))
    }

    /// [`UsageSpec::parse`] with the option values `letters` required and operands refused
    /// (usage). Returns the options and the required values, in `letters` order.
    pub fn parse_required<const N: usize>(
        &self,
        io: &mut Io,
        args: &[String],
        letters: [char; N],
    ) -> Result<Option<(Parsed, [String; N])>> {
        let Some(p) = self.parse(io, args)? else {
            return Ok(None);
        };
        let values = letters.map(|c| p.value(c).map(str::to_string));
        if values.iter().any(Option::is_none) || !p.operands.is_empty() {
            return Err(self.fail(io));
        }
        Ok(Some((p, values.map(Option::unwrap_or_default))))
    }
}

/// Accessors over parsed options (the last occurrence wins, as with getopt loops).
pub trait OptsExt {
    fn flag(&self, c: char) -> bool;
    fn value(&self, c: char) -> Option<&str>;
}

impl OptsExt for Parsed {
    fn flag(&self, c: char) -> bool {
        self.opts.iter().any(|o| o.letter == c)
    }
    fn value(&self, c: char) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|o| o.letter == c)
            .and_then(|o| o.arg.as_deref())
    }
}

/// A strict MiB/byte/sector count for `-s`-style options: print
/// `invalid <what> '<s>'` and fail on anything but plain decimal digits.
pub fn number(io: &mut Io, what: &str, s: &str) -> Result<u64> {
    parse_u64_strict(s).ok_or_else(|| {
        let _ = writeln!(io.out, "invalid {what} '{s}'");
        Error::invalid(format!("invalid {what} '{s}'"))
    })
}

/// C's number prefix: leading whitespace skipped, then an optional sign (`true` for `-`).
fn split_sign(s: &str) -> (bool, &str) {
    let t = s.trim_start();
    match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    }
}

/// C `strtoull(s, NULL, 10)`: leading whitespace, optional sign, then as many decimal
/// digits as there are; no digits gives 0; overflow saturates at `u64::MAX`; a minus sign
/// negates modulo 2^64 as C does.
pub fn strtoull(s: &str) -> u64 {
    let (neg, digits) = split_sign(s);
    let mut v: u64 = 0;
    for b in digits.bytes().take_while(u8::is_ascii_digit) {
        match v
            .checked_mul(10)
            .and_then(|x| x.checked_add(u64::from(b - b'0')))
        {
            Some(n) => v = n,
            None => return u64::MAX,
        }
    }
    if neg {
        v.wrapping_neg()
    } else {
        v
    }
}

/// C `strtol(s, NULL, 10)` on a 64-bit long: saturates at the i64 range.
pub fn strtol(s: &str) -> i64 {
    let (neg, digits) = split_sign(s);
    let mut v: i64 = 0;
    for b in digits.bytes().take_while(u8::is_ascii_digit) {
        let d = i64::from(b - b'0');
        let next = v.checked_mul(10).and_then(|x| {
            if neg {
                x.checked_sub(d)
            } else {
                x.checked_add(d)
            }
        });
        match next {
            Some(n) => v = n,
            None => return if neg { i64::MIN } else { i64::MAX },
        }
    }
    v
}

/// A strict decimal parse for sizes: the whole string must be digits (no sign, no
/// suffix). vhd-util's C code accepts garbage as 0; we reject it with EINVAL instead.
pub fn parse_u64_strict(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: UsageSpec = UsageSpec {
        cmd: "demo",
        spec: "n:vh",
        text: "options: <-n name> [-v] [-h help]\n",
        to_stderr: false,
        h_fails: false,
    };

    fn run(args: &[&str]) -> (Result<Option<Parsed>>, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            err_is_tty: false,
        };
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let r = U.parse(&mut io, &args);
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn usage_paths() {
        let (r, out, err) = run(&["-x"]);
        assert!(matches!(r, Err(Error::Usage)));
        assert_eq!(out, U.text);
        assert_eq!(err, "demo: invalid option -- 'x'\n");
        let (r, out, _) = run(&["-h"]);
        assert!(matches!(r, Ok(None)));
        assert_eq!(out, U.text);
        let (r, out, _) = run(&["--help"]);
        assert!(matches!(r, Ok(None)));
        assert_eq!(out, U.text);
        let (r, out, _) = run(&["-n", "a", "-n", "b", "-v"]);
        let p = r.unwrap().unwrap();
        assert!(out.is_empty());
        assert_eq!(p.value('n'), Some("b"));
        assert!(p.flag('v'));
        assert!(!p.flag('x'));
    }

    #[test]
    fn c_number_parsing() {
        assert_eq!(strtoull("10"), 10);
        assert_eq!(strtoull("  12abc"), 12);
        assert_eq!(strtoull("abc"), 0);
        assert_eq!(strtoull("99999999999999999999999"), u64::MAX);
        assert_eq!(strtoull("-1"), u64::MAX);
        assert_eq!(strtol("-5"), -5);
        assert_eq!(strtol("300x"), 300);
        assert_eq!(strtol("-99999999999999999999"), i64::MIN);
        assert_eq!(parse_u64_strict("10"), Some(10));
        assert_eq!(parse_u64_strict("10M"), None);
        assert_eq!(parse_u64_strict(""), None);
        assert_eq!(parse_u64_strict("-1"), None);
    }
}
