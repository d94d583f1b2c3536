//! Text dumps of VHD metadata as `vhd-util read -p` prints them.
//!
//! The layout (labels padded to 20 columns, `conv()` numbers: decimal, or `%#x` with
//! `-x`, checksums as `0x<stored>|0x<computed> (Good!|Bad!)`, timestamps in `ctime`
//! format) follows blktap's `vhd-util-read.c`. The functions take plain field views so
//! they can be tested with golden strings and fed from any decoder.

use std::fmt::Write;

use crate::image::vhd::format::{
    decode_locator, DynHeader, Footer, Locator, PLAT_MAC, PLAT_MACX, PLAT_NONE, PLAT_W2KU,
    PLAT_W2RU, PLAT_WI2K, PLAT_WI2R, VHD_EPOCH_OFFSET,
};

/// A footer as read, with the checksum recomputed over it as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FooterView {
    pub footer: Footer,
    pub computed_checksum: u32,
}

impl FooterView {
    /// The view of `footer`, its checksum recomputed.
    pub fn of(footer: &Footer) -> FooterView {
        FooterView {
            footer: *footer,
            computed_checksum: footer.compute_checksum(),
        }
    }
}

/// The dynamic header as `read -p` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderView {
    pub header: DynHeader,
    pub computed_checksum: u32,
    /// Decoded parent name, `None` when it cannot be decoded.
    pub parent_name: Option<String>,
}

impl HeaderView {
    /// The view of `header`, its checksum recomputed and its parent name decoded.
    pub fn of(header: &DynHeader) -> HeaderView {
        HeaderView {
            header: header.clone(),
            computed_checksum: header.compute_checksum(),
            parent_name: Some(header.parent_name()),
        }
    }
}

/// One parent locator entry (only non-empty ones are printed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocatorView {
    pub index: usize,
    pub code: u32,
    pub data_space: u32,
    pub data_len: u32,
    pub data_offset: u64,
    /// The decoded location, `None` when it cannot be read or decoded.
    pub decoded: Option<String>,
}

impl LocatorView {
    /// Locator `index` with its payload `data` (if it could be read).
    pub fn of(index: usize, l: &Locator, data: Option<Vec<u8>>) -> LocatorView {
        LocatorView {
            index,
            code: l.code,
            data_space: l.data_space,
            data_len: l.data_len,
            data_offset: l.data_offset,
            decoded: data.and_then(|d| decode_locator(l.code, &d).ok()),
        }
    }
}

/// `(nonce, hash)` of a set keyhash, `None` when unset, `Err(errno)` if unreadable.
pub type KeyhashView = Result<Option<([u8; 32], [u8; 32])>, i32>;

/// Batmap header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatmapView {
    pub offset: u64,
    pub size_secs: u32,
    pub version: u32,
    pub checksum: u32,
    pub computed_checksum: u32,
    /// `(nonce, hash)` when the keyhash cookie is 1; `Err(errno)` if it cannot be read.
    pub keyhash: KeyhashView,
}

/// `conv(hex, n)`: `%#llx` (so 0 prints as `0`) or `%llu`.
pub fn conv(hex: bool, n: u64) -> String {
    if hex {
        if n == 0 {
            "0".to_string()
        } else {
            format!("{n:#x}")
        }
    } else {
        n.to_string()
    }
}

/// A C string from a fixed byte field: up to the first NUL, bytes as Latin-1.
fn cstr(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect()
}

/// `ctime()` of a VHD timestamp without the trailing newline, e.g.
/// `Sat Jan  1 00:00:00 2000`. Rendered in UTC (dom0 runs in UTC; blktap uses the local
/// zone).
pub fn vhd_time_to_string(ts: u32) -> String {
    let t = i64::from(ts) + VHD_EPOCH_OFFSET as i64;
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    // 1970-01-01 was a Thursday.
    let wday = (days + 4).rem_euclid(7) as usize;
    // Civil-from-days (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mon = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mon <= 2);
    const WD: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MO: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{} {} {:2} {:02}:{:02}:{:02} {}",
        WD[wday],
        MO[(mon - 1) as usize],
        d,
        h,
        m,
        s,
        y
    )
}

/// `uuid_unparse` (lower case).
pub fn uuid_string(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).hyphenated().to_string()
}

fn checksum_line(s: &mut String, stored: u32, computed: u32) {
    let _ = writeln!(
        s,
        "Checksum            : {:#x}|{:#x} ({})",
        stored,
        computed,
        if stored == computed { "Good!" } else { "Bad!" }
    );
}

