//! Small C programs that print `name value` lines (sizes, offsets, constants as the system's
//! headers define them), compiled with the host's gcc for `-m64` or `-m32`.

use std::collections::BTreeMap;
use std::process::Command;
use std::str::FromStr;

/// Compile `src` with `gcc <mflag> -std=gnu99 -Wall -Werror`, run it, and parse its
/// `name value` lines (the value after the last space).
pub fn run_c<V: FromStr>(src: &str, mflag: &str) -> BTreeMap<String, V>
where
    V::Err: std::fmt::Debug,
{
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("prog.c");
    let exe = dir.path().join("prog");
    std::fs::write(&c, src).unwrap();
    let st = Command::new("gcc")
        .args([mflag, "-std=gnu99", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&c)
        .status()
        .expect("gcc (with gcc-multilib for -m32) is needed for this test");
    assert!(st.success(), "gcc {mflag} failed");
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}
