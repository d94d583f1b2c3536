//! Kill torture on the real binaries (issue 13): writes verifiable sectors through tapdisk's NBD
//! export, SIGKILLs tapdisk at random moments (often right after a write that allocates a new
//! VHD block), then checks the image with `vhd-util check` (repairing with `vhd-util repair` when
//! needed, and saying so), reopens the chain with `tap-ctl create` and verifies every written
//! sector against a model of what may be on disk.
//!
//! Every 512-byte sector written carries its address, a generation number (one per write
//! request, increasing), the image cycle it belongs to and a checksum. The model keeps, per
//! sector, `stable` (the generation a completed flush made durable; 0 = never written since the
//! image was created: zeros, or the parent's content for a differencing leaf) and `after` (the
//! generations submitted since). After a kill the sector must read `stable` or one of `after`:
//! reading an older generation than `stable` is *data lost*, reading anything else (a bad
//! checksum, another sector's address, a generation never written there) is *garbage*.
//! Writes in flight never overlap, so per sector the generations are ordered.
//!
//! By default this models process death (SIGKILL): what tapdisk handed to the kernel survives.
//! With `--cut-cmd`/`--restore-cmd` it models a power cut: at the kill moment tapdisk is
//! stopped (SIGSTOP, every thread out of its system calls, so no reply can follow the cut),
//! the cut command makes the storage drop every later write (dm-flakey `drop_writes`), tapdisk
//! is killed, and the restore command discards what the page cache held (sync into the dropped
//! writes, unmount, allow writes, drop caches, mount): the image is then what had reached the
//! device. `scripts/torture-powercut-vm.sh` runs this in a VM on ext4 over dm-flakey.
//!
//! Usage: `torture --bindir DIR --work DIR [--kills N] [--seed S] [--rounds-per-image N]
//! [--inject N]` (run by `scripts/torture.sh`). `--inject N` is the driver's self-test: every
//! N-th kill point it writes behind the model's back (a generation never submitted, and zeros
//! over a flushed sector) and the run must then report garbage and data lost.

mod common;

use blktap3::nbd::client::{Client, ClientReply};
use blktap3::nbd::proto::{RequestHeader, CMD_FLUSH, CMD_WRITE};
use common::{alive, seed_or_clock, Ctx, Env, Fail, Rng, R};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SECTOR: usize = 512;
/// Sectors per verification chunk (8 KiB); also the largest write.
const CHUNK: u64 = 16;
/// Sectors per VHD block (2 MiB).
const BLOCK: u64 = 4096;
/// Virtual disk size in MiB.
const DISK_MB: u64 = 1024;
const DISK_SECTORS: u64 = DISK_MB * 2048;
/// Generation stamped on the parent's sectors (differencing leaf).
const PARENT_GEN: u32 = u32::MAX;
const MAGIC: &[u8; 8] = b"TORTURE1";

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The content of sector `lba` written with generation `gen` in image cycle `cycle`.
fn stamp(lba: u64, gen: u32, cycle: u32) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    s[..8].copy_from_slice(MAGIC);
    s[8..16].copy_from_slice(&lba.to_le_bytes());
    s[16..20].copy_from_slice(&gen.to_le_bytes());
    s[20..24].copy_from_slice(&cycle.to_le_bytes());
    let mut r = Rng(lba ^ (u64::from(gen) << 40) ^ (u64::from(cycle) << 20));
    for c in s[24..504].chunks_mut(8) {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
    let h = fnv(&s[..504]);
    s[504..].copy_from_slice(&h.to_le_bytes());
    s
}

/// What a sector read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Zero,
    Gen {
        gen: u32,
        cycle: u32,
    },
    /// Not zeros and not a valid stamp for this address: (stamped lba if the magic is there).
    Garbage(Option<u64>),
}

fn decode(lba: u64, s: &[u8]) -> Seen {
    if s.iter().all(|b| *b == 0) {
        return Seen::Zero;
    }
    if &s[..8] != MAGIC {
        return Seen::Garbage(None);
    }
    let mut b8 = [0u8; 8];
    b8.copy_from_slice(&s[8..16]);
    let at = u64::from_le_bytes(b8);
    let mut b4 = [0u8; 4];
    b4.copy_from_slice(&s[16..20]);
    let gen = u32::from_le_bytes(b4);
    b4.copy_from_slice(&s[20..24]);
    let cycle = u32::from_le_bytes(b4);
    if at != lba || stamp(lba, gen, cycle)[..] != s[..] {
        return Seen::Garbage(Some(at));
    }
    Seen::Gen { gen, cycle }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Dynamic,
    Encrypted,
    Leaf,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Dynamic, Kind::Encrypted, Kind::Leaf];
    fn name(self) -> &'static str {
        match self {
            Kind::Dynamic => "dynamic",
            Kind::Encrypted => "encrypted",
            Kind::Leaf => "leaf",
        }
    }
}

