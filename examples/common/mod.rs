//! What the test drivers in `examples/` (`torture`, `hostile_peers`) share: their error type,
//! a seedable generator, the environment they run the real binaries in, and process checks.
//! Each driver uses part of it.
#![allow(dead_code)]

use std::fmt;
use std::path::PathBuf;
use std::process::Command;

/// A driver's one error type: what failed, in words (a driver reports, never panics).
#[derive(Debug)]
pub struct Fail(pub String);

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fail {}

pub type R<T> = Result<T, Fail>;

pub trait Ctx<T> {
    fn ctx(self, what: impl fmt::Display) -> R<T>;
}

impl<T, E: fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl fmt::Display) -> R<T> {
        self.map_err(|e| Fail(format!("{what}: {e}")))
    }
}

/// splitmix64: small, seedable, good enough to choose offsets, delays and data.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// The given seed, or one from the clock.
pub fn seed_or_clock(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    })
}

/// Where the binaries under test are and the directories they share.
pub struct Env {
    pub bindir: PathBuf,
    pub ctl: PathBuf,
    pub keys: PathBuf,
}

impl Env {
    /// `prog` from the bin directory, with the control directory, the tapdisk to spawn, no
    /// kernel NBD device and the key directory in its environment.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(self.bindir.join(prog));
        c.env("BLKTAP_CONTROL_DIR", &self.ctl)
            .env("BLKTAP_TAPDISK", self.bindir.join("tapdisk"))
            .env("BLKTAP_NBD_DEVICE", "0")
            .env("TAPDISK3_CRYPTO_KEYDIR", &self.keys);
        c
    }

    /// Runs `prog args`; (success, stdout+stderr).
    pub fn run(&self, prog: &str, args: &[&str]) -> R<(bool, String)> {
        let out = self
            .cmd(prog)
            .args(args)
            .output()
            .ctx(format!("running {prog}"))?;
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), s))
    }

    /// Runs `prog args`; its stdout+stderr, or an error naming the command.
    pub fn run_ok(&self, prog: &str, args: &[&str]) -> R<String> {
        let (ok, s) = self.run(prog, args)?;
        if ok {
            Ok(s)
        } else {
            Err(Fail(format!("{prog} {args:?} failed: {}", s.trim())))
        }
    }
}

/// Whether `pid` still runs: exists and is not a zombie (a SIGKILLed tapdisk's parent is
/// init, which may reap it late; its files are closed once it is a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
