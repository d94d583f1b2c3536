//! `create` hands the VBD's NBD export to the kernel NBD driver and returns `/dev/nbdN`;
//! `destroy` (also `tap-ctl destroy -d /dev/nbdN`) disconnects the device first. The driver
//! is the in-process simulation here (it holds the negotiated socket like the kernel does),
//! plus the real netlink driver, which falls back to the socket path without the module.

mod common;
use common::image::aio_raw;
use common::nbd::NoBackendKernel;
use common::proc::wait_exited;

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use blktap3::control::client::Client;
use blktap3::control::msg::OpenRequest;
use blktap3::control::nbd_socket_path;
use blktap3::nbd::kernel::{KernelNbd, KernelNbdError, Netlink, SimCall, SimKernelNbd};
use blktap3::nbd::proto::TFLAG_HAS_FLAGS;
use blktap3::tapctl::{run_with, CliIo};

/// A client on `<dir>/ctl` whose tapdev links go to `<dir>/dev/xen/blktap-2` (never the
/// host's /dev).
fn client(dir: &Path) -> Client {
    Client::with_dir(dir.join("ctl"))
        .with_tapdisk(env!("CARGO_BIN_EXE_tapdisk"))
        .with_tapdev_dir(tapdev_dir(dir))
}

fn tapdev_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("dev/xen/blktap-2")
}

/// Where `<dir>/dev/xen/blktap-2/tapdev<minor>` points, if it is a link.
fn tapdev_target(dir: &Path, minor: u16) -> Option<std::path::PathBuf> {
    std::fs::read_link(tapdev_dir(dir).join(format!("tapdev{minor}"))).ok()
}

/// Whether no minor is allocated in `<dir>/ctl`.
fn no_minors(dir: &Path) -> bool {
    blktap3::control::minors::list(&dir.join("ctl"))
        .unwrap()
        .is_empty()
}

/// The names in `<dir>/dev/xen/blktap-2`.
fn tapdev_links(dir: &Path) -> Vec<String> {
    std::fs::read_dir(tapdev_dir(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// SIGKILL `pid` and wait for it to exit.
fn kill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_exited(pid));
}

fn tap_ctl(c: &Client, args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut inp: &[u8] = b"";
    let st = {
        let mut io = CliIo {
            stdout: &mut out,
            stderr: &mut err,
            stdin: &mut inp,
            tty: false,
        };
        run_with(c, &args, &mut io)
    };
    (
        st,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn create_returns_dev_nbd_and_destroy_by_devname_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 8 << 20);
    let img = dir.path().join("disk.raw");
    let sim = Arc::new(SimKernelNbd::starting_at(3));
    let c = client(dir.path()).with_kernel_nbd(sim.clone());

    let created = c.create(OpenRequest::new(0, params), None).unwrap();
    assert_eq!(created.devname, Path::new("/dev/nbd3"));
    let sock = nbd_socket_path(&dir.path().join("ctl"), created.pid, created.minor);
    let calls = sim.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    match &calls[0] {
        SimCall::Connect {
            index,
            size,
            block_size,
            flags,
            backend_id,
        } => {
            assert_eq!(*index, 3);
            assert_eq!(*size, 8 << 20);
            assert_eq!(*block_size, Some(512));
            assert_ne!(flags & u64::from(TFLAG_HAS_FLAGS), 0, "{flags:#x}");
            assert_eq!(Path::new(backend_id), sock);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.nbd_device_of(created.pid, created.minor), Some(3));
    assert_eq!(c.vbd_of_nbd_device(3), Some((created.pid, created.minor)));
    assert_eq!(c.vbd_of_nbd_device(4), None);

    // The socket the "kernel" holds is in the transmission phase: write through it and find
    // the data in the image.
    {
        let stream = UnixStream::from(sim.socket(3).unwrap());
        let mut nbd = blktap3::nbd::client::Client {
            stream,
            size: 8 << 20,
            flags: 0,
            structured: false,
        };
        let data = vec![0x5au8; 4096];
        assert_eq!(nbd.write(65536, &data, true).unwrap(), 0);
        assert_eq!(nbd.read(65536, 4096).unwrap().unwrap(), data);
    }
    let mut f = std::fs::File::open(&img).unwrap();
    let mut buf = vec![0u8; 65536 + 4096];
    f.read_exact(&mut buf).unwrap();
    assert!(buf[65536..].iter().all(|&b| b == 0x5a));

    // tap-ctl destroy -d /dev/nbd3 finds the VBD through the backend identifier.
    let (st, _, err) = tap_ctl(&c, &["destroy", "-d", "/dev/nbd3"]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(sim.calls().last(), Some(&SimCall::Disconnect(3)));
    assert!(sim.devices().is_empty());
    assert!(wait_exited(created.pid));
    assert!(!sock.exists());
    // An unknown kernel device is ENOENT.
    let (st, _, _) = tap_ctl(&c, &["destroy", "-d", "/dev/nbd3"]);
    assert_eq!(st, libc::ENOENT);
}

#[test]
fn destroy_by_pid_and_minor_disconnects_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 1 << 20);
    let sim = Arc::new(SimKernelNbd::new());
    let c = client(dir.path()).with_kernel_nbd(sim.clone());
    let created = c.create(OpenRequest::new(0, params), None).unwrap();
    assert_eq!(created.devname, Path::new("/dev/nbd0"));
    c.destroy(created.pid, created.minor, false, None).unwrap();
    let calls = sim.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1], SimCall::Disconnect(0));
    assert!(wait_exited(created.pid));
}

