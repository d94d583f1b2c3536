//! The declared on-disk and on-wire structs against C: a small C program declaring libvhd's
//! VHD structs (written from the VHD specification and the field tables of blktap's
//! `vhd.h`) and `tapdisk_message_t` (from the field tables of `tapdisk-message.h`) is
//! compiled with gcc for `-m64` and `-m32`; it prints every struct's size and every field's
//! offset, and each must equal the Rust struct's `size_of`/`offset_of!` (for the control
//! message: the member structs, plus [`WireLayout::LP64`] / [`WireLayout::I686`] for the
//! message size, the union offset and the union size).

mod common;

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};

use blktap3::control::msg::{wire, WireLayout};
use blktap3::image::vhd::format::layout::{
    RawBatEntry, RawBatmapHeader, RawDynHeader, RawFooter, RawLocator,
};

/// The C declarations, written from the format description (all integers big-endian on
/// disk; gcc lays the structs out with its native alignment and no packing, as blktap does).
const C_STRUCTS: &str = r#"
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct hd_ftr {
    char     cookie[8];
    uint32_t features;
    uint32_t ff_version;
    uint64_t data_offset;
    uint32_t timestamp;
    char     crtr_app[4];
    uint32_t crtr_ver;
    uint32_t crtr_os;
    uint64_t orig_size;
    uint64_t curr_size;
    uint32_t geometry;
    uint32_t type;
    uint32_t checksum;
    uint8_t  uuid[16];
    char     saved;
    char     hidden;
    char     reserved[426];
};

struct prt_loc {
    uint32_t code;
    uint32_t data_space;
    uint32_t data_len;
    uint32_t res;
    uint64_t data_offset;
};

struct dd_hdr {
    char     cookie[8];
    uint64_t data_offset;
    uint64_t table_offset;
    uint32_t hdr_ver;
    uint32_t max_bat_size;
    uint32_t block_size;
    uint32_t checksum;
    uint8_t  prt_uuid[16];
    uint32_t prt_ts;
    uint32_t res1;
    char     prt_name[512];
    struct prt_loc loc[8];
    char     res2[256];
};

struct vhd_keyhash {
    uint8_t cookie;
    uint8_t nonce[32];
    uint8_t hash[32];
};

struct dd_batmap_hdr {
    char     cookie[8];
    uint64_t batmap_offset;
    uint32_t batmap_size;
    uint32_t batmap_version;
    uint32_t checksum;
    char     marker;
    struct vhd_keyhash keyhash;
    char     res[418];
};

typedef uint32_t vhd_bat_entry;

typedef struct {
    uint32_t flags;
    uint32_t devnum;
    uint32_t domid;
    char     path[256];
    uint32_t prt_devnum;
    uint16_t req_timeout;
    char     secondary[256];
} td_params;

typedef struct {
    uint64_t sectors;
    uint32_t sector_size;
    uint32_t info;
} td_image;

typedef struct {
    char text[256];
} td_string;

typedef struct {
    int  error;
    char message[256];
} td_response;

typedef struct {
    int count;
    int list[63];
} td_minors;

typedef struct {
    int  count;
    int  minor;
    int  state;
    char path[256];
} td_list;

typedef struct {
    uint16_t type;
    uint16_t cookie;
    size_t   length;
} td_info;

typedef struct {
    uint32_t domid;
    uint32_t devid;
    uint32_t gref[8];
    uint32_t order;
    uint32_t proto;
    char     pool[256];
    uint32_t port;
    uint32_t poll_duration;
    uint32_t poll_idle_threshold;
} td_blkif;

typedef struct {
    uint32_t flags;
    char     new_params[256];
    char     secondary[256];
} td_resume;

typedef union {
    int32_t     tapdisk_pid;
    td_params   params;
    td_image    image;
    td_string   string;
    td_response response;
    td_minors   minors;
    td_list     list;
    td_info     info;
    td_blkif    blkif;
    td_resume   resume;
} td_union;

typedef struct {
    uint16_t type;
    uint16_t cookie;
    td_union u;
} tapdisk_message_t;

#define SIZE(s) printf("sizeof %s %zu\n", #s, sizeof(s))
#define OFF(s, f) printf("%s.%s %zu\n", #s, #f, offsetof(s, f))
"#;

