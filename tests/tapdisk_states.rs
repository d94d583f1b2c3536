//! Control requests in every VBD state, table-driven: each step is a request and the reply
//! (or errno) it must get. Rings are connected through the simulated Xen, so the odd orders
//! include a connected ring (close while paused with the ring up, detach with a ring, a ring
//! request queued while paused). After the table, the VBD must still serve I/O: nothing is
//! wedged.

mod common;

use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use blktap3::control::msg::{OpenFlags, OpenRequest, Reply, Request, ResumeRequest};
use blktap3::xen::sim::{MemXsConn, SimBlkfront};
use common::xenio::*;

const MINOR: u16 = 0;
const DOMID: u16 = 7;
const DEVID: u32 = 51712;

#[derive(Debug, Clone, Copy)]
enum Step {
    Attach,
    Open,
    Pause,
    Resume,
    Close,
    ForceClose,
    Detach,
    DiskInfo,
    Disconnect,
}

/// What a step must answer: success (the request's own reply) or an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Ok,
    Err(i32),
}

fn request(s: Step) -> Request {
    match s {
        Step::Attach => Request::Attach { minor: MINOR },
        Step::Open => Request::Open(OpenRequest::new(MINOR, "aio:/disk")),
        Step::Pause => Request::Pause { minor: MINOR },
        Step::Resume => Request::Resume(ResumeRequest {
            minor: MINOR,
            flags: OpenFlags::empty(),
            params: None,
            secondary: None,
            log_path: None,
        }),
        Step::Close => Request::Close { minor: MINOR },
        Step::ForceClose => Request::ForceShutdown { minor: MINOR },
        Step::Detach => Request::Detach { minor: MINOR },
        Step::DiskInfo => Request::DiskInfo { minor: MINOR },
        Step::Disconnect => Request::XenblkifDisconnect {
            domid: u32::from(DOMID),
            devid: DEVID,
        },
    }
}

fn outcome(r: &Reply) -> Want {
    match r {
        Reply::Error(e) => Want::Err(*e),
        _ => Want::Ok,
    }
}

fn run_table(rig: &Rig, table: &[(Step, Want)]) {
    for (i, (step, want)) in table.iter().enumerate() {
        let r = rig.call(request(*step));
        assert_eq!(outcome(&r), *want, "step {i} {step:?}: {r:?}");
        // The loop answers after every step (nothing wedged).
        assert!(matches!(rig.call(Request::Pid), Reply::Pid(_)));
    }
}

/// A rig with minor [`MINOR`] open on a gated RAM disk and a guest ring connected.
fn rig_with_ring() -> (Arc<GateOpener>, Rig, SimBlkfront<MemXsConn>) {
    let opener = GateOpener::new(2048);
    let rig = Rig::with_opener(opener.clone());
    run_table(&rig, &[(Attach, K), (Open, K)]);
    let front = rig.frontend(DOMID, DEVID, MINOR, None, 0);
    (opener, rig, front)
}

/// Kick the ring and wait until one request is held in the (closed) image gate.
fn kick_until_one_in_flight(rig: &Rig, front: &mut SimBlkfront<MemXsConn>) {
    front.kick().unwrap();
    until("the write to reach the image", || {
        outstanding(&rig.stats(MINOR)) == 1
    });
}

/// Send `r` from another thread (the answer comes once the loop finished it).
fn call_async(rig: &Rig, r: Request) -> Receiver<Reply> {
    let (tx, rx) = channel();
    let h = rig.h.clone();
    std::thread::spawn(move || tx.send(h.call(r)).unwrap());
    rx
}

use Step::*;
use Want::Err as E;
use Want::Ok as K;

#[test]
fn requests_in_every_state_without_a_ring() {
    let rig = Rig::with_opener(GateOpener::new(2048));
    let (inval, busy) = (libc::EINVAL, libc::EBUSY);
    run_table(
        &rig,
        &[
            // Not attached.
            (Open, E(inval)),
            (Pause, E(inval)),
            (Resume, E(inval)),
            (Close, E(inval)),
            (ForceClose, E(inval)),
            (Detach, E(inval)),
            (DiskInfo, E(inval)),
            (Disconnect, E(libc::ENODEV)),
            // Attached, closed.
            (Attach, K),
            (Attach, E(libc::EEXIST)),
            (Pause, E(inval)),
            (Resume, E(inval)),
            (DiskInfo, E(inval)),
            (Close, K),
            (Close, K),
            // Open.
            (Open, K),
            (Open, E(libc::EALREADY)),
            (Resume, E(inval)),
            (Detach, E(busy)),
            (DiskInfo, K),
            // Paused: pause is idempotent, open refused, resume once.
            (Pause, K),
            (Pause, K),
            (Open, E(libc::EALREADY)),
            (Detach, E(busy)),
            (DiskInfo, K),
            (Resume, K),
            (Resume, E(inval)),
            // Close while paused, then the closed VBD answers like a fresh one.
            (Pause, K),
            (Close, K),
            (Resume, E(inval)),
            (Pause, E(inval)),
            (Open, K),
            (ForceClose, K),
            (ForceClose, K),
            (Detach, K),
            (Detach, E(inval)),
            (Pause, E(inval)),
        ],
    );
}

