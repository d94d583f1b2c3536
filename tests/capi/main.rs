//! Builds tests/capi/tap_ctl_test.c with gcc against include/blktap and the cdylib (loaded
//! through its soname libblktapctl.so.0) and runs it against an empty control directory and
//! one with a live in-process tapdisk server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use blktap3::control::minors;
use blktap3::control::msg::{ListEntry, Reply, Request, VbdState, MSG_SIZE};
use blktap3::control::server::ControlServer;

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Compile the C test in `work`; returns its path.
fn build_c_test(work: &Path) -> PathBuf {
    // `cargo test` builds the cdylib into deps/ (only `cargo build` copies it up).
    let lib = [
        target_dir().join("deps/libblktap3.so"),
        target_dir().join("libblktap3.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("libblktap3.so not built");
    let out = Command::new("readelf")
        .arg("-d")
        .arg(&lib)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Library soname: [libblktapctl.so.0]"),
        "soname"
    );
    std::os::unix::fs::symlink(&lib, work.join("libblktapctl.so.0")).unwrap();
    std::os::unix::fs::symlink(&lib, work.join("libblktapctl.so")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = work.join("tap_ctl_test");
    let st = Command::new("gcc")
        .arg(if cfg!(target_pointer_width = "32") {
            "-m32"
        } else {
            "-m64"
        })
        .args(["-std=gnu99", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include/blktap"))
        .arg(root.join("tests/capi/tap_ctl_test.c"))
        .arg("-L")
        .arg(work)
        .args(["-lblktapctl", "-o"])
        .arg(&exe)
        .status()
        .unwrap();
    assert!(st.success(), "gcc failed");
    exe
}

fn run(exe: &Path, work: &Path, ctl: &Path, extra_env: &[(&str, &str)], args: &[&str]) {
    run_output(exe, work, ctl, extra_env, args);
}

/// [`run`], returning the test's stdout.
fn run_output(
    exe: &Path,
    work: &Path,
    ctl: &Path,
    extra_env: &[(&str, &str)],
    args: &[&str],
) -> String {
    let mut c = Command::new(exe);
    c.args(args)
        .env("LD_LIBRARY_PATH", work)
        .env("BLKTAP_CONTROL_DIR", ctl);
    for (k, v) in extra_env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.trim_end().ends_with("ok"),
        "tap_ctl_test {args:?}: status {:?}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text.into_owned()
}

#[test]
fn c_abi_end_to_end() {
    let work = tempfile::tempdir().unwrap();
    let ctl = tempfile::tempdir().unwrap();
    let exe = build_c_test(work.path());
    let (w, c) = (work.path(), ctl.path());

    run(&exe, w, c, &[], &["sizes", &MSG_SIZE.to_string()]);
    run(&exe, w, c, &[], &["empty"]);

    // A live "tapdisk" (this process) serving minor 3; minors 0..=2 are orphans.
    for _ in 0..4 {
        minors::allocate(c).unwrap();
    }
    let pid = std::process::id() as i32;
    let server = Arc::new(ControlServer::bind(c, pid).unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s2, seen2) = (Arc::clone(&server), Arc::clone(&seen));
    std::thread::spawn(move || {
        let _ = s2.run_concurrent(Arc::new(move |r: Request| {
            seen2.lock().unwrap().push(r.clone());
            match r {
                Request::Pid => Reply::Pid(pid),
                Request::List => Reply::List(vec![ListEntry {
                    minor: 3,
                    state: VbdState::PAUSED,
                    params: "vhd:/images/a.vhd".into(),
                }]),
                Request::Close { minor: 3 } => Reply::Close,
                Request::Detach { minor: 3 } => Reply::Detach,
                _ => Reply::error(libc::EINVAL),
            }
        }));
    });
    run(
        &exe,
        w,
        c,
        &[],
        &[
            "live",
            &pid.to_string(),
            "3",
            "0x20",
            "vhd",
            "/images/a.vhd",
            "3",
        ],
    );
    run(&exe, w, c, &[], &["destroy", &pid.to_string(), "3"]);
    assert!(
        !minors::marker_path(c, 3).exists(),
        "destroy frees the minor"
    );
    {
        let seen = seen.lock().unwrap();
        let n = seen.len();
        assert_eq!(
            &seen[n - 2..],
            &[Request::Close { minor: 3 }, Request::Detach { minor: 3 }]
        );
    }

    // tap_ctl_create with no tapdisk binary: -ENOENT, nothing left allocated.
    let before = minors::list(c).unwrap();
    run(
        &exe,
        w,
        c,
        &[("BLKTAP_TAPDISK", "/nonexistent/tapdisk")],
        &["create_fail", "vhd:/x.vhd", &libc::ENOENT.to_string()],
    );
    assert_eq!(minors::list(c).unwrap(), before);
    run(
        &exe,
        w,
        c,
        &[],
        &["create_fail", "no-colon", &libc::EINVAL.to_string()],
    );
}

/// `tap_ctl_find_device` from C against a real tapdisk (spawned by `tap_ctl_create`): it
/// names the device `tap_ctl_create` returned (here the NBD socket: no kernel devices),
/// -ENOENT for other minors and after destroy, -EINVAL for bad arguments. No tapdev link
/// is made for a socket.
#[test]
fn c_abi_find_device_of_an_existing_tapdisk() {
    let work = tempfile::tempdir().unwrap();
    let ctl = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let exe = build_c_test(work.path());
    let img = data.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let links = data.path().join("blktap-2");
    let out = run_output(
        &exe,
        work.path(),
        ctl.path(),
        &[
            ("BLKTAP_TAPDISK", env!("CARGO_BIN_EXE_tapdisk")),
            ("BLKTAP_NBD_DEVICE", "0"),
            ("BLKTAP_TAPDEV_DIR", links.to_str().unwrap()),
        ],
        &["find_device", "aio", img.to_str().unwrap()],
    );
    let dev = out
        .lines()
        .find_map(|l| l.strip_prefix("devname "))
        .unwrap_or_else(|| panic!("no devname line in {out}"));
    let dev = Path::new(dev);
    assert_eq!(dev.parent(), Some(ctl.path()), "{out}");
    let name = dev.file_name().unwrap().to_str().unwrap();
    assert!(
        blktap3::control::nbd_from_socket_name(name).is_some(),
        "{name}"
    );
    assert!(!links.exists(), "a socket got a tapdev link");
    assert!(minors::list(ctl.path()).unwrap().is_empty());
}

#[test]
fn header_layout_on_i686_and_x86_64() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (flag, size, union_at, len_at) in [("-m64", 544, 8, 8), ("-m32", 536, 4, 4)] {
        let src = format!(
            "#include <tap-ctl.h>\n\
             _Static_assert(sizeof(tapdisk_message_t) == {size}, \"size\");\n\
             _Static_assert(offsetof(tapdisk_message_t, u) == {union_at}, \"union\");\n\
             _Static_assert(offsetof(tapdisk_message_stat_t, length) == {len_at}, \"len\");\n\
             _Static_assert(sizeof(tapdisk_message_blkif_t) == 316, \"blkif\");\n\
             _Static_assert(offsetof(tapdisk_message_blkif_ext_t, gref_ext) == 316, \"ext\");\n\
             _Static_assert(sizeof(tapdisk_message_blkif_ext_t) == 348, \"ext size\");\n\
             _Static_assert(sizeof(tapdisk_message_params_t) == 532, \"params\");\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.c");
        std::fs::write(&f, src).unwrap();
        let st = Command::new("gcc")
            .args([
                flag,
                "-std=gnu99",
                "-Wall",
                "-Werror",
                "-fsyntax-only",
                "-I",
            ])
            .arg(root.join("include/blktap"))
            .arg(&f)
            .status()
            .unwrap();
        assert!(st.success(), "header layout with {flag}");
    }
}
