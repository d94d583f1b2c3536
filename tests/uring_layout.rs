//! `aio::uring`'s structs and constants against the kernel's `<linux/io_uring.h>` as gcc
//! lays it out for `-m64` and `-m32`: sizes, every field's offset, and the values of the
//! opcodes, flags and offsets the ring uses. The layouts are the same on both (fixed-width
//! fields, 64-bit ones at multiples of 8), so the Rust declarations, checked on whichever
//! target runs the test, must equal both.

mod common;

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};

use blktap3::aio::uring::{self, Cqe, CqringOffsets, Params, Sqe, SqringOffsets};

/// (C struct, Rust size, [(field, Rust offset)]).
type Layout = (&'static str, usize, Vec<(&'static str, usize)>);

fn layouts() -> Vec<Layout> {
    vec![
        (
            "io_uring_sqe",
            size_of::<Sqe>(),
            vec![
                ("opcode", offset_of!(Sqe, opcode)),
                ("flags", offset_of!(Sqe, flags)),
                ("ioprio", offset_of!(Sqe, ioprio)),
                ("fd", offset_of!(Sqe, fd)),
                ("off", offset_of!(Sqe, off)),
                ("addr", offset_of!(Sqe, addr)),
                ("len", offset_of!(Sqe, len)),
                ("rw_flags", offset_of!(Sqe, rw_flags)),
                ("user_data", offset_of!(Sqe, user_data)),
                ("buf_index", offset_of!(Sqe, buf_index)),
                ("personality", offset_of!(Sqe, personality)),
                ("splice_fd_in", offset_of!(Sqe, splice_fd_in)),
                ("addr3", offset_of!(Sqe, addr3)),
            ],
        ),
        (
            "io_uring_cqe",
            size_of::<Cqe>(),
            vec![
                ("user_data", offset_of!(Cqe, user_data)),
                ("res", offset_of!(Cqe, res)),
                ("flags", offset_of!(Cqe, flags)),
            ],
        ),
        (
            "io_sqring_offsets",
            size_of::<SqringOffsets>(),
            vec![
                ("head", offset_of!(SqringOffsets, head)),
                ("tail", offset_of!(SqringOffsets, tail)),
                ("ring_mask", offset_of!(SqringOffsets, ring_mask)),
                ("ring_entries", offset_of!(SqringOffsets, ring_entries)),
                ("flags", offset_of!(SqringOffsets, flags)),
                ("dropped", offset_of!(SqringOffsets, dropped)),
                ("array", offset_of!(SqringOffsets, array)),
                ("resv1", offset_of!(SqringOffsets, resv1)),
                ("resv2", offset_of!(SqringOffsets, resv2)),
            ],
        ),
        (
            "io_cqring_offsets",
            size_of::<CqringOffsets>(),
            vec![
                ("head", offset_of!(CqringOffsets, head)),
                ("tail", offset_of!(CqringOffsets, tail)),
                ("ring_mask", offset_of!(CqringOffsets, ring_mask)),
                ("ring_entries", offset_of!(CqringOffsets, ring_entries)),
                ("overflow", offset_of!(CqringOffsets, overflow)),
                ("cqes", offset_of!(CqringOffsets, cqes)),
                ("flags", offset_of!(CqringOffsets, flags)),
                ("resv1", offset_of!(CqringOffsets, resv1)),
                ("resv2", offset_of!(CqringOffsets, resv2)),
            ],
        ),
        (
            "io_uring_params",
            size_of::<Params>(),
            vec![
                ("sq_entries", offset_of!(Params, sq_entries)),
                ("cq_entries", offset_of!(Params, cq_entries)),
                ("flags", offset_of!(Params, flags)),
                ("sq_thread_cpu", offset_of!(Params, sq_thread_cpu)),
                ("sq_thread_idle", offset_of!(Params, sq_thread_idle)),
                ("features", offset_of!(Params, features)),
                ("wq_fd", offset_of!(Params, wq_fd)),
                ("resv", offset_of!(Params, resv)),
                ("sq_off", offset_of!(Params, sq_off)),
                ("cq_off", offset_of!(Params, cq_off)),
            ],
        ),
    ]
}

/// (C constant, Rust value).
fn constants() -> Vec<(&'static str, i64)> {
    vec![
        ("IORING_OP_READ", i64::from(uring::IORING_OP_READ)),
        ("IORING_OP_WRITE", i64::from(uring::IORING_OP_WRITE)),
        (
            "IORING_FEAT_SINGLE_MMAP",
            i64::from(uring::IORING_FEAT_SINGLE_MMAP),
        ),
        ("IORING_FEAT_NODROP", i64::from(uring::IORING_FEAT_NODROP)),
        (
            "IORING_FEAT_RW_CUR_POS",
            i64::from(uring::IORING_FEAT_RW_CUR_POS),
        ),
        (
            "IORING_OFF_SQ_RING",
            i64::try_from(uring::IORING_OFF_SQ_RING).unwrap(),
        ),
        (
            "IORING_OFF_SQES",
            i64::try_from(uring::IORING_OFF_SQES).unwrap(),
        ),
        (
            "IORING_ENTER_GETEVENTS",
            i64::from(uring::IORING_ENTER_GETEVENTS),
        ),
        (
            "IORING_REGISTER_EVENTFD",
            i64::from(uring::IORING_REGISTER_EVENTFD),
        ),
    ]
}

fn c_values(mflag: &str) -> BTreeMap<String, i64> {
    let mut src = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/io_uring.h>\nint main(void) {\n",
    );
    for (s, _, fields) in layouts() {
        src += &format!("printf(\"{s} %zu\\n\", sizeof(struct {s}));\n");
        for (f, _) in fields {
            src += &format!("printf(\"{s}.{f} %zu\\n\", offsetof(struct {s}, {f}));\n");
        }
    }
    for (c, _) in constants() {
        src += &format!("printf(\"{c} %lld\\n\", (long long)({c}));\n");
    }
    src += "return 0; }\n";
    common::cprog::run_c(&src, mflag)
}

fn rust_values() -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for (s, size, fields) in layouts() {
        m.insert(s.to_string(), size as i64);
        for (f, o) in fields {
            m.insert(format!("{s}.{f}"), o as i64);
        }
    }
    for (c, v) in constants() {
        m.insert(c.to_string(), v);
    }
    m
}

#[test]
fn io_uring_structs_and_constants_match_the_kernel_header_for_m64_and_m32() {
    let want = rust_values();
    assert_eq!(want["io_uring_sqe"], 64);
    assert_eq!(want["io_uring_cqe"], 16);
    assert_eq!(want["io_uring_params"], 120);
    for mflag in ["-m64", "-m32"] {
        assert_eq!(c_values(mflag), want, "gcc {mflag}");
    }
}
