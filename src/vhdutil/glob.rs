//! A small `glob(3)` for `vhd-util scan -m`: `*`, `?`, `[...]` (with `!`/`^` negation
//! and ranges) within one path component, `{a,b}` brace expansion (GLOB_BRACE), leading
//! dots matched only explicitly, results sorted.

use std::path::Path;

/// `fnmatch(pattern, name)` for one component (no `/` in either).
pub fn fnmatch(pat: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && pat.first() != Some(&b'.') {
        return false;
    }
    match_from(pat, name)
}

fn match_from(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() {
            match pat[p] {
                b'*' => {
                    star = Some((p, n));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    n += 1;
                    continue;
                }
                b'[' => {
                    if let Some((ok, next)) = class(&pat[p..], name[n]) {
                        if ok {
                            p += next;
                            n += 1;
                            continue;
                        }
                    } else if name[n] == b'[' {
                        p += 1;
                        n += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pat.len() => {
                    if pat[p + 1] == name[n] {
                        p += 2;
                        n += 1;
                        continue;
                    }
                }
                c => {
                    if c == name[n] {
                        p += 1;
                        n += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, sn)) => {
                p = sp + 1;
                n = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Match a bracket expression at the start of `pat` against `c`: `(matched, length)`,
/// or `None` when the bracket is not closed (then `[` is literal).
fn class(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let neg = matches!(pat.get(1), Some(b'!') | Some(b'^'));
    if neg {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < pat.len() {
        let lo = pat[i];
        if lo == b']' && !first {
            return Some((matched != neg, i + 1));
        }
        first = false;
        if i + 2 < pat.len() && pat[i + 1] == b'-' && pat[i + 2] != b']' {
            if (lo..=pat[i + 2]).contains(&c) {
                matched = true;
            }
            i += 3;
        } else {
            if lo == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

/// Expand `{a,b}` alternatives (nested allowed); a pattern without braces is returned as is.
pub fn brace_expand(pat: &str) -> Vec<String> {
    let b = pat.as_bytes();
    let Some(open) = b.iter().position(|&c| c == b'{') else {
        return vec![pat.to_string()];
    };
    let mut depth = 0;
    let mut commas = Vec::new();
    let mut close = None;
    for (i, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(i);
                    break;
                }
            }
            b',' if depth == 1 => commas.push(i),
            _ => {}
        }
    }
    let Some(close) = close else {
        return vec![pat.to_string()];
    };
    let (pre, post) = (&pat[..open], &pat[close + 1..]);
    let mut bounds = vec![open];
    bounds.extend(commas);
    bounds.push(close);
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let alt = &pat[w[0] + 1..w[1]];
        for tail in brace_expand(&format!("{alt}{post}")) {
            out.push(format!("{pre}{tail}"));
        }
    }
    out
}

fn has_magic(s: &str) -> bool {
    s.bytes().any(|c| matches!(c, b'*' | b'?' | b'['))
}

fn expand_one(pattern: &str, out: &mut Vec<String>) {
    let absolute = pattern.starts_with('/');
    let comps: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let mut bases: Vec<String> = vec![if absolute { "/".into() } else { String::new() }];
    for (i, comp) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let mut next = Vec::new();
        for base in &bases {
            let join = |name: &str| {
                if base.is_empty() {
                    name.to_string()
                } else if base.ends_with('/') {
                    format!("{base}{name}")
                } else {
                    format!("{base}/{name}")
                }
            };
            if !has_magic(comp) {
                let cand = join(comp);
                let exists = if last {
                    Path::new(&cand).symlink_metadata().is_ok()
                } else {
                    Path::new(&cand).is_dir()
                };
                if exists {
                    next.push(cand);
                }
                continue;
            }
            let dir = if base.is_empty() { "." } else { base.as_str() };
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if fnmatch(comp.as_bytes(), name.as_bytes()) {
                    let cand = join(&name);
                    if last || Path::new(&cand).is_dir() {
                        next.push(cand);
                    }
                }
            }
        }
        bases = next;
    }
    if comps.is_empty() {
        return;
    }
    out.extend(bases);
}

/// All existing paths matching `pattern`, sorted (byte order), duplicates removed.
pub fn glob(pattern: &str) -> Vec<String> {
    let mut out = Vec::new();
    for p in brace_expand(pattern) {
        expand_one(&p, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_basics() {
        assert!(fnmatch(b"*.vhd", b"a.vhd"));
        assert!(!fnmatch(b"*.vhd", b"a.vhdx"));
        assert!(fnmatch(b"VHD-*", b"VHD-1234"));
        assert!(fnmatch(b"a?c", b"abc"));
        assert!(fnmatch(b"[a-c]x", b"bx"));
        assert!(!fnmatch(b"[!a-c]x", b"bx"));
        assert!(fnmatch(b"[!a-c]x", b"dx"));
        assert!(!fnmatch(b"*", b".hidden"));
        assert!(fnmatch(b".*", b".hidden"));
        assert!(fnmatch(b"*a*b*", b"xxaxxbxx"));
        assert!(fnmatch(b"[x", b"[x"));
        assert!(fnmatch(b"\\*", b"*"));
    }

    #[test]
    fn braces() {
        assert_eq!(brace_expand("a{b,c}d"), vec!["abd", "acd"]);
        assert_eq!(brace_expand("{x,y{1,2}}"), vec!["x", "y1", "y2"]);
        assert_eq!(brace_expand("no{brace"), vec!["no{brace"]);
    }

    #[test]
    fn glob_on_a_directory() {
        let d = tempfile::tempdir().unwrap();
        for n in ["b.vhd", "a.vhd", "c.raw", ".h.vhd"] {
            std::fs::write(d.path().join(n), b"").unwrap();
        }
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/z.vhd"), b"").unwrap();
        let base = d.path().to_string_lossy().into_owned();
        assert_eq!(
            glob(&format!("{base}/*.vhd")),
            vec![format!("{base}/a.vhd"), format!("{base}/b.vhd")]
        );
        assert_eq!(
            glob(&format!("{base}/{{a.vhd,c.*}}")),
            vec![format!("{base}/a.vhd"), format!("{base}/c.raw")]
        );
        assert_eq!(
            glob(&format!("{base}/*/*.vhd")),
            vec![format!("{base}/sub/z.vhd")]
        );
        assert!(glob(&format!("{base}/*.none")).is_empty());
    }
}