/// `%#x` as C prints it (0 is `0`).
fn cx(n: u32) -> String {
    conv(true, u64::from(n))
}

/// `VHD Footer Summary` block, with the trailing blank line.
pub fn footer_summary(f: &FooterView, hex: bool) -> String {
    const TYPES: [&str; 7] = [
        "None",
        "Reserved (deprecated)",
        "Fixed hard disk",
        "Dynamic hard disk",
        "Differencing hard disk",
        "Reserved (deprecated)",
        "Reserved (deprecated)",
    ];
    let mut s = String::new();
    s.push_str("VHD Footer Summary:\n-------------------\n");
    let _ = writeln!(s, "Cookie              : {}", cstr(&f.footer.cookie));
    let _ = writeln!(
        s,
        "Features            : (0x{:08x}) {}{}",
        f.footer.features,
        if f.footer.features & 1 != 0 {
            "<TEMP>"
        } else {
            ""
        },
        if f.footer.features & 2 != 0 {
            "<RESV>"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "File format version : Major: {}, Minor: {}",
        f.footer.ff_version >> 16,
        f.footer.ff_version & 0xffff
    );
    let _ = writeln!(
        s,
        "Data offset         : {}",
        conv(hex, f.footer.data_offset)
    );
    let _ = writeln!(
        s,
        "Timestamp           : {}",
        vhd_time_to_string(f.footer.timestamp)
    );
    let _ = writeln!(s, "Creator Application : '{}'", cstr(&f.footer.crtr_app));
    let _ = writeln!(
        s,
        "Creator version     : Major: {}, Minor: {}",
        f.footer.crtr_ver >> 16,
        f.footer.crtr_ver & 0xffff
    );
    let os = match f.footer.crtr_os {
        0x5769_326B => "Windows",
        0x4D61_6320 => "Macintosh",
        _ => "Unknown!",
    };
    let _ = writeln!(s, "Creator OS          : {os}");
    let _ = writeln!(
        s,
        "Original disk size  : {} MB ({} Bytes)",
        conv(hex, f.footer.orig_size >> 20),
        conv(hex, f.footer.orig_size)
    );
    let _ = writeln!(
        s,
        "Current disk size   : {} MB ({} Bytes)",
        conv(hex, f.footer.curr_size >> 20),
        conv(hex, f.footer.curr_size)
    );
    let c = u64::from(f.footer.geometry >> 16);
    let h = u64::from((f.footer.geometry >> 8) & 0xff);
    let sp = u64::from(f.footer.geometry & 0xff);
    let _ = writeln!(
        s,
        "Geometry            : Cyl: {}, Hds: {}, Sctrs: {}",
        conv(hex, c),
        conv(hex, h),
        conv(hex, sp)
    );
    let _ = writeln!(
        s,
        "                    : = {} MB ({} Bytes)",
        conv(hex, (c * h * sp) >> 11),
        conv(hex, (c * h * sp) << 9)
    );
    let ty = TYPES
        .get(f.footer.disk_type as usize)
        .copied()
        .unwrap_or("Unknown type!\n");
    let _ = writeln!(s, "Disk type           : {ty}");
    checksum_line(&mut s, f.footer.checksum, f.computed_checksum);
    let _ = writeln!(s, "UUID                : {}", uuid_string(&f.footer.uuid));
    let _ = writeln!(
        s,
        "Saved state         : {}",
        if f.footer.saved == 0 { "No" } else { "Yes" }
    );
    let _ = writeln!(s, "Hidden              : {}", f.footer.hidden);
    s.push('\n');
    s
}

/// `VHD Header Summary` block, with the trailing blank line.
pub fn header_summary(v: &HeaderView, hex: bool) -> String {
    let h = &v.header;
    let mut s = String::new();
    s.push_str("VHD Header Summary:\n-------------------\n");
    let _ = writeln!(s, "Cookie              : {}", cstr(&h.cookie));
    let _ = writeln!(s, "Data offset (unusd) : {}", conv(hex, h.data_offset));
    let _ = writeln!(s, "Table offset        : {}", conv(hex, h.table_offset));
    let _ = writeln!(s, "Header version      : 0x{:08x}", h.hdr_ver);
    let _ = writeln!(
        s,
        "Max BAT size        : {}",
        conv(hex, u64::from(h.max_bat_size))
    );
    let _ = writeln!(
        s,
        "Block size          : {} ({} MB)",
        conv(hex, u64::from(h.block_size)),
        conv(hex, u64::from(h.block_size >> 20))
    );
    let _ = writeln!(
        s,
        "Parent name         : {}",
        v.parent_name.as_deref().unwrap_or("failed to read name")
    );
    let _ = writeln!(s, "Parent UUID         : {}", uuid_string(&h.prt_uuid));
    let _ = writeln!(s, "Parent timestamp    : {}", vhd_time_to_string(h.prt_ts));
    checksum_line(&mut s, h.checksum, v.computed_checksum);
    s.push('\n');
    s
}

/// Platform code names as `read -p` prints them (blktap spells the fallback `UNKOWN`).
pub fn code_name(code: u32) -> &'static str {
    match code {
        PLAT_NONE => "PLAT_CODE_NONE",
        PLAT_WI2R => "PLAT_CODE_WI2R",
        PLAT_WI2K => "PLAT_CODE_WI2K",
        PLAT_W2RU => "PLAT_CODE_W2RU",
        PLAT_W2KU => "PLAT_CODE_W2KU",
        PLAT_MAC => "PLAT_CODE_MAC",
        PLAT_MACX => "PLAT_CODE_MACX",
        _ => "UNKOWN",
    }
}