/// Per-sector model of one image.
#[derive(Default)]
struct Model {
    /// Generation made durable by a completed flush (0: base content).
    stable: HashMap<u64, u32>,
    /// Generations submitted since, in order.
    after: HashMap<u64, Vec<u32>>,
    /// Chunks (lba / CHUNK) ever written or holding parent data: all verified after each kill.
    touched: BTreeSet<u64>,
    /// Chunks the parent has data in (leaf only); its sectors hold PARENT_GEN stamps.
    parent: BTreeSet<u64>,
    /// VHD blocks already allocated (written at least once) in the leaf/image itself.
    allocated: BTreeSet<u64>,
    /// Latest acknowledged generation per sector (since the last verification).
    acked: HashMap<u64, u32>,
    /// Sectors already reported as a violation (each is counted once, not at every reopen).
    reported: BTreeSet<u64>,
}

impl Model {
    fn submit(&mut self, lba: u64, n: u64, gen: u32) {
        for s in lba..lba + n {
            self.after.entry(s).or_default().push(gen);
            self.touched.insert(s / CHUNK);
        }
        self.allocated.insert(lba / BLOCK);
    }
    /// A flush completed that covers these acknowledged writes.
    fn flushed(&mut self, writes: &[(u64, u64, u32)]) {
        for &(lba, n, gen) in writes {
            for s in lba..lba + n {
                let st = self.stable.entry(s).or_insert(0);
                if gen > *st {
                    *st = gen;
                }
                let st = *st;
                if let Some(v) = self.after.get_mut(&s) {
                    v.retain(|g| *g > st);
                }
            }
        }
    }
}

struct Stats {
    kills: u64,
    alloc_kills: u64,
    per_kind: HashMap<Kind, u64>,
    repairs: Vec<String>,
    writes_acked: u64,
    flushes: u64,
    sectors_verified: u64,
    lost: u64,
    garbage: u64,
    violations: Vec<String>,
    /// Violating sectors per image kind.
    bad_by_kind: HashMap<Kind, u64>,
    reads_unflushed_new: u64,
    /// Kill points where an allocating write was still unacknowledged when tapdisk died.
    alloc_inflight_kills: u64,
    /// Sectors that read older than a write acknowledged (not yet flushed) before the kill.
    acked_missing: u64,
    /// Power-cut mode: then `acked_missing` is allowed (and shows the cut dropped data);
    /// on process death an acknowledged write is in the kernel and must survive.
    power_cut: bool,
}

struct Opts {
    bindir: PathBuf,
    work: PathBuf,
    kills: u64,
    seed: u64,
    rounds_per_image: u64,
    /// Self-test: every this many kill points, write behind the model's back (must be caught).
    inject: u64,
    /// Where the control directory and key files go (default: `work`); for power cuts, a
    /// directory that the cut does not touch.
    state: Option<PathBuf>,
    /// Power-cut mode: run this (sh -c) with tapdisk stopped, then SIGKILL it ...
    cut_cmd: Option<String>,
    /// ... and this once it is dead, before checking and reopening the image.
    restore_cmd: Option<String>,
}

fn parse_opts() -> R<Opts> {
    let mut o = Opts {
        bindir: PathBuf::from("target/debug"),
        work: PathBuf::from("/var/tmp/torture"),
        kills: 200,
        seed: 0,
        rounds_per_image: 20,
        inject: 0,
        state: None,
        cut_cmd: None,
        restore_cmd: None,
    };
    let mut seed = None;
    let mut a = std::env::args().skip(1);
    while let Some(k) = a.next() {
        let mut v = || a.next().ok_or_else(|| Fail(format!("{k} needs a value")));
        match k.as_str() {
            "--bindir" => o.bindir = PathBuf::from(v()?),
            "--work" => o.work = PathBuf::from(v()?),
            "--kills" => o.kills = v()?.parse().ctx("--kills")?,
            "--seed" => seed = Some(v()?.parse().ctx("--seed")?),
            "--rounds-per-image" => o.rounds_per_image = v()?.parse().ctx("--rounds-per-image")?,
            "--inject" => o.inject = v()?.parse().ctx("--inject")?,
            "--state" => o.state = Some(PathBuf::from(v()?)),
            "--cut-cmd" => o.cut_cmd = Some(v()?),
            "--restore-cmd" => o.restore_cmd = Some(v()?),
            "-h" | "--help" => {
                println!(
                    "usage: torture [--bindir DIR] [--work DIR] [--kills N] [--seed S] [--rounds-per-image N] [--inject N] [--state DIR --cut-cmd CMD --restore-cmd CMD]"
                );
                std::process::exit(0);
            }
            _ => return Err(Fail(format!("unknown argument {k}"))),
        }
    }
    o.seed = seed_or_clock(seed);
    Ok(o)
}