#[test]
fn refused_attach_falls_back_to_the_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 1 << 20);
    let sim = Arc::new(SimKernelNbd::failing(libc::EBUSY));
    let c = client(dir.path()).with_kernel_nbd(sim.clone());
    let created = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    let sock = nbd_socket_path(&dir.path().join("ctl"), created.pid, created.minor);
    assert_eq!(created.devname, sock);
    // The export still serves new clients after the abandoned handshake.
    let nbd = blktap3::nbd::client::Client::connect(&sock, false).unwrap();
    assert_eq!(nbd.size, 1 << 20);
    drop(nbd);
    c.destroy(created.pid, created.minor, false, None).unwrap();
    assert!(sim.calls().is_empty());
    assert!(wait_exited(created.pid));

    // Kernel devices off: the socket path, and the driver is never asked.
    let c = client(dir.path()).without_kernel_nbd();
    let created = c.create(OpenRequest::new(0, params), None).unwrap();
    assert_eq!(
        created.devname,
        nbd_socket_path(&dir.path().join("ctl"), created.pid, created.minor)
    );
    c.destroy(created.pid, created.minor, false, None).unwrap();
    assert!(wait_exited(created.pid));
}

/// A pid that existed and is gone now (reaped), for backends that must look orphaned.
fn dead_pid() -> i32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    pid
}

