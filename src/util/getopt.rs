//! The one getopt(3) of both command lines (`vhd-util`, `tap-ctl`): GNU flavour, so
//! arguments are permuted (operands may appear between options) and `--` ends the options.
//!
//! blktap's tools parse every command with `getopt(argc, argv, "n:s:...")`, so the accepted
//! spellings are exactly getopt's: grouped flags (`-pM`), attached arguments (`-nfoo`),
//! detached arguments (`-n foo`). Error messages match glibc's, with the program name the
//! caller gives (vhd-util passes the command as `argv[0]`). `--help` is our one long option.
//!
//! [`Getopt`] yields the command line item by item (tap-ctl acts on each option as it
//! comes); [`getopt`] collects it, stopping at the first error (vhd-util).

/// One parsed option: its letter and, for options declared with `:`, the argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opt {
    pub letter: char,
    pub arg: Option<String>,
}

/// One item of the command line, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Opt(Opt),
    /// A word that is not an option (also every word after `--`).
    Operand(String),
    /// `--help` (an extension; getopt itself would reject it).
    LongHelp,
}

/// A getopt failure; `message` is what glibc prints on stderr.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GetoptError {
    pub message: String,
}

/// The result of [`getopt`]: options in command-line order, then operands in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub opts: Vec<Opt>,
    pub operands: Vec<String>,
    /// `--help` was given.
    pub long_help: bool,
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

/// An iterator over the items of `args` (without the program name) against a getopt
/// option string. After an error it ends.
pub struct Getopt<'a> {
    prog: &'a str,
    args: &'a [String],
    spec: &'a str,
    /// Next word to look at.
    idx: usize,
    /// The rest of a flag group being taken apart (`-pMv` after `-p`: `Mv`).
    group: &'a str,
    /// `--` was seen: everything left is an operand.
    operands_only: bool,
    done: bool,
}

impl<'a> Getopt<'a> {
    pub fn new(prog: &'a str, args: &'a [String], spec: &'a str) -> Self {
        Getopt {
            prog,
            args,
            spec,
            idx: 0,
            group: "",
            operands_only: false,
            done: false,
        }
    }

    fn error(&mut self, message: String) -> Option<Result<Item, GetoptError>> {
        self.done = true;
        Some(Err(GetoptError { message }))
    }

    /// The next option letter of the current group.
    fn next_in_group(&mut self) -> Option<Result<Item, GetoptError>> {
        let letter = self.group.chars().next()?;
        self.group = &self.group[letter.len_utf8()..];
        let prog = self.prog;
        match lookup(self.spec, letter) {
            None => self.error(format!("{prog}: invalid option -- '{letter}'")),
            Some(false) => Some(Ok(Item::Opt(Opt { letter, arg: None }))),
            Some(true) => {
                let value = if !self.group.is_empty() {
                    std::mem::take(&mut self.group).to_string()
                } else if let Some(v) = self.args.get(self.idx) {
                    self.idx += 1;
                    v.clone()
                } else {
                    return self
                        .error(format!("{prog}: option requires an argument -- '{letter}'"));
                };
                Some(Ok(Item::Opt(Opt {
                    letter,
                    arg: Some(value),
                })))
            }
        }
    }
}

impl Iterator for Getopt<'_> {
    type Item = Result<Item, GetoptError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if !self.group.is_empty() {
            return self.next_in_group();
        }
        let args = self.args;
        let arg = args.get(self.idx)?;
        self.idx += 1;
        if self.operands_only {
            return Some(Ok(Item::Operand(arg.clone())));
        }
        if arg == "--" {
            self.operands_only = true;
            return self.next();
        }
        if arg == "--help" {
            return Some(Ok(Item::LongHelp));
        }
        if let Some(long) = arg.strip_prefix("--") {
            let prog = self.prog;
            return self.error(format!("{prog}: unrecognized option '--{long}'"));
        }
        match arg.strip_prefix('-').filter(|g| !g.is_empty()) {
            Some(group) => {
                self.group = group;
                self.next_in_group()
            }
            None => Some(Ok(Item::Operand(arg.clone()))),
        }
    }
}

/// Parse all of `args` against `spec`; the first error ends the parse.
/// `prog` is used in error messages (`<prog>: invalid option -- 'x'`).
pub fn getopt(prog: &str, args: &[String], spec: &str) -> Result<Parsed, GetoptError> {
    let mut parsed = Parsed::default();
    for item in Getopt::new(prog, args, spec) {
        match item? {
            Item::Opt(o) => parsed.opts.push(o),
            Item::Operand(s) => parsed.operands.push(s),
            Item::LongHelp => parsed.long_help = true,
        }
    }
    Ok(parsed)
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
        let p = getopt(
            "create",
            &v(&["-rn", "x.vhd", "-s10", "-p", "-m"]),
            "n:s:p:rh",
        )
        .unwrap();
        let got: Vec<(char, Option<&str>)> = p
            .opts
            .iter()
            .map(|o| (o.letter, o.arg.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ('r', None),
                ('n', Some("x.vhd")),
                ('s', Some("10")),
                ('p', Some("-m"))
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
    fn iteration_ends_after_the_first_error() {
        let a = v(&["-v", "-x", "-v"]);
        let items: Vec<_> = Getopt::new("p", &a, "v").collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert!(items[1].is_err());
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
}