#[test]
fn requests_in_every_state_with_a_connected_ring() {
    let (_, rig, mut front) = rig_with_ring();
    let (inval, busy) = (libc::EINVAL, libc::EBUSY);
    front.submit_write(0, &[0x5a; 4096]).unwrap();
    front.kick().unwrap();
    assert_eq!(wait(&mut front, 1)[0].status, 0);
    run_table(&rig, &[(Detach, E(busy)), (Pause, K), (Pause, K)]);
    // A request arriving while paused stays in the ring ...
    let rd = front.submit_read(0, 8).unwrap();
    front.kick().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(front.poll_completions().unwrap().is_empty());
    // ... across a close while paused with the ring up, and a fresh open.
    run_table(
        &rig,
        &[
            (Close, K),
            (Detach, E(busy)),
            (Resume, E(inval)),
            (Pause, E(inval)),
            (Open, K),
        ],
    );
    let got = wait(&mut front, 1);
    assert_eq!((got[0].id, got[0].status), (rd, 0));
    // Resume without pause, double resume, a second disconnect, detach once the ring is gone.
    run_table(
        &rig,
        &[
            (Resume, E(inval)),
            (Pause, K),
            (Resume, K),
            (Resume, E(inval)),
            (Disconnect, K),
            (Disconnect, E(libc::ENODEV)),
            (Detach, E(busy)),
            (Close, K),
            (Detach, K),
            (Disconnect, E(libc::ENODEV)),
        ],
    );
}

#[test]
fn requests_while_a_close_drains_get_ebusy() {
    let (opener, rig, mut front) = rig_with_ring();
    opener.set(false);
    let id = front.submit_write(8, &[1; 4096]).unwrap();
    kick_until_one_in_flight(&rig, &mut front);
    let rx = call_async(&rig, Request::Close { minor: MINOR });
    std::thread::sleep(Duration::from_millis(50));
    let busy = libc::EBUSY;
    run_table(
        &rig,
        &[
            (Open, E(busy)),
            (Pause, E(busy)),
            (Resume, E(busy)),
            (Close, E(busy)),
            (Detach, E(busy)),
        ],
    );
    // A disconnect during the drain: the ring goes dead, the close still completes.
    run_table(&rig, &[(Disconnect, K)]);
    opener.set(true);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        Reply::Close
    );
    assert!(front.poll_completions().unwrap().iter().all(|c| c.id != id));
    run_table(&rig, &[(Detach, K)]);
}

#[test]
fn a_barrier_waiting_for_the_ring_to_drain_survives_pause_and_resume() {
    let (opener, rig, mut front) = rig_with_ring();
    opener.set(false);
    let w = front.submit_write(0, &[2; 4096]).unwrap();
    let b = front
        .submit_sync(blktap3::blkif::op::WRITE_BARRIER, 8, &[3; 4096])
        .unwrap();
    let after = front.submit_read(0, 8).unwrap();
    kick_until_one_in_flight(&rig, &mut front);
    // PAUSE while the barrier waits for the write: the pause drains the write and the
    // barrier is held (not started on a pausing VBD, nothing after it taken).
    let rx = call_async(&rig, Request::Pause { minor: MINOR });
    std::thread::sleep(Duration::from_millis(50));
    opener.set(true);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        Reply::Pause
    );
    let got = wait(&mut front, 1);
    assert_eq!((got[0].id, got[0].status), (w, 0));
    std::thread::sleep(Duration::from_millis(50));
    assert!(front.poll_completions().unwrap().is_empty());
    // RESUME: the barrier completes, then the read behind it sees its data.
    run_table(&rig, &[(Resume, K)]);
    let got = wait(&mut front, 2);
    assert_eq!((got[0].id, got[0].status), (b, 0));
    assert_eq!((got[1].id, got[1].status), (after, 0));
    // (GateOpener opens a fresh RAM disk at RESUME: the barrier's data, written after the
    // resume, is there; the pre-pause write is not.)
    front.submit_read(8, 8).unwrap();
    front.kick().unwrap();
    let got = wait(&mut front, 1);
    assert!(got[0].data.as_deref() == Some(&[3u8; 4096][..]));
}

#[test]
fn a_disconnect_while_a_barrier_waits_drains_and_frees_the_ring() {
    let (opener, rig, mut front) = rig_with_ring();
    opener.set(false);
    front.submit_write(0, &[4; 4096]).unwrap();
    front
        .submit_sync(blktap3::blkif::op::WRITE_BARRIER, 8, &[5; 4096])
        .unwrap();
    kick_until_one_in_flight(&rig, &mut front);
    assert!(rig.stats(MINOR).contains("xenbus"));
    // The ring goes dead with the write in flight and the barrier held.
    run_table(&rig, &[(Disconnect, K), (Detach, E(libc::EBUSY))]);
    assert!(!rig.stats(MINOR).contains("xenbus"));
    opener.set(true);
    until("the write to drain", || outstanding(&rig.stats(MINOR)) == 0);
    // Nothing was answered on the dead ring, nothing more is started, and the VBD closes
    // and detaches.
    std::thread::sleep(Duration::from_millis(50));
    assert!(front.poll_completions().unwrap().is_empty());
    assert_eq!(outstanding(&rig.stats(MINOR)), 0);
    run_table(&rig, &[(Close, K), (Detach, K)]);
}
