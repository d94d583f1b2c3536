//! vhd-util on damaged images: every command must fail cleanly (an errno exit status and
//! a message), never panic (Rust's exit status 101) or die from a signal.

mod vhd_util_common;
use vhd_util_common::*;

/// A tiny deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn assert_clean(o: &Out, what: &str) {
    assert_ne!(o.status, 101, "{what} panicked: {}", o.stderr);
    assert!(o.status >= 0, "{what} died from a signal: {}", o.stderr);
}

#[test]
fn damaged_metadata_never_panics() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "8"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    ok(&["fill", "-n", &leaf, "-b", "-t", "5000"]);
    let pristine = std::fs::read(&leaf).unwrap();
    let meta_end = 8192.min(pristine.len());
    let n = pristine.len();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let victim = p(d.path(), "victim.vhd");
    let journal = p(d.path(), "victim.journal");
    for round in 0..40 {
        let mut b = pristine.clone();
        // Damage 1..8 bytes in the metadata area or the footers, sometimes with
        // extreme values (all ones / zero) that stress size arithmetic.
        for _ in 0..=rng.below(8) {
            let off = match rng.below(3) {
                0 => rng.below(meta_end as u64) as usize,
                1 => n - 512 + rng.below(512) as usize,
                _ => rng.below(512) as usize,
            };
            b[off] = match rng.below(3) {
                0 => 0xff,
                1 => 0,
                _ => rng.next() as u8,
            };
        }
        if rng.below(5) == 0 {
            b.truncate(rng.below(n as u64) as usize);
        }
        std::fs::write(&victim, &b).unwrap();
        let what = format!("round {round}");
        for args in [
            vec![
                "query", "-n", &victim, "-v", "-s", "-p", "-f", "-m", "-d", "-a", "-S",
            ],
            vec!["read", "-n", &victim, "-p"],
            vec![
                "read", "-n", &victim, "-b", "0", "-c", "4", "-t", "10", "-e", "0", "-c", "100",
            ],
            vec!["read", "-n", &victim, "-m", "0", "-i", "0", "-a", "-B"],
            vec!["check", "-n", &victim],
            vec!["check", "-n", &victim, "-s", "-b"],
            vec!["scan", "-M", "-p", "-a", &victim],
            vec!["key", "-p", "-n", &victim],
        ] {
            let o = run(&args);
            assert_clean(&o, &format!("{what} {args:?}"));
        }
        // Writers, each on a fresh copy of the damaged file.
        for args in [
            vec!["repair", "-n", &victim],
            vec!["set", "-n", &victim, "-f", "hidden", "-v", "1"],
            vec!["coalesce", "-n", &victim],
            vec!["modify", "-n", &victim, "-z"],
            vec!["resize", "-n", &victim, "-s", "16", "-f"],
            vec!["resize", "-n", &victim, "-s", "300", "-j", &journal],
            vec!["fill", "-n", &victim, "-b"],
        ] {
            let _ = std::fs::remove_file(&journal);
            std::fs::write(&victim, &b).unwrap();
            let o = run(&args);
            assert_clean(&o, &format!("{what} {args:?}"));
        }
    }
}

/// Regression: check summed a locator's offset and space before validating them, so an
/// offset near 2^64 overflowed (a panic in debug builds, a wrapped end in release).
#[test]
fn check_with_locator_offset_near_the_top_of_u64() {
    use blktap3::image::vhd::ops::open_meta;
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "8"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    let img = open_meta(std::path::Path::new(&leaf), false).unwrap();
    img.update_header(|h| h.loc[0].data_offset = u64::MAX - 511)
        .unwrap();
    drop(img);
    for args in [
        vec!["check", "-n", &leaf],
        vec!["check", "-n", &leaf, "-s", "-b"],
        vec!["query", "-n", &leaf, "-p"],
        vec!["scan", "-M", "-p", "-a", &leaf],
    ] {
        let o = run(&args);
        assert_clean(&o, &format!("{args:?}"));
    }
    let o = run(&["check", "-n", &leaf]);
    assert_ne!(o.status, 0, "{}", o.stdout);
    assert!(
        o.stdout.contains("invalid parent locator 0"),
        "{}",
        o.stdout
    );
}
