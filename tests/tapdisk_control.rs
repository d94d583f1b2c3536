//! tapdisk driven through its control socket by the control client (what tap-ctl does):
//! spawn (daemonise + readiness line), attach/open, list, stats, pause/unpause, close,
//! detach, and exit after the last detach with the sockets removed.

mod common;
use common::cmd::tap_ctl;
use common::image::aio_raw;
use common::proc::{alive, wait_gone};

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blktap3::control::client::Client;
use blktap3::control::msg::{OpenFlags, OpenRequest, ResumeRequest, VbdState};

/// Kernel NBD devices off: these tests use `devname` as the export's socket, also on a
/// machine where the nbd module is loaded.
fn client(dir: &Path) -> Client {
    Client::with_dir(dir.join("ctl"))
        .with_tapdisk(env!("CARGO_BIN_EXE_tapdisk"))
        .without_kernel_nbd()
}

#[test]
fn create_use_pause_resume_destroy_through_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(dir.path());
    let params = aio_raw(dir.path(), "a.raw", 8 << 20);
    let snap = aio_raw(dir.path(), "b.raw", 8 << 20);
    let created = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    let pid = created.pid;
    assert!(alive(pid));
    assert!(dir.path().join(format!("ctl/ctl{pid}")).exists());
    assert!(created.devname.exists());
    assert_eq!(c.get_pid(pid, None).unwrap(), pid);

    let uri = format!("nbd+unix:///?socket={}", created.devname.display());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x42 0 64k"])
        .output()
        .unwrap();
    assert!(out.status.success());

    let list = c.list_pid(pid, None).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].params, params);
    assert_eq!(list[0].state, VbdState(0));
    let stats = String::from_utf8(c.stats(pid, Some(created.minor), None).unwrap()).unwrap();
    assert!(stats.contains("\"secs\": [ 0, 128 ]"), "{stats}");
    let info = c.info(pid, created.minor, None).unwrap();
    assert_eq!((info.sectors, info.sector_size), (16384, 512));

    c.pause(pid, created.minor, None).unwrap();
    assert_eq!(c.list_pid(pid, None).unwrap()[0].state, VbdState::PAUSED);
    c.unpause(
        pid,
        ResumeRequest {
            minor: created.minor,
            flags: OpenFlags::empty(),
            params: Some(snap.clone()),
            secondary: None,
            log_path: None,
        },
        None,
    )
    .unwrap();
    assert_eq!(c.list_pid(pid, None).unwrap()[0].params, snap);

    c.destroy(pid, created.minor, false, None).unwrap();
    assert!(
        wait_gone(pid, Duration::from_secs(5)),
        "tapdisk must exit after its last VBD is detached"
    );
    assert!(!dir.path().join(format!("ctl/ctl{pid}")).exists());
    assert!(!created.devname.exists());
}

#[test]
fn many_vbds_in_one_tapdisk_list_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(dir.path());
    let pid = c.spawn().unwrap();
    let mut minors = Vec::new();
    for i in 0..9 {
        let (m, _) = c.allocate().unwrap();
        c.attach(pid, m).unwrap();
        let mut o = OpenRequest::new(m, aio_raw(dir.path(), &format!("{i}.raw"), 1 << 20));
        if i % 2 == 1 {
            o.flags = OpenFlags::RDONLY;
        }
        let info = c.open(pid, o, None).unwrap();
        assert_eq!(info.info & 0x4 != 0, i % 2 == 1);
        minors.push(m);
    }
    // More than the 6 VBDs the C server's LIST buffer could hold.
    let list = c.list_pid(pid, None).unwrap();
    assert_eq!(list.len(), 9);
    let all = String::from_utf8(c.stats(pid, None, None).unwrap()).unwrap();
    assert!(all.starts_with("[ { \"name\": \"aio:"), "{all}");
    assert_eq!(all.matches("\"read_caching\"").count(), 9);
    // Attaching a minor twice fails.
    assert!(c.attach(pid, minors[0]).is_err());
    for m in &minors {
        c.destroy(pid, *m, true, None).unwrap();
    }
    assert!(wait_gone(pid, Duration::from_secs(5)));
}

#[test]
fn sighup_and_sigusr1_are_harmless_sigterm_removes_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(dir.path());
    let created = c
        .create(
            OpenRequest::new(0, aio_raw(dir.path(), "x.raw", 1 << 20)),
            None,
        )
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(created.pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_gone(created.pid, Duration::from_secs(5)));
    assert!(!created.devname.exists());
    assert!(!dir.path().join(format!("ctl/ctl{}", created.pid)).exists());
}

