//! The NBD server connection (`nbd::server::Connection`, what tapdisk's NBD export runs)
//! fed a hostile client byte stream over a real socket pair.
//!
//! The client bytes are written to the peer end and the write side is shut; the server side
//! is driven like tapdisk's reactor does (`on_readable` with a small event budget, replies
//! to every request, `flush`), while the peer end is drained. Invariants: nothing panics,
//! the loop terminates, every WRITE event carries exactly its payload (none for a
//! zero-length one), every request lies
//! inside the export, and the connection ends (EOF or a protocol error) once input is gone.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use blktap3::nbd::proto::Command;
use blktap3::nbd::server::{Connection, Event, ReadStatus};
use blktap3::nbd::ExportInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let export = ExportInfo {
        size: u64::from(flags >> 2) * 4096 + u64::from(flags & 1) * 512,
        read_only: flags & 2 != 0,
        name: "fuzz".into(),
    };
    let Ok((server, mut client)) = UnixStream::pair() else {
        return;
    };
    // Default socket buffers hold the (max_len bounded) input.
    if client.write_all(data).is_err() || client.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let _ = client.set_nonblocking(true);
    let Ok(mut conn) = Connection::new(server, export.clone()) else {
        return;
    };
    let mut sink = vec![0u8; 1 << 16];
    let mut events = Vec::new();
    for _round in 0..10_000 {
        conn.mark_readable();
        let st = conn.on_readable(4, &mut events);
        for ev in events.drain(..) {
            match ev {
                Event::Disconnect => {}
                Event::Request { cookie, cmd, data } => match cmd {
                    Command::Write { offset, len, .. } => {
                        // A zero-length WRITE has no payload (tapdisk's export treats None as
                        // an empty buffer); any other carries exactly its length.
                        let d = data.unwrap_or_default();
                        assert_eq!(d.len(), len as usize);
                        assert!(offset + u64::from(len) <= export.size);
                        conn.give_buf(d);
                        conn.reply_ok(cookie);
                    }
                    Command::Read { offset, len } => {
                        assert!(data.is_none());
                        assert!(offset + u64::from(len) <= export.size);
                        let buf = conn.take_buf(len as usize);
                        conn.reply_read(cookie, offset, buf, 0, len);
                    }
                    Command::BlockStatus { offset, len, .. } => {
                        assert!(offset + u64::from(len) <= export.size);
                        conn.reply_block_status(cookie, &[(len, 0)]);
                    }
                    Command::Trim { offset, len, .. }
                    | Command::WriteZeroes { offset, len, .. } => {
                        assert!(offset + u64::from(len) <= export.size);
                        conn.reply_ok(cookie);
                    }
                    Command::Flush | Command::Disconnect => conn.reply_ok(cookie),
                },
            }
        }
        if conn.flush().is_err() {
            break;
        }
        // Drain what the server wrote (the client never stalls here).
        while let Ok(n) = client.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        if st == ReadStatus::Done {
            return;
        }
    }
    panic!("the connection did not end after its input ran out");
});
