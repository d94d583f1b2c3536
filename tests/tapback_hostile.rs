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

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use blktap3::control::msg::Blkif;
use blktap3::xen::sim::{BlkfrontOptions, MemXsConn, SimBlkfront};
use blktap3::xen::xenstore::{Tx, XenStore, XsClient};
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
        let mut others = format!("{} rings kept, 0 spurious (dis)connects", self.goods.len());
        if !self.joins.is_empty() {
            others += &format!("; {} joined meanwhile in {slowest} ms", self.joins.len());
        }
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
    r.tb.wait_logged(&["device failed"]);
    r.report(
        "bad ring values: num-queues 0 / max+1 / text / huge, order > max, event-channel missing / 0 / text, ring-ref missing / text, protocol garbage, 4000-byte values",
        &format!("1 guest, {n} vbds"),
    );
}

/// Wait until the hostile device `devid` has a ring and its backend is Connected.
fn wait_connected(r: &Rig, devid: u32, bpath: &str, queues: usize) {
    until(
        &format!("hostile {devid} connected"),
        Duration::from_secs(20),
        || r.hostile_rings(devid).len() == queues && r.env.bstate(bpath).as_deref() == Some("4"),
    );
}

#[test]
fn contradictory_values_change_nothing_connected() {
    let mut r = Rig::new();
    let probe = r.join_during(Duration::from_millis(100), |r| {
        // Connected, then the guest rewrites its ring keys and re-announces its states; the
        // toolstack moves or removes the backend's device keys. tapback keeps the ring it
        // connected (like blkback, it reads them once per connection).
        let (devid, fpath, bpath) = r.hostile_vbd();
        r.publish(&fpath, &[]);
        wait_connected(r, devid, &bpath, 1);
        let ring = r.hostile_rings(devid);
        for round in 0..50 {
            r.gw(&fpath, "ring-ref0", &(5000 + round).to_string());
            r.gw(&fpath, "event-channel", &(40 + round).to_string());
            r.gw(&fpath, "ring-page-order", "0");
            r.gw(&fpath, "multi-queue-num-queues", "4");
            r.gw(&fpath, "protocol", "x86_32-abi");
            r.gw(&fpath, "state", if round % 2 == 0 { "3" } else { "4" });
            let b = |k: &str| format!("{bpath}/{k}");
            let dom0 = &r.env.dom0;
            match round % 4 {
                0 => dom0
                    .write(
                        Tx::NONE,
                        &b("physical-device-path"),
                        r.env.nbd_path(499).as_bytes(),
                    )
                    .unwrap(),
                1 => dom0.rm(Tx::NONE, &b("physical-device-path")).unwrap(),
                2 => dom0
                    .write(Tx::NONE, &b("physical-device"), b"fd:99")
                    .unwrap(),
                _ => dom0
                    .write(Tx::NONE, &b("params"), b"/dev/elsewhere")
                    .unwrap(),
            }
        }
        // A good guest joining afterwards proves tapback has gone through those events.
        let probe = r.good(5);
        assert_eq!(
            r.hostile_rings(devid),
            ring,
            "the ring changed while connected"
        );
        assert_eq!(r.hostile_events(devid), 1);
        assert_eq!(r.env.bstate(&bpath).as_deref(), Some("4"));
        // The guest closes and reconnects: now the values it publishes (and the toolstack's
        // new device key) are used.
        r.gw(&fpath, "state", "5");
        r.gw(&fpath, "state", "6");
        until("hostile closed", Duration::from_secs(20), || {
            r.hostile_rings(devid).is_empty() && r.env.bstate(&bpath).as_deref() == Some("6")
        });
        r.env
            .dom0
            .write(
                Tx::NONE,
                &format!("{bpath}/physical-device-path"),
                r.env.nbd_path(498).as_bytes(),
            )
            .unwrap();
        r.gw(&fpath, "state", "1");
        r.env.wait_bstate(&bpath, "2");
        r.grm(&fpath, "multi-queue-num-queues");
        r.publish(
            &fpath,
            &[("ring-ref0", s("777")), ("event-channel", s("33"))],
        );
        wait_connected(r, devid, &bpath, 1);
        let now = r.hostile_rings(devid);
        assert_eq!((now[0].gref[0], now[0].port), (777, 33));
        assert!(r
            .env
            .tap()
            .rings
            .get(&(9, devid, 0))
            .is_some_and(|(m, _)| *m == 498));

        // Both `ring-ref` and `queue-0/ring-ref`: multi-queue-num-queues decides.
        let (devid, fpath, bpath) = r.hostile_vbd();
        for (k, v) in [
            ("queue-0/ring-ref", "300"),
            ("queue-0/event-channel", "30"),
            ("queue-1/ring-ref", "301"),
            ("queue-1/event-channel", "31"),
        ] {
            r.gw(&fpath, k, v);
        }
        r.publish(
            &fpath,
            &[
                ("ring-page-order", None),
                ("ring-ref0", None),
                ("ring-ref1", None),
                ("ring-ref2", None),
                ("ring-ref3", None),
                ("ring-ref", s("200")),
            ],
        );
        wait_connected(r, devid, &bpath, 1);
        let one = r.hostile_rings(devid);
        assert_eq!((one[0].gref[0], one[0].port, one[0].order), (200, 17, 0));
        let (devid, fpath, bpath) = r.hostile_vbd();
        for (k, v) in [
            ("queue-0/ring-ref", "300"),
            ("queue-0/event-channel", "30"),
            ("queue-1/ring-ref", "301"),
            ("queue-1/event-channel", "31"),
            ("multi-queue-num-queues", "2"),
        ] {
            r.gw(&fpath, k, v);
        }
        r.publish(
            &fpath,
            &[
                ("ring-page-order", None),
                ("ring-ref0", None),
                ("ring-ref1", None),
                ("ring-ref2", None),
                ("ring-ref3", None),
                ("ring-ref", s("200")),
            ],
        );
        wait_connected(r, devid, &bpath, 2);
        let two = r.hostile_rings(devid);
        assert_eq!(
            two.iter().map(|b| (b.gref[0], b.port)).collect::<Vec<_>>(),
            vec![(300, 30), (301, 31)]
        );
        probe
    });
    r.goods.push(probe);
    r.report(
        "ring-ref / event-channel / order / queues / protocol rewritten while Connected, backend physical-device(-path) / params moved or removed while Connected, ring-ref and queue-0/ring-ref both given",
        "1 guest, 3 vbds, 50 rewrite rounds",
    );
}

