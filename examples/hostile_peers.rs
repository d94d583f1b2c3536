//! Hostile peers on the real binaries (issue 13): one tapdisk process (spawned with `tap-ctl
//! spawn`) serves many VBDs at once (raw `aio:` files, dynamic VHDs and encrypted VHDs, made
//! with `vhd-util`), each exported over an NBD Unix socket. Scenario by scenario, misbehaving
//! peers (many connections, stalled handshakes and requests, garbage, disconnects in the middle
//! of requests, clients that never read their replies, a flood, garbage on the control socket)
//! attack it while well-behaved *verifier* clients keep writing stamped data, flushing and
//! reading it back on other VBDs and on the first VBD, which hostile peers share.
//!
//! Per scenario the driver checks that every verifier I/O succeeded and every acknowledged
//! write reads back exactly (a full read-back of everything each verifier ever wrote ends each
//! scenario), that tapdisk is alive, that every hostile peer got an error reply or a disconnect
//! where one is due, and that tapdisk's peak RSS (`VmHWM`, reset by writing `5` to
//! `/proc/PID/clear_refs` before the scenario) stays within the bound. It prints a markdown
//! table and exits 1 if any check failed.
//!
//! Verifiers write in the lower half of their VBD; hostile writes only ever go to the upper
//! half, so hostile data can never be mistaken for lost verifier data.
//!
//! Usage: `hostile_peers --bindir DIR --work DIR [--long] [--seed S]` (run by
//! `scripts/hostile-peers.sh`, which documents the options).

mod common;

use blktap3::nbd::client::Client;
use blktap3::nbd::proto::{
    RequestHeader, CMD_FLUSH, CMD_READ, CMD_WRITE, MAX_PAYLOAD, NBD_EINVAL, NBD_ENOSPC,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};
use common::{alive, seed_or_clock, Ctx, Env, Fail, Rng, R};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SECTOR: usize = 512;
/// Verifier chunk: 8 sectors (4 KiB).
const CHUNK: u64 = 8;
/// Virtual disk size (MiB) of every VBD: the upper half is the hostile peers' (32 MiB: room
/// for one maximal 32 MiB write).
const DISK_MB: u64 = 64;
const DISK_BYTES: u64 = DISK_MB << 20;
const HALF: u64 = DISK_BYTES / 2;
/// Verifiers write in the first `VERIFY_BYTES` of their VBD (read back whole at the end of
/// every scenario).
const VERIFY_BYTES: u64 = 4 << 20;
/// Verifier I/O slower than this fails the scenario (a stalled event loop).
const MAX_LATENCY: Duration = Duration::from_secs(10);
/// Socket timeout for verifiers and for peers waiting for an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// The content of sector `lba` written by verifier `vid` with generation `gen`.
fn stamp(lba: u64, gen: u64, vid: u32, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(b"HOSTILE1");
    out.extend_from_slice(&lba.to_le_bytes());
    out.extend_from_slice(&gen.to_le_bytes());
    out.extend_from_slice(&vid.to_le_bytes());
    let mut r = Rng(lba ^ gen.rotate_left(32) ^ u64::from(vid) << 20);
    while out.len() < start + SECTOR {
        out.extend_from_slice(&r.next().to_le_bytes());
    }
    out.truncate(start + SECTOR);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Raw,
    Dynamic,
    Encrypted,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Dynamic => "vhd",
            Kind::Encrypted => "enc",
        }
    }
}

struct Opts {
    bindir: PathBuf,
    work: PathBuf,
    long: bool,
    seed: u64,
}

fn parse_opts() -> R<Opts> {
    let mut o = Opts {
        bindir: PathBuf::from("target/debug"),
        work: PathBuf::from("/var/tmp/hostile"),
        long: false,
        seed: 0,
    };
    let mut seed = None;
    let mut a = std::env::args().skip(1);
    while let Some(k) = a.next() {
        let mut v = || a.next().ok_or_else(|| Fail(format!("{k} needs a value")));
        match k.as_str() {
            "--bindir" => o.bindir = PathBuf::from(v()?),
            "--work" => o.work = PathBuf::from(v()?),
            "--seed" => seed = Some(v()?.parse().ctx("--seed")?),
            "--long" => o.long = true,
            "-h" | "--help" => {
                println!("usage: hostile_peers [--bindir DIR] [--work DIR] [--long] [--seed S]");
                std::process::exit(0);
            }
            _ => return Err(Fail(format!("unknown argument {k}"))),
        }
    }
    o.seed = seed_or_clock(seed);
    Ok(o)
}

/// Sizes of one run (`--ci` default, `--long`).
struct Scale {
    vbds: usize,
    verifier_vbds: usize,
    secs: f64,
    many_conns: usize,
    stallers: usize,
    payload_stallers: usize,
    garbage_peers: usize,
    disconnects: usize,
    never_readers: usize,
}

fn s(p: &Path) -> R<&str> {
    p.to_str()
        .ok_or_else(|| Fail(format!("path {} is not UTF-8", p.display())))
}

struct Vbd {
    minor: u16,
    kind: Kind,
    sock: PathBuf,
    path: PathBuf,
}

