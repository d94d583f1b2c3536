//! blkif data path through the real tapdisk event loop over the simulated Xen: every ABI and
//! ring order, random workloads (reads, writes, flushes, barriers, discards, indirect up to
//! 1 MiB) on raw, dynamic VHD and encrypted VHD images, checked against an in-memory model.
//!
//! Model: a write replaces the bytes; a discard reads back as zeros on all three image types
//! (raw: punched hole; dynamic VHD, plain or encrypted, without parent: bitmap bits cleared
//! so the sectors read as zeros); flush and barrier leave the data unchanged. Requests of a
//! batch never overlap each other, so the model does not depend on completion order.

mod common;

use blktap3::blkif::ring::header_index;
use blktap3::blkif::{op, Abi};
use blktap3::control::msg::{Reply, Request};
use blktap3::xen::sim::{MemXsConn, SimBlkfront};
use common::xenio::*;

const SECTORS_PER_PAGE: u64 = 8;

#[derive(Debug)]
enum Pending {
    Read(u64, usize),
    Write,
    Sync,
    Discard,
}

/// Run `batches` random batches; `model` is the disk contents. Returns requests completed.
fn workload(
    front: &mut SimBlkfront<MemXsConn>,
    model: &mut [u8],
    rng: &mut Rng,
    batches: usize,
) -> usize {
    let disk_sectors = (model.len() / 512) as u64;
    let mut done = 0;
    for _ in 0..batches {
        let k = 1 + rng.below(10) as usize;
        let mut used: Vec<(u64, u64)> = Vec::new();
        let mut pending: Vec<(u64, Pending)> = Vec::new();
        for _ in 0..k {
            let dice = rng.below(100);
            let max_pages = match dice {
                0..=74 if rng.below(4) == 0 => 256,
                _ => 11,
            };
            let pages = 1 + rng.below(max_pages);
            let sectors = pages * SECTORS_PER_PAGE - rng.below(SECTORS_PER_PAGE);
            let Some(sector) = pick_free(rng, &mut used, disk_sectors, sectors, 10) else {
                continue;
            };
            let off = (sector * 512) as usize;
            let len = (sectors * 512) as usize;
            let (id, p) = match dice {
                0..=39 => (
                    front.submit_read(sector, sectors as u32).unwrap(),
                    Pending::Read(sector, len),
                ),
                40..=74 => {
                    let mut data = vec![0u8; len];
                    rng.fill(&mut data);
                    model[off..off + len].copy_from_slice(&data);
                    (front.submit_write(sector, &data).unwrap(), Pending::Write)
                }
                75..=81 => (
                    front.submit_sync(op::FLUSH_DISKCACHE, 0, &[]).unwrap(),
                    Pending::Sync,
                ),
                82..=86 => {
                    // Barrier, with data half of the time.
                    let data = if rng.below(2) == 0 {
                        let mut d = vec![0u8; len];
                        rng.fill(&mut d);
                        model[off..off + len].copy_from_slice(&d);
                        d
                    } else {
                        Vec::new()
                    };
                    (
                        front.submit_sync(op::WRITE_BARRIER, sector, &data).unwrap(),
                        Pending::Sync,
                    )
                }
                _ => {
                    model[off..off + len].fill(0);
                    (
                        front.submit_discard(sector, sectors).unwrap(),
                        Pending::Discard,
                    )
                }
            };
            pending.push((id, p));
        }
        front.kick().unwrap();
        let got = wait(front, pending.len());
        for c in got {
            let idx = pending
                .iter()
                .position(|(id, _)| *id == c.id)
                .unwrap_or_else(|| panic!("unexpected completion {c:?}"));
            let (_, p) = pending.swap_remove(idx);
            assert_eq!(c.status, 0, "{p:?} failed: {c:?}");
            match p {
                Pending::Read(sector, len) => {
                    let off = (sector * 512) as usize;
                    let data = c.data.expect("read data");
                    assert!(
                        data == model[off..off + len],
                        "read at sector {sector} ({len} bytes) differs from the model"
                    );
                }
                Pending::Write => assert_eq!(c.op, op::WRITE),
                Pending::Sync => assert!(c.op == op::FLUSH_DISKCACHE || c.op == op::WRITE_BARRIER),
                Pending::Discard => assert_eq!(c.op, op::DISCARD),
            }
            done += 1;
        }
    }
    done
}

