//! Minor marker files: allocation, freeing and lock contention.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use blktap3::control::minors::{
    allocate, free, is_locked, list, lock_marker, marker_dir, marker_path,
};

#[test]
fn allocate_lowest_free_and_free() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    assert_eq!(list(dir).unwrap(), Vec::<u16>::new());
    for want in 0..3u16 {
        let (m, p) = allocate(dir).unwrap();
        assert_eq!(m, want);
        assert_eq!(p, dir.join(format!("tapdisk/tapdisk-{want}")));
        assert_eq!(p, marker_path(dir, want));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert_eq!(list(dir).unwrap(), vec![0, 1, 2]);
    free(dir, 1).unwrap();
    assert!(!marker_path(dir, 1).exists());
    assert_eq!(list(dir).unwrap(), vec![0, 2]);
    assert_eq!(allocate(dir).unwrap().0, 1);
    assert_eq!(allocate(dir).unwrap().0, 3);
    // Freeing a minor that is not allocated.
    assert_eq!(free(dir, 9).unwrap_err().errno(), libc::ENOENT);
    // Out of range.
    assert_eq!(free(dir, 16384).unwrap_err().errno(), libc::EINVAL);
    // Foreign files in the marker dir are ignored.
    std::fs::write(marker_dir(dir).join("tapdisk-x"), b"").unwrap();
    std::fs::write(marker_dir(dir).join("other"), b"").unwrap();
    std::fs::write(marker_dir(dir).join("tapdisk-99999"), b"").unwrap();
    assert_eq!(list(dir).unwrap(), vec![0, 1, 2, 3]);
}

#[test]
fn free_fails_while_a_tapdisk_holds_the_marker() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (m, _) = allocate(dir).unwrap();
    let held = lock_marker(dir, m, Duration::ZERO).unwrap();
    assert_eq!(held.minor(), m);
    assert_eq!(held.path(), marker_path(dir, m));
    assert!(is_locked(dir, m).unwrap());
    let e = free(dir, m).unwrap_err();
    assert_eq!(e.errno(), libc::EWOULDBLOCK);
    assert!(marker_path(dir, m).exists());
    // A second tapdisk cannot take it either.
    let t = Instant::now();
    let e = lock_marker(dir, m, Duration::from_millis(100)).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY);
    assert!(t.elapsed() >= Duration::from_millis(100));
    drop(held);
    assert!(!is_locked(dir, m).unwrap());
    free(dir, m).unwrap();
    assert!(!marker_path(dir, m).exists());
}

#[test]
fn lock_of_missing_marker_is_enoent() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(
        lock_marker(d.path(), 5, Duration::ZERO)
            .unwrap_err()
            .errno(),
        libc::ENOENT
    );
}

#[test]
fn lock_waits_for_a_short_holder() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let (m, _) = allocate(&dir).unwrap();
    let held = lock_marker(&dir, m, Duration::ZERO).unwrap();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
    });
    let l = lock_marker(&dir, m, Duration::from_secs(5)).unwrap();
    assert_eq!(l.minor(), m);
    t.join().unwrap();
}

#[test]
fn concurrent_allocations_are_unique() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| allocate(&dir).unwrap().0)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u16> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..80).collect::<Vec<u16>>());
}
