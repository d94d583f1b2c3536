//! Injected I/O faults seen through the blkif door: an in-process tapdisk on simulated Xen
//! with two guests' rings, one on a dynamic VHD whose file fails chosen calls
//! ([`blktap3::image::fault`]), one on a healthy raw image. The request that hits a fault
//! is answered `BLKIF_RSP_ERROR`; the other guest's ring keeps working; `vhd-util check`
//! passes on the file; once the fault is cleared the same ring and open image serve the
//! request and the data reads back right; after a failed fdatasync every later
//! FLUSH_DISKCACHE is answered with an error.
//!
//! Prints `faults-injected point/kind=N ...` (summed by `scripts/faults.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use blktap3::blkif::op;
use blktap3::image::fault::{Fault, FaultFile, Injector, Point};
use blktap3::image::file::BlockFile;
use blktap3::image::open::open_wrapped;
use blktap3::image::vhd::ops::{create, CreateOptions};
use blktap3::image::{open as open_image, Image, ImageError};
use blktap3::tapdisk::{ImageOpener, OpenSpec};
use blktap3::xen::sim::{MemXsConn, SimBlkfront};
use common::xenio::{wait, Rig};

const BLKIF_RSP_OKAY: i16 = 0;
const BLKIF_RSP_ERROR: i16 = -1;
const BLK_SECTORS: u64 = 4096;

/// Opens one path through a [`FaultFile`], the others as tapdisk does.
#[derive(Debug)]
struct FaultOpener {
    path: PathBuf,
    inj: Arc<Injector>,
    opens: Mutex<u32>,
}

impl ImageOpener for FaultOpener {
    fn open(&self, spec: &OpenSpec) -> Result<Arc<dyn Image>, ImageError> {
        let opts = spec.chain_options();
        let fmt = spec.kind.format();
        if spec.path != self.path {
            return Ok(Arc::from(open_image(&spec.path, fmt, &opts)?));
        }
        *self.opens.lock().unwrap() += 1;
        let inj = Arc::clone(&self.inj);
        Ok(Arc::from(open_wrapped(&spec.path, fmt, &opts, &|f| {
            Ok(Arc::new(FaultFile::new(f, Arc::clone(&inj))?) as Arc<dyn BlockFile>)
        })?))
    }
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| {
            (i.wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(131))
                >> 9) as u8
        })
        .collect()
}

