//! Output of `vhd-util scan`: the per-image line and the `-p` tree.
//!
//! Storage managers parse these lines, so they follow blktap's `vhd-util-scan.c` byte for
//! byte:
//! - `vhd=<name> capacity=<bytes> size=<bytes> hidden=<n> parent=<name|none>`;
//! - with `-M`: `... hidden=<n> marker=<n> keyhash=<64 hex or empty> parent=...`;
//! - errors: `vhd=<full name> scan-error=<negative errno> error-message='<msg>'`;
//! - names are basenames unless `-v`; with `-p` each tree level is indented by 3 spaces
//!   and a parent missing from the scan is flagged ` (not found in scan)`.

/// What scanning one target found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanInfo {
    /// Virtual size in bytes (the file size for raw targets).
    pub capacity: u64,
    /// File size in bytes.
    pub size: u64,
    pub hidden: u8,
    pub marker: u8,
    /// The keyhash's hash when its cookie is non-zero.
    pub keyhash: Option<[u8; 32]>,
    /// Parent path (as resolved, or as recorded when it cannot be resolved).
    pub parent: Option<String>,
}

/// One scanned target: its name and what was found, or why scanning failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanEntry {
    pub name: String,
    pub result: Result<ScanInfo, ScanFailure>,
}

/// A scan error as printed: `scan-error=<code> error-message='<message>'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanFailure {
    /// Negative errno, as blktap prints it.
    pub code: i32,
    pub message: &'static str,
}

/// Output flags of scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanFlags {
    /// `-v`: full paths instead of basenames.
    pub verbose: bool,
    /// `-M`: marker and keyhash fields.
    pub markers: bool,
    /// `-p`: tree output.
    pub pretty: bool,
}

/// POSIX `basename(3)` for the paths vhd-util prints.
pub fn basename(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return if path.is_empty() { "." } else { "/" };
    }
    match trimmed.rfind('/') {
        Some(i) => &trimmed[i + 1..],
        None => trimmed,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// One output line (without the newline), indented by `tab` spaces. `not_found` adds the
/// ` (not found in scan)` suffix used by the tree for parents outside the scan.
pub fn format_line(entry: &ScanEntry, flags: ScanFlags, tab: usize, not_found: bool) -> String {
    let pad = " ".repeat(tab);
    let info = match &entry.result {
        Err(f) => {
            return format!(
                "{pad}vhd={} scan-error={} error-message='{}'",
                entry.name, f.code, f.message
            )
        }
        Ok(info) => info,
    };
    let (name, parent) = if flags.verbose {
        (
            entry.name.as_str(),
            info.parent.as_deref().unwrap_or("none"),
        )
    } else {
        (
            basename(&entry.name),
            info.parent.as_deref().map(basename).unwrap_or("none"),
        )
    };
    let pmsg = if not_found {
        " (not found in scan)"
    } else {
        ""
    };
    if flags.markers {
        let kh = info.keyhash.as_ref().map(|h| hex(h)).unwrap_or_default();
        format!(
            "{pad}vhd={name} capacity={} size={} hidden={} marker={} keyhash={kh} parent={parent}{pmsg}",
            info.capacity, info.size, info.hidden, info.marker
        )
    } else {
        format!(
            "{pad}vhd={name} capacity={} size={} hidden={} parent={parent}{pmsg}",
            info.capacity, info.size, info.hidden
        )
    }
}

/// The `-p` tree: successfully scanned images (duplicates by name dropped, first kept),
/// sorted by name, children under their parent indented by 3 per level, visible
/// children before hidden ones. Roots are printed hidden ones first, then the rest, then
/// anything left over (members of parent cycles).
pub fn pretty_lines(entries: &[ScanEntry], flags: ScanFlags) -> Vec<String> {
    let mut imgs: Vec<&ScanEntry> = Vec::new();
    for e in entries.iter().filter(|e| e.result.is_ok()) {
        if !imgs.iter().any(|i| i.name == e.name) {
            imgs.push(e);
        }
    }
    imgs.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let info = |i: usize| imgs[i].result.as_ref().ok();
    let n = imgs.len();
    let mut parent_of: Vec<Option<usize>> = vec![None; n];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, slot) in parent_of.iter_mut().enumerate() {
        if let Some(p) = info(i).and_then(|x| x.parent.as_deref()) {
            if let Ok(j) = imgs.binary_search_by(|e| e.name.as_bytes().cmp(p.as_bytes())) {
                *slot = Some(j);
                children[j].push(i);
            }
        }
    }
    let hidden: Vec<bool> = (0..n)
        .map(|i| info(i).map(|x| x.hidden != 0).unwrap_or(false))
        .collect();
    let mut t = Tree {
        imgs: &imgs,
        children: &children,
        parent_of: &parent_of,
        hidden: &hidden,
        flags: ScanFlags {
            pretty: true,
            ..flags
        },
        printed: vec![false; n],
        lines: Vec::new(),
    };
    let roots: Vec<usize> = (0..n).filter(|&i| parent_of[i].is_none()).collect();
    for &i in roots.iter().filter(|&&i| hidden[i]) {
        t.walk(i, 0);
    }
    for &i in &roots {
        t.walk(i, 0);
    }
    for i in 0..n {
        t.walk(i, 0);
    }
    t.lines
}

