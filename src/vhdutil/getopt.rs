//! A getopt(3)-compatible option parser (GNU flavour: arguments are permuted, so
//! operands may appear between options; `--` ends the options).
//!
//! blktap's vhd-util parses every command with `getopt(argc, argv, "n:s:...")`, so the
//! accepted spellings are exactly getopt's: grouped flags (`-pM`), attached arguments
//! (`-nfoo`), detached arguments (`-n foo`). Error messages match glibc's, with the
//! command name as the program name (vhd-util passes the command as `argv[0]`).

/// One parsed option: its letter and, for options declared with `:`, the argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opt {
    pub letter: char,
    pub arg: Option<String>,
}

/// The result of parsing: options in command-line order, then operands in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub opts: Vec<Opt>,
    pub operands: Vec<String>,
    /// `--help` was given (our extension; getopt itself would reject it).
    pub long_help: bool,
}

/// A getopt failure; `message` is what glibc prints on stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetoptError {
    pub message: String,
}

/// Whether `letter` takes an argument according to `spec` (`None`: not an option).
fn lookup(spec: &str, letter: char) -> Option<bool> {
    if letter == ':' {
        return None;
    }
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        let takes_arg = chars.peek() == Some(&':');
        if takes_arg {
            chars.next();
        }
        if c == letter {
            return Some(takes_arg);
        }
    }
    None
}

/// Parse `args` (without the command name) against a getopt option string.
/// `prog` is used in error messages (`<prog>: invalid option -- 'x'`).
pub fn getopt(prog: &str, args: &[String], spec: &str) -> Result<Parsed, GetoptError> {
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            parsed.operands.extend(args[i..].iter().cloned());
            break;
        }
        if arg == "--help" {
            parsed.long_help = true;
            continue;
        }
        if let Some(long) = arg.strip_prefix("--") {
            return Err(GetoptError {
                message: format!("{prog}: unrecognized option '--{long}'"),
            });
        }
        let Some(group) = arg.strip_prefix('-').filter(|g| !g.is_empty()) else {
            parsed.operands.push(arg.clone());
            continue;
        };
        let mut rest = group;
        while let Some(letter) = rest.chars().next() {
            rest = &rest[letter.len_utf8()..];
            match lookup(spec, letter) {
                None => {
                    return Err(GetoptError {
                        message: format!("{prog}: invalid option -- '{letter}'"),
                    })
                }
                Some(false) => parsed.opts.push(Opt { letter, arg: None }),
                Some(true) => {
                    let value = if !rest.is_empty() {
                        let v = rest.to_string();
                        rest = "";
                        v
                    } else if i < args.len() {
                        i += 1;
                        args[i - 1].clone()
                    } else {
                        return Err(GetoptError {
                            message: format!("{prog}: option requires an argument -- '{letter}'"),
                        });
                    };
                    parsed.opts.push(Opt {
                        letter,
                        arg: Some(value),
                    });
                }
            }
        }
    }
    Ok(parsed)
}

/// C `strtoull(s, NULL, 10)`: leading whitespace, optional sign, then as many decimal
/// digits as there are; no digits gives 0; overflow saturates at `u64::MAX`; a minus sign
/// negates modulo 2^64 as C does.
pub fn strtoull(s: &str) -> u64 {
    let t = s.trim_start();
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
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
    let t = s.trim_start();
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
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

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn grouped_attached_and_detached_arguments() {
        let p = getopt(
            "scan",
            &v(&["-pMv", "-mfoo*", "a.vhd", "-l", "VG", "b"]),
            "m:fcl:pavMh",
        )
        .unwrap();
        let letters: Vec<char> = p.opts.iter().map(|o| o.letter).collect();
        assert_eq!(letters, vec!['p', 'M', 'v', 'm', 'l']);
        assert_eq!(p.opts[3].arg.as_deref(), Some("foo*"));
        assert_eq!(p.opts[4].arg.as_deref(), Some("VG"));
        assert_eq!(p.operands, v(&["a.vhd", "b"]));
    }

    #[test]
    fn flag_group_ending_in_argument_option_takes_next_word() {
        let p = getopt("create", &v(&["-rn", "x.vhd", "-s10"]), "n:s:S:rh").unwrap();
        assert_eq!(
            p.opts,
            vec![
                Opt {
                    letter: 'r',
                    arg: None
                },
                Opt {
                    letter: 'n',
                    arg: Some("x.vhd".into())
                },
                Opt {
                    letter: 's',
                    arg: Some("10".into())
                },
            ]
        );
    }

    #[test]
    fn errors_use_glibc_wording() {
        let e = getopt("create", &v(&["-q"]), "n:s:").unwrap_err();
        assert_eq!(e.message, "create: invalid option -- 'q'");
        let e = getopt("create", &v(&["-n"]), "n:s:").unwrap_err();
        assert_eq!(e.message, "create: option requires an argument -- 'n'");
        let e = getopt("create", &v(&["--bogus"]), "n:").unwrap_err();
        assert_eq!(e.message, "create: unrecognized option '--bogus'");
        // ':' is never an option letter even though it appears in the spec.
        assert!(getopt("x", &v(&["-:"]), "n:").is_err());
    }

    #[test]
    fn double_dash_ends_options_and_lone_dash_is_an_operand() {
        let p = getopt("scan", &v(&["-p", "--", "-v", "-"]), "pv").unwrap();
        assert_eq!(p.opts.len(), 1);
        assert_eq!(p.operands, v(&["-v", "-"]));
        let p = getopt("scan", &v(&["-"]), "pv").unwrap();
        assert_eq!(p.operands, v(&["-"]));
    }

    #[test]
    fn long_help_is_recognised() {
        let p = getopt("query", &v(&["--help"]), "n:").unwrap();
        assert!(p.long_help);
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