fn vhd_check(path: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_vhd-util"))
        .args(["check", "-n"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vhd-util check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

type Front = SimBlkfront<MemXsConn>;

fn status(front: &mut Front, id: u64) -> i16 {
    front.kick().unwrap();
    let c = wait(front, 1);
    assert_eq!(c[0].id, id);
    c[0].status
}

fn write(front: &mut Front, sector: u64, data: &[u8]) -> i16 {
    let id = front.submit_write(sector, data).unwrap();
    status(front, id)
}

fn read(front: &mut Front, sector: u64, n: u32) -> Result<Vec<u8>, i16> {
    let id = front.submit_read(sector, n).unwrap();
    front.kick().unwrap();
    let c = wait(front, 1);
    assert_eq!(c[0].id, id);
    match c[0].status {
        BLKIF_RSP_OKAY => Ok(c[0].data.clone().unwrap()),
        s => Err(s),
    }
}

fn flush(front: &mut Front) -> i16 {
    let id = front.submit_sync(op::FLUSH_DISKCACHE, 0, &[]).unwrap();
    status(front, id)
}

/// The healthy guest: write, read back, flush.
fn healthy(front: &mut Front, round: u32) {
    let s = u64::from(round) * 64;
    let d = pattern(8192, 7000 + round);
    assert_eq!(write(front, s, &d), BLKIF_RSP_OKAY, "healthy write");
    assert_eq!(read(front, s, 16), Ok(d), "healthy read");
    assert_eq!(flush(front), BLKIF_RSP_OKAY, "healthy flush");
}

#[test]
fn faults_answer_blkif_rsp_error_and_clear_without_reopen() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let vhd = dir.path().join("faulty.vhd");
    let raw = dir.path().join("good.raw");
    create(&vhd, &CreateOptions::dynamic(64 << 20)).unwrap();
    std::fs::write(&raw, vec![0u8; 16 << 20]).unwrap();
    let inj = Injector::new();
    let opener = Arc::new(FaultOpener {
        path: vhd.clone(),
        inj: Arc::clone(&inj),
        opens: Mutex::new(0),
    });
    let rig = Rig::with_opener(opener.clone());
    rig.open(1, &format!("vhd:{}", vhd.display()), None);
    rig.open(2, &format!("aio:{}", raw.display()), None);
    let mut f1 = rig.frontend(1, 51712, 1, None, 2);
    let mut f2 = rig.frontend(2, 51712, 2, None, 0);

    // Block 0 full (later I/O there is mapped: Linux AIO), block 1 in part.
    let full = pattern(2 << 20, 1);
    for (i, c) in full.chunks(32 << 10).enumerate() {
        assert_eq!(write(&mut f1, i as u64 * 64, c), BLKIF_RSP_OKAY);
    }
    let part = pattern(4096, 2);
    assert_eq!(write(&mut f1, BLK_SECTORS, &part), BLKIF_RSP_OKAY);
    assert_eq!(flush(&mut f1), BLKIF_RSP_OKAY);

    // (point, fault, sector, what): each write fails while armed, succeeds once cleared.
    let cases = [
        (
            Point::Data,
            Fault::Eio,
            3 * BLK_SECTORS,
            "data, new block (allocated on the loop)",
        ),
        (Point::Data, Fault::Enospc, 64, "data, mapped (AIO)"),
        (Point::Bitmap, Fault::Short, BLK_SECTORS + 512, "bitmap"),
        (Point::Bat, Fault::Short, 5 * BLK_SECTORS, "BAT"),
    ];
    let mut round = 0;
    for (point, fault, sector, what) in cases {
        round += 1;
        inj.arm(point, fault);
        let d = pattern(8192, 100 + round);
        assert_eq!(write(&mut f1, sector, &d), BLKIF_RSP_ERROR, "{what}");
        assert!(inj.injected(point) >= 1, "{what}: never hit");
        healthy(&mut f2, round);
        vhd_check(&vhd);
        inj.clear();
        assert_eq!(
            write(&mut f1, sector, &d),
            BLKIF_RSP_OKAY,
            "{what}, cleared"
        );
        assert_eq!(read(&mut f1, sector, 16), Ok(d), "{what}, read back");
        assert_eq!(flush(&mut f1), BLKIF_RSP_OKAY, "{what}, flush");
        vhd_check(&vhd);
    }
    assert!(inj.aio_seen() >= 1, "the mapped write went through AIO");

    // Reads: mapped (AIO) and across set and unset bits (worker).
    for (sector, what) in [(32u64, "AIO read"), (BLK_SECTORS, "worker read")] {
        inj.arm(Point::Read, Fault::Eio);
        assert_eq!(read(&mut f1, sector, 16), Err(BLKIF_RSP_ERROR), "{what}");
        healthy(&mut f2, 10);
        inj.clear();
        assert!(read(&mut f1, sector, 16).is_ok(), "{what}, cleared");
    }
    assert_eq!(
        read(&mut f1, 0, 64),
        Ok(pattern(2 << 20, 1)[..32768].to_vec()),
        "block 0 intact"
    );

    // fdatasync fails once: that FLUSH and every later one fail, writes go on.
    inj.arm_n(Point::Sync, Fault::Eio, 0, Some(1));
    assert_eq!(flush(&mut f1), BLKIF_RSP_ERROR, "the failing flush");
    for _ in 0..3 {
        assert_eq!(flush(&mut f1), BLKIF_RSP_ERROR, "a later flush");
    }
    let d = pattern(4096, 999);
    assert_eq!(write(&mut f1, 200, &d), BLKIF_RSP_OKAY);
    assert_eq!(read(&mut f1, 200, 8), Ok(d));
    healthy(&mut f2, 20);
    assert_eq!(*opener.opens.lock().unwrap(), 1, "never reopened");
    eprintln!("{}", inj.summary());
}
