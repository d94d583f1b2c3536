//! Ring ABI layouts: the offset tables against `#[repr(C)]` mirrors of the C structs compiled
//! for this target (x86_64: natural alignment; i686: u64 aligned to 4, i.e. the x86_32 ABI),
//! plus fixed numbers from blkif.h for both ABIs.

use std::mem::{offset_of, size_of};

use blktap3::blkif::abi::{self, Abi};

#[repr(C)]
struct CSeg {
    gref: u32,
    first_sect: u8,
    last_sect: u8,
    pad: u16,
}

#[repr(C)]
struct CRequest {
    operation: u8,
    nr_segments: u8,
    handle: u16,
    id: u64,
    sector_number: u64,
    seg: [CSeg; 11],
}

#[repr(C)]
struct CResponse {
    id: u64,
    operation: u8,
    pad: u8,
    status: i16,
}

#[repr(C)]
struct CDiscard {
    operation: u8,
    flag: u8,
    handle: u16,
    id: u64,
    sector_number: u64,
    nr_sectors: u64,
}

#[repr(C)]
struct CIndirect {
    operation: u8,
    indirect_op: u8,
    nr_segments: u16,
    id: u64,
    sector_number: u64,
    handle: u16,
    grefs: [u32; 8],
    #[cfg(target_arch = "x86")]
    pad: u64,
}

#[test]
fn native_abi_matches_the_c_layout_of_this_target() {
    let l = Abi::NATIVE.layout();
    assert_eq!(size_of::<CSeg>(), abi::SEGMENT_SIZE);
    assert_eq!(size_of::<CRequest>(), l.size);
    assert_eq!(offset_of!(CRequest, id), l.id);
    assert_eq!(offset_of!(CRequest, sector_number), l.sector);
    assert_eq!(offset_of!(CRequest, seg), l.seg);
    assert_eq!(size_of::<CResponse>(), l.response_size);
    assert_eq!(offset_of!(CResponse, operation), abi::rsp::OPERATION);
    assert_eq!(offset_of!(CResponse, status), abi::rsp::STATUS);
    assert_eq!(offset_of!(CDiscard, id), l.id);
    assert_eq!(offset_of!(CDiscard, sector_number), l.sector);
    assert_eq!(offset_of!(CDiscard, nr_sectors), l.discard_nr_sectors);
    assert_eq!(offset_of!(CIndirect, nr_segments), l.indirect_nr_segments);
    assert_eq!(offset_of!(CIndirect, id), l.indirect_id);
    assert_eq!(offset_of!(CIndirect, sector_number), l.indirect_sector);
    assert_eq!(offset_of!(CIndirect, handle), l.indirect_handle);
    assert_eq!(offset_of!(CIndirect, grefs), l.indirect_grefs);
    assert_eq!(size_of::<CIndirect>(), 64);
}

#[test]
fn native_is_x86_32_on_i686_and_x86_64_elsewhere() {
    if cfg!(target_arch = "x86") {
        assert_eq!(Abi::NATIVE, Abi::X86_32);
    } else {
        assert_eq!(Abi::NATIVE, Abi::X86_64);
    }
}

#[test]
fn x86_64_layout_numbers() {
    let l = Abi::X86_64.layout();
    assert_eq!((l.size, l.id, l.sector, l.seg), (112, 8, 16, 24));
    assert_eq!(l.response_size, 16);
    assert_eq!(l.discard_nr_sectors, 24);
    assert_eq!(
        (
            l.indirect_id,
            l.indirect_sector,
            l.indirect_handle,
            l.indirect_grefs
        ),
        (8, 16, 24, 28)
    );
}

#[test]
fn x86_32_layout_numbers() {
    let l = Abi::X86_32.layout();
    assert_eq!((l.size, l.id, l.sector, l.seg), (108, 4, 12, 20));
    assert_eq!(l.response_size, 12);
    assert_eq!(l.discard_nr_sectors, 20);
    assert_eq!(
        (
            l.indirect_id,
            l.indirect_sector,
            l.indirect_handle,
            l.indirect_grefs
        ),
        (4, 12, 20, 24)
    );
}

#[test]
fn ring_entries_per_order() {
    for a in [Abi::X86_32, Abi::X86_64] {
        let e: Vec<u32> = (0..=4).map(|o| a.ring_entries(o).unwrap()).collect();
        assert_eq!(e, vec![32, 64, 128, 256, 512], "{a:?}");
        assert_eq!(a.ring_entries(5), None);
        for o in 0..=4 {
            let n = a.ring_entries(o).unwrap() as usize;
            assert!(abi::SRING_HEADER_SIZE + n * a.request_size() <= Abi::ring_bytes(o));
            assert!(abi::SRING_HEADER_SIZE + 2 * n * a.request_size() > Abi::ring_bytes(o));
        }
    }
}

#[test]
fn header_and_constants() {
    assert_eq!(abi::SRING_HEADER_SIZE, 64);
    assert_eq!(
        (
            abi::sring::REQ_PROD,
            abi::sring::REQ_EVENT,
            abi::sring::RSP_PROD,
            abi::sring::RSP_EVENT
        ),
        (0, 4, 8, 12)
    );
    assert_eq!(abi::SEGMENTS_PER_INDIRECT_PAGE, 512);
    assert_eq!(
        (
            abi::op::READ,
            abi::op::WRITE,
            abi::op::WRITE_BARRIER,
            abi::op::FLUSH_DISKCACHE,
            abi::op::DISCARD,
            abi::op::INDIRECT
        ),
        (0, 1, 2, 3, 5, 6)
    );
    assert_eq!(Abi::X86_32.protocol_name(), "x86_32-abi");
    assert_eq!(Abi::X86_64.protocol_name(), "x86_64-abi");
}
