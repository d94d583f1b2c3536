//! The real `tapback` binary serving several guests at once while one guest (domain 9), or
//! the toolstack on its behalf, feeds it contradictory and hostile xenstore values.
//!
//! Rig (tests/common/tapback_bin.rs): a fake xenstored (the in-memory store on a Unix socket,
//! `XENSTORED_PATH`), a fake tapdisk serving many minors that records every ring it is given,
//! and simulated blkfronts as the well-behaved guests. In every scenario:
//! - the well-behaved guests' rings stay connected in the tapdisk with the values they were
//!   connected with, with no other connect or disconnect of theirs, and their backends stay
//!   Connected;
//! - a new well-behaved guest connecting while the hostile one acts gets its ring (the time it
//!   took is reported);
//! - refused values end with the hostile device Closing, an `error/backend/vbd3/9/<devid>/error`
//!   node naming the key, and no ring for it in the tapdisk;
//! - tapback is still running, and its peak RSS (`VmHWM`) stays under [`RSS_BOUND_KIB`].
//!
//! Each test prints one `HOSTILE-XEN|...` line for `scripts/hostile-xen.sh`.

mod common;

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use blktap3::control::msg::Blkif;
use blktap3::xen::sim::{BlkfrontOptions, MemXsConn, SimBlkfront};
use blktap3::xen::xenstore::{Tx, XenStore};
use blktap3::xen::DomId;
use common::tapback_bin::*;

/// The hostile guest.
const HOSTILE: DomId = DomId(9);
/// Well-behaved guests connected before the hostile one starts.
const GOOD_DOMS: [u16; 3] = [1, 2, 3];

/// Bound on tapback's peak RSS. An idle tapback on x86_64 peaks at about 3 MiB (its
/// binary, libc, one xenstore connection, a few devices). The floods below push tens of
/// thousands of watch events (~100 bytes each on the wire) and kilobytes-long values at it:
/// retaining them, or a queue growing with the backlog, would cost several MiB more. 16 MiB
/// leaves room for allocator slack and debug builds while still catching such growth.
const RSS_BOUND_KIB: u64 = 16 * 1024;

struct Good {
    domid: u16,
    devid: u32,
    bpath: String,
    blkif: Blkif,
    /// The tapdisk's events of this device once connected.
    events: usize,
    _front: SimBlkfront<MemXsConn>,
}

struct Rig {
    env: BinEnv,
    tb: Tapback,
    goods: Vec<Good>,
    /// The hostile guest's own xenstore connection (its permissions).
    guest: MemXsConn,
    next_devid: AtomicU32,
    next_minor: AtomicU16,
    /// How long the guests that joined during hostile activity took to connect.
    joins: Vec<Duration>,
}

fn opts() -> BlkfrontOptions {
    BlkfrontOptions {
        timeout: Duration::from_secs(20),
        ..BlkfrontOptions::default()
    }
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

type Overrides<'a> = Vec<(&'a str, Option<String>)>;

impl Rig {
    fn new() -> Rig {
        let env = BinEnv::new(500);
        let tb = env.spawn_tapback();
        env.xen.create_domain(HOSTILE, 256).unwrap();
        let guest = env.store.connect(HOSTILE).unwrap();
        let mut r = Rig {
            env,
            tb,
            goods: Vec::new(),
            guest,
            next_devid: AtomicU32::new(51712),
            next_minor: AtomicU16::new(0),
            joins: Vec::new(),
        };
        for d in GOOD_DOMS {
            let g = r.good(d);
            r.goods.push(g);
        }
        r
    }

    fn devid(&self) -> u32 {
        self.next_devid.fetch_add(16, Ordering::Relaxed)
    }