/// `tap-ctl allocate`, `attach`, `open`: one more VBD in tapdisk `pid`.
fn add_vbd(env: &Env, pid: i32, dir: &Path, i: usize, kind: Kind, rng: &mut Rng) -> R<Vbd> {
    let path = dir.join(format!(
        "{}{i}.{}",
        kind.name(),
        if kind == Kind::Raw { "img" } else { "vhd" }
    ));
    let mb = DISK_MB.to_string();
    let params = match kind {
        Kind::Raw => {
            let f = std::fs::File::create(&path).ctx(format!("creating {}", path.display()))?;
            f.set_len(DISK_BYTES).ctx("sizing the raw image")?;
            format!("aio:{}", path.display())
        }
        Kind::Dynamic | Kind::Encrypted => {
            env.run_ok("vhd-util", &["create", "-n", s(&path)?, "-s", &mb])?;
            if kind == Kind::Encrypted {
                let key = env
                    .keys
                    .join(format!("{}{i},aes-xts-plain,512.key", kind.name()));
                std::fs::write(&key, rng.bytes(64)).ctx(format!("writing {}", key.display()))?;
                env.run_ok("vhd-util", &["key", "-s", "-n", s(&path)?, "-k", s(&key)?])?;
            }
            format!("vhd:{}", path.display())
        }
    };
    let out = env.run_ok("tap-ctl", &["allocate"])?;
    let dev = out.trim();
    let digits: String = dev
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let minor: u16 = digits
        .parse()
        .ctx(format!("minor in tap-ctl allocate's {dev:?}"))?;
    let (p, m) = (pid.to_string(), minor.to_string());
    env.run_ok("tap-ctl", &["attach", "-p", &p, "-m", &m])?;
    env.run_ok("tap-ctl", &["open", "-p", &p, "-m", &m, "-a", &params])?;
    let sock = env.ctl.join(format!("nbd{pid}.{minor}"));
    if !sock.exists() {
        return Err(Fail(format!("no NBD socket {} after open", sock.display())));
    }
    Ok(Vbd {
        minor,
        kind,
        sock,
        path,
    })
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    st.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = st.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

// ---------------------------------------------------------------- verifiers

#[derive(Default, Clone, Copy)]
struct VStats {
    ok: u64,
    failed: u64,
    bad_sectors: u64,
    max_latency: Duration,
}

struct Verifier {
    vid: u32,
    sock: PathBuf,
    /// Chunk -> generation of the last acknowledged write.
    model: HashMap<u64, u64>,
    gen: u64,
    rng: Rng,
    first_error: Option<String>,
}

impl Verifier {
    fn note(&mut self, st: &mut VStats, e: String) {
        st.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("verifier {}: {e}", self.vid));
        }
    }

    fn timed<T>(st: &mut VStats, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        st.max_latency = st.max_latency.max(t.elapsed());
        r
    }

    fn expected(&self, chunk: u64, n: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity((n * CHUNK) as usize * SECTOR);
        for c in chunk..chunk + n {
            match self.model.get(&c) {
                Some(g) => {
                    for l in c * CHUNK..(c + 1) * CHUNK {
                        stamp(l, *g, self.vid, &mut v);
                    }
                }
                None => v.resize(v.len() + (CHUNK as usize) * SECTOR, 0),
            }
        }
        v
    }

    /// Read `n` chunks at `chunk` and compare with the model.
    fn check(&mut self, c: &mut Client, chunk: u64, n: u64, st: &mut VStats) -> R<()> {
        let len = (n * CHUNK) as u32 * SECTOR as u32;
        let r =
            Self::timed(st, || c.read(chunk * CHUNK * SECTOR as u64, len)).ctx("verifier read")?;
        match r {
            Ok(data) => {
                let want = self.expected(chunk, n);
                let bad = data
                    .chunks(SECTOR)
                    .zip(want.chunks(SECTOR))
                    .filter(|(a, b)| a != b)
                    .count() as u64;
                if bad > 0 {
                    st.bad_sectors += bad;
                    self.note(
                        st,
                        format!("{bad} sectors at chunk {chunk} read back wrong"),
                    );
                } else {
                    st.ok += 1;
                }
            }
            Err(e) => self.note(st, format!("read at chunk {chunk}: NBD error {e}")),
        }
        Ok(())
    }

    /// Write, flush and read back until `stop`; then read back everything ever written.
    fn run(&mut self, stop: &AtomicBool) -> VStats {
        let mut st = VStats::default();
        if let Err(e) = self.run_inner(stop, &mut st) {
            self.note(&mut st, e.0);
        }
        st
    }

    fn run_inner(&mut self, stop: &AtomicBool, st: &mut VStats) -> R<()> {
        let mut c = Client::connect(&self.sock, false).ctx("verifier connect")?;
        c.stream.set_read_timeout(Some(IO_TIMEOUT)).ctx("timeout")?;
        c.stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .ctx("timeout")?;
        let chunks = VERIFY_BYTES / (CHUNK * SECTOR as u64);
        let mut data = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let n = 1 + self.rng.below(8);
            let chunk = self.rng.below(chunks - n);
            self.gen += 1;
            data.clear();
            for l in chunk * CHUNK..(chunk + n) * CHUNK {
                stamp(l, self.gen, self.vid, &mut data);
            }
            let e = Self::timed(st, || c.write(chunk * CHUNK * SECTOR as u64, &data, false))
                .ctx("verifier write")?;
            if e != 0 {
                self.note(st, format!("write at chunk {chunk}: NBD error {e}"));
                continue;
            }
            st.ok += 1;
            for k in chunk..chunk + n {
                self.model.insert(k, self.gen);
            }
            if self.rng.below(8) == 0 {
                let h = RequestHeader {
                    flags: 0,
                    typ: CMD_FLUSH,
                    cookie: 7,
                    offset: 0,
                    length: 0,
                };
                c.send(&h, &[]).ctx("flush")?;
                let r = Self::timed(st, || c.recv(None, &mut Vec::new())).ctx("flush reply")?;
                match r {
                    blktap3::nbd::client::ClientReply::Simple { error: 0, .. } => st.ok += 1,
                    r => self.note(st, format!("flush: {r:?}")),
                }
            }
            // Read back what was just written, and one older chunk.
            self.check(&mut c, chunk, n, st)?;
            let keys = self.model.len() as u64;
            if keys > 0 {
                let k = self.rng.below(keys) as usize;
                if let Some(old) = self.model.keys().nth(k).copied() {
                    self.check(&mut c, old, 1, st)?;
                }
            }
        }
        // Everything acknowledged must read back exactly, and nothing else may have
        // appeared in the verifier's half: read it all, 1 MiB at a time.
        let per = (1u64 << 20) / (CHUNK * SECTOR as u64);
        for k in (0..chunks).step_by(per as usize) {
            self.check(&mut c, k, per.min(chunks - k), st)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- hostile peers

/// What happened to the hostile peers of one scenario.
#[derive(Default)]
struct Peers {
    count: u64,
    /// Peers whose misbehaviour was answered as required (error reply or disconnect).
    answered: u64,
    /// Peers that were due an answer and did not get it, with a reason.
    unanswered: Vec<String>,
}

impl Peers {
    fn ok(&mut self) {
        self.count += 1;
        self.answered += 1;
    }
    fn bad(&mut self, why: String) {
        self.count += 1;
        self.unanswered.push(why);
    }
    fn merge(&mut self, o: Peers) {
        self.count += o.count;
        self.answered += o.answered;
        self.unanswered.extend(o.unanswered);
    }
}

/// Connect and negotiate (OPT_GO); the raw stream in the transmission phase.
fn connect(sock: &Path) -> R<UnixStream> {
    let c = Client::connect(sock, false).ctx(format!("connect {}", sock.display()))?;
    c.stream.set_read_timeout(Some(IO_TIMEOUT)).ctx("timeout")?;
    c.stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .ctx("timeout")?;
    Ok(c.stream)
}

fn header(typ: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    RequestHeader {
        flags: 0,
        typ,
        cookie,
        offset,
        length,
    }
    .encode()
}

/// Read one simple reply: (error, cookie).
fn simple_reply(s: &mut UnixStream) -> std::io::Result<(u32, u64)> {
    let mut b = [0u8; 16];
    s.read_exact(&mut b)?;
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("reply magic {magic:#x}"),
        ));
    }
    let err = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&b[8..16]);
    Ok((err, u64::from_be_bytes(c)))
}

