//! Simulated event channels over eventfd.
//!
//! Like Linux's evtchn driver, a delivered port is masked until the user unmasks it; an event
//! sent while masked stays pending and is delivered on unmask. Like Xen, a freshly bound
//! interdomain port starts with one pending event.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, Weak};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::xen::{DomId, EventChannel, Port};

#[derive(Debug)]
pub(super) struct Queue {
    fd: EventFd,
    ready: Mutex<VecDeque<u32>>,
}

#[derive(Debug)]
struct PortState {
    owner: Weak<Queue>,
    /// Interdomain peer `(dom, port)` once bound.
    peer: Option<(DomId, u32)>,
    /// Unbound port reserved for this remote domain.
    unbound_for: Option<DomId>,
    masked: bool,
    pending: bool,
}

#[derive(Debug, Default)]
struct HubState {
    ports: HashMap<(DomId, u32), PortState>,
    next: HashMap<DomId, u32>,
}

/// Shared state of all simulated event channels.
#[derive(Debug, Default)]
pub(crate) struct EvtHub {
    state: Mutex<HubState>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl HubState {
    fn alloc(&mut self, dom: DomId, owner: &Arc<Queue>, unbound_for: Option<DomId>) -> u32 {
        let n = self.next.entry(dom).or_insert(1);
        let port = *n;
        *n += 1;
        self.ports.insert(
            (dom, port),
            PortState {
                owner: Arc::downgrade(owner),
                peer: None,
                unbound_for,
                masked: false,
                pending: false,
            },
        );
        port
    }

    fn deliver(&mut self, dom: DomId, port: u32) {
        let Some(p) = self.ports.get_mut(&(dom, port)) else {
            return;
        };
        if p.masked {
            p.pending = true;
            return;
        }
        p.masked = true;
        if let Some(q) = p.owner.upgrade() {
            let mut r = lock(&q.ready);
            r.push_back(port);
            let _ = q.fd.write(1);
        }
    }
}

/// One domain's event-channel handle (what opening `/dev/xen/evtchn` gives).
#[derive(Debug)]
pub struct SimEvtchn {
    hub: Arc<EvtHub>,
    dom: DomId,
    queue: Arc<Queue>,
}

impl SimEvtchn {
    pub(super) fn new(hub: Arc<EvtHub>, dom: DomId) -> io::Result<SimEvtchn> {
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(SimEvtchn {
            hub,
            dom,
            queue: Arc::new(Queue {
                fd,
                ready: Mutex::new(VecDeque::new()),
            }),
        })
    }

    /// The owning domain.
    pub fn dom(&self) -> DomId {
        self.dom
    }

    /// Allocate a port `remote` may bind to (`IOCTL_EVTCHN_BIND_UNBOUND_PORT`).
    pub fn alloc_unbound(&self, remote: DomId) -> io::Result<Port> {
        let mut st = lock(&self.hub.state);
        Ok(Port(st.alloc(self.dom, &self.queue, Some(remote))))
    }

    fn owned(&self, st: &HubState, local: Port) -> io::Result<()> {
        match st.ports.get(&(self.dom, local.0)) {
            Some(p)
                if p.owner
                    .upgrade()
                    .is_some_and(|q| Arc::ptr_eq(&q, &self.queue)) =>
            {
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

impl AsFd for SimEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.queue.fd.as_fd()
    }
}

impl EventChannel for SimEvtchn {
    fn bind_interdomain(&self, dom: DomId, remote: Port) -> io::Result<Port> {
        let mut st = lock(&self.hub.state);
        match st.ports.get(&(dom, remote.0)) {
            Some(p) if p.unbound_for == Some(self.dom) && p.peer.is_none() => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
        let local = st.alloc(self.dom, &self.queue, None);
        if let Some(p) = st.ports.get_mut(&(self.dom, local)) {
            p.peer = Some((dom, remote.0));
        }
        if let Some(p) = st.ports.get_mut(&(dom, remote.0)) {
            p.peer = Some((self.dom, local));
            p.unbound_for = None;
        }
        // Xen marks a newly bound port pending.
        st.deliver(self.dom, local);
        Ok(Port(local))
    }

    fn unbind(&self, local: Port) -> io::Result<()> {
        let mut st = lock(&self.hub.state);
        self.owned(&st, local)?;
        if let Some(p) = st.ports.remove(&(self.dom, local.0)) {
            if let Some((pd, pp)) = p.peer {
                if let Some(peer) = st.ports.get_mut(&(pd, pp)) {
                    peer.peer = None;
                    peer.unbound_for = Some(self.dom);
                }
            }
        }
        lock(&self.queue.ready).retain(|&p| p != local.0);
        Ok(())
    }

    fn notify(&self, local: Port) -> io::Result<()> {
        let mut st = lock(&self.hub.state);
        self.owned(&st, local)?;
        let peer = st.ports.get(&(self.dom, local.0)).and_then(|p| p.peer);
        match peer {
            Some((pd, pp)) => {
                st.deliver(pd, pp);
                Ok(())
            }
            None => Err(io::Error::from_raw_os_error(libc::ENOTCONN)),
        }
    }

    fn pending(&self) -> io::Result<Option<Port>> {
        let mut r = lock(&self.queue.ready);
        let p = r.pop_front();
        if r.is_empty() {
            // Clear the eventfd counter; EAGAIN just means it was already clear.
            let _ = self.queue.fd.read();
        }
        Ok(p.map(Port))
    }

    fn unmask(&self, local: Port) -> io::Result<()> {
        let mut st = lock(&self.hub.state);
        self.owned(&st, local)?;
        let again = match st.ports.get_mut(&(self.dom, local.0)) {
            Some(p) => {
                p.masked = false;
                std::mem::take(&mut p.pending)
            }
            None => false,
        };
        if again {
            st.deliver(self.dom, local.0);
        }
        Ok(())
    }
}

impl Drop for SimEvtchn {
    fn drop(&mut self) {
        let mut st = lock(&self.hub.state);
        let mine: Vec<u32> = st
            .ports
            .iter()
            .filter(|((d, _), p)| {
                *d == self.dom
                    && p.owner
                        .upgrade()
                        .is_none_or(|q| Arc::ptr_eq(&q, &self.queue))
            })
            .map(|((_, port), _)| *port)
            .collect();
        for port in mine {
            if let Some(p) = st.ports.remove(&(self.dom, port)) {
                if let Some((pd, pp)) = p.peer {
                    if let Some(peer) = st.ports.get_mut(&(pd, pp)) {
                        peer.peer = None;
                    }
                }
            }
        }
    }
}
