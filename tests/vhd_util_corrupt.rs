//! vhd-util on damaged images: every command must fail cleanly (an errno exit status and
//! a message), never panic (Rust's exit status 101) or die from a signal.

mod common;
use common::data::Rng;
use common::vhd_util::*;

/// The read-only commands run on every damaged image.
fn readers(victim: &str) -> Vec<Vec<&str>> {
    vec![
        vec![
            "query", "-n", victim, "-v", "-s", "-p", "-f", "-m", "-d", "-a", "-S",
        ],
        vec!["read", "-n", victim, "-p"],
        vec![
            "read", "-n", victim, "-b", "0", "-c", "4", "-t", "10", "-e", "0", "-c", "100",
        ],
        vec!["read", "-n", victim, "-m", "0", "-i", "0", "-a", "-B"],
        vec!["read", "-n", victim, "-r", "0", "-c", "100"],
        vec!["check", "-n", victim],
        vec!["check", "-n", victim, "-s", "-b"],
        vec!["scan", "-M", "-p", "-a", victim],
        vec!["key", "-p", "-n", victim],
    ]
}

fn assert_clean(o: &Out, what: &str) {
    assert_ne!(o.status, 101, "{what} panicked: {}", o.stderr);
    assert!(o.status >= 0, "{what} died from a signal: {}", o.stderr);
}

/// The bytes of a filled 8 MiB snapshot (leaf.vhd over base.vhd, made in `dir`).
fn filled_snapshot(dir: &std::path::Path) -> Vec<u8> {
    let base = p(dir, "base.vhd");
    let leaf = p(dir, "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "8"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    ok(&["fill", "-n", &leaf, "-b", "-t", "5000"]);
    std::fs::read(&leaf).unwrap()
}

#[test]
fn damaged_metadata_never_panics() {
    let d = tmpdir();
    let pristine = filled_snapshot(d.path());
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
        for args in readers(&victim) {
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

type HeaderEdit = Box<dyn Fn(&mut blktap3::image::vhd::DynHeader)>;
type FooterEdit = Box<dyn Fn(&mut blktap3::image::vhd::Footer)>;

/// Metadata damage that passes the checksums (fields set through the engine, which
/// re-encodes them): extreme offsets and sizes in the header and the footer. Every
/// command must fail or succeed cleanly.
#[test]
fn checksummed_header_and_footer_extremes_never_panic() {
    let d = tmpdir();
    let pristine = filled_snapshot(d.path());
    let base = p(d.path(), "base.vhd");
    let victim = p(d.path(), "v.vhd");
    let vals64 = [
        0u64,
        1,
        511,
        512,
        1 << 20,
        u64::MAX,
        u64::MAX - 511,
        1 << 40,
    ];
    let vals32 = [
        0u32,
        1,
        511,
        512,
        513,
        0x8000_0000,
        u32::MAX,
        1 << 21,
        1 << 24,
    ];
    let mut cases: Vec<HeaderEdit> = Vec::new();
    for &v in &vals64 {
        cases.push(Box::new(move |h| h.table_offset = v));
        cases.push(Box::new(move |h| h.loc[0].data_offset = v));
        cases.push(Box::new(move |h| h.loc[1].data_offset = v));
    }
    for &v in &vals32 {
        cases.push(Box::new(move |h| h.max_bat_size = v));
        cases.push(Box::new(move |h| h.block_size = v));
        cases.push(Box::new(move |h| h.loc[0].data_space = v));
        cases.push(Box::new(move |h| h.loc[0].data_len = v));
        cases.push(Box::new(move |h| h.loc[2].data_len = v));
        cases.push(Box::new(move |h| h.loc[2].data_space = v));
    }
    let mut fcases: Vec<FooterEdit> = Vec::new();
    for &v in &vals64 {
        fcases.push(Box::new(move |f| f.curr_size = v));
        fcases.push(Box::new(move |f| f.data_offset = v));
        fcases.push(Box::new(move |f| f.orig_size = v));
    }
    for &v in &vals32 {
        fcases.push(Box::new(move |f| f.disk_type = v));
        fcases.push(Box::new(move |f| f.geometry = v));
        fcases.push(Box::new(move |f| f.crtr_ver = v));
    }
    let n = cases.len() + fcases.len();
    for i in 0..n {
        std::fs::write(&victim, &pristine).unwrap();
        {
            let img =
                blktap3::image::vhd::ops::open_meta(std::path::Path::new(&victim), false).unwrap();
            if i < cases.len() {
                img.update_header(|h| cases[i](h)).unwrap();
            } else {
                let _ = img.update_footer(|f| fcases[i - cases.len()](f));
            }
        }
        let bad = std::fs::read(&victim).unwrap();
        let (jpath, snap) = (p(d.path(), "j"), p(d.path(), "s.vhd"));
        let mut cmds = readers(&victim);
        cmds.extend([
            vec!["repair", "-n", &victim],
            vec!["coalesce", "-n", &victim],
            vec!["fill", "-n", &victim],
            vec!["fill", "-n", &victim, "-b"],
            vec!["modify", "-n", &victim, "-p", &base],
            vec!["resize", "-n", &victim, "-s", "16", "-j", &jpath],
            vec!["snapshot", "-n", &snap, "-p", &victim],
            vec!["set", "-n", &victim, "-f", "hidden", "-v", "1"],
        ]);
        for args in cmds {
            std::fs::write(&victim, &bad).unwrap();
            let _ = std::fs::remove_file(&snap);
            let _ = std::fs::remove_file(&jpath);
            let o = run(&args);
            assert_clean(&o, &format!("case {i} {args:?}"));
        }
    }
}