/// Whether the server closes `s` (EOF or reset) within the timeout, discarding what it sends.
fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 4096];
    let t = Instant::now();
    while t.elapsed() < IO_TIMEOUT {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
    false
}

/// A hostile offset in the upper half of the disk, `len` bytes fitting.
fn upper(rng: &mut Rng, len: u64) -> u64 {
    let span = (HALF - len) / 4096;
    HALF + rng.below(span.max(1)) * 4096
}

/// Many well-behaved connections at once (spread over every VBD), each reading and then
/// holding its connection open; at the end each reads again (all must still be served).
fn many_clients(
    vbds: &[Vbd],
    pid: i32,
    n: usize,
    rng: &mut Rng,
    hold: Duration,
) -> R<(Peers, usize)> {
    let mut p = Peers::default();
    let mut conns = Vec::new();
    for i in 0..n {
        let v = &vbds[i % vbds.len()];
        match connect(&v.sock) {
            Ok(mut s) => {
                let off = upper(rng, 4096);
                let r = s
                    .write_all(&header(CMD_READ, 1, off, 4096))
                    .and_then(|()| simple_reply(&mut s));
                let mut d = [0u8; 4096];
                match r.and_then(|r| s.read_exact(&mut d).map(|()| r)) {
                    Ok((0, 1)) => conns.push(s),
                    r => p.bad(format!("client {i}: first read: {r:?}")),
                }
            }
            Err(e) => p.bad(format!("client {i}: {e}")),
        }
    }
    std::thread::sleep(hold);
    let fds = open_fds(pid);
    for (i, mut s) in conns.into_iter().enumerate() {
        let r = s
            .write_all(&header(CMD_READ, 2, 0, 4096))
            .and_then(|()| simple_reply(&mut s));
        let mut d = [0u8; 4096];
        match r.and_then(|r| s.read_exact(&mut d).map(|()| r)) {
            Ok((0, 2)) => p.ok(),
            r => p.bad(format!("client {i}: read after holding: {r:?}")),
        }
    }
    Ok((p, fds))
}