/// One struct: its C name, its Rust size and (C field, Rust offset) pairs.
struct Layout {
    c: &'static str,
    size: usize,
    fields: Vec<(&'static str, usize)>,
}

macro_rules! layout {
    ($c:literal, $rs:ty, { $($rf:ident => $cf:literal),* $(,)? }) => {
        Layout {
            c: $c,
            size: size_of::<$rs>(),
            fields: vec![$(($cf, offset_of!($rs, $rf))),*],
        }
    };
}

fn vhd_layouts() -> Vec<Layout> {
    vec![
        layout!("struct hd_ftr", RawFooter, {
            cookie => "cookie", features => "features", ff_version => "ff_version",
            data_offset => "data_offset", timestamp => "timestamp", crtr_app => "crtr_app",
            crtr_ver => "crtr_ver", crtr_os => "crtr_os", orig_size => "orig_size",
            curr_size => "curr_size", geometry => "geometry", disk_type => "type",
            checksum => "checksum", uuid => "uuid", saved => "saved", hidden => "hidden",
            reserved => "reserved",
        }),
        layout!("struct prt_loc", RawLocator, {
            code => "code", data_space => "data_space", data_len => "data_len", res => "res",
            data_offset => "data_offset",
        }),
        layout!("struct dd_hdr", RawDynHeader, {
            cookie => "cookie", data_offset => "data_offset", table_offset => "table_offset",
            hdr_ver => "hdr_ver", max_bat_size => "max_bat_size", block_size => "block_size",
            checksum => "checksum", prt_uuid => "prt_uuid", prt_ts => "prt_ts", res1 => "res1",
            prt_name => "prt_name", loc => "loc", res2 => "res2",
        }),
        layout!("struct dd_batmap_hdr", RawBatmapHeader, {
            cookie => "cookie", batmap_offset => "batmap_offset", batmap_size => "batmap_size",
            batmap_version => "batmap_version", checksum => "checksum", marker => "marker",
            keyhash => "keyhash", res => "res",
        }),
        Layout {
            c: "vhd_bat_entry",
            size: size_of::<RawBatEntry>(),
            fields: vec![],
        },
    ]
}

/// The control message for gcc's `-m64` (`m64`) or `-m32`: the members are declared once
/// (unaligned, so the same on both); the message size, union offset and `size_t` come from
/// the [`WireLayout`] of that target.
fn msg_layouts(m64: bool) -> Vec<Layout> {
    let wl = if m64 {
        WireLayout::LP64
    } else {
        WireLayout::I686
    };
    let info = if m64 {
        layout!("td_info", wire::Info64, { ty => "type", cookie => "cookie", length => "length" })
    } else {
        layout!("td_info", wire::Info32, { ty => "type", cookie => "cookie", length => "length" })
    };
    vec![
        Layout {
            c: "tapdisk_message_t",
            size: wl.msg_size,
            fields: vec![
                ("type", offset_of!(wire::Head, ty)),
                ("cookie", offset_of!(wire::Head, cookie)),
                ("u", wl.union_offset),
            ],
        },
        Layout {
            c: "td_union",
            size: wl.msg_size - wl.union_offset,
            fields: vec![],
        },
        layout!("td_params", wire::Params, {
            flags => "flags", devnum => "devnum", domid => "domid", path => "path",
            prt_devnum => "prt_devnum", req_timeout => "req_timeout", secondary => "secondary",
        }),
        layout!("td_image", wire::Image, {
            sectors => "sectors", sector_size => "sector_size", info => "info",
        }),
        layout!("td_response", wire::Response, { error => "error", message => "message" }),
        layout!("td_list", wire::List, {
            count => "count", minor => "minor", state => "state", path => "path",
        }),
        info,
        layout!("td_blkif", wire::Blkif, {
            domid => "domid", devid => "devid", gref => "gref", order => "order",
            proto => "proto", pool => "pool", port => "port", poll_duration => "poll_duration",
            poll_idle_threshold => "poll_idle_threshold",
        }),
    ]
}

/// The C program printing sizes and offsets of `layouts`.
fn c_program(layouts: &[Layout]) -> String {
    let mut s = String::from(C_STRUCTS);
    s.push_str("int main(void)\n{\n");
    for l in layouts {
        s.push_str(&format!("    SIZE({});\n", l.c));
        for (f, _) in &l.fields {
            s.push_str(&format!("    OFF({}, {f});\n", l.c));
        }
    }
    s.push_str("    return 0;\n}\n");
    s
}

/// Compile `src` with `gcc <mflag>`, run it, and parse its `name value` lines.
fn run_c(src: &str, mflag: &str) -> BTreeMap<String, usize> {
    common::cprog::run_c(src, mflag)
}

/// Every size and offset of `layouts` as the C program names them.
fn rust_values(layouts: &[Layout]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in layouts {
        m.insert(format!("sizeof {}", l.c), l.size);
        for (f, off) in &l.fields {
            m.insert(format!("{}.{f}", l.c), *off);
        }
    }
    m
}

#[test]
fn vhd_structs_match_c_for_m64_and_m32() {
    let layouts = vhd_layouts();
    let src = c_program(&layouts);
    let want = rust_values(&layouts);
    for mflag in ["-m64", "-m32"] {
        let c = run_c(&src, mflag);
        assert_eq!(c, want, "gcc {mflag}");
    }
    // The sizes the format fixes, independently of both sides.
    assert_eq!(want["sizeof struct hd_ftr"], 512);
    assert_eq!(want["sizeof struct dd_hdr"], 1024);
    assert_eq!(want["struct dd_hdr.loc"], 576);
    assert_eq!(want["sizeof struct dd_batmap_hdr"], 512);
    assert_eq!(want["struct dd_batmap_hdr.keyhash"], 29);
}

#[test]
fn control_message_matches_c_for_m64_and_m32() {
    for (mflag, m64) in [("-m64", true), ("-m32", false)] {
        let layouts = msg_layouts(m64);
        let c = run_c(&c_program(&layouts), mflag);
        assert_eq!(c, rust_values(&layouts), "gcc {mflag}");
        // Our order-4 extension (grant refs 8..15 after the C blkif struct) fits the union.
        assert!(
            size_of::<wire::BlkifExt>() <= c["sizeof td_union"],
            "{mflag}"
        );
        assert_eq!(
            offset_of!(wire::BlkifExt, gref_ext),
            c["sizeof td_blkif"],
            "{mflag}"
        );
    }
    assert_eq!(WireLayout::LP64.msg_size, 544);
    assert_eq!(WireLayout::I686.msg_size, 536);
}