#[test]
fn state_flapping_converges() {
    let mut r = Rig::new();
    let (devid, fpath, bpath) = r.hostile_vbd();
    let states = [
        "1", "3", "4", "5", "6", "3", "2", "7", "8", "0", "99", "", "x",
    ];
    let rounds = 400;
    r.join_during(Duration::from_millis(20), |r| {
        r.publish(&fpath, &[]);
        for i in 0..rounds {
            for st in states {
                r.gw(&fpath, "state", st);
            }
            if i % 50 == 0 {
                thread::sleep(Duration::from_millis(1));
            }
        }
    });
    // Whatever tapback made of the flapping, a proper sequence from the guest now works.
    r.gw(&fpath, "state", "1");
    r.env.wait_bstate(&bpath, "2");
    assert!(
        r.hostile_rings(devid).is_empty(),
        "stale ring after a reset"
    );
    r.gw(&fpath, "state", "3");
    wait_connected(&r, devid, &bpath, 1);
    let ring = r.hostile_rings(devid);
    assert_eq!(
        (ring[0].gref[..4].to_vec(), ring[0].port),
        (vec![100, 101, 102, 103], 17)
    );
    r.gw(&fpath, "state", "5");
    r.env.wait_bstate(&bpath, "5");
    r.gw(&fpath, "state", "6");
    until("hostile closed", Duration::from_secs(20), || {
        r.hostile_rings(devid).is_empty() && r.env.bstate(&bpath).as_deref() == Some("6")
    });
    // Every connect of the hostile device was matched by a disconnect (or refused).
    let st = r.env.tap();
    let (mut c, mut d) = (0, 0);
    for e in &st.events {
        match e {
            TapEvent::Connect {
                blkif, errno: 0, ..
            } if blkif.devid == devid => c += 1,
            TapEvent::Disconnect {
                devid: v, errno: 0, ..
            } if *v == devid => d += 1,
            _ => {}
        }
    }
    drop(st);
    assert_eq!(c, d, "connects vs disconnects");
    r.report(
        "frontend state flapping (Initialising / Initialised / Connected / Closing / Closed and invalid states in loops)",
        &format!("1 guest, {} state writes", rounds * states.len()),
    );
}

