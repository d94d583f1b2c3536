//! The tapdisk NBD export checked by real NBD peers (qemu-img, qemu-io, nbdinfo, nbdcopy) and
//! by hand-made bad requests. Each test starts `tapdisk -D --open aio:<image>` in a private
//! control directory.

mod common;
use common::cmd::{qemu_io, run_ok};
use common::data::XorShift64;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blktap3::nbd::client::{Client, ClientReply};
use blktap3::nbd::proto::{self, RequestHeader};

struct Td {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
    image: PathBuf,
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Deterministic pseudo-random bytes.
fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = XorShift64(seed | 1);
    (0..n).map(|_| x.next() as u8).collect()
}

impl Td {
    fn start(image_len: usize, content: Option<&[u8]>, read_only: bool) -> Td {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(image_len as u64).unwrap();
        if let Some(c) = content {
            std::fs::write(&image, c).unwrap();
        }
        Td::serve(dir, image, "aio", read_only)
    }

    /// A fresh dynamic VHD made by qemu-img.
    fn start_vhd(image_len: usize) -> Td {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.vhd");
        run_ok(
            Command::new("qemu-img")
                .args([
                    "create",
                    "-q",
                    "-f",
                    "vpc",
                    "-o",
                    "subformat=dynamic,force_size=on",
                ])
                .arg(&image)
                .arg(image_len.to_string()),
        );
        Td::serve(dir, image, "vhd", false)
    }

    fn serve(dir: tempfile::TempDir, image: PathBuf, kind: &str, read_only: bool) -> Td {
        let ctl = dir.path().join("ctl");
        let pidfile = dir.path().join("pid");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tapdisk"));
        cmd.arg("-D")
            .arg("--open")
            .arg(format!("{kind}:{}", image.display()))
            .arg("--pidfile")
            .arg(&pidfile)
            .env("BLKTAP_CONTROL_DIR", &ctl)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if read_only {
            cmd.arg("--read-only");
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        let mut out = child.stdout.take().unwrap();
        let mut b = [0u8; 1];
        while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0] as char);
        }
        let pid = child.id();
        assert_eq!(line, format!("{}/ctl{pid}", ctl.display()));
        let sock = ctl.join(format!("nbd{pid}.0"));
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no nbd socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Td {
            child,
            dir,
            sock,
            image,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// Stop the daemon (SIGTERM: it closes the image cleanly).
    fn child_stop(&mut self) -> std::io::Result<()> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().map(|_| ())
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Td {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Copies `src` into the export and the export back out to `out.raw` with qemu-img; returns
/// the copy's path.
fn qemu_img_roundtrip(td: &Td, src: &Path) -> PathBuf {
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(src)
            .arg(td.uri()),
    );
    qemu_img_out(td, "out.raw")
}

/// Copies the export out to `name` in the test's directory with qemu-img; returns its path.
fn qemu_img_out(td: &Td, name: &str) -> PathBuf {
    let out = td.dir.path().join(name);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(td.uri())
            .arg(&out),
    );
    out
}

/// Whether one of `tools` is not installed (then the test is skipped, and says so).
fn missing(tools: &[&str]) -> bool {
    let absent: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if !absent.is_empty() {
        eprintln!("skipped: {} not installed", absent.join(", "));
    }
    !absent.is_empty()
}

fn sha256_file(p: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(p))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn qemu_img_convert_in_and_out_roundtrips() {
    if missing(&["qemu-img"]) {
        return;
    }
    let td = Td::start(8 << 20, None, false);
    let src = td.dir.path().join("src.raw");
    std::fs::write(&src, pattern(8 << 20, 7)).unwrap();
    let out = qemu_img_roundtrip(&td, &src);
    let want = std::fs::read(&src).unwrap();
    assert!(std::fs::read(&out).unwrap() == want, "read back differs");
    assert!(std::fs::read(&td.image).unwrap() == want, "image differs");
}

#[test]
fn qemu_io_pattern_write_read_and_nbdinfo() {
    if missing(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let td = Td::start(16 << 20, None, false);
    let out = run_ok(&mut qemu_io(
        &td.uri(),
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 3M 64k",
            "read -P 0xcd 3M 64k",
            "read -P 0 2M 512",
            "flush",
        ],
    ));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let img = std::fs::read(&td.image).unwrap();
    assert!(img[..1 << 20].iter().all(|b| *b == 0xab));
    assert!(img[3 << 20..(3 << 20) + 65536].iter().all(|b| *b == 0xcd));

    let info = run_ok(Command::new("nbdinfo").arg(td.uri()));
    assert!(info.contains("export-size: 16777216"), "{info}");
    for flag in [
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_multi_conn: true",
        "is_read_only: false",
        "block_size_minimum: 512",
    ] {
        assert!(info.contains(flag), "{flag}: {info}");
    }
}