/// Peers that stall: before the handshake, after half a request header, and after a write
/// header (of `MAX_PAYLOAD` bytes) and half its payload. They hold on for `hold`; then the
/// half-header peers complete their request and must get its reply.
fn stallers(vbds: &[Vbd], n: usize, np: usize, rng: &mut Rng, hold: Duration) -> R<Peers> {
    let mut p = Peers::default();
    let mut held = Vec::new();
    let mut half = Vec::new();
    for i in 0..n {
        let v = &vbds[i % vbds.len()];
        // Connected, greeting never read, nothing sent.
        held.push(UnixStream::connect(&v.sock).ctx("stall connect")?);
        let mut s = connect(&v.sock)?;
        let h = header(CMD_READ, 9, upper(rng, 4096), 4096);
        s.write_all(&h[..14]).ctx("half header")?;
        half.push((s, h));
    }
    let mut th = Vec::new();
    for i in 0..np {
        let v = &vbds[i % vbds.len()];
        let mut s = connect(&v.sock)?;
        let len = u64::from(MAX_PAYLOAD);
        let off = upper(rng, len).min(DISK_BYTES - len);
        s.write_all(&header(CMD_WRITE, 3, off, MAX_PAYLOAD))
            .ctx("write header")?;
        // tapdisk may not read it (its memory limit): a short timeout, errors ignored.
        s.set_write_timeout(Some(Duration::from_millis(500)))
            .ctx("timeout")?;
        let half = rng.bytes(MAX_PAYLOAD as usize / 2);
        th.push(std::thread::spawn(move || {
            let _ = s.write_all(&half);
            s
        }));
    }
    for t in th {
        held.push(
            t.join()
                .map_err(|_| Fail("staller thread panicked".into()))?,
        );
    }
    std::thread::sleep(hold);
    for (i, (mut s, h)) in half.into_iter().enumerate() {
        let r = s.write_all(&h[14..]).and_then(|()| simple_reply(&mut s));
        let mut d = [0u8; 4096];
        match r.and_then(|r| s.read_exact(&mut d).map(|()| r)) {
            Ok((0, 9)) => p.ok(),
            r => p.bad(format!("half-header peer {i}: {r:?}")),
        }
    }
    // The others cannot be answered (they never finish); count them as peers.
    p.count += held.len() as u64;
    p.answered += held.len() as u64;
    Ok(p)
}

/// Garbage after the handshake: each peer must get an error reply or be disconnected.
fn garbage(vbds: &[Vbd], n: usize, rng: &mut Rng) -> R<Peers> {
    let mut p = Peers::default();
    for i in 0..n {
        let v = &vbds[i % vbds.len()];
        let what = i % 8;
        let r: R<bool> = (|| {
            if what == 7 {
                // Garbage instead of the handshake.
                let mut s = UnixStream::connect(&v.sock).ctx("connect")?;
                s.set_read_timeout(Some(IO_TIMEOUT)).ctx("timeout")?;
                let mut g = [0u8; 18];
                s.read_exact(&mut g).ctx("greeting")?;
                let n = 1 + rng.below(2000) as usize;
                let _ = s.write_all(&rng.bytes(n));
                return Ok(closed_by_server(&mut s));
            }
            let mut s = connect(&v.sock)?;
            Ok(match what {
                0 => {
                    // Random bytes (not starting with the request magic).
                    let n = 1 + rng.below(100_000) as usize;
                    let mut b = rng.bytes(n);
                    if b.len() >= 4 && b[..4] == REQUEST_MAGIC.to_be_bytes() {
                        b[0] ^= 1;
                    }
                    let _ = s.write_all(&b);
                    closed_by_server(&mut s)
                }
                1 => {
                    // Bad magic, otherwise a valid read.
                    let mut h = header(CMD_READ, 1, 0, 4096);
                    h[3] ^= 0x40;
                    let _ = s.write_all(&h);
                    closed_by_server(&mut s)
                }
                2 => {
                    // Unknown commands: EINVAL each, connection stays.
                    let mut ok = true;
                    for t in [5u16, 8, 99, 0xffff] {
                        s.write_all(&header(t, u64::from(t), 0, 512)).ctx("send")?;
                        ok &= matches!(simple_reply(&mut s), Ok((NBD_EINVAL, c)) if c == u64::from(t));
                    }
                    ok
                }
                3 => {
                    // A 4 GiB read.
                    s.write_all(&header(CMD_READ, 4, 0, u32::MAX)).ctx("send")?;
                    matches!(simple_reply(&mut s), Ok((e, 4)) if e != 0)
                }
                4 => {
                    // A 4 GiB write: refused; its "payload" (garbage headers) is skipped.
                    s.write_all(&header(CMD_WRITE, 5, HALF, u32::MAX))
                        .ctx("send")?;
                    let _ = s.write_all(&rng.bytes(1 << 20));
                    drop(s);
                    true
                }
                5 => {
                    // Out-of-range offsets: read, write, and offset + length overflowing.
                    s.write_all(&header(CMD_READ, 6, DISK_BYTES, 512))
                        .ctx("send")?;
                    let a = matches!(simple_reply(&mut s), Ok((NBD_EINVAL, 6)));
                    s.write_all(&header(CMD_WRITE, 7, DISK_BYTES - 512, 4096))
                        .ctx("send")?;
                    s.write_all(&[0xaa; 4096]).ctx("send")?;
                    let b = matches!(simple_reply(&mut s), Ok((NBD_ENOSPC, 7)));
                    s.write_all(&header(CMD_READ, 8, u64::MAX - 100, 4096))
                        .ctx("send")?;
                    let c = matches!(simple_reply(&mut s), Ok((NBD_EINVAL, 8)));
                    a && b && c
                }
                _ => {
                    // Valid magic, random type, flags, offset and length, many of them.
                    for k in 0..64u64 {
                        let mut h = rng.bytes(28);
                        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                        // Never a valid read or write or flush or trim inside the disk.
                        h[6..8].copy_from_slice(&(8 + (k as u16 % 100)).to_be_bytes());
                        s.write_all(&h).ctx("send")?;
                    }
                    let mut ok = true;
                    for _ in 0..64 {
                        ok &= matches!(simple_reply(&mut s), Ok((e, _)) if e != 0);
                    }
                    ok
                }
            })
        })();
        match r {
            Ok(true) => p.ok(),
            Ok(false) => p.bad(format!(
                "garbage peer {i} (kind {what}): no error, no disconnect"
            )),
            Err(e) => p.bad(format!("garbage peer {i} (kind {what}): {e}")),
        }
    }
    Ok(p)
}