/// A tapdisk killed with SIGKILL leaves its kernel device configured (the kernel fails
/// its I/O until told to disconnect). The next create disconnects such orphans of this
/// control directory, and only those; destroy of the dead VBD disconnects its device,
/// frees the minor and succeeds.
#[test]
fn orphaned_devices_of_a_killed_tapdisk_are_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 1 << 20);
    let sim = Arc::new(SimKernelNbd::new());
    let c = client(dir.path()).with_kernel_nbd(sim.clone());

    // A device of another control directory whose pid is dead is not ours to touch, nor is
    // a live process's export in ours.
    let (foreign, _peer) = UnixStream::pair().unwrap();
    let dead = dead_pid();
    fn cfg(backend_id: &str) -> blktap3::nbd::kernel::ConnectConfig<'_> {
        blktap3::nbd::kernel::ConnectConfig {
            size: 1 << 20,
            block_size: None,
            flags: 0,
            backend_id,
        }
    }
    let other_dir = format!("/elsewhere/nbd{dead}.0");
    assert_eq!(sim.connect(foreign.as_fd(), &cfg(&other_dir)).unwrap(), 0);
    let live = nbd_socket_path(&dir.path().join("ctl"), std::process::id() as i32, 7);
    assert_eq!(
        sim.connect(foreign.as_fd(), &cfg(live.to_str().unwrap()))
            .unwrap(),
        1
    );

    let first = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    assert_eq!(first.devname, Path::new("/dev/nbd2"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_exited(first.pid));
    assert_eq!(c.nbd_device_of(first.pid, first.minor), Some(2));

    let second = c.create(OpenRequest::new(0, params), None).unwrap();
    let calls = sim.calls();
    assert_eq!(
        &calls[calls.len() - 2..calls.len() - 1],
        &[SimCall::Disconnect(2)],
        "{calls:?}"
    );
    assert_eq!(second.devname, Path::new("/dev/nbd2"));
    assert_eq!(c.nbd_device_of(second.pid, second.minor), Some(2));
    let backends: Vec<String> = sim.devices().into_iter().map(|(_, b)| b).collect();
    assert!(backends.contains(&other_dir), "{backends:?}");
    assert!(
        backends.iter().any(|b| Path::new(b) == live),
        "{backends:?}"
    );

    // The dead VBD's minor is still allocated; destroying it frees it.
    assert_ne!(first.minor, second.minor);
    let (st, _, err) = tap_ctl(
        &c,
        &[
            "destroy",
            "-p",
            &first.pid.to_string(),
            "-m",
            &first.minor.to_string(),
        ],
    );
    assert_eq!(st, 0, "{err}");
    assert!(!blktap3::control::minors::list(&dir.path().join("ctl"))
        .unwrap()
        .contains(&first.minor));

    // Killed again, and destroyed by device name: the device goes too.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_exited(second.pid));
    let (st, _, err) = tap_ctl(&c, &["destroy", "-d", "/dev/nbd2"]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(sim.calls().last(), Some(&SimCall::Disconnect(2)));
    assert_eq!(sim.devices().len(), 2);
    assert!(no_minors(dir.path()));
}

/// The real netlink driver. Without the nbd module (this build machine) the family lookup
/// says "not available" and create returns the socket path; where the module is loaded and
/// we may use it, create returns a /dev/nbdN whose sysfs backend names the socket.
#[test]
fn real_driver_attaches_or_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 1 << 20);
    let k = Netlink::new();
    let available = match k.family() {
        Err(KernelNbdError::NotAvailable) => false,
        Ok(_) => true,
        Err(e) => panic!("family lookup: {e}"),
    };
    let c = client(dir.path()).with_kernel_nbd(Arc::new(k.clone()));
    let created = c.create(OpenRequest::new(0, params), None).unwrap();
    let sock = nbd_socket_path(&dir.path().join("ctl"), created.pid, created.minor);
    let dev = created.devname.to_string_lossy().into_owned();
    if !available {
        assert_eq!(created.devname, sock);
        assert!(k.devices().iter().all(|(_, b)| Path::new(b) != sock));
    } else if let Some(index) = blktap3::nbd::kernel::parse_device_name(&dev) {
        assert!(dev.starts_with("/dev/nbd"), "{dev}");
        let backend = std::fs::read_to_string(format!("/sys/block/nbd{index}/backend")).unwrap();
        assert_eq!(Path::new(backend.trim()), sock);
        assert_eq!(c.nbd_device_of(created.pid, created.minor), Some(index));
    } else {
        // The family exists but the connect was refused (e.g. no CAP_SYS_ADMIN).
        assert_eq!(created.devname, sock);
    }
    c.destroy(created.pid, created.minor, false, None).unwrap();
    assert!(wait_exited(created.pid));
    assert_eq!(c.nbd_device_of(created.pid, created.minor), None);
}