#[test]
fn vhd_export_roundtrips_and_maps_allocation() {
    if missing(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let mut td = Td::start_vhd(16 << 20);
    let out = run_ok(&mut qemu_io(
        &td.uri(),
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 6M 64k",
            "read -P 0xab 0 1M",
            "read -P 0xcd 6M 64k",
            "read -P 0 4M 512",
        ],
    ));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(td.uri()));
    let lines: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    // Data where written, holes (hole,zero = 3) elsewhere.
    assert_eq!(lines[0][..3], ["0", "1048576", "0"], "{map}");
    assert_eq!(lines[1][..3], ["1048576", "5242880", "3"], "{map}");
    assert_eq!(lines[2][..3], ["6291456", "65536", "0"], "{map}");
    assert_eq!(lines.last().unwrap()[2], "3", "{map}");
    // Whole-image copy in and out with qemu-img, then qemu-img compare on the VHD itself.
    let src = td.dir.path().join("src.raw");
    std::fs::write(&src, pattern(16 << 20, 3)).unwrap();
    let out = qemu_img_roundtrip(&td, &src);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
    td.child_stop().unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "vpc"])
            .arg(&src)
            .arg(&td.image),
    );
}

#[test]
fn nbdcopy_whole_export_matches_file_sha256() {
    if missing(&["nbdcopy"]) {
        return;
    }
    let data = pattern(24 << 20, 99);
    let td = Td::start(data.len(), Some(&data), false);
    let out = td.dir.path().join("copy.raw");
    run_ok(Command::new("nbdcopy").arg(td.uri()).arg(&out));
    assert_eq!(sha256_file(&out), sha256_file(&td.image));
    // And the other way: nbdcopy into the export, then compare.
    let src = td.dir.path().join("src2.raw");
    std::fs::write(&src, pattern(24 << 20, 5)).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(td.uri()));
    assert_eq!(sha256_file(&src), sha256_file(&td.image));
}

#[test]
fn concurrent_clients_write_disjoint_regions() {
    if missing(&["qemu-io"]) {
        return;
    }
    let td = Td::start(16 << 20, None, false);
    let uri = td.uri();
    let threads: Vec<_> = (0..4u32)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let off = format!("{}M", i * 4);
                let pat = format!("0x{:x}", 0x10 + i);
                run_ok(&mut qemu_io(
                    &uri,
                    &[
                        &format!("aio_write -P {pat} {off} 2M"),
                        &format!("aio_write -P {pat} {}M 2M", i * 4 + 2),
                        "aio_flush",
                        &format!("read -P {pat} {off} 4M"),
                    ],
                ))
            })
        })
        .collect();
    for t in threads {
        let out = t.join().unwrap();
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    let img = std::fs::read(&td.image).unwrap();
    for i in 0..4usize {
        assert!(img[i << 22..(i + 1) << 22]
            .iter()
            .all(|b| *b == 0x10 + i as u8));
    }
}

#[test]
fn read_only_export_refuses_writes() {
    if missing(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let td = Td::start(4 << 20, Some(&[0x5a; 4 << 20]), true);
    let info = run_ok(Command::new("nbdinfo").arg(td.uri()));
    assert!(info.contains("is_read_only: true"), "{info}");
    let out = qemu_io(&td.uri(), &["write -P 1 0 4k"]).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("wrote 4096"), "{text}");
    // A raw WRITE gets EPERM.
    let mut c = Client::connect(&td.sock, false).unwrap();
    assert_eq!(c.write(0, &[1u8; 4096], false).unwrap(), proto::NBD_EPERM);
    assert_eq!(c.read(0, 4096).unwrap(), Ok(vec![0x5a; 4096]));
    assert!(std::fs::read(&td.image).unwrap().iter().all(|b| *b == 0x5a));
}