impl Env {
    /// `tap-ctl create -a vhd:IMG`: (tapdisk pid, minor, NBD socket).
    fn create(&self, img: &Path) -> R<(i32, u16, PathBuf)> {
        let params = format!("vhd:{}", img.display());
        let out = self.run_ok("tap-ctl", &["create", "-a", &params])?;
        let sock = PathBuf::from(out.lines().last().unwrap_or("").trim());
        let name = sock
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("nbd"))
            .ok_or_else(|| Fail(format!("tap-ctl create printed {out:?}, not a socket")))?;
        let (pid, minor) = name
            .split_once('.')
            .ok_or_else(|| Fail(format!("socket name {name:?}")))?;
        let pid = pid.parse().ctx("pid in socket name")?;
        let minor = minor.parse().ctx("minor in socket name")?;
        Ok((pid, minor, sock))
    }

    fn destroy(&self, pid: i32, minor: u16) -> R<()> {
        self.run_ok(
            "tap-ctl",
            &["destroy", "-p", &pid.to_string(), "-m", &minor.to_string()],
        )?;
        // A killed tapdisk leaves its control and NBD sockets behind (destroy frees the minor
        // but keeps them); remove them so thousands of kill points do not pile them up.
        for f in [format!("ctl{pid}"), format!("nbd{pid}.{minor}")] {
            let p = self.ctl.join(f);
            if !alive(pid) && p.exists() {
                std::fs::remove_file(&p).ctx(format!("removing {}", p.display()))?;
            }
        }
        Ok(())
    }
}