/// `VHD Parent Locators` block (differencing disks).
pub fn locators_summary(locs: &[LocatorView], hex: bool) -> String {
    let mut s = String::new();
    s.push_str("VHD Parent Locators:\n--------------------\n");
    for l in locs.iter().filter(|l| l.code != PLAT_NONE) {
        let _ = writeln!(s, "locator:            : {}", l.index);
        let _ = writeln!(s, "       code         : {}", code_name(l.code));
        let _ = writeln!(
            s,
            "       data_space   : {}",
            conv(hex, u64::from(l.data_space))
        );
        let _ = writeln!(
            s,
            "       data_length  : {}",
            conv(hex, u64::from(l.data_len))
        );
        let _ = writeln!(s, "       data_offset  : {}", conv(hex, l.data_offset));
        match &l.decoded {
            Some(name) => {
                let _ = writeln!(s, "       decoded name : {name}");
            }
            None => s.push_str("failed to read parent name\n"),
        }
        s.push('\n');
    }
    s
}

fn hex_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// `VHD Batmap Summary` block, with the trailing blank line.
pub fn batmap_summary(b: &BatmapView, hex: bool) -> String {
    let mut s = String::new();
    s.push_str("VHD Batmap Summary:\n-------------------\n");
    let _ = writeln!(s, "Batmap offset       : {}", conv(hex, b.offset));
    let _ = writeln!(
        s,
        "Batmap size (secs)  : {}",
        conv(hex, u64::from(b.size_secs))
    );
    let _ = writeln!(s, "Batmap version      : 0x{:08x}", b.version);
    match &b.keyhash {
        Err(e) => {
            let _ = writeln!(s, "error reading keyhash: {}", -e.abs());
        }
        Ok(Some((nonce, hash))) => {
            let _ = writeln!(s, "Batmap keyhash nonce: {}", hex_bytes(nonce));
            let _ = writeln!(s, "Batmap keyhash hash : {}", hex_bytes(hash));
        }
        Ok(None) => {}
    }
    checksum_line(&mut s, b.checksum, b.computed_checksum);
    s.push('\n');
    s
}