/// Read the whole disk through the ring in 1 MiB requests and compare with the model.
fn verify_all(front: &mut SimBlkfront<MemXsConn>, model: &[u8]) {
    let chunk = 1 << 20;
    for (i, want) in model.chunks(chunk).enumerate() {
        let id = front
            .submit_read((i * chunk / 512) as u64, (want.len() / 512) as u32)
            .unwrap();
        front.kick().unwrap();
        let c = wait(front, 1);
        assert_eq!((c[0].id, c[0].status), (id, 0));
        assert!(c[0].data.as_deref() == Some(want), "chunk {i} differs");
    }
}

fn disconnect_and_close(rig: &Rig, domid: u32, devid: u32, minor: u16) {
    assert_eq!(
        rig.call(Request::XenblkifDisconnect { domid, devid }),
        Reply::XenblkifDisconnect
    );
    assert_eq!(rig.call(Request::Close { minor }), Reply::Close);
    assert_eq!(rig.call(Request::Detach { minor }), Reply::Detach);
}

#[test]
fn every_abi_and_ring_order_on_raw() {
    let rig = Rig::start();
    let size = 16 << 20;
    let abis = [None, Some(Abi::X86_32), Some(Abi::X86_64)];
    let mut total = 0;
    for (ai, abi) in abis.iter().enumerate() {
        for order in 0..=4u32 {
            let minor = (ai * 5) as u16 + order as u16;
            let path = rig.path(&format!("raw{minor}.img"));
            let mut model = make_raw(&path, size, 100 + u64::from(minor));
            let info = rig.open(minor, &format!("aio:{}", path.display()), None);
            assert_eq!(info.sectors, (size / 512) as u64);
            let domid = 1 + minor;
            let devid = 51712 + u32::from(minor);
            let mut front = rig.frontend(domid, devid, minor, *abi, order);
            let fi = front.info().unwrap();
            assert_eq!(fi.ring_order, order);
            assert_eq!(fi.sectors, (size / 512) as u64);
            let entries = front.ring().unwrap().entries();
            // 32, 64, 128, 256, 512 slots for orders 0..=4, for every ABI.
            assert_eq!(entries, 32 << order);
            if order == 4 {
                assert_eq!(entries, 512);
            }
            let mut rng = Rng(7 + u64::from(minor));
            // Until the ring has wrapped: every slot, on every ring page (for order 4 also the
            // pages whose grant refs travel in the control message's extension), carried a
            // request and its response.
            let mut rounds = 0;
            while header_index(front.ring().unwrap().mem(), 8) <= entries {
                total += workload(&mut front, &mut model, &mut rng, 25);
                rounds += 1;
                assert!(rounds < 100, "ring order {order} never wrapped");
            }
            let st = rig.stats(minor);
            assert!(
                st.contains(&format!(
                    "\"xenbus\": {{ \"pool\": \"td-xenio-default\", \"domid\": {domid}, \"devid\": {devid}, \"reqs\": [ "
                )),
                "{st}"
            );
            disconnect_and_close(&rig, u32::from(domid), devid, minor);
            assert!(
                std::fs::read(&path).unwrap() == model,
                "file differs from model"
            );
        }
    }
    assert!(total > 1000, "{total}");
}

#[test]
fn dynamic_and_encrypted_vhd() {
    let rig = Rig::start();
    let size: u64 = 24 << 20;
    let key = [0x5au8; 64];
    for (minor, enc, abi, order) in [
        (0u16, false, Some(Abi::X86_64), 1u32),
        (1, true, Some(Abi::X86_32), 2),
        (2, true, None, 0),
    ] {
        let path = rig.path(&format!("d{minor}.vhd"));
        make_vhd(&path, size, enc.then_some(&key[..]));
        rig.open(
            minor,
            &format!("vhd:{}", path.display()),
            enc.then_some(&key[..]),
        );
        let mut front = rig.frontend(10 + minor, 768 + u32::from(minor), minor, abi, order);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(99 + u64::from(minor));
        let n = workload(&mut front, &mut model, &mut rng, 40);
        assert!(n > 100);
        verify_all(&mut front, &model);
        disconnect_and_close(&rig, 10 + u32::from(minor), 768 + u32::from(minor), minor);
        if enc {
            // The plaintext must not be on disk: a written random block would show up.
            let raw = std::fs::read(&path).unwrap();
            let probe = model
                .chunks(512)
                .find(|c| c.iter().any(|b| *b != 0))
                .unwrap();
            assert!(!raw.windows(512).step_by(512).any(|w| w == probe));
        }
    }
}