    fn minor(&self) -> u16 {
        self.next_minor.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A new well-behaved guest disk on domain `domid`, connected.
    fn good(&self, domid: u16) -> Good {
        let devid = self.devid();
        let minor = self.minor();
        let (fpath, bpath) = self.env.add_vbd(DomId(domid), devid, minor);
        let mut front = SimBlkfront::new(
            &self.env.xen,
            DomId(domid),
            self.env.store.connect(DomId(domid)).unwrap(),
            &fpath,
            opts(),
        )
        .unwrap();
        front.connect().unwrap();
        let rings = self.env.tap().rings_of(u32::from(domid), devid);
        assert_eq!(rings.len(), 1, "good guest {domid}/{devid}: {rings:?}");
        Good {
            domid,
            devid,
            bpath,
            blkif: rings[0].clone(),
            events: self.env.tap().events_of(u32::from(domid), devid),
            _front: front,
        }
    }

    /// Run `hostile` on another thread; meanwhile a well-behaved guest (domain 4) joins
    /// (after `delay`, so that the hostile activity is going).
    fn join_during<R: Send>(
        &mut self,
        delay: Duration,
        hostile: impl FnOnce(&Rig) -> R + Send,
    ) -> R {
        let (good, took, out) = thread::scope(|sc| {
            let me = &*self;
            let h = sc.spawn(move || hostile(me));
            thread::sleep(delay);
            let start = Instant::now();
            let good = me.good(4);
            let took = start.elapsed();
            (good, took, h.join().unwrap())
        });
        self.goods.push(good);
        self.joins.push(took);
        out
    }

    /// Every well-behaved guest still has exactly the ring it connected, nothing else
    /// happened to it, and its backend is Connected.
    fn check_others(&mut self) {
        self.tb.assert_alive();
        let st = self.env.tap();
        for g in &self.goods {
            let (d, v) = (u32::from(g.domid), g.devid);
            assert_eq!(
                st.rings_of(d, v),
                vec![g.blkif.clone()],
                "ring of {d}/{v} changed"
            );
            assert_eq!(
                st.events_of(d, v),
                g.events,
                "spurious (dis)connect of {d}/{v}"
            );
        }
        drop(st);
        for g in &self.goods {
            assert_eq!(
                self.env.bstate(&g.bpath).as_deref(),
                Some("4"),
                "{}",
                g.bpath
            );
        }
    }

    /// A new vbd of the hostile guest, its backend in InitWait: (devid, fpath, bpath).
    fn hostile_vbd(&self) -> (u32, String, String) {
        let devid = self.devid();
        let minor = self.minor();
        let (fpath, bpath) = self.env.add_vbd(HOSTILE, devid, minor);
        self.env.wait_bstate(&bpath, "2");
        (devid, fpath, bpath)
    }

    fn gw(&self, fpath: &str, key: &str, v: &str) {
        self.guest
            .write(Tx::NONE, &format!("{fpath}/{key}"), v.as_bytes())
            .unwrap();
    }

    fn grm(&self, fpath: &str, key: &str) {
        let _ = self.guest.rm(Tx::NONE, &format!("{fpath}/{key}"));
    }

    /// The frontend's ring keys (order 2, refs 100..103, port 17), each overridable
    /// (`None` = removed), then `state` = Initialised.
    fn publish(&self, fpath: &str, overrides: &[(&str, Option<String>)]) {
        let mut kv: Vec<(String, Option<String>)> = vec![
            ("ring-page-order".into(), s("2")),
            ("ring-ref0".into(), s("100")),
            ("ring-ref1".into(), s("101")),
            ("ring-ref2".into(), s("102")),
            ("ring-ref3".into(), s("103")),
            ("event-channel".into(), s("17")),
            ("protocol".into(), s("x86_64-abi")),
        ];
        for (k, v) in overrides {
            match kv.iter_mut().find(|(kk, _)| kk == k) {
                Some(e) => e.1 = v.clone(),
                None => kv.push(((*k).to_owned(), v.clone())),
            }
        }
        for (k, v) in &kv {
            match v {
                Some(v) => self.gw(fpath, k, v),
                None => self.grm(fpath, k),
            }
        }
        self.gw(fpath, "state", "3");
    }

    fn hostile_rings(&self, devid: u32) -> Vec<Blkif> {
        self.env.tap().rings_of(u32::from(HOSTILE.0), devid)
    }

    fn hostile_events(&self, devid: u32) -> usize {
        self.env.tap().events_of(u32::from(HOSTILE.0), devid)
    }

    /// Publish the ring with `overrides`; tapback must refuse it naming `key`.
    fn refuse(&self, overrides: &[(&str, Option<String>)], key: &str) {
        let (devid, fpath, bpath) = self.hostile_vbd();
        self.publish(&fpath, overrides);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.env.bstate(&bpath).as_deref() != Some("5") {
            assert!(
                Instant::now() < deadline,
                "{overrides:?}: backend {:?}, error {:?}, rings {:?}\n{}",
                self.env.bstate(&bpath),
                self.env.error_node(&bpath),
                self.hostile_rings(devid),
                self.tb.log_text()
            );
            thread::sleep(Duration::from_millis(5));
        }
        let err = self.env.error_node(&bpath).unwrap_or_default();
        assert!(
            err.contains(key),
            "{overrides:?}: error node {err:?} does not name {key}"
        );
        assert!(
            self.hostile_rings(devid).is_empty(),
            "{overrides:?}: ring connected"
        );
        assert_eq!(
            self.hostile_events(devid),
            0,
            "{overrides:?}: tapdisk was asked"
        );
    }

    /// Check the others and the RSS bound; print the scenario's line.
    fn report(mut self, scenario: &str, hostile: &str) {
        self.check_others();
        let peak = self.tb.peak_rss_kib();
        let slowest = self.joins.iter().map(|d| d.as_millis()).max().unwrap_or(0);
        let others = format!(
            "{} rings kept, 0 spurious (dis)connects; {} joined meanwhile in {} ms",
            self.goods.len(),
            self.joins.len(),
            slowest
        );
        eprintln!(
            "HOSTILE-XEN|tapback: {scenario}|{hostile}|{others}|{:.1}|0",
            peak as f64 / 1024.0
        );
        assert!(
            peak < RSS_BOUND_KIB,
            "tapback peak RSS {peak} KiB over {RSS_BOUND_KIB}"
        );
        assert!(self.tb.stop().success());
    }
}

fn advertised(r: &Rig, key: &str) -> u32 {
    r.env
        .dom0
        .read_string(Tx::NONE, &format!("{}/{key}", r.goods[0].bpath))
        .unwrap()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn refuses_bad_ring_values_without_harming_others() {
    let mut r = Rig::new();
    let maxq = advertised(&r, "multi-queue-max-queues");
    let maxo = advertised(&r, "max-ring-page-order");
    let long = "7".repeat(4000);
    let nq = "multi-queue-num-queues";
    let cases: Vec<(Overrides, &str)> = vec![
        (vec![(nq, s("0"))], nq),
        (vec![(nq, Some((maxq + 1).to_string()))], nq),
        (vec![(nq, s("two"))], nq),
        (vec![(nq, s("99999999999999999999999"))], nq),
        (vec![(nq, s("-1"))], nq),
        (vec![(nq, Some(long.clone()))], nq),
        (
            vec![("ring-page-order", Some((maxo + 1).to_string()))],
            "ring-page-order",
        ),
        (
            vec![("ring-page-order", s("4294967295"))],
            "ring-page-order",
        ),
        (vec![("ring-page-order", s("x"))], "ring-page-order"),
        (vec![("event-channel", None)], "event-channel"),
        (vec![("event-channel", s("0"))], "event-channel"),
        (vec![("event-channel", s("seventeen"))], "event-channel"),
        (vec![("event-channel", Some(long.clone()))], "event-channel"),
        (vec![("ring-ref2", None)], "ring-ref2"),
        (vec![("ring-ref0", Some(long.clone()))], "ring-ref0"),
        (vec![("ring-ref1", s("0x10"))], "ring-ref1"),
        (vec![("protocol", s("x86_99-abi"))], "protocol"),
        (vec![("protocol", Some("p".repeat(4000)))], "protocol"),
        // Two queues announced, but only the single-queue keys are there.
        (vec![(nq, s("2"))], "queue-0/ring-ref0"),
        (
            vec![("feature-persistent", s("maybe"))],
            "feature-persistent",
        ),
    ];
    let n = cases.len();
    r.join_during(Duration::from_millis(50), |r| {
        for (ov, key) in &cases {
            r.refuse(ov, key);
        }
    });
    assert!(r.tb.logged(&["device failed"]), "{}", r.tb.log_text());
    r.report(
        "bad ring values: num-queues 0 / max+1 / text / huge, order > max, event-channel missing / 0 / text, ring-ref missing / text, protocol garbage, 4000-byte values",
        &format!("1 guest, {n} vbds"),
    );
}