/// Garbage on the control socket: truncated, oversized and invalid messages, and more
/// stalled connections than the control thread serves at once. tap-ctl must still work
/// afterwards (its time is reported).
fn control_garbage(env: &Env, pid: i32, n: usize, rng: &mut Rng) -> R<(Peers, Duration)> {
    let mut p = Peers::default();
    let path = env.ctl.join(format!("ctl{pid}"));
    let mut stalled = Vec::new();
    for _ in 0..12 {
        stalled.push(UnixStream::connect(&path).ctx("control connect")?);
    }
    for i in 0..n {
        let mut s = UnixStream::connect(&path).ctx("control connect")?;
        s.set_read_timeout(Some(IO_TIMEOUT)).ctx("timeout")?;
        let len = [0usize, 7, 543, 544, 545, 4096, 1 << 20][i % 7];
        let mut b = rng.bytes(len);
        if i % 2 == 1 && len >= 4 {
            // A plausible type field with garbage around it.
            b[0] = (i % 40) as u8;
        }
        let _ = s.write_all(&b);
        if len < 544 {
            // Truncated: the server gives up after its receive timeout (2 s) and closes.
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut r = Vec::new();
        let ok = match s.read_to_end(&mut r) {
            Ok(_) => true,
            Err(e) => {
                e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut
            }
        };
        if ok {
            p.ok();
        } else {
            p.bad(format!(
                "control peer {i} ({len} bytes): no reply, no close"
            ));
        }
    }
    let t = Instant::now();
    env.run_ok("tap-ctl", &["list"])?;
    let list = t.elapsed();
    p.count += stalled.len() as u64;
    p.answered += stalled.len() as u64;
    drop(stalled);
    Ok((p, list))
}

/// Disconnect in the middle of requests: write header and part of its payload then close;
/// many reads in flight then close; half a header then close.
fn disconnects(vbds: &[Vbd], n: usize, rng: &mut Rng) -> R<Peers> {
    let mut p = Peers::default();
    for i in 0..n {
        let v = &vbds[i % vbds.len()];
        let mut s = connect(&v.sock)?;
        match i % 3 {
            0 => {
                let len = 4096 * (1 + rng.below(256));
                s.write_all(&header(CMD_WRITE, 1, upper(rng, len), len as u32))
                    .ctx("send")?;
                let part = rng.below(len) as usize;
                s.write_all(&rng.bytes(part)).ctx("send")?;
            }
            1 => {
                let mut b = Vec::new();
                for k in 0..64 {
                    b.extend_from_slice(&header(CMD_READ, k, upper(rng, 1 << 20), 1 << 20));
                }
                s.write_all(&b).ctx("send")?;
            }
            _ => {
                s.write_all(&header(CMD_READ, 1, 0, 4096)[..20])
                    .ctx("send")?;
            }
        }
        drop(s);
        p.ok();
    }
    Ok(p)
}

/// Clients that send many large reads and never read a reply, held for `hold`.
fn never_readers(vbds: &[Vbd], n: usize, rng: &mut Rng, hold: Duration) -> R<Peers> {
    let mut p = Peers::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut th = Vec::new();
    for i in 0..n {
        let v = &vbds[i % vbds.len()];
        let s = connect(&v.sock)?;
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .ctx("timeout")?;
        let stop = Arc::clone(&stop);
        let mut rng = Rng(rng.next());
        th.push(std::thread::spawn(move || {
            let mut s = s;
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let len = 1u64 << 20 << rng.below(6);
                let h = header(CMD_READ, sent, upper(&mut rng, len), len as u32);
                match s.write_all(&h) {
                    Ok(()) => sent += 1,
                    // The server stopped reading (its limits): keep trying, as a hostile
                    // client would.
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            (s, sent)
        }));
    }
    std::thread::sleep(hold);
    stop.store(true, Ordering::Relaxed);
    for t in th {
        match t.join() {
            Ok((s, sent)) => {
                // The peer is still connected (nothing forces a close on it) and was
                // throttled, not served without bound: it got far fewer replies than
                // requests sent is fine either way. Count it.
                drop(s);
                if sent > 0 {
                    p.ok();
                } else {
                    p.bad("never-reader could not send a single request".into());
                }
            }
            Err(_) => p.bad("never-reader thread panicked".into()),
        }
    }
    Ok(p)
}

/// tapdisk out of file descriptors: its open-files limit is lowered (prlimit) to what it
/// has open plus 16, and `n` clients connect. The connections beyond the limit wait in the
/// listen backlog; tapdisk must neither spin nor stop serving the others. Then the limit is
/// restored and the clients dropped; a new client must be served again. Returns the peers
/// and tapdisk's CPU seconds during the hold.
fn fd_limit(vbds: &[Vbd], pid: i32, n: usize, hold: Duration) -> R<(Peers, f64)> {
    let mut p = Peers::default();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ctx("limits")?;
    let (soft, hard) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(3)?.to_string(), f.get(4)?.to_string()))
        })
        .ok_or_else(|| Fail("no open-files limit in /proc/PID/limits".into()))?;
    let prlimit = |v: &str| -> R<()> {
        let ok = Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={v}")])
            .status()
            .ctx("running prlimit")?
            .success();
        if ok {
            Ok(())
        } else {
            Err(Fail(format!("prlimit --nofile={v} failed")))
        }
    };
    prlimit(&format!("{}:{hard}", open_fds(pid) + 16))?;
    let mut held = Vec::new();
    for i in 0..n {
        match UnixStream::connect(&vbds[i % vbds.len()].sock) {
            Ok(s) => held.push(s),
            Err(_) => break, // the backlog is full
        }
    }
    let c0 = cpu_ticks(pid).unwrap_or(0);
    std::thread::sleep(hold);
    let cpu = cpu_ticks(pid).unwrap_or(0).saturating_sub(c0) as f64 / 100.0;
    prlimit(&format!("{soft}:{hard}"))?;
    p.count += held.len() as u64;
    p.answered += held.len() as u64;
    drop(held);
    std::thread::sleep(Duration::from_millis(1500));
    let r = connect(&vbds[1].sock).and_then(|mut s| {
        s.write_all(&header(CMD_READ, 1, 0, 4096)).ctx("send")?;
        simple_reply(&mut s).ctx("reply")
    });
    match r {
        Ok((0, 1)) => p.ok(),
        r => p.bad(format!("a client after the fd shortage: {r:?}")),
    }
    Ok((p, cpu))
}