/// blktap2 compatibility: a VBD on /dev/nbdN is also /dev/xen/blktap-2/tapdev<minor> (a
/// symlink, the directory made on demand); `find_device` names the device; `tap-ctl destroy
/// -d` takes the tapdev name and removes the link with the device.
#[test]
fn tapdev_link_follows_the_kernel_device() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 1 << 20);
    let sim = Arc::new(SimKernelNbd::starting_at(4));
    let c = client(dir.path()).with_kernel_nbd(sim.clone());
    assert!(!tapdev_dir(dir.path()).exists());

    let a = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    let b = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    assert_eq!(a.devname, Path::new("/dev/nbd4"));
    assert_eq!(b.devname, Path::new("/dev/nbd5"));
    let link_a = tapdev_dir(dir.path()).join(format!("tapdev{}", a.minor));
    assert_eq!(a.tapdev.as_deref(), Some(link_a.as_path()));
    assert_eq!(
        tapdev_target(dir.path(), a.minor).as_deref(),
        Some(Path::new("/dev/nbd4"))
    );
    assert_eq!(
        tapdev_target(dir.path(), b.minor).as_deref(),
        Some(Path::new("/dev/nbd5"))
    );
    assert_eq!(c.find_device(a.minor).unwrap(), Path::new("/dev/nbd4"));
    assert_eq!(c.find_device(b.minor).unwrap(), Path::new("/dev/nbd5"));
    assert_eq!(c.find_device(999).unwrap_err().errno(), libc::ENOENT);

    // `tap-ctl create` still prints the device itself.
    let (st, out, err) = tap_ctl(&c, &["create", "-a", &params]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(out, "/dev/nbd6\n");

    // Destroy by the blktap2 name: the device is disconnected, only that link goes.
    let (st, _, err) = tap_ctl(&c, &["destroy", "-d", link_a.to_str().unwrap()]);
    assert_eq!(st, 0, "{err}");
    assert!(sim.calls().contains(&SimCall::Disconnect(4)));
    assert!(!link_a.exists() && tapdev_target(dir.path(), a.minor).is_none());
    assert!(wait_exited(a.pid));
    assert_eq!(c.find_device(a.minor).unwrap_err().errno(), libc::ENOENT);
    assert!(tapdev_target(dir.path(), b.minor).is_some());

    // Destroy by /dev/nbdN and by pid/minor remove the link too.
    let (st, _, err) = tap_ctl(&c, &["destroy", "-d", "/dev/nbd5"]);
    assert_eq!(st, 0, "{err}");
    assert!(tapdev_target(dir.path(), b.minor).is_none());
    assert!(wait_exited(b.pid));
    let rest: Vec<_> = sim.devices();
    assert_eq!(rest.len(), 1, "{rest:?}");
    let (pid, minor) = c.vbd_of_nbd_device(6).unwrap();
    assert_eq!(
        tapdev_target(dir.path(), minor).as_deref(),
        Some(Path::new("/dev/nbd6"))
    );
    c.destroy(pid, minor, false, None).unwrap();
    assert!(tapdev_target(dir.path(), minor).is_none());
    assert!(wait_exited(pid));
    // Nothing is left in the link directory.
    assert_eq!(tapdev_links(dir.path()), Vec::<String>::new());
}

/// Without a kernel device there is no tapdev link (a socket is not a block device), a
/// stale link of the minor is removed, and `find_device` names the socket.
#[test]
fn socket_only_vbds_get_no_tapdev_link() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 1 << 20);
    // A link left by an earlier user of minor 0 (e.g. a minor freed by hand).
    std::fs::create_dir_all(tapdev_dir(dir.path())).unwrap();
    std::os::unix::fs::symlink("/dev/nbd9", tapdev_dir(dir.path()).join("tapdev0")).unwrap();
    for c in [
        client(dir.path()).with_kernel_nbd(Arc::new(SimKernelNbd::failing(libc::EBUSY))),
        client(dir.path()).without_kernel_nbd(),
    ] {
        let created = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
        assert_eq!(created.minor, 0);
        let sock = nbd_socket_path(&dir.path().join("ctl"), created.pid, created.minor);
        assert_eq!(created.devname, sock);
        assert_eq!(created.tapdev, None);
        assert_eq!(tapdev_target(dir.path(), 0), None);
        assert_eq!(c.find_device(0).unwrap(), sock);
        // A minor allocated but not served by a live tapdisk has no device.
        let (spare, _) = c.allocate().unwrap();
        assert_eq!(c.find_device(spare).unwrap_err().errno(), libc::ENOENT);
        c.free(spare).unwrap();
        let (st, _, err) = tap_ctl(&c, &["destroy", "-d", "tapdev0"]);
        assert_eq!(st, 0, "{err}");
        assert!(wait_exited(created.pid));
        assert_eq!(c.find_device(0).unwrap_err().errno(), libc::ENOENT);
    }
}

