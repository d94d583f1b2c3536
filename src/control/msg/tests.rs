use super::*;
use proptest::prelude::*;
use std::mem::offset_of;

// Offsets inside the union, from the declared members.
const P_PATH: usize = offset_of!(wire::Params, path);
const P_PRT_DEVNUM: usize = offset_of!(wire::Params, prt_devnum);
const P_REQ_TIMEOUT: usize = offset_of!(wire::Params, req_timeout);
const P_SECONDARY: usize = offset_of!(wire::Params, secondary);
const I_INFO: usize = offset_of!(wire::Image, info);
const L_PATH: usize = offset_of!(wire::List, path);
const B_ORDER: usize = offset_of!(wire::Blkif, order);
const B_PROTO: usize = offset_of!(wire::Blkif, proto);
const B_POOL: usize = offset_of!(wire::Blkif, pool);
const B_PORT: usize = offset_of!(wire::Blkif, port);
const B_POLL_IDLE: usize = offset_of!(wire::Blkif, poll_idle_threshold);
const B_GREF_EXT: usize = offset_of!(wire::BlkifExt, gref_ext);

const LAYOUTS: [WireLayout; 3] = [WireLayout::LP64, WireLayout::I686, WireLayout::ILP32_ALIGN8];

/// A `#[repr(C)]` mirror of the C struct: the compiler's C layout of the *target*.
#[allow(dead_code)]
mod mirror {
    #[repr(C)]
    pub struct Params {
        pub flags: u32,
        pub devnum: u32,
        pub domid: u32,
        pub path: [u8; 256],
        pub prt_devnum: u32,
        pub req_timeout: u16,
        pub secondary: [u8; 256],
    }
    #[repr(C)]
    pub struct Image {
        pub sectors: u64,
        pub sector_size: u32,
        pub info: u32,
    }
    #[repr(C)]
    pub struct Info {
        pub ty: u16,
        pub cookie: u16,
        pub length: usize,
    }
    #[repr(C)]
    pub struct Blkif {
        pub domid: u32,
        pub devid: u32,
        pub gref: [u32; 8],
        pub order: u32,
        pub proto: u32,
        pub pool: [u8; 256],
        pub port: u32,
        pub poll_duration: u32,
        pub poll_idle_threshold: u32,
    }
    #[repr(C)]
    pub struct List {
        pub count: i32,
        pub minor: i32,
        pub state: i32,
        pub path: [u8; 256],
    }
    #[repr(C)]
    pub union U {
        pub pid: i32,
        pub params: std::mem::ManuallyDrop<Params>,
        pub image: std::mem::ManuallyDrop<Image>,
        pub info: std::mem::ManuallyDrop<Info>,
        pub blkif: std::mem::ManuallyDrop<Blkif>,
        pub list: std::mem::ManuallyDrop<List>,
        pub response: std::mem::ManuallyDrop<([i32; 1], [u8; 256])>,
    }
    #[repr(C)]
    pub struct Message {
        pub ty: u16,
        pub cookie: u16,
        pub u: U,
    }
}