fn wait_gone(pid: i32) -> R<()> {
    let t = Instant::now();
    while alive(pid) {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(Fail(format!(
                "tapdisk {pid} still alive 10 s after SIGKILL"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// One image under torture.
struct Image {
    kind: Kind,
    path: PathBuf,
    cycle: u32,
    model: Model,
}

fn expected_base(m: &Model, lba: u64) -> Seen {
    if m.parent.contains(&(lba / CHUNK)) {
        Seen::Gen {
            gen: PARENT_GEN,
            cycle: 0,
        }
    } else {
        Seen::Zero
    }
}

/// Makes a fresh image of `kind` for cycle `cycle` under `dir`.
fn make_image(env: &Env, dir: &Path, kind: Kind, cycle: u32, rng: &mut Rng) -> R<Image> {
    let base = format!("{}{cycle}", kind.name());
    let path = dir.join(format!("{base}.vhd"));
    let mb = DISK_MB.to_string();
    let mut model = Model::default();
    match kind {
        Kind::Dynamic => {
            env.run_ok("vhd-util", &["create", "-n", s(&path)?, "-s", &mb])?;
        }
        Kind::Encrypted => {
            env.run_ok("vhd-util", &["create", "-n", s(&path)?, "-s", &mb])?;
            let key = env.keys.join(format!("{base},aes-xts-plain,512.key"));
            let mut k = Vec::with_capacity(64);
            while k.len() < 64 {
                k.extend_from_slice(&rng.next().to_le_bytes());
            }
            std::fs::write(&key, &k).ctx(format!("writing {}", key.display()))?;
            env.run_ok("vhd-util", &["key", "-s", "-n", s(&path)?, "-k", s(&key)?])?;
        }
        Kind::Leaf => {
            let parent = dir.join(format!("{base}-parent.vhd"));
            env.run_ok("vhd-util", &["create", "-n", s(&parent)?, "-s", &mb])?;
            let (pid, minor, sock) = env.create(&parent)?;
            let mut c = Client::connect(&sock, false).ctx("NBD connect to the parent")?;
            for _ in 0..64 {
                let chunk = rng.below(DISK_SECTORS / CHUNK);
                let mut buf = Vec::with_capacity(CHUNK as usize * SECTOR);
                for l in chunk * CHUNK..(chunk + 1) * CHUNK {
                    buf.extend_from_slice(&stamp(l, PARENT_GEN, 0));
                }
                let e = c
                    .write(chunk * CHUNK * 512, &buf, false)
                    .ctx("parent write")?;
                if e != 0 {
                    return Err(Fail(format!("parent write: NBD error {e}")));
                }
                model.parent.insert(chunk);
                model.touched.insert(chunk);
            }
            drop(c);
            env.destroy(pid, minor)?;
            env.run_ok(
                "vhd-util",
                &["snapshot", "-n", s(&path)?, "-p", s(&parent)?],
            )?;
        }
    }
    Ok(Image {
        kind,
        path,
        cycle,
        model,
    })
}

fn s(p: &Path) -> R<&str> {
    p.to_str()
        .ok_or_else(|| Fail(format!("path {} is not UTF-8", p.display())))
}

/// Reads every touched chunk (and a few random others) and checks each sector against the
/// model; afterwards the observed content is the new `stable` (the caller flushes).
fn verify(c: &mut Client, img: &mut Image, rng: &mut Rng, st: &mut Stats, when: &str) -> R<()> {
    let mut chunks: BTreeSet<u64> = img.model.touched.clone();
    for _ in 0..8 {
        chunks.insert(rng.below(DISK_SECTORS / CHUNK));
    }
    // Coalesce into runs of up to 32 chunks (256 KiB reads).
    let list: Vec<u64> = chunks.into_iter().collect();
    let mut i = 0;
    let mut observed: Vec<(u64, u32)> = Vec::new();
    while i < list.len() {
        let mut j = i + 1;
        while j < list.len() && list[j] == list[j - 1] + 1 && j - i < 32 {
            j += 1;
        }
        let lba = list[i] * CHUNK;
        let n = (j - i) as u64 * CHUNK;
        let data = match c.read(lba * 512, (n * 512) as u32).ctx("verify read")? {
            Ok(d) => d,
            Err(e) => return Err(Fail(format!("verify read at sector {lba}: NBD error {e}"))),
        };
        for (k, sec) in data.chunks(SECTOR).enumerate() {
            let l = lba + k as u64;
            st.sectors_verified += 1;
            let seen = decode(l, sec);
            let stable = img.model.stable.get(&l).copied().unwrap_or(0);
            let after: &[u32] = img.model.after.get(&l).map(Vec::as_slice).unwrap_or(&[]);
            let base = expected_base(&img.model, l);
            let ok_gen = |g: u32| g == stable || after.contains(&g);
            let verdict = match seen {
                s if s == base && (stable == 0 || after.contains(&0)) => Ok(0),
                Seen::Gen { gen, cycle } if cycle == img.cycle && gen != PARENT_GEN => {
                    if ok_gen(gen) {
                        Ok(gen)
                    } else if gen < stable {
                        Err(true)
                    } else {
                        Err(false)
                    }
                }
                Seen::Zero | Seen::Gen { .. } if stable > 0 => Err(true),
                _ => Err(false),
            };
            match verdict {
                Ok(g) => {
                    if g != stable {
                        st.reads_unflushed_new += 1;
                    }
                    let acked = img.model.acked.get(&l).copied().unwrap_or(0);
                    if g < acked {
                        st.acked_missing += 1;
                        if !st.power_cut && st.violations.len() < 50 {
                            st.violations.push(format!(
                                "{} {} {when}: sector {l} read gen {g}, older than gen {acked} \
                                 acknowledged before the kill (ACKED WRITE LOST ON PROCESS DEATH)",
                                img.kind.name(),
                                img.path.display(),
                            ));
                        }
                    }
                    observed.push((l, g));
                }
                Err(_) if img.model.reported.contains(&l) => {}
                Err(lost) => {
                    img.model.reported.insert(l);
                    if lost {
                        st.lost += 1;
                    } else {
                        st.garbage += 1;
                    }
                    let kind_bad = st.bad_by_kind.entry(img.kind).or_insert(0);
                    *kind_bad += 1;
                    if *kind_bad <= 16 {
                        st.violations.push(format!(
                            "{} {} {}: sector {l} read {seen:?}; allowed: stable gen {stable} \
                             (0 = {base:?}) or later {after:?} ({})",
                            img.kind.name(),
                            img.path.display(),
                            when,
                            if lost { "DATA LOST" } else { "GARBAGE" }
                        ));
                    }
                    // Continue from what is there.
                    match seen {
                        Seen::Gen { gen, cycle } if cycle == img.cycle => observed.push((l, gen)),
                        _ => observed.push((l, 0)),
                    }
                }
            }
        }
        i = j;
    }
    img.model.acked.clear();
    for (l, g) in observed {
        if g == 0 {
            img.model.stable.remove(&l);
        } else {
            img.model.stable.insert(l, g);
        }
        img.model.after.remove(&l);
    }
    Ok(())
}

fn flush(c: &mut Client, cookie: u64) -> R<()> {
    let h = RequestHeader {
        flags: 0,
        typ: CMD_FLUSH,
        cookie,
        offset: 0,
        length: 0,
    };
    c.send(&h, &[]).ctx("send flush")?;
    match c.recv(None, &mut Vec::new()).ctx("flush reply")? {
        ClientReply::Simple { error: 0, .. } => Ok(()),
        r => Err(Fail(format!("flush failed: {r:?}"))),
    }
}

/// One request in flight.
enum Op {
    Write {
        lba: u64,
        n: u64,
        gen: u32,
        allocating: bool,
    },
    /// A flush, with the number of acknowledged writes it covers.
    Flush { covers: usize },
}

/// Runs the workload until tapdisk dies; returns whether the kill came right after an
/// allocating write.
fn workload(
    c: &mut Client,
    pid: i32,
    img: &mut Image,
    rng: &mut Rng,
    gen: &mut u32,
    st: &mut Stats,
    cut: Option<&str>,
) -> R<bool> {
    let qd = 1 + rng.below(8) as usize;
    // Kill plan: after the k-th allocating write (with a 0..400 us delay), else on a timer.
    let alloc_kill = rng.chance(60);
    let kth_alloc = 1 + rng.below(4);
    let timer = Duration::from_micros(500 + rng.below(30_000));
    let start = Instant::now();
    let mut killer: Option<std::thread::JoinHandle<()>> = None;
    let mut n_alloc = 0;
    let mut inflight: HashMap<u64, Op> = HashMap::new();
    let mut busy: BTreeSet<u64> = BTreeSet::new(); // sectors with a write in flight
    let mut acked: Vec<(u64, u64, u32)> = Vec::new();
    let mut flushed_upto = 0usize;
    let mut cookie = 0u64;
    let mut flush_inflight = false;
    let mut sent = 0u64;
    let spawn_kill = |delay: Duration| {
        let cut = cut.map(str::to_owned);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            if let Some(cmd) = cut {
                if let Err(e) = power_cut(pid, &cmd) {
                    eprintln!("torture: power cut: {e}");
                    std::process::exit(2);
                }
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        })
    };
    loop {
        if killer.is_none() && !alloc_kill && start.elapsed() >= timer {
            killer = Some(spawn_kill(Duration::ZERO));
        }
        // Keep the safety net: if no allocating write came, kill on the timer anyway.
        if killer.is_none() && start.elapsed() >= timer * 4 {
            killer = Some(spawn_kill(Duration::ZERO));
        }
        let mut failed = false;
        while inflight.len() < qd && !failed {
            cookie += 1;
            sent += 1;
            if !flush_inflight && sent > 2 && rng.chance(8) {
                let h = RequestHeader {
                    flags: 0,
                    typ: CMD_FLUSH,
                    cookie,
                    offset: 0,
                    length: 0,
                };
                if c.send(&h, &[]).is_err() {
                    failed = true;
                    break;
                }
                inflight.insert(
                    cookie,
                    Op::Flush {
                        covers: acked.len(),
                    },
                );
                flush_inflight = true;
                continue;
            }
            let n = if rng.chance(50) {
                8
            } else {
                1 + rng.below(CHUNK)
            };
            let fresh = rng.chance(35);
            let lba = loop {
                let block = if fresh {
                    rng.below(DISK_SECTORS / BLOCK)
                } else if let Some(b) = pick(&img.model.allocated, rng) {
                    b
                } else {
                    rng.below(DISK_SECTORS / BLOCK)
                };
                let off = if rng.chance(50) {
                    rng.below(BLOCK / 8) * 8
                } else {
                    rng.below(BLOCK)
                };
                let lba = (block * BLOCK + off).min(DISK_SECTORS - n);
                if !(lba..lba + n).any(|x| busy.contains(&x)) {
                    break lba;
                }
            };
            let allocating = !img.model.allocated.contains(&(lba / BLOCK))
                || !img.model.allocated.contains(&((lba + n - 1) / BLOCK));
            *gen += 1;
            let g = *gen;
            let mut buf = Vec::with_capacity(n as usize * SECTOR);
            for l in lba..lba + n {
                buf.extend_from_slice(&stamp(l, g, img.cycle));
            }
            img.model.submit(lba, n, g);
            img.model.allocated.insert((lba + n - 1) / BLOCK);
            busy.extend(lba..lba + n);
            inflight.insert(
                cookie,
                Op::Write {
                    lba,
                    n,
                    gen: g,
                    allocating,
                },
            );
            let h = RequestHeader {
                flags: 0,
                typ: CMD_WRITE,
                cookie,
                offset: lba * 512,
                length: (n * 512) as u32,
            };
            let r = c.send(&h, &buf);
            if allocating {
                n_alloc += 1;
                if alloc_kill && killer.is_none() && n_alloc >= kth_alloc {
                    killer = Some(spawn_kill(Duration::from_micros(rng.below(400))));
                }
            }
            if r.is_err() {
                failed = true;
            }
        }
        if failed {
            break;
        }
        let reply = match c.recv(None, &mut Vec::new()) {
            Ok(r) => r,
            Err(_) => break,
        };
        let (ck, err) = match reply {
            ClientReply::Simple { cookie, error } => (cookie, error),
            r => return Err(Fail(format!("unexpected reply {r:?}"))),
        };
        match inflight.remove(&ck) {
            Some(Op::Write { lba, n, gen, .. }) => {
                if err != 0 {
                    return Err(Fail(format!("write at {lba}+{n} failed: NBD error {err}")));
                }
                for x in lba..lba + n {
                    busy.remove(&x);
                }
                st.writes_acked += 1;
                acked.push((lba, n, gen));
                for x in lba..lba + n {
                    img.model.acked.insert(x, gen);
                }
            }
            Some(Op::Flush { covers }) => {
                if err != 0 {
                    return Err(Fail(format!("flush failed: NBD error {err}")));
                }
                st.flushes += 1;
                img.model.flushed(&acked[flushed_upto..covers]);
                flushed_upto = covers;
                flush_inflight = false;
            }
            None => return Err(Fail(format!("reply for unknown cookie {ck}"))),
        }
    }
    if inflight.values().any(|op| {
        matches!(
            op,
            Op::Write {
                allocating: true,
                ..
            }
        )
    }) {
        st.alloc_inflight_kills += 1;
    }
    if let Some(k) = killer {
        let _ = k.join();
    } else {
        return Err(Fail(format!(
            "the NBD connection failed before tapdisk {pid} was killed"
        )));
    }
    Ok(alloc_kill && n_alloc >= kth_alloc)
}

/// Stops `pid` (all threads out of their system calls), then runs `cmd` (the cut).
fn power_cut(pid: i32, cmd: &str) -> R<()> {
    let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
    let t = Instant::now();
    loop {
        let mut all = true;
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for e in rd.flatten() {
                let s = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                let st = s
                    .rsplit_once(')')
                    .map(|(_, r)| r.trim_start().chars().next());
                if !matches!(st, Some(Some('T' | 't' | 'Z' | 'X')) | None) {
                    all = false;
                }
            }
        }
        if all {
            break;
        }
        if t.elapsed() > Duration::from_secs(10) {
            return Err(Fail(format!("tapdisk {pid} did not stop within 10 s")));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    sh(cmd)
}

fn sh(cmd: &str) -> R<()> {
    let ok = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .ctx(format!("running {cmd:?}"))?
        .success();
    if ok {
        Ok(())
    } else {
        Err(Fail(format!("{cmd:?} failed")))
    }
}

fn pick(set: &BTreeSet<u64>, rng: &mut Rng) -> Option<u64> {
    if set.is_empty() {
        return None;
    }
    set.iter()
        .nth(rng.below(set.len() as u64) as usize)
        .copied()
}

/// After a kill: `vhd-util check`, `repair` if needed (recorded), check again.
fn check_image(env: &Env, img: &Image, st: &mut Stats, point: u64) -> R<()> {
    let p = s(&img.path)?;
    let (ok, out) = env.run("vhd-util", &["check", "-n", p])?;
    if ok && out.contains("is valid") {
        return Ok(());
    }
    let (rok, rout) = env.run("vhd-util", &["repair", "-n", p])?;
    let (ok2, out2) = env.run("vhd-util", &["check", "-n", p])?;
    let first = out.lines().next().unwrap_or("").trim().to_owned();
    st.repairs.push(format!(
        "kill {point} {}: check said {first:?}; repair {} {:?}; check after: {}",
        img.kind.name(),
        if rok { "ok" } else { "FAILED" },
        rout.trim(),
        if ok2 { "valid" } else { "STILL INVALID" }
    ));
    if !ok2 {
        return Err(Fail(format!(
            "{}: still invalid after repair: {}",
            img.path.display(),
            out2.trim()
        )));
    }
    Ok(())
}

fn main() {
    match real_main() {
        Ok(clean) => std::process::exit(if clean { 0 } else { 1 }),
        Err(e) => {
            eprintln!("torture: {e}");
            std::process::exit(2);
        }
    }
}

fn real_main() -> R<bool> {
    let o = parse_opts()?;
    let bindir = std::fs::canonicalize(&o.bindir).ctx(format!("{}", o.bindir.display()))?;
    std::fs::create_dir_all(&o.work).ctx(format!("creating {}", o.work.display()))?;
    let mut o = o;
    o.work = std::fs::canonicalize(&o.work).ctx(format!("{}", o.work.display()))?;
    let env = Env {
        bindir,
        ctl: o.state.as_ref().unwrap_or(&o.work).join("ctl"),
        keys: o.state.as_ref().unwrap_or(&o.work).join("keys"),
    };
    std::fs::create_dir_all(&env.ctl).ctx("control dir")?;
    std::fs::create_dir_all(&env.keys).ctx("key dir")?;
    let mut rng = Rng(o.seed);
    println!(
        "torture: seed {} kills {} work {} binaries {}",
        o.seed,
        o.kills,
        o.work.display(),
        env.bindir.display()
    );
    let mut st = Stats {
        kills: 0,
        alloc_kills: 0,
        per_kind: HashMap::new(),
        repairs: Vec::new(),
        writes_acked: 0,
        flushes: 0,
        sectors_verified: 0,
        lost: 0,
        garbage: 0,
        violations: Vec::new(),
        bad_by_kind: HashMap::new(),
        reads_unflushed_new: 0,
        alloc_inflight_kills: 0,
        acked_missing: 0,
        power_cut: o.cut_cmd.is_some(),
    };
    let t0 = Instant::now();
    let mut gen = 0u32;
    let mut cycle = 0u32;
    let mut img: Option<Image> = None;
    let mut rounds = 0;
    while st.kills < o.kills {
        if img.is_none() || rounds >= o.rounds_per_image {
            if let Some(old) = img.take() {
                remove_image(&old)?;
            }
            cycle += 1;
            let kind = Kind::ALL[(cycle as usize - 1) % Kind::ALL.len()];
            img = Some(make_image(&env, &o.work, kind, cycle, &mut rng)?);
            // The new files must be on the device before the first cut.
            nix::unistd::sync();
            rounds = 0;
        }
        let Some(im) = img.as_mut() else {
            continue;
        };
        let (pid, minor, sock) = env.create(&im.path)?;
        let mut c = Client::connect(&sock, false).ctx("NBD connect")?;
        let when = if rounds == 0 {
            "initial".to_owned()
        } else {
            format!("after kill {}", st.kills)
        };
        verify(&mut c, im, &mut rng, &mut st, &when)?;
        flush(&mut c, 0).ctx("flush after verify")?;
        if o.inject > 0 && (st.kills + 1).is_multiple_of(o.inject) {
            inject(&mut c, im, &mut rng, &mut gen)?;
        }
        let at_alloc = workload(
            &mut c,
            pid,
            im,
            &mut rng,
            &mut gen,
            &mut st,
            o.cut_cmd.as_deref(),
        )?;
        drop(c);
        wait_gone(pid)?;
        if let Some(r) = &o.restore_cmd {
            sh(r)?;
        }
        st.kills += 1;
        rounds += 1;
        *st.per_kind.entry(im.kind).or_insert(0) += 1;
        if at_alloc {
            st.alloc_kills += 1;
        }
        env.destroy(pid, minor)?;
        let point = st.kills;
        check_image(&env, im, &mut st, point)?;
        if st.kills.is_multiple_of(50) {
            println!(
                "  {} kill points, {:.0} s, lost {} garbage {}",
                st.kills,
                t0.elapsed().as_secs_f64(),
                st.lost,
                st.garbage
            );
        }
    }
    // Final reopen and verification of the last image.
    if let Some(im) = img.as_mut() {
        let (pid, minor, sock) = env.create(&im.path)?;
        let mut c = Client::connect(&sock, false).ctx("NBD connect")?;
        verify(&mut c, im, &mut rng, &mut st, "final")?;
        drop(c);
        env.destroy(pid, minor)?;
        let (ok, out) = env.run("vhd-util", &["check", "-n", s(&im.path)?])?;
        if !ok {
            st.violations
                .push(format!("final check after clean close: {}", out.trim()));
            st.garbage += 1;
        }
        remove_image(im)?;
    }
    let clean = st.lost == 0 && st.garbage == 0 && (st.power_cut || st.acked_missing == 0);
    println!(
        "== torture summary (seed {}; {}) ==",
        o.seed,
        if o.cut_cmd.is_some() {
            "power cuts: SIGSTOP, writes dropped, SIGKILL, page cache discarded"
        } else {
            "process death: SIGKILL"
        }
    );
    println!(
        "kill points survived: {} in {:.1} s ({} aimed just after an allocating write, {} on a \
         timer; {} with an allocating write unacknowledged when tapdisk died)",
        st.kills,
        t0.elapsed().as_secs_f64(),
        st.alloc_kills,
        st.kills - st.alloc_kills,
        st.alloc_inflight_kills
    );
    for k in Kind::ALL {
        println!(
            "  {:<9} {}",
            k.name(),
            st.per_kind.get(&k).copied().unwrap_or(0)
        );
    }
    println!(
        "images: {cycle}; writes acknowledged: {}; flushes completed: {}; sectors verified: {}; \
         unflushed writes found on disk after a kill: {}",
        st.writes_acked, st.flushes, st.sectors_verified, st.reads_unflushed_new
    );
    println!(
        "sectors older than an acknowledged unflushed write: {} ({})",
        st.acked_missing,
        if st.power_cut {
            "allowed: lost with the page cache in the cut"
        } else {
            "must be 0: an acknowledged write is in the kernel when tapdisk dies"
        }
    );
    println!("repairs needed: {}", st.repairs.len());
    for r in &st.repairs {
        println!("  {r}");
    }
    println!("data lost (sectors): {}", st.lost);
    println!("garbage read (sectors): {}", st.garbage);
    for k in Kind::ALL {
        if let Some(n) = st.bad_by_kind.get(&k) {
            println!(
                "  violating sectors on {} images: {n} (first 16 listed)",
                k.name()
            );
        }
    }
    for v in &st.violations {
        println!("  VIOLATION {v}");
    }
    println!("result: {}", if clean { "PASS" } else { "FAIL" });
    Ok(clean)
}

/// Self-test: corrupt the image through the export without telling the model.
fn inject(c: &mut Client, img: &Image, rng: &mut Rng, gen: &mut u32) -> R<()> {
    let written: Vec<u64> = img.model.stable.keys().copied().collect();
    if written.len() < 2 {
        return Ok(());
    }
    let a = written[rng.below(written.len() as u64) as usize];
    let b = written[rng.below(written.len() as u64) as usize];
    *gen += 1;
    eprintln!("inject: gen {} at sector {a}, zeros at sector {b}", *gen);
    let e1 = c
        .write(a * 512, &stamp(a, *gen, img.cycle), false)
        .ctx("inject")?;
    let e2 = if a != b {
        c.write(b * 512, &[0u8; SECTOR], false).ctx("inject")?
    } else {
        0
    };
    if e1 != 0 || e2 != 0 {
        return Err(Fail(format!("inject: NBD errors {e1} {e2}")));
    }
    flush(c, 1)
}

fn remove_image(img: &Image) -> R<()> {
    std::fs::remove_file(&img.path).ctx(format!("removing {}", img.path.display()))?;
    if img.kind == Kind::Leaf {
        let parent = img.path.with_file_name(format!(
            "{}-parent.vhd",
            img.path
                .file_stem()
                .and_then(|x| x.to_str())
                .unwrap_or_default()
        ));
        std::fs::remove_file(&parent).ctx(format!("removing {}", parent.display()))?;
    }
    Ok(())
}
