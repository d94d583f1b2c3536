//! `aio::Iocb` and `aio::IoEvent` against the kernel's `<linux/aio_abi.h>` as gcc lays it out
//! for `-m64` and `-m32`: sizes and every field's offset. The structs are the same on both
//! (every pointer-sized field is padded to 64 bits), so the Rust declarations, checked on
//! whichever target runs the test, must equal both.

mod common;

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};

use blktap3::aio::{IoEvent, Iocb};

const FIELDS_IOCB: &[&str] = &[
    "aio_data",
    "aio_key",
    "aio_rw_flags",
    "aio_lio_opcode",
    "aio_reqprio",
    "aio_fildes",
    "aio_buf",
    "aio_nbytes",
    "aio_offset",
    "aio_reserved2",
    "aio_flags",
    "aio_resfd",
];
const FIELDS_EVENT: &[&str] = &["data", "obj", "res", "res2"];

fn c_values(mflag: &str) -> BTreeMap<String, usize> {
    let mut src = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/aio_abi.h>\nint main(void) {\n",
    );
    src += "printf(\"iocb %zu\\n\", sizeof(struct iocb));\n";
    src += "printf(\"io_event %zu\\n\", sizeof(struct io_event));\n";
    for f in FIELDS_IOCB {
        src += &format!("printf(\"iocb.{f} %zu\\n\", offsetof(struct iocb, {f}));\n");
    }
    for f in FIELDS_EVENT {
        src += &format!("printf(\"io_event.{f} %zu\\n\", offsetof(struct io_event, {f}));\n");
    }
    src += "return 0; }\n";
    common::cprog::run_c(&src, mflag)
}

fn rust_values() -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    m.insert("iocb".into(), size_of::<Iocb>());
    m.insert("io_event".into(), size_of::<IoEvent>());
    let iocb = [
        offset_of!(Iocb, aio_data),
        offset_of!(Iocb, aio_key),
        offset_of!(Iocb, aio_rw_flags),
        offset_of!(Iocb, aio_lio_opcode),
        offset_of!(Iocb, aio_reqprio),
        offset_of!(Iocb, aio_fildes),
        offset_of!(Iocb, aio_buf),
        offset_of!(Iocb, aio_nbytes),
        offset_of!(Iocb, aio_offset),
        offset_of!(Iocb, aio_reserved2),
        offset_of!(Iocb, aio_flags),
        offset_of!(Iocb, aio_resfd),
    ];
    for (f, o) in FIELDS_IOCB.iter().zip(iocb) {
        m.insert(format!("iocb.{f}"), o);
    }
    let ev = [
        offset_of!(IoEvent, data),
        offset_of!(IoEvent, obj),
        offset_of!(IoEvent, res),
        offset_of!(IoEvent, res2),
    ];
    for (f, o) in FIELDS_EVENT.iter().zip(ev) {
        m.insert(format!("io_event.{f}"), o);
    }
    m
}

#[test]
fn iocb_and_io_event_match_the_kernel_header_for_m64_and_m32() {
    let want = rust_values();
    assert_eq!(want["iocb"], 64);
    assert_eq!(want["io_event"], 32);
    for mflag in ["-m64", "-m32"] {
        assert_eq!(c_values(mflag), want, "gcc {mflag}");
    }
}
