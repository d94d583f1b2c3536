//! tapback's `physical-device` lookup on kernels whose NBD driver has no backend
//! identifier (before Linux 5.14; OpenXT 8 runs 4.14): `/sys/block/nbdN/backend` does not
//! exist, so `2b:<minor>` is resolved through the control client's record of which VBD a
//! device serves, the `tapdev<minor>` link to `/dev/nbdN`. Real tapdisks, the simulated
//! kernel driver reporting no backends, and a sysfs tree as Linux 4.14 lays it out.

mod common;
use common::image::aio_raw;
use common::nbd::NoBackendKernel;
use common::proc::wait_exited;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blktap3::control::client::Client;
use blktap3::control::msg::OpenRequest;
use blktap3::control::nbd_socket_path;
use blktap3::nbd::kernel::{KernelNbd, SimKernelNbd};
use blktap3::tapback::locate::{
    locate_tapdisk, LocatorKeys, KEY_PHYSICAL_DEVICE, KEY_TAPDISK_PARAMS,
};
use blktap3::tapback::{ControlTapdisks, TapdiskOps};

/// `<sys>/dev/block/43:<index * 32>` → `../../devices/virtual/block/nbd<index>` for each
/// index (nbd's default max_part=16 gives 32 minors per device), with no `backend` file.
fn sysfs_4_14(sys: &Path, indices: &[u32]) {
    std::fs::create_dir_all(sys.join("dev/block")).unwrap();
    for &i in indices {
        let d = sys.join(format!("devices/virtual/block/nbd{i}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("size"), "2048\n").unwrap();
        std::os::unix::fs::symlink(
            format!("../../devices/virtual/block/nbd{i}"),
            sys.join(format!("dev/block/43:{}", i * 32)),
        )
        .unwrap();
    }
}

fn keys(physical_device: &str, tapdisk_params: Option<&str>) -> LocatorKeys {
    LocatorKeys {
        physical_device_path: None,
        physical_device: Some(physical_device.to_string()),
        tapdisk_params: tapdisk_params.map(str::to_string),
    }
}

#[test]
fn physical_device_resolves_through_tapdev_links_without_backend_identifiers() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl");
    let tapdevs: PathBuf = dir.path().join("dev/xen/blktap-2");
    let sim = Arc::new(SimKernelNbd::new());
    let c = Client::with_dir(&ctl)
        .with_tapdisk(env!("CARGO_BIN_EXE_tapdisk"))
        .with_tapdev_dir(&tapdevs)
        .with_kernel_nbd(Arc::new(NoBackendKernel(sim.clone())));
    let (pa, pb) = (
        aio_raw(dir.path(), "a.raw", 1 << 20),
        aio_raw(dir.path(), "b.raw", 1 << 20),
    );
    let a = c.create(OpenRequest::new(0, pa.clone()), None).unwrap();
    let b = c.create(OpenRequest::new(0, pb.clone()), None).unwrap();
    assert_eq!(
        (a.devname.as_path(), b.devname.as_path()),
        (Path::new("/dev/nbd0"), Path::new("/dev/nbd1"))
    );
    assert_eq!(
        sim.devices().len(),
        2,
        "both are connected to the (simulated) kernel"
    );

    let sys = dir.path().join("sys");
    sysfs_4_14(&sys, &[0, 1, 2]);
    assert!(!sys.join("dev/block/43:32/backend").exists());
    let t = ControlTapdisks::new(c.clone()).with_sysfs(&sys);

    // 2b:20 is /dev/nbd1, whose tapdev link names b's VBD.
    let sock_b = nbd_socket_path(&ctl, b.pid, b.minor);
    assert_eq!(
        t.block_device_socket(43, 32).as_deref(),
        sock_b.to_str(),
        "nbd1 resolves to b's socket"
    );
    // physical-device wins over a tapdisk-params that names the other disk.
    let loc = locate_tapdisk(&t, &keys("2b:20", Some(&pa))).unwrap();
    assert_eq!(
        (loc.pid, loc.minor, loc.source),
        (b.pid, b.minor, KEY_PHYSICAL_DEVICE)
    );
    let loc = locate_tapdisk(&t, &keys("2b:0", None)).unwrap();
    assert_eq!(
        (loc.pid, loc.minor, loc.source),
        (a.pid, a.minor, KEY_PHYSICAL_DEVICE)
    );

    // nbd2 is not connected and has no link: not resolvable, tapdisk-params decides.
    assert_eq!(t.block_device_socket(43, 64), None);
    assert!(locate_tapdisk(&t, &keys("2b:40", None)).is_err());
    let loc = locate_tapdisk(&t, &keys("2b:40", Some(&pb))).unwrap();
    assert_eq!(
        (loc.pid, loc.minor, loc.source),
        (b.pid, b.minor, KEY_TAPDISK_PARAMS)
    );
    // Neither a partition minor nor another major resolves.
    assert_eq!(t.block_device_socket(43, 33), None);
    assert_eq!(t.block_device_socket(8, 32), None);

    // Destroyed: the link is gone, and with it the answer for nbd1.
    c.destroy(b.pid, b.minor, false, None).unwrap();
    assert!(wait_exited(b.pid));
    assert!(std::fs::symlink_metadata(tapdevs.join(format!("tapdev{}", b.minor))).is_err());
    assert_eq!(t.block_device_socket(43, 32), None);
    assert!(locate_tapdisk(&t, &keys("2b:20", None)).is_err());

    // Killed: the link still points at nbd0 until the device is reclaimed, but the VBD it
    // names is dead, so physical-device does not resolve to it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_exited(a.pid));
    let err = locate_tapdisk(&t, &keys("2b:0", None)).unwrap_err();
    assert!(err.to_string().contains(KEY_PHYSICAL_DEVICE), "{err}");
    c.destroy(a.pid, a.minor, false, None).unwrap();
    assert!(sim.devices().is_empty());
}