/// `%#x` for u32 values in messages (`0x1f`, or `0` for zero).
pub fn hex32(n: u32) -> String {
    cx(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctime_format() {
        assert_eq!(vhd_time_to_string(0), "Sat Jan  1 00:00:00 2000");
        // 2026-11-25 07:58:10 UTC = unix 1795593490.
        assert_eq!(
            vhd_time_to_string((1_795_593_490 - VHD_EPOCH_OFFSET) as u32),
            "Wed Nov 25 07:58:10 2026"
        );
        // 2000-02-29 (leap day) 12:34:56.
        assert_eq!(
            vhd_time_to_string(59 * 86_400 + 12 * 3600 + 34 * 60 + 56),
            "Tue Feb 29 12:34:56 2000"
        );
        assert_eq!(vhd_time_to_string(u32::MAX), "Tue Feb  7 06:28:15 2136");
    }

    #[test]
    fn conv_matches_printf() {
        assert_eq!(conv(false, 1536), "1536");
        assert_eq!(conv(true, 1536), "0x600");
        assert_eq!(conv(true, 0), "0");
        assert_eq!(conv(false, u64::MAX), "18446744073709551615");
    }

    fn dyn_footer() -> FooterView {
        FooterView {
            footer: Footer {
                cookie: *b"conectix",
                features: 2,
                ff_version: 0x0001_0000,
                data_offset: 512,
                timestamp: 0,
                crtr_app: *b"tap\0",
                crtr_ver: 0x0001_0003,
                crtr_os: 0,
                orig_size: 10 << 20,
                curr_size: 10 << 20,
                geometry: (300 << 16) | (4 << 8) | 17,
                disk_type: 3,
                checksum: 0xffff_ef0c,
                uuid: [0x11; 16],
                saved: 0,
                hidden: 1,
                reserved: [0; 426],
            },
            computed_checksum: 0xffff_ef0c,
        }
    }

    #[test]
    fn footer_golden() {
        let want = "VHD Footer Summary:
-------------------
Cookie              : conectix
Features            : (0x00000002) <RESV>
File format version : Major: 1, Minor: 0
Data offset         : 512
Timestamp           : Sat Jan  1 00:00:00 2000
Creator Application : 'tap'
Creator version     : Major: 1, Minor: 3
Creator OS          : Unknown!
Original disk size  : 10 MB (10485760 Bytes)
Current disk size   : 10 MB (10485760 Bytes)
Geometry            : Cyl: 300, Hds: 4, Sctrs: 17
                    : = 9 MB (10444800 Bytes)
Disk type           : Dynamic hard disk
Checksum            : 0xffffef0c|0xffffef0c (Good!)
UUID                : 11111111-1111-1111-1111-111111111111
Saved state         : No
Hidden              : 1

";
        assert_eq!(footer_summary(&dyn_footer(), false), want);
        let mut f = dyn_footer();
        f.footer.disk_type = 9;
        f.computed_checksum = 0;
        let s = footer_summary(&f, true);
        assert!(s.contains("Disk type           : Unknown type!\n\n"));
        assert!(s.contains("Checksum            : 0xffffef0c|0x0 (Bad!)"));
        assert!(s.contains("Data offset         : 0x200\n"));
        assert!(s.contains("Geometry            : Cyl: 0x12c, Hds: 0x4, Sctrs: 0x11\n"));
    }

    #[test]
    fn header_locators_and_batmap_golden() {
        let mut header = DynHeader::new(5, 2 << 20);
        header.checksum = 0xffff_f3a1;
        let h = HeaderView {
            header,
            computed_checksum: 0xffff_f3a1,
            parent_name: Some(String::new()),
        };
        let want = "VHD Header Summary:
-------------------
Cookie              : cxsparse
Data offset (unusd) : 18446744073709551615
Table offset        : 1536
Header version      : 0x00010000
Max BAT size        : 5
Block size          : 2097152 (2 MB)
Parent name         : 
Parent UUID         : 00000000-0000-0000-0000-000000000000
Parent timestamp    : Sat Jan  1 00:00:00 2000
Checksum            : 0xfffff3a1|0xfffff3a1 (Good!)

";
        assert_eq!(header_summary(&h, false), want);

        let locs = [
            LocatorView {
                index: 0,
                code: PLAT_MACX,
                data_space: 512,
                data_len: 17,
                data_offset: 3072,
                decoded: Some("./p.vhd".into()),
            },
            LocatorView {
                index: 3,
                code: 0,
                ..Default::default()
            },
            LocatorView {
                index: 1,
                code: 0x1234,
                data_space: 512,
                data_len: 4,
                data_offset: 3584,
                decoded: None,
            },
        ];
        let want = "VHD Parent Locators:
--------------------
locator:            : 0
       code         : PLAT_CODE_MACX
       data_space   : 512
       data_length  : 17
       data_offset  : 3072
       decoded name : ./p.vhd

locator:            : 1
       code         : UNKOWN
       data_space   : 512
       data_length  : 4
       data_offset  : 3584
failed to read parent name

";
        assert_eq!(locators_summary(&locs, false), want);

        let mut b = BatmapView {
            offset: 2560,
            size_secs: 1,
            version: 0x0001_0002,
            checksum: 0xffff_ffff,
            computed_checksum: 0xffff_ffff,
            keyhash: Ok(None),
        };
        let want = "VHD Batmap Summary:
-------------------
Batmap offset       : 2560
Batmap size (secs)  : 1
Batmap version      : 0x00010002
Checksum            : 0xffffffff|0xffffffff (Good!)

";
        assert_eq!(batmap_summary(&b, false), want);
        b.keyhash = Ok(Some(([0; 32], [0xdc; 32])));
        let s = batmap_summary(&b, false);
        assert!(s.contains(&format!(
            "Batmap keyhash nonce: {}\nBatmap keyhash hash : {}\nChecksum",
            "00".repeat(32),
            "dc".repeat(32)
        )));
    }
}
