//! The event loop's OS side: epoll with typed tokens, an eventfd-based waker and a timerfd.
//!
//! Level-triggered epoll. A [`Token`] names what an fd is (control wakeup, I/O completions,
//! a periodic timer, an NBD listener of a VBD, an NBD connection) and is packed into epoll's
//! 64-bit user data: kind in the top byte, id below.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// What a ready fd is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Token {
    /// Control requests are waiting in the channel.
    Control,
    /// I/O completions are waiting.
    IoDone,
    /// The periodic timer fired.
    Timer,
    /// Signals (signalfd), in the daemon binary.
    Signal,
    /// NBD listening socket of VBD `minor`.
    Listener(u16),
    /// NBD connection `id` (ids are never reused).
    Conn(u64),
    /// The event-channel handle of the blkif rings.
    Evtchn,
}

const ID_MASK: u64 = (1 << 56) - 1;

impl Token {
    fn encode(self) -> u64 {
        let (kind, id) = match self {
            Token::Control => (1u64, 0u64),
            Token::IoDone => (2, 0),
            Token::Timer => (3, 0),
            Token::Signal => (4, 0),
            Token::Listener(m) => (5, u64::from(m)),
            Token::Conn(id) => (6, id & ID_MASK),
            Token::Evtchn => (7, 0),
        };
        kind << 56 | id
    }

    fn decode(v: u64) -> Option<Token> {
        let id = v & ID_MASK;
        Some(match v >> 56 {
            1 => Token::Control,
            2 => Token::IoDone,
            3 => Token::Timer,
            4 => Token::Signal,
            5 => Token::Listener(u16::try_from(id).ok()?),
            6 => Token::Conn(id),
            7 => Token::Evtchn,
            _ => return None,
        })
    }
}

/// Interest in an fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

impl Interest {
    pub const READ: Interest = Interest {
        read: true,
        write: false,
    };

    fn flags(self) -> EpollFlags {
        let mut f = EpollFlags::empty();
        if self.read {
            f |= EpollFlags::EPOLLIN;
        }
        if self.write {
            f |= EpollFlags::EPOLLOUT;
        }
        f
    }
}

/// One ready fd.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    pub token: Token,
    pub readable: bool,
    pub writable: bool,
    /// Hang-up or error: the peer is gone.
    pub hangup: bool,
}

/// epoll with typed tokens.
#[derive(Debug)]
pub struct Reactor {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl Reactor {
    pub fn new() -> nix::Result<Self> {
        Ok(Reactor {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            events: vec![EpollEvent::empty(); 256],
        })
    }

    pub fn add<F: AsFd>(&self, fd: F, token: Token, interest: Interest) -> nix::Result<()> {
        self.epoll
            .add(fd, EpollEvent::new(interest.flags(), token.encode()))
    }

    pub fn modify<F: AsFd>(&self, fd: F, token: Token, interest: Interest) -> nix::Result<()> {
        let mut ev = EpollEvent::new(interest.flags(), token.encode());
        self.epoll.modify(fd, &mut ev)
    }

    pub fn delete<F: AsFd>(&self, fd: F) -> nix::Result<()> {
        self.epoll.delete(fd)
    }

    /// Wait up to `timeout` (None = forever) and append ready fds to `out`.
    pub fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Ready>) -> nix::Result<()> {
        let t = match timeout {
            None => EpollTimeout::NONE,
            Some(d) => {
                let ms = u16::try_from(d.as_millis()).unwrap_or(u16::MAX);
                EpollTimeout::from(ms)
            }
        };
        let n = match self.epoll.wait(&mut self.events, t) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(e),
        };
        for ev in &self.events[..n] {
            let Some(token) = Token::decode(ev.data()) else {
                continue;
            };
            let f = ev.events();
            out.push(Ready {
                token,
                readable: f.contains(EpollFlags::EPOLLIN),
                writable: f.contains(EpollFlags::EPOLLOUT),
                hangup: f.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR),
            });
        }
        Ok(())
    }
}

/// A non-blocking eventfd used to wake the loop from other threads.
#[derive(Debug)]
pub struct Waker(EventFd);

impl Waker {
    pub fn new() -> nix::Result<Self> {
        Ok(Waker(EventFd::from_flags(
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?))
    }

    /// Wake the loop (best effort: a full counter already means "wake").
    pub fn wake(&self) {
        let _ = self.0.write(1);
    }

    /// Reset the counter; called by the loop before draining its queue.
    pub fn reset(&self) {
        let _ = self.0.read();
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A periodic monotonic timer.
#[derive(Debug)]
pub struct Ticker(TimerFd);

impl Ticker {
    pub fn new(period: Duration) -> nix::Result<Self> {
        let t = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        t.set(
            Expiration::Interval(TimeSpec::from_duration(period)),
            TimerSetTimeFlags::empty(),
        )?;
        Ok(Ticker(t))
    }

    /// Consume the expirations.
    pub fn reset(&self) {
        // A non-blocking timerfd read fails with EAGAIN when nothing expired; nix's `wait`
        // does the read for us.
        let _ = self.0.wait();
    }
}

impl AsFd for Ticker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_roundtrip() {
        for t in [
            Token::Control,
            Token::IoDone,
            Token::Timer,
            Token::Signal,
            Token::Listener(16383),
            Token::Conn(ID_MASK),
            Token::Evtchn,
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(0), None);
    }

    #[test]
    fn waker_and_ticker_report_ready() {
        let mut r = Reactor::new().unwrap();
        let w = Waker::new().unwrap();
        r.add(&w, Token::Control, Interest::READ).unwrap();
        let mut out = Vec::new();
        r.wait(Some(Duration::ZERO), &mut out).unwrap();
        assert!(out.is_empty());
        w.wake();
        r.wait(Some(Duration::from_secs(1)), &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].token, Token::Control);
        w.reset();
        out.clear();
        r.wait(Some(Duration::ZERO), &mut out).unwrap();
        assert!(out.is_empty());

        let t = Ticker::new(Duration::from_millis(10)).unwrap();
        r.add(&t, Token::Timer, Interest::READ).unwrap();
        r.wait(Some(Duration::from_secs(2)), &mut out).unwrap();
        assert_eq!(out[0].token, Token::Timer);
        t.reset();
    }
}