#[test]
fn bad_requests_get_errors_and_the_daemon_keeps_serving() {
    let mut td = Td::start(4 << 20, None, false);
    let mut good = Client::connect(&td.sock, true).unwrap();

    // Huge read: EOVERFLOW (structured) / EINVAL (simple); connection stays.
    let mut c = Client::connect(&td.sock, false).unwrap();
    let h = RequestHeader {
        flags: 0,
        typ: proto::CMD_READ,
        cookie: 1,
        offset: 0,
        length: u32::MAX,
    };
    c.send(&h, &[]).unwrap();
    assert_eq!(
        c.recv(None, &mut Vec::new()).unwrap(),
        ClientReply::Simple {
            cookie: 1,
            error: proto::NBD_EINVAL
        }
    );
    // Out of range read and write.
    assert_eq!(c.read(4 << 20, 512).unwrap(), Err(proto::NBD_EINVAL));
    assert_eq!(
        c.write((4 << 20) - 512, &[0u8; 1024], false).unwrap(),
        proto::NBD_ENOSPC
    );
    // Oversized write: the payload is consumed, EINVAL, the connection goes on.
    let big = vec![0u8; (proto::MAX_PAYLOAD + 512) as usize];
    assert_eq!(c.write(0, &big, false).unwrap(), proto::NBD_EINVAL);
    assert_eq!(c.write(0, &[9u8; 512], true).unwrap(), 0);
    // Unknown command.
    c.send(&RequestHeader { typ: 42, ..h }, &[]).unwrap();
    assert!(matches!(
        c.recv(None, &mut Vec::new()).unwrap(),
        ClientReply::Simple {
            error: proto::NBD_EINVAL,
            ..
        }
    ));
    // Bad magic: the server hangs up.
    c.stream.write_all(&[0xffu8; 28]).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.stream.read(&mut b).unwrap_or(0), 0);

    // A client that disconnects in the middle of a write payload.
    let mut d = Client::connect(&td.sock, false).unwrap();
    let w = RequestHeader {
        flags: 0,
        typ: proto::CMD_WRITE,
        cookie: 2,
        offset: 0,
        length: 1 << 20,
    };
    d.send(&w, &[1u8; 4096]).unwrap();
    drop(d);
    // A client that disconnects with reads in flight.
    let mut e = Client::connect(&td.sock, false).unwrap();
    for i in 0..32u64 {
        e.send(
            &RequestHeader {
                flags: 0,
                typ: proto::CMD_READ,
                cookie: i,
                offset: 0,
                length: 1 << 20,
            },
            &[],
        )
        .unwrap();
    }
    drop(e);
    // A client that drops during the handshake.
    let mut s = UnixStream::connect(&td.sock).unwrap();
    s.write_all(&[0, 0]).unwrap();
    drop(s);

    std::thread::sleep(Duration::from_millis(100));
    assert!(td.alive());
    // The first client still works, with structured replies.
    good.send(
        &RequestHeader {
            flags: 0,
            typ: proto::CMD_READ,
            cookie: 7,
            offset: 0,
            length: 512,
        },
        &[],
    )
    .unwrap();
    match good.recv(None, &mut Vec::new()).unwrap() {
        ClientReply::Chunk {
            cookie: 7, payload, ..
        } => assert_eq!(payload[8..], [9u8; 512]),
        r => panic!("{r:?}"),
    }
}

#[test]
fn qemu_img_convert_keeps_a_vhd_export_sparse() {
    if missing(&["qemu-img", "nbdinfo"]) {
        return;
    }
    let td = Td::start_vhd(16 << 20);
    let src = td.dir.path().join("sparse.raw");
    let mut data = pattern(1 << 20, 11);
    data.resize(16 << 20, 0);
    std::fs::write(&src, &data).unwrap();
    // -n: the target is not known to be zero, so qemu-img sends WRITE_ZEROES for the rest.
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(td.uri()),
    );
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(td.uri()));
    let lines: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    assert_eq!(lines.len(), 2, "{map}");
    assert_eq!(lines[0][..3], ["0", "1048576", "0"], "{map}");
    assert_eq!(lines[1][2], "3", "{map}");
    let out = qemu_img_out(&td, "back.raw");
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn a_client_that_never_reads_does_not_stall_others() {
    let td = Td::start(4 << 20, Some(&[0x33; 4 << 20]), false);
    // 256 MiB of replies nobody reads: the server must queue (up to its backlog limit)
    // and stop reading this client, not block.
    let mut hog = Client::connect(&td.sock, false).unwrap();
    let mut reqs = Vec::new();
    for i in 0..256u64 {
        reqs.extend_from_slice(
            &RequestHeader {
                flags: 0,
                typ: proto::CMD_READ,
                cookie: i,
                offset: 0,
                length: 1 << 20,
            }
            .encode(),
        );
    }
    hog.stream.write_all(&reqs).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let mut other = Client::connect(&td.sock, false).unwrap();
    for _ in 0..50 {
        assert_eq!(other.read(4096, 4096).unwrap(), Ok(vec![0x33; 4096]));
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    // The hog still gets all its replies, in some order, when it finally reads.
    let mut seen = 0;
    let mut data = Vec::new();
    while seen < 256 {
        match hog.recv(Some(1 << 20), &mut data).unwrap() {
            ClientReply::Simple { error: 0, .. } => seen += 1,
            r => panic!("{r:?}"),
        }
    }
    if have("nbdinfo") {
        let list = run_ok(Command::new("nbdinfo").arg("--list").arg(td.uri()));
        assert!(list.contains("export=\"\""), "{list}");
    }
}