#[test]
fn native_layout_matches_the_c_abi_of_this_target() {
    use std::mem::size_of;
    let l = WireLayout::NATIVE;
    assert_eq!(size_of::<mirror::Message>(), l.msg_size);
    assert_eq!(offset_of!(mirror::Message, u), l.union_offset);
    assert_eq!(size_of::<usize>(), l.size_t_len);
    assert_eq!(offset_of!(mirror::Info, length), l.info_length_offset());
    assert_eq!(offset_of!(mirror::Params, path), P_PATH);
    assert_eq!(offset_of!(mirror::Params, prt_devnum), P_PRT_DEVNUM);
    assert_eq!(offset_of!(mirror::Params, req_timeout), P_REQ_TIMEOUT);
    assert_eq!(offset_of!(mirror::Params, secondary), P_SECONDARY);
    assert_eq!(size_of::<mirror::Params>(), 532);
    assert_eq!(offset_of!(mirror::Image, info), I_INFO);
    assert_eq!(offset_of!(mirror::Blkif, order), B_ORDER);
    assert_eq!(offset_of!(mirror::Blkif, proto), B_PROTO);
    assert_eq!(offset_of!(mirror::Blkif, pool), B_POOL);
    assert_eq!(offset_of!(mirror::Blkif, port), B_PORT);
    assert_eq!(offset_of!(mirror::Blkif, poll_idle_threshold), B_POLL_IDLE);
    assert_eq!(size_of::<mirror::Blkif>(), 316);
    // The order-4 extension starts right after the C struct and fits in the union.
    assert_eq!(B_GREF_EXT, size_of::<mirror::Blkif>());
    assert!(B_GREF_EXT + 4 * (MAX_RING_PAGES - BLKIF_C_GREFS) <= size_of::<mirror::U>());
    assert_eq!(offset_of!(mirror::List, path), L_PATH);
    assert_eq!(MSG_SIZE, l.msg_size);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn x86_64_sizes() {
    assert_eq!(MSG_SIZE, 544);
    assert_eq!(WireLayout::NATIVE.union_offset, 8);
    assert_eq!(WireLayout::NATIVE.params_path_offset(), 20);
    assert_eq!(WireLayout::NATIVE.info_length_offset(), 8);
}

#[cfg(target_arch = "x86")]
#[test]
fn i686_sizes() {
    assert_eq!(MSG_SIZE, 536);
    assert_eq!(WireLayout::NATIVE.union_offset, 4);
    assert_eq!(WireLayout::NATIVE.params_path_offset(), 16);
    assert_eq!(WireLayout::NATIVE.info_length_offset(), 4);
}

#[test]
fn layout_constants_as_measured_with_gcc() {
    // gcc -m64 / -m32 on the C struct: 544/8 and 536/4; info.length @8 / @4.
    assert_eq!(WireLayout::LP64.msg_size, 544);
    assert_eq!(WireLayout::LP64.params_path_offset(), 20);
    assert_eq!(WireLayout::LP64.info_length_offset(), 8);
    assert_eq!(WireLayout::I686.msg_size, 536);
    assert_eq!(WireLayout::I686.params_path_offset(), 16);
    assert_eq!(WireLayout::I686.info_length_offset(), 4);
}

#[test]
fn type_table() {
    for (i, t) in MsgType::ALL.iter().enumerate() {
        assert_eq!(*t as u16 as usize, i + 1);
        assert_eq!(MsgType::from_u16(*t as u16), Some(*t));
    }
    assert_eq!(MsgType::from_u16(0), None);
    assert_eq!(MsgType::from_u16(31), None);
    assert_eq!(MsgType::Open as u16, 7);
    assert_eq!(MsgType::ForceShutdown as u16, 23);
    assert_eq!(MsgType::XenblkifDisconnect as u16, 26);
    assert_eq!(MsgType::Exit as u16, 30);
    assert_eq!(OpenFlags::OPEN_ENCRYPTED.0, 0x400);
    assert_eq!(OpenFlags::NO_O_DIRECT.0, 0x200);
    assert_eq!(VbdState::RESUME_FAILED.0, 0x200);
    assert_eq!(c_hex(0), "0");
    assert_eq!(c_hex(2), "0x2");
    assert_eq!(c_hex(0x22), "0x22");
}

fn full_open() -> OpenRequest {
    OpenRequest {
        minor: 7,
        flags: OpenFlags::RDONLY | OpenFlags::SECONDARY | OpenFlags::REUSE_PRT,
        devnum: 7,
        domid: 3,
        params: "vhd:/storage/disks/a.vhd".into(),
        prt_devnum: 2,
        req_timeout: 30,
        secondary: Some("vhd:/mirror/b.vhd".into()),
        log_path: Some("/var/log/cbt.log".into()),
        key: Some(SecretKey::new(&[0xA5; 64])),
    }
}

fn all_requests() -> Vec<Request> {
    let mut open = full_open();
    open.flags |= OpenFlags::ADD_LOG | OpenFlags::OPEN_ENCRYPTED;
    let mut plain = OpenRequest::new(0, "aio:/dev/sdb");
    plain.flags = OpenFlags::NO_O_DIRECT;
    // Order 3: the eight refs of the C struct. Order 4: sixteen, eight of them in gref_ext.
    let mut gref = [0u32; MAX_RING_PAGES];
    for (i, g) in gref.iter_mut().enumerate().take(BLKIF_C_GREFS) {
        *g = 100 + i as u32;
    }
    let mut gref16 = [0u32; MAX_RING_PAGES];
    for (i, g) in gref16.iter_mut().enumerate() {
        *g = 0x0100_0000 + i as u32;
    }
    vec![
        Request::Pid,
        Request::Attach { minor: 16383 },
        Request::Open(open),
        Request::Open(plain),
        Request::Pause { minor: 1 },
        Request::Resume(ResumeRequest {
            minor: 1,
            flags: OpenFlags::ADD_LOG,
            params: Some("vhd:/new/leaf.vhd".into()),
            secondary: None,
            log_path: Some("/l".into()),
        }),
        Request::Resume(ResumeRequest {
            minor: 2,
            flags: OpenFlags::empty(),
            params: None,
            secondary: None,
            log_path: None,
        }),
        Request::Close { minor: 3 },
        Request::ForceShutdown { minor: 3 },
        Request::Detach { minor: 3 },
        Request::List,
        Request::Stats { minor: Some(4) },
        Request::Stats { minor: None },
        Request::XenblkifConnect {
            minor: 5,
            blkif: Blkif {
                domid: 9,
                devid: 51712,
                gref,
                order: 3,
                proto: BlkifProto::X86_32,
                pool: "td-xenio-default".into(),
                port: 77,
                poll_duration: 1000,
                poll_idle_threshold: 50,
                queue: 0,
            },
        },
        Request::XenblkifConnect {
            minor: 5,
            blkif: Blkif {
                domid: 9,
                devid: 51713,
                gref: gref16,
                order: 4,
                proto: BlkifProto::X86_64,
                pool: "p".repeat(255),
                port: 78,
                poll_duration: 7,
                poll_idle_threshold: 0xFFFF_FFFF,
                queue: 3,
            },
        },
        Request::XenblkifDisconnect {
            domid: 9,
            devid: 51712,
        },
        Request::DiskInfo { minor: 6 },
    ]
}

#[test]
fn request_round_trips_on_every_layout() {
    for layout in LAYOUTS {
        for req in all_requests() {
            let wire = req.encode_with(layout).unwrap();
            assert_eq!(
                request_len(&wire, layout).unwrap(),
                Need::Exactly(wire.len())
            );
            let back = decode_request(&wire, layout).unwrap();
            assert_eq!(back, req, "{layout:?}");
            // Byte-exact re-encoding.
            assert_eq!(*back.encode_with(layout).unwrap(), *wire);
        }
    }
}

#[test]
fn open_wire_bytes_at_exact_offsets() {
    for (layout, path_at) in [(WireLayout::LP64, 20usize), (WireLayout::I686, 16)] {
        let o = full_open();
        let wire = Request::Open(o).encode_with(layout).unwrap();
        let n = layout.msg_size;
        assert_eq!(wire.len(), n + 256 + 1 + 64);
        assert_eq!(u16::from_ne_bytes([wire[0], wire[1]]), 7);
        assert_eq!(u16::from_ne_bytes([wire[2], wire[3]]), 7);
        let u = layout.union_offset;
        let flags = u32::from_ne_bytes(wire[u..u + 4].try_into().unwrap());
        assert_eq!(flags, 0x002 | 0x080 | 0x040 | 0x010 | 0x400);
        assert_eq!(&wire[path_at..path_at + 24], b"vhd:/storage/disks/a.vhd");
        assert_eq!(wire[path_at + 24], 0);
        let prt = u + 268;
        assert_eq!(
            u32::from_ne_bytes(wire[prt..prt + 4].try_into().unwrap()),
            2
        );
        assert_eq!(u16::from_ne_bytes([wire[u + 272], wire[u + 273]]), 30);
        assert_eq!(&wire[u + 274..u + 274 + 17], b"vhd:/mirror/b.vhd");
        assert_eq!(&wire[n..n + 16], b"/var/log/cbt.log");
        assert!(wire[n + 16..n + 256].iter().all(|&b| b == 0));
        assert_eq!(wire[n + 256], 64);
        assert!(wire[n + 257..].iter().all(|&b| b == 0xA5));
    }
}

#[test]
fn stats_reply_length_field_per_layout() {
    let payload = b"{ \"name\": \"vhd:/x\" }".to_vec();
    for layout in LAYOUTS {
        let wire = Reply::Stats(payload.clone())
            .encode_with(0xFFFF, layout)
            .unwrap();
        assert_eq!(wire.len(), layout.msg_size + payload.len());
        let at = layout.union_offset + layout.info_length_offset();
        let len = if layout.size_t_len == 8 {
            u64::from_ne_bytes(wire[at..at + 8].try_into().unwrap())
        } else {
            u64::from(u32::from_ne_bytes(wire[at..at + 4].try_into().unwrap()))
        };
        assert_eq!(len, payload.len() as u64);
        let (cookie, back) = read_reply(&mut &wire[..], layout).unwrap();
        assert_eq!(cookie, 0xFFFF);
        assert_eq!(back, Reply::Stats(payload.clone()));
    }
}

fn all_replies() -> Vec<Reply> {
    let info = DiskInfo {
        sectors: 0x1_0000_0001,
        sector_size: 512,
        info: 4,
    };
    vec![
        Reply::Error(libc::EBUSY),
        Reply::Pid(4242),
        Reply::Attach,
        Reply::Open(info),
        Reply::Pause,
        Reply::Resume,
        Reply::Close,
        Reply::Detach,
        Reply::List(vec![]),
        Reply::List(
            (0..50)
                .map(|i| ListEntry {
                    minor: i,
                    state: VbdState(u32::from(i % 3)),
                    params: if i % 5 == 0 {
                        String::new()
                    } else {
                        format!("vhd:/d/{i}.vhd")
                    },
                })
                .collect(),
        ),
        Reply::Stats(vec![]),
        Reply::Stats(vec![b'x'; 10000]),
        Reply::XenblkifConnect,
        Reply::XenblkifDisconnect,
        Reply::DiskInfo(info),
    ]
}

#[test]
fn reply_round_trips_on_every_layout() {
    for layout in LAYOUTS {
        for rep in all_replies() {
            let wire = rep.encode_with(9, layout).unwrap();
            let mut r = &wire[..];
            let (cookie, back) = read_reply(&mut r, layout).unwrap();
            assert_eq!(cookie, 9);
            assert_eq!(back, rep);
            assert!(r.is_empty(), "reply not fully consumed");
        }
    }
}

#[test]
fn list_reply_counts_down_and_terminates() {
    let layout = WireLayout::NATIVE;
    let entries: Vec<ListEntry> = (0..3)
        .map(|i| ListEntry {
            minor: i,
            state: VbdState::CLOSED,
            params: String::new(),
        })
        .collect();
    let wire = Reply::List(entries).encode_with(0xFFFF, layout).unwrap();
    assert_eq!(wire.len(), 4 * layout.msg_size);
    let counts: Vec<(i32, i32)> = wire
        .chunks(layout.msg_size)
        .map(|m| {
            let u = layout.union_offset;
            (
                i32::from_ne_bytes(m[u..u + 4].try_into().unwrap()),
                i32::from_ne_bytes(m[u + 4..u + 8].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(counts, vec![(3, 0), (2, 1), (1, 2), (0, -1)]);
    for m in wire.chunks(layout.msg_size) {
        assert_eq!(u16::from_ne_bytes([m[0], m[1]]), MsgType::ListRsp as u16);
    }
}

#[test]
fn error_reply_carries_positive_errno() {
    let wire = Reply::error(-libc::ENOENT)
        .encode_with(5, WireLayout::NATIVE)
        .unwrap();
    let u = WireLayout::NATIVE.union_offset;
    assert_eq!(u16::from_ne_bytes([wire[0], wire[1]]), 1);
    assert_eq!(u16::from_ne_bytes([wire[2], wire[3]]), 5);
    assert_eq!(
        i32::from_ne_bytes(wire[u..u + 4].try_into().unwrap()),
        libc::ENOENT
    );
    assert_eq!(Reply::error(0), Reply::Error(libc::EIO));
    assert_eq!(Reply::error(i32::MIN), Reply::Error(libc::EIO));
}

fn msg(layout: WireLayout, ty: u16) -> Vec<u8> {
    let mut v = vec![0u8; layout.msg_size];
    v[0..2].copy_from_slice(&ty.to_ne_bytes());
    v
}

fn errno_of(r: Result<Request>) -> i32 {
    r.expect_err("must fail").errno()
}

#[test]
fn bad_requests_are_einval() {
    for layout in LAYOUTS {
        // Short.
        assert_eq!(errno_of(decode_request(&[], layout)), libc::EINVAL);
        assert_eq!(
            errno_of(decode_request(
                &msg(layout, 3)[..layout.msg_size - 1],
                layout
            )),
            libc::EINVAL
        );
        // Oversized (a valid PID plus a stray byte).
        let mut m = msg(layout, 3);
        m.push(0);
        assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
        // Unknown types and types without a handler.
        for t in [0u16, 31, 0xFFFF, 1, 2, 4, 6, 17, 18, 20, 22, 30] {
            assert_eq!(
                errno_of(decode_request(&msg(layout, t), layout)),
                libc::EINVAL,
                "type {t}"
            );
        }
        // No NUL in u.params.path, whatever the type.
        let mut m = msg(layout, 3);
        let p = layout.params_path_offset();
        m[p..p + 256].fill(b'a');
        assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
        // ... but a NUL at the very last byte of the field is fine.
        m[p + 255] = 0;
        assert_eq!(decode_request(&m, layout).unwrap(), Request::Pid);
        // Unterminated secondary.
        let mut m = msg(layout, 7);
        let s = layout.union_offset + P_SECONDARY;
        m[s..s + 256].fill(b'b');
        assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
        // Non-UTF-8 params.
        let mut m = msg(layout, 7);
        m[p] = 0xff;
        assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
    }
}

#[test]
fn bad_trailers() {
    let layout = WireLayout::NATIVE;
    let open_with = |flags: u32| {
        let mut m = msg(layout, 7);
        let u = layout.union_offset;
        m[u..u + 4].copy_from_slice(&flags.to_ne_bytes());
        m[u + P_PATH..u + P_PATH + 6].copy_from_slice(b"aio:/x");
        m
    };
    // ADD_LOG without the trailer.
    let m = open_with(0x010);
    assert_eq!(
        request_len(&m, layout).unwrap(),
        Need::Exactly(layout.msg_size + 256)
    );
    assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
    // Unterminated log path.
    let mut m = open_with(0x010);
    m.extend_from_slice(&[b'l'; 256]);
    assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
    // Empty log path.
    let mut m = open_with(0x010);
    m.extend_from_slice(&[0; 256]);
    assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
    // Encrypted: key length byte missing, zero, too large, key truncated.
    let m = open_with(0x400);
    assert_eq!(
        request_len(&m, layout).unwrap(),
        Need::AtLeast(layout.msg_size + 1)
    );
    assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
    for bad in [0u8, 129, 255] {
        let mut m = open_with(0x400);
        m.push(bad);
        m.extend_from_slice(&vec![1; usize::from(bad)]);
        assert!(request_len(&m, layout).is_err());
        assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
    }
    let mut m = open_with(0x400);
    m.push(32);
    m.extend_from_slice(&[1; 31]);
    assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
    m.push(1);
    match decode_request(&m, layout).unwrap() {
        Request::Open(o) => assert_eq!(o.key.unwrap().bytes(), &[1u8; 32][..]),
        other => panic!("{other:?}"),
    }
    // 128 is the largest key.
    let mut m = open_with(0x400);
    m.push(128);
    m.extend_from_slice(&[2; 128]);
    assert!(decode_request(&m, layout).is_ok());
}

#[test]
fn blkif_validation() {
    let layout = WireLayout::NATIVE;
    let u = layout.union_offset;
    let mut m = msg(layout, 24);
    m[u + B_PROTO..u + B_PROTO + 4].copy_from_slice(&4u32.to_ne_bytes());
    assert_eq!(errno_of(decode_request(&m, layout)), libc::EPROTONOSUPPORT);
    m[u + B_PROTO..u + B_PROTO + 4].copy_from_slice(&1u32.to_ne_bytes());
    for bad in [5u32, 8, 0x100, u32::MAX] {
        m[u + B_ORDER..u + B_ORDER + 4].copy_from_slice(&bad.to_ne_bytes());
        assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL, "{bad}");
    }
    m[u + B_ORDER..u + B_ORDER + 4].copy_from_slice(&1u32.to_ne_bytes());
    match decode_request(&m, layout).unwrap() {
        Request::XenblkifConnect { blkif, .. } => {
            assert_eq!(blkif.ring_refs().len(), 2);
            assert_eq!(blkif.proto, BlkifProto::Native);
            assert_eq!(blkif.pool, "");
        }
        other => panic!("{other:?}"),
    }
    // A pool that runs to the end of its field without NUL.
    m[u + B_POOL..u + B_POOL + 256].fill(b'p');
    assert_eq!(errno_of(decode_request(&m, layout)), libc::EINVAL);
    // The order field (always <= 4) keeps a NUL inside params.path, so a long pool is fine;
    // a pool without room for its NUL is refused.
    let mut req = Request::XenblkifConnect {
        minor: 0,
        blkif: Blkif {
            domid: 1,
            devid: 2,
            gref: [0; 16],
            order: 0,
            proto: BlkifProto::X86_64,
            pool: "q".repeat(240),
            port: 0,
            poll_duration: 0,
            poll_idle_threshold: 0,
            queue: 0,
        },
    };
    let wire = req.encode_with(layout).unwrap();
    assert_eq!(decode_request(&wire, layout).unwrap(), req);
    if let Request::XenblkifConnect { blkif, .. } = &mut req {
        blkif.pool = "q".repeat(256);
    }
    assert!(req.encode_with(layout).is_err());
    // Order 5 does not encode.
    if let Request::XenblkifConnect { blkif, .. } = &mut req {
        blkif.pool.clear();
        blkif.order = 5;
    }
    assert_eq!(req.encode_with(layout).unwrap_err().errno(), libc::EINVAL);
}

fn blkif_req(order: u32, gref: [u32; MAX_RING_PAGES]) -> Request {
    Request::XenblkifConnect {
        minor: 3,
        blkif: Blkif {
            domid: 7,
            devid: 51760,
            gref,
            order,
            proto: BlkifProto::X86_32,
            pool: "td-xenio-default".into(),
            port: 0x1234_5678,
            poll_duration: 250,
            poll_idle_threshold: 60,
            queue: 0,
        },
    }
}

fn word(wire: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(wire[at..at + 4].try_into().unwrap())
}

#[test]
fn blkif_order4_carries_sixteen_refs_after_the_c_struct() {
    let mut gref = [0u32; MAX_RING_PAGES];
    for (i, g) in gref.iter_mut().enumerate() {
        *g = 0xA000 + i as u32;
    }
    for layout in [WireLayout::LP64, WireLayout::I686] {
        let req = blkif_req(4, gref);
        let wire = req.encode_with(layout).unwrap();
        assert_eq!(wire.len(), layout.msg_size);
        let u = layout.union_offset;
        // Every C offset is where it always was.
        assert_eq!(word(&wire, u), 7);
        assert_eq!(word(&wire, u + 4), 51760);
        for i in 0..8 {
            assert_eq!(word(&wire, u + 8 + 4 * i), 0xA000 + i as u32);
        }
        assert_eq!(word(&wire, u + 40), 4);
        assert_eq!(word(&wire, u + 44), 2);
        assert_eq!(&wire[u + 48..u + 64], b"td-xenio-default");
        assert_eq!(word(&wire, u + 304), 0x1234_5678);
        assert_eq!(word(&wire, u + 308), 250);
        assert_eq!(word(&wire, u + 312), 60);
        // Refs 8..15 right after the 316-byte struct, then nothing.
        for i in 8..16 {
            assert_eq!(word(&wire, u + 316 + 4 * (i - 8)), 0xA000 + i as u32);
        }
        assert!(wire[u + 348..].iter().all(|&b| b == 0), "{layout:?}");
        let back = decode_request(&wire, layout).unwrap();
        assert_eq!(back, req, "{layout:?}");
        match &back {
            Request::XenblkifConnect { blkif, .. } => assert_eq!(blkif.ring_refs(), &gref[..]),
            other => panic!("{other:?}"),
        }
        assert_eq!(*back.encode_with(layout).unwrap(), *wire);
    }
}

#[test]
fn blkif_orders_0_to_3_keep_the_c_bytes_and_ignore_the_extension() {
    for layout in [WireLayout::LP64, WireLayout::I686] {
        let u = layout.union_offset;
        for order in 0..=3u32 {
            let n = 1usize << order;
            let mut gref = [0u32; MAX_RING_PAGES];
            for (i, g) in gref.iter_mut().enumerate().take(n) {
                *g = 40 + i as u32;
            }
            let clean = blkif_req(order, gref).encode_with(layout).unwrap();
            // Stray refs beyond gref[8] are not sent for orders below 4: the message is the
            // one a C tap-ctl would build.
            let mut noisy_gref = gref;
            noisy_gref[8..].fill(0xDEAD);
            let noisy = blkif_req(order, noisy_gref).encode_with(layout).unwrap();
            assert_eq!(*noisy, *clean, "{layout:?} order {order}");
            assert!(clean[u + 316..].iter().all(|&b| b == 0));
            // A C message with garbage in the spare union bytes decodes as before.
            let mut c_msg = clean.to_vec();
            c_msg[u + 316..].fill(0x5A);
            let back = decode_request(&c_msg, layout).unwrap();
            assert_eq!(back, blkif_req(order, gref), "{layout:?} order {order}");
            match back {
                Request::XenblkifConnect { blkif, .. } => {
                    assert_eq!(blkif.ring_refs(), &gref[..n]);
                    assert!(blkif.gref[8..].iter().all(|&g| g == 0));
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

#[test]
fn blkif_queue_travels_after_the_extension_behind_its_magic() {
    for layout in [WireLayout::LP64, WireLayout::I686] {
        let u = layout.union_offset;
        let mut gref = [0u32; MAX_RING_PAGES];
        gref[0] = 9;
        let mut req = blkif_req(0, gref);
        // Queue 0: nothing in the spare bytes (a C tap-ctl's message).
        let q0 = req.encode_with(layout).unwrap();
        assert!(q0[u + 316..].iter().all(|&b| b == 0));
        for q in [1u32, 2, MAX_QUEUES - 1] {
            if let Request::XenblkifConnect { blkif, .. } = &mut req {
                blkif.queue = q;
            }
            let wire = req.encode_with(layout).unwrap();
            assert_eq!(word(&wire, u + 348), MQ_MAGIC);
            assert_eq!(word(&wire, u + 352), q);
            assert!(wire[u + 356..].iter().all(|&b| b == 0));
            // Everything else is the queue-0 message.
            assert_eq!(wire[..u + 348], q0[..u + 348]);
            assert_eq!(
                decode_request(&wire, layout).unwrap(),
                req,
                "{layout:?} {q}"
            );
        }
        // A queue word without the magic is not a queue (garbage in a C message).
        let mut stray = q0.to_vec();
        stray[u + 352..u + 356].copy_from_slice(&5u32.to_ne_bytes());
        match decode_request(&stray, layout).unwrap() {
            Request::XenblkifConnect { blkif, .. } => assert_eq!(blkif.queue, 0),
            other => panic!("{other:?}"),
        }
        // With the magic, a queue beyond MAX_QUEUES is refused both ways.
        let mut bad = q0.to_vec();
        bad[u + 348..u + 352].copy_from_slice(&MQ_MAGIC.to_ne_bytes());
        bad[u + 352..u + 356].copy_from_slice(&MAX_QUEUES.to_ne_bytes());
        assert_eq!(errno_of(decode_request(&bad, layout)), libc::EINVAL);
        if let Request::XenblkifConnect { blkif, .. } = &mut req {
            blkif.queue = MAX_QUEUES;
        }
        assert_eq!(req.encode_with(layout).unwrap_err().errno(), libc::EINVAL);
    }
}

#[test]
fn encode_rejects_bad_strings_and_keys() {
    let mut o = OpenRequest::new(1, "x".repeat(256));
    assert!(Request::Open(o.clone()).encode().is_err());
    o.params = "vhd:/a\0b".into();
    assert!(Request::Open(o.clone()).encode().is_err());
    o.params = "vhd:/a".into();
    o.key = Some(SecretKey::new(&[]));
    assert!(Request::Open(o.clone()).encode().is_err());
    o.key = Some(SecretKey::new(&[0; 129]));
    assert!(Request::Open(o.clone()).encode().is_err());
    o.key = None;
    o.log_path = Some(String::new());
    assert!(Request::Open(o).encode().is_err());
}

#[test]
fn key_is_never_in_debug_output() {
    let o = full_open();
    let s = format!("{:?}", Request::Open(o));
    assert!(s.contains("redacted"));
    assert!(!s.to_lowercase().contains("a5"));
    assert!(!s.contains("165"));
}

#[test]
fn bad_replies() {
    let layout = WireLayout::NATIVE;
    // Short reply.
    assert!(matches!(
        read_reply(&mut &msg(layout, 4)[..10], layout),
        Err(ControlError::Closed)
    ));
    // A request type as reply.
    assert_eq!(
        read_reply(&mut &msg(layout, 3)[..], layout)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    // LIST without terminator.
    let entries = vec![ListEntry {
        minor: 1,
        state: VbdState(0),
        params: String::new(),
    }];
    let wire = Reply::List(entries).encode_with(0, layout).unwrap();
    assert!(read_reply(&mut &wire[..layout.msg_size], layout).is_err());
    // LIST with negative minor in a non-terminator.
    let mut m = msg(layout, 20);
    let u = layout.union_offset;
    m[u..u + 4].copy_from_slice(&1i32.to_ne_bytes());
    m[u + 4..u + 8].copy_from_slice(&(-5i32).to_ne_bytes());
    assert!(read_reply(&mut &m[..], layout).is_err());
    // Huge STATS length.
    let mut m = msg(layout, 22);
    let at = u + layout.info_length_offset();
    m[at..at + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert!(read_reply(&mut &m[..], layout).is_err());
    // STATS payload shorter than announced.
    let mut wire = Reply::Stats(vec![b'a'; 100])
        .encode_with(0, layout)
        .unwrap();
    wire.truncate(wire.len() - 1);
    assert!(matches!(
        read_reply(&mut &wire[..], layout),
        Err(ControlError::Closed)
    ));
}

#[test]
fn read_request_handles_trailers_and_short_reads() {
    struct Dribble<'a>(&'a [u8]);
    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(7);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let layout = WireLayout::NATIVE;
    for req in all_requests() {
        let wire = req.encode_with(layout).unwrap();
        let (cookie, back) = read_request(&mut Dribble(&wire), layout).unwrap();
        assert_eq!(cookie, req.cookie());
        assert_eq!(back, req);
    }
    // Truncated trailer: the error carries the cookie.
    let wire = Request::Open(full_open()).encode_with(layout).unwrap();
    let (cookie, err) = read_request(&mut Dribble(&wire[..wire.len() - 3]), layout).unwrap_err();
    assert_eq!(cookie, 7);
    assert!(matches!(err, ControlError::Closed));
}

#[test]
fn split_params_rules() {
    assert_eq!(split_params("vhd:/a/b").unwrap(), ("vhd", "/a/b"));
    assert_eq!(split_params("x-chain:/a:b").unwrap(), ("x-chain", "/a:b"));
    assert!(split_params("/a/b").is_err());
    assert!(split_params(":/a").is_err());
    assert!(split_params("vhd:").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200), ty in 0u16..40, flags in any::<u32>()) {
        for layout in LAYOUTS {
            let _ = request_len(&bytes, layout);
            let _ = decode_request(&bytes, layout);
            let _ = read_request(&mut &bytes[..], layout);
            let _ = read_reply(&mut &bytes[..], layout);
            if bytes.len() >= layout.msg_size {
                let _ = decode_frame(&bytes[..layout.msg_size], layout);
            }
            // The same bytes with a plausible type and flags reach deeper paths.
            let mut b = bytes.clone();
            if b.len() >= layout.union_offset + 4 {
                b[0..2].copy_from_slice(&ty.to_ne_bytes());
                let u = layout.union_offset;
                b[u..u + 4].copy_from_slice(&flags.to_ne_bytes());
                let _ = request_len(&b, layout);
                if let Ok(req) = decode_request(&b, layout) {
                    // Whatever decodes re-encodes to the same request.
                    let again = req.encode_with(layout).unwrap();
                    prop_assert_eq!(decode_request(&again, layout).unwrap(), req);
                }
                let _ = read_request(&mut &b[..], layout);
                let _ = read_reply(&mut &b[..], layout);
            }
        }
    }
}