#[test]
fn frontend_removed_mid_connect() {
    let mut r = Rig::new();
    let rounds = 30;
    let devs = r.join_during(Duration::from_millis(20), |r| {
        let mut devs = Vec::new();
        for i in 0..rounds {
            let (devid, fpath, bpath) = r.hostile_vbd();
            r.publish(&fpath, &[]);
            thread::sleep(Duration::from_micros(200 * (i % 10)));
            r.guest.rm(Tx::NONE, &fpath).unwrap();
            devs.push((devid, bpath));
        }
        devs
    });
    for (devid, bpath) in &devs {
        until(
            &format!("{bpath} closed without ring"),
            Duration::from_secs(20),
            || r.hostile_rings(*devid).is_empty() && r.env.bstate(bpath).as_deref() == Some("6"),
        );
    }
    // The toolstack removes the backend directories: tapback forgets the devices.
    for (_, bpath) in &devs {
        r.env.dom0.rm(Tx::NONE, bpath).unwrap();
    }
    let probe = r.good(5);
    r.goods.push(probe);
    assert!(r.env.tap().rings.keys().all(|k| k.0 != 9));
    r.report(
        "frontend directory removed mid-connect",
        &format!("1 guest, {rounds} vbds"),
    );
}

#[test]
fn watch_flood_many_nodes_and_long_values() {
    let mut r = Rig::new();
    let (devid, fpath, bpath) = r.hostile_vbd();
    let writes = 300_000;
    let nodes = 3000;
    let flood = Instant::now();
    r.join_during(Duration::from_millis(50), |r| {
        let big = "z".repeat(4000);
        // Many nodes with long values in the guest's own directory (nothing tapback reads).
        for i in 0..nodes {
            r.gw(&fpath, &format!("junk/{i}"), &big);
        }
        // Every write below `state` fires tapback's frontend watch; `state` itself gets long
        // garbage too.
        for i in 0..writes {
            if i % 1000 == 0 {
                r.gw(&fpath, "state", &big);
            } else {
                r.gw(&fpath, &format!("state/{}", i % 64), &big[..i % 4000]);
            }
        }
    });
    let took = flood.elapsed();
    // The flood is over: the device still connects normally.
    r.gw(&fpath, "state", "1");
    r.env.wait_bstate(&bpath, "2");
    r.publish(&fpath, &[]);
    wait_connected(&r, devid, &bpath, 1);
    eprintln!("flood of {writes} watch-firing writes and {nodes} nodes took {took:?}");
    r.report(
        "xenstore flood: 300 000 watch-firing writes, 3 000 nodes of 4 000 bytes, 4 000-byte state",
        "1 guest, 1 vbd",
    );
}