/// One client pipelining writes and reads in its upper half as fast as it can (a second
/// thread reads the replies); every reply must be a success.
fn flood(vbds: &[Vbd], rng: &mut Rng, hold: Duration) -> R<(Peers, u64)> {
    let mut p = Peers::default();
    let s = connect(&vbds[0].sock)?;
    let mut r = s.try_clone().ctx("clone")?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let stop = Arc::clone(&stop);
        let sent = Arc::clone(&sent);
        let mut rng = Rng(rng.next());
        std::thread::spawn(move || {
            let mut s = s;
            let payload = rng.bytes(65536);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let len = 4096 * (1 + rng.below(16));
                let off = upper(&mut rng, len);
                let mut b = Vec::new();
                if n.is_multiple_of(2) {
                    b.extend_from_slice(&header(CMD_WRITE, n, off, len as u32));
                    b.extend_from_slice(&payload[..len as usize]);
                } else {
                    b.extend_from_slice(&header(
                        CMD_READ,
                        n | 1 << 63 | len << 32,
                        off,
                        len as u32,
                    ));
                }
                if s.write_all(&b).is_err() {
                    break;
                }
                n += 1;
                sent.store(n, Ordering::Release);
            }
            s
        })
    };
    let mut got = 0u64;
    let mut errors = 0u64;
    let t = Instant::now();
    let mut buf = vec![0u8; 65536];
    loop {
        let done = stop.load(Ordering::Relaxed);
        if !done && t.elapsed() >= hold {
            stop.store(true, Ordering::Relaxed);
        }
        if done && got >= sent.load(Ordering::Acquire) {
            break;
        }
        match simple_reply(&mut r) {
            Ok((e, cookie)) => {
                got += 1;
                if e != 0 {
                    errors += 1;
                } else if cookie >> 63 == 1 {
                    let len = ((cookie >> 32) & 0x7fff_ffff) as usize;
                    r.read_exact(&mut buf[..len]).ctx("flood read data")?;
                }
            }
            Err(e) => return Err(Fail(format!("flood: reply {got}: {e}"))),
        }
    }
    let _ = writer.join();
    if errors == 0 {
        p.ok();
    } else {
        p.bad(format!("flood: {errors} of {got} requests failed"));
    }
    Ok((p, got))
}

// ---------------------------------------------------------------- scenarios

struct Row {
    name: String,
    peers: String,
    ok: u64,
    failed: u64,
    rss_mib: f64,
    bound_mib: f64,
    lost: u64,
    latency_ms: u128,
    notes: String,
}

fn main() {
    match real_main() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("hostile_peers: {e}");
            std::process::exit(2);
        }
    }
}