/// A killed tapdisk: destroy by its tapdev name still finds the VBD (through the device the
/// link points to), disconnects the device, frees the minor and removes the link; an orphan
/// reclaimed by the next create loses its link before the device is reused.
#[test]
fn tapdev_links_of_killed_tapdisks_do_not_outlive_their_devices() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 1 << 20);
    let sim = Arc::new(SimKernelNbd::new());
    let c = client(dir.path()).with_kernel_nbd(sim.clone());

    let a = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    assert_eq!(a.devname, Path::new("/dev/nbd0"));
    kill(a.pid);
    let link = tapdev_dir(dir.path()).join(format!("tapdev{}", a.minor));
    let (st, _, err) = tap_ctl(&c, &["destroy", "-d", link.to_str().unwrap()]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(sim.calls().last(), Some(&SimCall::Disconnect(0)));
    assert!(tapdev_target(dir.path(), a.minor).is_none());
    assert!(no_minors(dir.path()));

    // Killed and never destroyed: the next create reclaims /dev/nbd0 and the old name.
    let b = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    assert_eq!(b.devname, Path::new("/dev/nbd0"));
    kill(b.pid);
    let d = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    assert_ne!(d.minor, b.minor);
    assert_eq!(d.devname, Path::new("/dev/nbd0"));
    assert_eq!(tapdev_target(dir.path(), b.minor), None);
    assert_eq!(
        tapdev_target(dir.path(), d.minor).as_deref(),
        Some(Path::new("/dev/nbd0"))
    );
    // The dead VBD (no device, no link any more) is still destroyed by its tapdev name:
    // the export socket it left names its pid.
    let (st, _, err) = tap_ctl(&c, &["destroy", "-d", &format!("tapdev{}", b.minor)]);
    assert_eq!(st, 0, "{err}");
    assert!(!blktap3::control::minors::list(&dir.path().join("ctl"))
        .unwrap()
        .contains(&b.minor));
    // ... and the live one is untouched.
    assert_eq!(c.find_device(d.minor).unwrap(), Path::new("/dev/nbd0"));
    c.destroy(d.pid, d.minor, false, None).unwrap();
    assert!(wait_exited(d.pid));
    assert_eq!(tapdev_links(dir.path()), Vec::<String>::new());
}