#[test]
fn frontend_path_of_another_domain_is_refused() {
    let mut r = Rig::new();
    let victim = r.goods[0].domid;
    let victim_f = format!("/local/domain/{victim}/device/vbd/{}", r.goods[0].devid);
    let devid = r.devid();
    let minor = r.minor();
    // The toolstack (or whoever wrote the backend directory) names another domain's
    // frontend for domain 9's device, or a path climbing out of domain 9's tree.
    let (_, bpath) = r.env.add_vbd(HOSTILE, devid, minor);
    r.env
        .dom0
        .write(Tx::NONE, &format!("{bpath}/frontend"), victim_f.as_bytes())
        .unwrap();
    let devid2 = r.devid();
    let (_, bpath2) = r.env.add_vbd(HOSTILE, devid2, r.minor());
    r.env
        .dom0
        .write(
            Tx::NONE,
            &format!("{bpath2}/frontend"),
            format!("/local/domain/9/../{victim}/device/vbd/51712").as_bytes(),
        )
        .unwrap();
    // The hostile guest points its own frontend's backend keys at the victim's backend
    // and tries to write into the victim's frontend directory.
    let (devid3, fpath3, bpath3) = r.hostile_vbd();
    r.gw(&fpath3, "backend", &r.goods[0].bpath.clone());
    r.gw(&fpath3, "backend-id", "1");
    let denied = r
        .guest
        .write(Tx::NONE, &format!("{victim_f}/ring-ref"), b"1");
    assert!(
        denied.is_err(),
        "the store let domain 9 write domain {victim}'s keys"
    );
    r.publish(&fpath3, &[]);
    wait_connected(&r, devid3, &bpath3, 1);
    // A new good guest connects: tapback has seen all of the above.
    let probe = r.good(5);
    r.goods.push(probe);
    for (d, b) in [(devid, &bpath), (devid2, &bpath2)] {
        assert!(r.hostile_rings(d).is_empty(), "{b}: ring connected");
        assert_eq!(r.hostile_events(d), 0, "{b}: tapdisk was asked");
        assert_ne!(r.env.bstate(b).as_deref(), Some("4"));
    }
    r.tb.wait_logged(&[&format!("9/{devid}"), "frontend", "not domain 9"]);
    r.tb.wait_logged(&[&format!("9/{devid2}"), "frontend", "bad path"]);
    r.report(
        "device whose frontend path is another domain's (or climbs out of its own), frontend backend keys naming another domain's backend",
        "1 guest, 3 vbds",
    );
}

#[test]
fn sigterm_is_handled_during_a_flood() {
    let r = Rig::new();
    let (_, fpath, _) = r.hostile_vbd();
    // The guest's own xenstore connection over the wire: each write waits for its reply,
    // as a real guest's do.
    let sock = r.env.tmp.path().join("xenstored-9.sock");
    fake_xenstored_as(&sock, r.env.store.clone(), HOSTILE);
    let stop = AtomicBool::new(false);
    let writes = AtomicU32::new(0);
    thread::scope(|sc| {
        for t in 0..2 {
            let (fpath, stop, writes, sock) = (&fpath, &stop, &writes, &sock);
            sc.spawn(move || {
                let xs = XsClient::open_path(sock).unwrap();
                let mut i = 0u32;
                while !stop.load(Ordering::Acquire) {
                    let p = format!("{fpath}/state/{t}-{}", i % 256);
                    xs.write(Tx::NONE, &p, b"x").unwrap();
                    i += 1;
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        until("flood going", Duration::from_secs(20), || {
            writes.load(Ordering::Relaxed) > 20_000
        });
        let pid = nix::unistd::Pid::from_raw(r.tb.pid());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let exited = loop {
            if !common::proc::alive(pid.as_raw())
                || std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw()))
                    .is_ok_and(|s| s.contains(") Z"))
            {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            thread::sleep(Duration::from_millis(5));
        };
        let during = !stop.load(Ordering::Acquire);
        stop.store(true, Ordering::Release);
        assert!(exited, "tapback ignored SIGTERM during a flood");
        assert!(during);
        eprintln!(
            "tapback exited {:?} after SIGTERM during a flood of {} writes",
            start.elapsed(),
            writes.load(Ordering::Relaxed)
        );
    });
    let mut r = r;
    let st = r.tb.child.wait().unwrap();
    assert!(st.success(), "{st:?}");
}
