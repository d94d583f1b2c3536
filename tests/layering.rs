//! The crate's module boundaries, enforced: every `crate::<module>` path in `src/<module>/`
//! must name a module below it in the layering of ARCHITECTURE.md. A new upward edge (for
//! example `image` reaching into `tapdisk`) fails here instead of growing a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Each top-level module and the modules it may use. Anything not listed is refused.
const ALLOWED: &[(&str, &[&str])] = &[
    ("util", &[]),
    ("blkif", &[]),
    ("aio", &["util"]),
    ("image", &["aio", "util"]),
    ("nbd", &["util"]),
    ("xen", &["blkif", "util"]),
    ("control", &["image", "nbd", "util"]),
    ("vhdutil", &["image", "util"]),
    (
        "tapdisk",
        &["aio", "blkif", "control", "image", "nbd", "util", "xen"],
    ),
    ("tapback", &["blkif", "control", "nbd", "util", "xen"]),
    ("tapctl", &["control", "image", "nbd", "util"]),
    ("capi", &["control", "image", "util"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The first path segment of every `crate::...` path in `text`, including each member of
/// a `crate::{a::x, b}` group. Comments are skipped line by line.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level members of the group (nested braces belong to a member).
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(first_ident(&group[start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(first_ident(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(first_ident(rest));
        }
    }
    out.remove("");
    out
}

fn first_ident(s: &str) -> String {
    s.trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

#[test]
fn modules_only_use_modules_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let modules: BTreeSet<&str> = allowed.keys().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut seen_modules = BTreeSet::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        if m == "lib" || m == "bin" {
            continue;
        }
        let Some(ok) = allowed.get(m.as_str()) else {
            violations.push(format!(
                "{}: module {m} is not in the layering table",
                f.display()
            ));
            continue;
        };
        seen_modules.insert(m.clone());
        let text = fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for dep in crate_paths(&text) {
            // Items at the crate root (constants, macros) are not modules.
            if !modules.contains(dep.as_str()) || dep == m {
                continue;
            }
            if !ok.contains(&dep.as_str()) {
                violations.push(format!("{}: {m} uses crate::{dep}", f.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "upward or unlisted module edges:\n{}",
        violations.join("\n")
    );
    // The table is the crate's whole module list: a module it forgets would go unchecked.
    assert_eq!(
        seen_modules
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        modules
    );
}

#[test]
fn the_layering_table_has_no_cycle() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    // Every module may use only modules listed before it.
    let order: Vec<&str> = ALLOWED.iter().map(|(m, _)| *m).collect();
    for (i, m) in order.iter().enumerate() {
        for dep in allowed[m].iter() {
            let j = order.iter().position(|x| x == dep);
            assert!(
                j.is_some_and(|j| j < i),
                "{m} may use {dep}, which is not below it"
            );
        }
    }
}

#[test]
fn crate_paths_finds_single_and_grouped_paths() {
    let text = "use crate::image::Image;\nuse crate::{util::x, nbd::{a, b}, SECTOR_SIZE};\n\
                // crate::tapdisk in a comment\nlet v = crate::xen::f();";
    let got: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(got, ["SECTOR_SIZE", "image", "nbd", "util", "xen"]);
}
