//! Ring polling (`Config::ring_poll`, `TAPDISK3_POLL_US`): after a request, tapdisk keeps
//! looking at the ring for the polling window instead of re-arming `req_event`, so a guest
//! that pushes its next request within the window sends no event and is still served; once
//! the window has passed the ring is re-armed and the guest notifies again. Without polling
//! the ring is re-armed as soon as it is empty.

mod common;

use std::thread;
use std::time::Duration;

use common::xenio::*;

/// Write `data` at `sector`; returns whether the guest had to notify.
fn write(
    front: &mut blktap3::xen::sim::SimBlkfront<blktap3::xen::sim::MemXsConn>,
    sector: u64,
    data: &[u8],
) -> bool {
    front.submit_write(sector, data).unwrap();
    let notified = front.kick().unwrap();
    let done = wait(front, 1);
    assert_eq!(done[0].status, 0, "{done:?}");
    notified
}

fn read_back(
    front: &mut blktap3::xen::sim::SimBlkfront<blktap3::xen::sim::MemXsConn>,
    sector: u64,
    want: &[u8],
) {
    front
        .submit_read(sector, (want.len() / 512) as u32)
        .unwrap();
    front.kick().unwrap();
    let done = wait(front, 1);
    assert_eq!(done[0].status, 0);
    assert_eq!(done[0].data.as_deref(), Some(want));
}

#[test]
fn a_polled_ring_is_served_without_events_and_re_armed_after_the_window() {
    // Long enough that the guest's next request always falls inside it.
    let window = Duration::from_secs(3);
    let rig = Rig::start_with(|cfg| cfg.ring_poll = window);
    let path = rig.path("disk.raw");
    make_raw(&path, 4 << 20, 1);
    rig.open(0, &format!("aio:{}", path.display()), None);
    let mut front = rig.frontend(1, 51712, 0, None, 0);

    let a = vec![0xa5u8; 4096];
    let b = vec![0x5au8; 4096];
    assert!(
        write(&mut front, 0, &a),
        "the first request finds the ring armed"
    );
    // Inside the window: no event needed, and the request is still served.
    assert!(
        !write(&mut front, 8, &b),
        "a polled ring must not ask for an event"
    );
    read_back(&mut front, 0, &a);
    read_back(&mut front, 8, &b);
    // Let the window pass: the ring is re-armed and the guest notifies again.
    thread::sleep(window + Duration::from_secs(1));
    assert!(
        write(&mut front, 16, &a),
        "after the window the ring must be re-armed"
    );
    read_back(&mut front, 16, &a);
}

#[test]
fn without_polling_every_request_after_an_empty_ring_needs_an_event() {
    let rig = Rig::start();
    let path = rig.path("disk.raw");
    make_raw(&path, 4 << 20, 2);
    rig.open(0, &format!("aio:{}", path.display()), None);
    let mut front = rig.frontend(1, 51712, 0, None, 0);
    let a = vec![0x11u8; 4096];
    for i in 0..4 {
        assert!(
            write(&mut front, i * 8, &a),
            "request {i}: the ring must be armed"
        );
    }
    read_back(&mut front, 24, &a);
}