/// Without backend identifiers the tapdev links are the record of which device serves
/// which VBD: find_device, destroy (by pid/minor, /dev/nbdN or tapdev name) and the reaping
/// of a killed tapdisk's device still find the device, and disconnect it.
#[test]
fn tapdev_links_stand_in_for_missing_backend_identifiers() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 1 << 20);
    let sim = Arc::new(SimKernelNbd::new());
    let c = client(dir.path()).with_kernel_nbd(Arc::new(NoBackendKernel(sim.clone())));
    let connected = || -> Vec<u32> { sim.devices().into_iter().map(|(i, _)| i).collect() };

    let a = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    let b = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    assert_eq!(
        (a.devname.as_path(), b.devname.as_path()),
        (Path::new("/dev/nbd0"), Path::new("/dev/nbd1"))
    );
    assert_eq!(c.find_device(a.minor).unwrap(), Path::new("/dev/nbd0"));
    assert_eq!(c.nbd_device_of(b.pid, b.minor), Some(1));
    assert_eq!(c.vbd_of_nbd_device(1), Some((b.pid, b.minor)));
    assert_eq!(c.vbd_of_nbd_device(2), None);

    // destroy -d /dev/nbd1 finds the VBD through the link.
    let (st, _, err) = tap_ctl(&c, &["destroy", "-d", "/dev/nbd1"]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(sim.calls().last(), Some(&SimCall::Disconnect(1)));
    assert_eq!(tapdev_target(dir.path(), b.minor), None);
    assert!(wait_exited(b.pid));

    // A killed tapdisk: the next create reclaims its device through the link.
    kill(a.pid);
    let d = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    assert!(
        sim.calls().contains(&SimCall::Disconnect(0)),
        "{:?}",
        sim.calls()
    );
    assert_eq!(d.devname, Path::new("/dev/nbd0"));
    assert_eq!(tapdev_target(dir.path(), a.minor), None);
    assert_eq!(connected(), vec![0]);
    // ... and the dead VBD is destroyed by its tapdev name (pid from its leftover socket).
    let (st, _, err) = tap_ctl(&c, &["destroy", "-d", &format!("tapdev{}", a.minor)]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(connected(), vec![0], "the live VBD's device stays");

    // Killed, then destroyed by pid/minor: the device found through the link goes.
    kill(d.pid);
    c.destroy(d.pid, d.minor, false, None).unwrap();
    assert_eq!(sim.calls().last(), Some(&SimCall::Disconnect(0)));
    assert!(connected().is_empty());
    assert_eq!(tapdev_links(dir.path()), Vec::<String>::new());
    assert!(no_minors(dir.path()));
}

/// Without backend identifiers the tapdev links are the only record, so they are trusted
/// only where they cannot name another VBD's device: a stale destroy of a dead tapdisk
/// whose minor went to a new VBD leaves that VBD's device and link alone, and a device
/// named by two links (one stale) is neither handed out nor reaped.
#[test]
fn stale_pids_and_links_never_reach_another_vbds_device() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 1 << 20);
    let sim = Arc::new(SimKernelNbd::new());
    let c = client(dir.path()).with_kernel_nbd(Arc::new(NoBackendKernel(sim.clone())));
    let connected = || -> Vec<u32> { sim.devices().into_iter().map(|(i, _)| i).collect() };

    // A dies and is destroyed; its minor and device go to Q.
    let a = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    kill(a.pid);
    c.destroy(a.pid, a.minor, false, None).unwrap();
    let q = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    assert_eq!(q.minor, a.minor, "the freed minor is reused");
    let q_dev = tapdev_target(dir.path(), q.minor).expect("Q's link");
    // A retried destroy of A must not touch Q.
    let calls = sim.calls().len();
    let _ = c.destroy(a.pid, a.minor, false, None);
    assert_eq!(sim.calls().len(), calls, "no disconnect: {:?}", sim.calls());
    assert_eq!(tapdev_target(dir.path(), q.minor), Some(q_dev.clone()));
    assert_eq!(c.nbd_device_of(a.pid, a.minor), None);
    assert_eq!(
        c.nbd_device_of(q.pid, q.minor),
        blktap3::nbd::kernel::parse_device_name(q_dev.to_str().unwrap())
    );

    // A stale second link to Q's device: ambiguous, so neither resolved nor reaped.
    let q_index = blktap3::nbd::kernel::parse_device_name(q_dev.to_str().unwrap()).unwrap();
    std::os::unix::fs::symlink(&q_dev, tapdev_dir(dir.path()).join("tapdev900")).unwrap();
    assert_eq!(c.vbd_of_nbd_device(q_index), None);
    let r = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    assert!(connected().contains(&q_index), "{:?}", sim.calls());
    std::fs::remove_file(tapdev_dir(dir.path()).join("tapdev900")).unwrap();
    assert_eq!(c.vbd_of_nbd_device(q_index), Some((q.pid, q.minor)));

    for v in [&q, &r] {
        c.destroy(v.pid, v.minor, false, None).unwrap();
    }
    assert!(connected().is_empty());
}

/// Without backend identifiers a device whose tapdev link cannot be made would be
/// unreachable for destroy: create serves the socket instead and gives the device back.
/// With them the device is kept (the kernel says whose it is).
#[test]
fn a_device_without_link_or_backend_identifier_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let params = aio_raw(dir.path(), "disk.raw", 1 << 20);
    // Something that is not a directory where the links go: every link fails.
    std::fs::create_dir_all(dir.path().join("dev/xen")).unwrap();
    std::fs::write(tapdev_dir(dir.path()), b"").unwrap();

    let sim = Arc::new(SimKernelNbd::new());
    let c = client(dir.path()).with_kernel_nbd(Arc::new(NoBackendKernel(sim.clone())));
    let v = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    assert_eq!(
        v.devname,
        nbd_socket_path(&dir.path().join("ctl"), v.pid, v.minor)
    );
    assert!(sim.devices().is_empty(), "{:?}", sim.calls());
    c.destroy(v.pid, v.minor, false, None).unwrap();

    let sim = Arc::new(SimKernelNbd::new());
    let c = client(dir.path()).with_kernel_nbd(sim.clone());
    let v = c.create(OpenRequest::new(0, params), None).unwrap();
    assert_eq!(v.devname, Path::new("/dev/nbd0"));
    assert_eq!(v.tapdev, None);
    c.destroy(v.pid, v.minor, false, None).unwrap();
    assert!(sim.devices().is_empty());
}