fn real_main() -> R<bool> {
    let o = parse_opts()?;
    let sc = if o.long {
        Scale {
            vbds: 64,
            verifier_vbds: 9,
            secs: 20.0,
            many_conns: 900,
            stallers: 128,
            payload_stallers: 32,
            garbage_peers: 400,
            disconnects: 600,
            never_readers: 32,
        }
    } else {
        Scale {
            vbds: 32,
            verifier_vbds: 6,
            secs: 3.0,
            many_conns: 300,
            stallers: 32,
            payload_stallers: 16,
            garbage_peers: 80,
            disconnects: 120,
            never_readers: 8,
        }
    };
    println!(
        "seed {} ({} mode)",
        o.seed,
        if o.long { "long" } else { "ci" }
    );
    let mut rng = Rng(o.seed);
    let env = Env {
        bindir: o.bindir.clone(),
        ctl: o.work.join("ctl"),
        keys: o.work.join("keys"),
    };
    let imgs = o.work.join("img");
    for d in [&env.ctl, &env.keys, &imgs] {
        std::fs::create_dir_all(d).ctx(format!("creating {}", d.display()))?;
    }
    let pid: i32 = env
        .run_ok("tap-ctl", &["spawn"])?
        .trim()
        .parse()
        .ctx("tap-ctl spawn's pid")?;
    let t = Instant::now();
    let mut vbds = Vec::new();
    for i in 0..sc.vbds {
        let kind = [Kind::Raw, Kind::Dynamic, Kind::Encrypted][i % 3];
        vbds.push(add_vbd(&env, pid, &imgs, i, kind, &mut rng)?);
    }
    println!(
        "tapdisk {pid}: {} VBDs ({} raw, {} dynamic VHD, {} encrypted VHD) in {:.1} s; {} verifier VBDs",
        vbds.len(),
        vbds.iter().filter(|v| v.kind == Kind::Raw).count(),
        vbds.iter().filter(|v| v.kind == Kind::Dynamic).count(),
        vbds.iter().filter(|v| v.kind == Kind::Encrypted).count(),
        t.elapsed().as_secs_f64(),
        sc.verifier_vbds
    );
    let mut verifiers: Vec<Verifier> = (0..sc.verifier_vbds)
        .map(|i| Verifier {
            vid: i as u32,
            sock: vbds[i].sock.clone(),
            model: HashMap::new(),
            gen: 0,
            rng: Rng(rng.next()),
            first_error: None,
        })
        .collect();
    let hold = Duration::from_secs_f64(sc.secs);
    let names = [
        "baseline",
        "many-clients",
        "stall",
        "garbage",
        "control-garbage",
        "disconnect",
        "never-read",
        "flood",
        "fd-limit",
    ];
    let mut rows = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut baseline_mib = 0.0f64;
    for name in names {
        if !alive(pid) {
            failures.push(format!("{name}: tapdisk {pid} is gone"));
            break;
        }
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").ctx("resetting VmHWM")?;
        let cpu0 = cpu_ticks(pid).unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles: Vec<JoinHandle<(Verifier, VStats)>> = Vec::new();
        for mut v in verifiers.drain(..) {
            let stop = Arc::clone(&stop);
            handles.push(std::thread::spawn(move || {
                let st = v.run(&stop);
                (v, st)
            }));
        }
        let t = Instant::now();
        let mut notes = String::new();
        let peers: R<Peers> = match name {
            "baseline" => {
                std::thread::sleep(hold);
                Ok(Peers::default())
            }
            "many-clients" => {
                many_clients(&vbds, pid, sc.many_conns, &mut rng, hold).map(|(p, fds)| {
                    notes = format!("{fds} fds open in tapdisk while they were connected");
                    p
                })
            }
            "stall" => stallers(&vbds, sc.stallers, sc.payload_stallers, &mut rng, hold),
            "garbage" => {
                let r = garbage(&vbds, sc.garbage_peers, &mut rng);
                let left = hold.saturating_sub(t.elapsed());
                std::thread::sleep(left);
                r
            }
            "control-garbage" => {
                let r = control_garbage(&env, pid, sc.garbage_peers / 4, &mut rng);
                let left = hold.saturating_sub(t.elapsed());
                std::thread::sleep(left);
                r.map(|(p, list)| {
                    notes = format!("tap-ctl list took {} ms after them", list.as_millis());
                    p
                })
            }
            "disconnect" => {
                let r = disconnects(&vbds, sc.disconnects, &mut rng);
                let left = hold.saturating_sub(t.elapsed());
                std::thread::sleep(left);
                r
            }
            "never-read" => never_readers(&vbds, sc.never_readers, &mut rng, hold),
            "fd-limit" => fd_limit(&vbds, pid, 64, hold).map(|(p, cpu)| {
                notes = format!(
                    "open-files limit = open + 16; tapdisk CPU {cpu:.1} s in the {:.0} s held",
                    hold.as_secs_f64()
                );
                p
            }),
            _ => flood(&vbds, &mut rng, hold).map(|(p, n)| {
                notes = format!("{n} pipelined requests answered");
                p
            }),
        };
        // Peak RSS while the peers were there (they are gone now, or being dropped).
        let hwm_kib = status_kib(pid, "VmHWM:").unwrap_or(0);
        stop.store(true, Ordering::Relaxed);
        let mut vs = VStats::default();
        for h in handles {
            let (v, st) = h
                .join()
                .map_err(|_| Fail("a verifier thread panicked".into()))?;
            if let Some(e) = &v.first_error {
                failures.push(format!("{name}: {e}"));
            }
            vs.ok += st.ok;
            vs.failed += st.failed;
            vs.bad_sectors += st.bad_sectors;
            vs.max_latency = vs.max_latency.max(st.max_latency);
            verifiers.push(Verifier {
                first_error: None,
                ..v
            });
        }
        let cpu = cpu_ticks(pid).unwrap_or(0).saturating_sub(cpu0);
        if !notes.is_empty() {
            notes.push_str("; ");
        }
        notes.push_str(&format!(
            "tapdisk CPU {:.1} s in {:.1} s",
            cpu as f64 / 100.0,
            t.elapsed().as_secs_f64()
        ));
        let mut p = Peers::default();
        match peers {
            Ok(x) => p.merge(x),
            Err(e) => failures.push(format!("{name}: driver: {e}")),
        }
        for u in p.unanswered.iter().take(5) {
            failures.push(format!("{name}: {u}"));
        }
        if !alive(pid) {
            failures.push(format!("{name}: tapdisk {pid} died"));
        }
        let rss_mib = hwm_kib as f64 / 1024.0;
        if name == "baseline" {
            baseline_mib = rss_mib;
        }
        let bound_mib = rss_bound(baseline_mib);
        if rss_mib > bound_mib {
            failures.push(format!(
                "{name}: peak tapdisk RSS {rss_mib:.1} MiB above the bound {bound_mib:.0} MiB"
            ));
        }
        if vs.failed > 0 {
            failures.push(format!("{name}: {} verifier I/Os failed", vs.failed));
        }
        if vs.ok == 0 {
            failures.push(format!("{name}: no verifier I/O completed"));
        }
        if vs.max_latency > MAX_LATENCY {
            failures.push(format!(
                "{name}: a verifier I/O took {} ms",
                vs.max_latency.as_millis()
            ));
        }
        let peers_txt = match name {
            "baseline" => "none".to_string(),
            _ => format!("{} ({} answered as due)", p.count, p.answered),
        };
        eprintln!(
            "{name}: verifiers {} ok / {} failed, peers {peers_txt}, peak RSS {rss_mib:.1} MiB",
            vs.ok, vs.failed
        );
        rows.push(Row {
            name: name.to_string(),
            peers: peers_txt,
            ok: vs.ok,
            failed: vs.failed,
            rss_mib,
            bound_mib,
            lost: vs.bad_sectors,
            latency_ms: vs.max_latency.as_millis(),
            notes,
        });
    }
    // Clean shutdown: every VBD closed and detached; the VHDs must be consistent.
    if alive(pid) {
        let p = pid.to_string();
        for v in &vbds {
            if let Err(e) = env.run_ok(
                "tap-ctl",
                &["destroy", "-p", &p, "-m", &v.minor.to_string()],
            ) {
                failures.push(format!("shutdown: {e}"));
            }
        }
        let t = Instant::now();
        while alive(pid) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if alive(pid) {
            failures.push(format!(
                "tapdisk {pid} still alive after its last VBD was destroyed"
            ));
        }
        for v in vbds.iter().filter(|v| v.kind != Kind::Raw) {
            let out = env.run_ok("vhd-util", &["check", "-n", s(&v.path)?]);
            match out {
                Ok(o) if o.contains("is valid") => {}
                Ok(o) | Err(Fail(o)) => {
                    failures.push(format!("vhd-util check {}: {}", v.path.display(), o.trim()))
                }
            }
        }
    }
    println!();
    println!("| scenario | hostile peers | verifier I/Os ok / failed | peak tapdisk RSS (MiB) | bound (MiB) | data lost (sectors) | max verifier latency (ms) | notes |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} / {} | {:.1} | {:.0} | {} | {} | {} |",
            r.name, r.peers, r.ok, r.failed, r.rss_mib, r.bound_mib, r.lost, r.latency_ms, r.notes
        );
    }
    println!();
    if failures.is_empty() {
        println!("hostile peers: all checks passed");
        Ok(true)
    } else {
        for f in &failures {
            println!("FAIL: {f}");
        }
        Ok(false)
    }
}

/// tapdisk's limit on the buffer memory all NBD clients together hold (`NBD_MEM_LIMIT` in
/// src/tapdisk/daemon.rs), MiB.
const NBD_MEM_LIMIT_MIB: f64 = 256.0;
/// What else hostile peers may cost beyond that limit, MiB: per connection a 64 KiB input
/// buffer and its handshake state (hundreds of connections: tens of MiB), the 1 MiB every
/// light connection may still take past the limit, and memory the allocator keeps.
const SLACK_MIB: f64 = 96.0;

/// The RSS bound of every scenario (MiB): the baseline scenario's peak plus the NBD memory
/// limit and the slack. Without the limit, never-read and stall grew by 32-80 MiB per
/// hostile connection.
fn rss_bound(baseline: f64) -> f64 {
    baseline + NBD_MEM_LIMIT_MIB + SLACK_MIB
}