#[test]
fn stats_list_every_image_of_the_chain_leaf_first() {
    use blktap3::image::vhd::ops::{snapshot, SnapshotOptions};
    let dir = tempfile::tempdir().unwrap();
    let c = client(dir.path());
    let base = dir.path().join("base.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let leaf = dir.path().join("leaf.vhd");
    let opts = SnapshotOptions {
        raw_parent: true,
        ..Default::default()
    };
    snapshot(&leaf, &base, &opts).unwrap();
    let params = format!("vhd:{}", leaf.display());
    let created = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    let stats =
        String::from_utf8(c.stats(created.pid, Some(created.minor), None).unwrap()).unwrap();
    let images = format!(
        "\"images\": [ {{ \"name\": \"{}\", \"hits\": [ 0, 0 ], \"fail\": [ 0, 0 ], \"driver\": \
         {{ \"type\": 4, \"name\": \"vhd\", \"status\": null }} }}, {{ \"name\": \"{}\", \
         \"hits\": [ 0, 0 ], \"fail\": [ 0, 0 ], \"driver\": {{ \"type\": 0, \"name\": \"aio\", \
         \"status\": null }} }} ], ",
        leaf.display(),
        base.display()
    );
    assert!(stats.contains(&images), "{stats}");
    assert!(
        stats.starts_with(&format!("{{ \"name\": \"{params}\", ")),
        "{stats}"
    );
    c.destroy(created.pid, created.minor, true, None).unwrap();
    assert!(wait_gone(created.pid, Duration::from_secs(5)));
}

#[test]
fn nbdinfo_map_shows_the_holes_of_a_sparse_aio_raw() {
    use std::os::unix::fs::FileExt;
    if Command::new("nbdinfo").arg("--version").output().is_err() {
        eprintln!("skipped: nbdinfo not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = client(dir.path());
    let p = dir.path().join("sparse.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&[1; 4096], 0).unwrap();
    f.write_all_at(&[2; 4096], 8 << 20).unwrap();
    f.sync_all().unwrap();
    let holes = nix::unistd::lseek64(&f, 0, nix::unistd::Whence::SeekHole).unwrap() < 16 << 20;
    let params = format!("aio:{}", p.display());
    let created = c.create(OpenRequest::new(0, params), None).unwrap();
    let uri = format!("nbd+unix:///?socket={}", created.devname.display());
    let out = Command::new("nbdinfo")
        .args(["--map", &uri])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let map = String::from_utf8(out.stdout).unwrap();
    // Lines: "<offset> <length> <type> <description>".
    let kinds: Vec<&str> = map
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    if holes {
        assert_eq!(kinds, ["data", "hole,zero", "data", "hole,zero"], "{map}");
        let third: Vec<u64> = map
            .lines()
            .nth(2)
            .unwrap()
            .split_whitespace()
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(
            third[0] <= 8 << 20 && third[0] + third[1] >= (8 << 20) + 4096,
            "{map}"
        );
    } else {
        assert_eq!(kinds, ["data"], "{map}");
    }
    c.destroy(created.pid, created.minor, true, None).unwrap();
    assert!(wait_gone(created.pid, Duration::from_secs(5)));
}

#[test]
fn start_up_failure_reaches_the_spawner_with_its_errno() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    // The control directory cannot be created under a regular file: ENOTDIR.
    let bad = file.join("ctl");
    let expect = format!("create {}: Not a directory", bad.display());
    // tapdisk's own spawn (daemonising parent + child): the child's error and status.
    let out = Command::new(env!("CARGO_BIN_EXE_tapdisk"))
        .env("BLKTAP_CONTROL_DIR", &bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(libc::ENOTDIR), "{err}");
    assert!(err.contains(&expect), "{err}");
    assert!(out.stdout.is_empty());
    // Through the control client: the spawn fails and names tapdisk's exit status.
    let c = Client::with_dir(&bad).with_tapdisk(env!("CARGO_BIN_EXE_tapdisk"));
    let e = c.spawn().unwrap_err();
    assert!(e.to_string().contains("exit status: 20"), "{e}");
    assert_eq!(e.errno(), libc::ENOTDIR);
    // tap-ctl spawn: non-zero exit, and tapdisk's reason on its stderr.
    let out = tap_ctl(&bad, env!("CARGO_BIN_EXE_tapdisk"))
        .arg("spawn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(libc::ENOTDIR), "{err}");
    assert!(err.contains(&expect), "{err}");
}