/// The `-p` tree under construction.
struct Tree<'a> {
    imgs: &'a [&'a ScanEntry],
    children: &'a [Vec<usize>],
    parent_of: &'a [Option<usize>],
    hidden: &'a [bool],
    flags: ScanFlags,
    printed: Vec<bool>,
    lines: Vec<String>,
}

impl Tree<'_> {
    fn walk(&mut self, i: usize, depth: usize) {
        if self.printed[i] {
            return;
        }
        self.printed[i] = true;
        let has_parent = self.imgs[i]
            .result
            .as_ref()
            .map(|x| x.parent.is_some())
            .unwrap_or(false);
        let not_found = has_parent && self.parent_of[i].is_none();
        self.lines
            .push(format_line(self.imgs[i], self.flags, depth * 3, not_found));
        for pass_hidden in [false, true] {
            for &c in self.children[i].iter() {
                if self.hidden[c] == pass_hidden {
                    self.walk(c, depth + 1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(name: &str, parent: Option<&str>, hidden: u8) -> ScanEntry {
        ScanEntry {
            name: name.into(),
            result: Ok(ScanInfo {
                capacity: 10 << 20,
                size: 4096,
                hidden,
                marker: 0,
                keyhash: None,
                parent: parent.map(String::from),
            }),
        }
    }

    #[test]
    fn plain_line_uses_basenames_unless_verbose() {
        let e = ok("/srv/a/child.vhd", Some("/srv/a/base.vhd"), 0);
        let f = ScanFlags::default();
        assert_eq!(
            format_line(&e, f, 0, false),
            "vhd=child.vhd capacity=10485760 size=4096 hidden=0 parent=base.vhd"
        );
        let v = ScanFlags { verbose: true, ..f };
        assert_eq!(
            format_line(&e, v, 0, false),
            "vhd=/srv/a/child.vhd capacity=10485760 size=4096 hidden=0 parent=/srv/a/base.vhd"
        );
        let root = ok("/srv/a/base.vhd", None, 1);
        assert_eq!(
            format_line(&root, f, 0, false),
            "vhd=base.vhd capacity=10485760 size=4096 hidden=1 parent=none"
        );
    }

    #[test]
    fn marker_line_has_marker_and_keyhash_fields() {
        let mut e = ok("x.vhd", None, 0);
        let f = ScanFlags {
            markers: true,
            ..Default::default()
        };
        assert_eq!(
            format_line(&e, f, 0, false),
            "vhd=x.vhd capacity=10485760 size=4096 hidden=0 marker=0 keyhash= parent=none"
        );
        if let Ok(i) = &mut e.result {
            i.marker = 1;
            i.keyhash = Some([0xab; 32]);
        }
        assert_eq!(
            format_line(&e, f, 0, false),
            format!(
                "vhd=x.vhd capacity=10485760 size=4096 hidden=0 marker=1 keyhash={} parent=none",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn error_line_keeps_the_full_name() {
        let e = ScanEntry {
            name: "/no/such.vhd".into(),
            result: Err(ScanFailure {
                code: -2,
                message: "failure scanning target",
            }),
        };
        assert_eq!(
            format_line(&e, ScanFlags::default(), 0, false),
            "vhd=/no/such.vhd scan-error=-2 error-message='failure scanning target'"
        );
    }

    #[test]
    fn tree_orders_hidden_roots_first_and_visible_children_first() {
        let entries = vec![
            ok("/d/leaf2.vhd", Some("/d/base.vhd"), 0),
            ok("/d/base.vhd", None, 1),
            ok("/d/leaf1.vhd", Some("/d/mid.vhd"), 0),
            ok("/d/mid.vhd", Some("/d/base.vhd"), 1),
            ok("/d/alone.vhd", None, 0),
            ok("/d/orphan.vhd", Some("/elsewhere/p.vhd"), 0),
            ok("/d/base.vhd", None, 0), // duplicate: ignored
        ];
        let lines = pretty_lines(&entries, ScanFlags::default());
        let want = [
            "vhd=base.vhd capacity=10485760 size=4096 hidden=1 parent=none",
            "   vhd=leaf2.vhd capacity=10485760 size=4096 hidden=0 parent=base.vhd",
            "   vhd=mid.vhd capacity=10485760 size=4096 hidden=1 parent=base.vhd",
            "      vhd=leaf1.vhd capacity=10485760 size=4096 hidden=0 parent=mid.vhd",
            "vhd=alone.vhd capacity=10485760 size=4096 hidden=0 parent=none",
            "vhd=orphan.vhd capacity=10485760 size=4096 hidden=0 parent=p.vhd (not found in scan)",
        ];
        assert_eq!(lines, want);
    }

    #[test]
    fn tree_survives_parent_cycles() {
        let entries = vec![ok("/a", Some("/b"), 0), ok("/b", Some("/a"), 0)];
        let lines = pretty_lines(&entries, ScanFlags::default());
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("vhd=a "));
        assert!(lines[1].starts_with("   vhd=b "));
    }

    #[test]
    fn basename_like_posix() {
        assert_eq!(basename("/a/b.vhd"), "b.vhd");
        assert_eq!(basename("b.vhd"), "b.vhd");
        assert_eq!(basename("/a/b/"), "b");
        assert_eq!(basename("/"), "/");
        assert_eq!(basename(""), ".");
    }
}
