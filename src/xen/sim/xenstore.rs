//! An in-memory xenstore with transactions, basic permissions and watches, plus a wire-protocol
//! server over it (a fake xenstored) for testing [`XsClient`](crate::xen::xenstore::XsClient).
//!
//! Behaviour follows C xenstored where it matters to backends:
//! - writes create missing parents; a new node inherits its parent's permissions, and an
//!   unprivileged creator becomes the owner;
//! - `rm` of an absent node whose parent exists succeeds;
//! - a transaction works on a snapshot; commit fails with `EAGAIN` if any node it accessed
//!   (read, written, listed) was changed, created or removed by someone else meanwhile;
//! - watches fire once on registration, for changes at or below the watched path, and for a
//!   removal above it (reported with the watch's own path); relative paths are relative to
//!   `/local/domain/<domid>` and watch events on relative watches are reported relative.
//!
//! Differences: no quotas, no special `@introduceDomain`/`@releaseDomain` events (such
//! watches only fire on registration), watch events are not filtered by read permission, and
//! conflict detection is per node rather than per accessed generation in xenstored's sense.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::xen::xenstore::wire::{self, Message, MsgType};
use crate::xen::xenstore::{Access, Committed, Perm, Tx, WatchEvent, XenStore, XsError};
use crate::xen::DomId;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    value: Vec<u8>,
    perms: Vec<Perm>,
    gen: u64,
}

type Tree = BTreeMap<String, Node>;

#[derive(Debug)]
struct TxState {
    conn: u64,
    base: Tree,
    work: Tree,
    accessed: BTreeSet<String>,
}

#[derive(Debug)]
struct ConnQueue {
    fd: EventFd,
    events: Mutex<VecDeque<WatchEvent>>,
}

#[derive(Debug)]
struct Watch {
    conn: u64,
    /// Absolute path (or `@special`).
    path: String,
    token: String,
    /// Prefix to strip from event paths (relative watches).
    strip: Option<String>,
    queue: Arc<ConnQueue>,
}

#[derive(Debug)]
struct State {
    nodes: Tree,
    gen: u64,
    next_tx: u32,
    next_conn: u64,
    txs: HashMap<u32, TxState>,
    watches: Vec<Watch>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn parent_of(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

fn is_at_or_below(path: &str, top: &str) -> bool {
    top == "/"
        || path == top
        || (path.starts_with(top) && path.as_bytes().get(top.len()) == Some(&b'/'))
}

fn valid_abs(path: &str) -> bool {
    path == "/"
        || (path.starts_with('/')
            && !path.ends_with('/')
            && !path.contains("//")
            && path.len() <= 3072
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_-@".contains(&b)))
}

fn can(perms: &[Perm], dom: DomId, want: Access) -> bool {
    if dom.0 == 0 {
        return true;
    }
    let Some(owner) = perms.first() else {
        return false;
    };
    if owner.dom == dom {
        return true;
    }
    let access = perms[1..]
        .iter()
        .find(|p| p.dom == dom)
        .map_or(owner.access, |p| p.access);
    access == Access::Both || access == want
}

/// The shared in-memory store. Connect clients with [`MemXenStore::connect`].
#[derive(Debug, Clone)]
pub struct MemXenStore {
    state: Arc<Mutex<State>>,
}

impl Default for MemXenStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemXenStore {
    /// A store holding `/` and `/local/domain` owned by dom0, readable by nobody else.
    pub fn new() -> MemXenStore {
        let mut nodes = Tree::new();
        let perms = vec![Perm {
            dom: DomId(0),
            access: Access::None,
        }];
        for p in ["/", "/local", "/local/domain"] {
            nodes.insert(
                p.to_owned(),
                Node {
                    value: Vec::new(),
                    perms: perms.clone(),
                    gen: 0,
                },
            );
        }
        MemXenStore {
            state: Arc::new(Mutex::new(State {
                nodes,
                gen: 1,
                next_tx: 1,
                next_conn: 1,
                txs: HashMap::new(),
                watches: Vec::new(),
            })),
        }
    }

    /// A connection acting as domain `dom` (dom 0 is privileged).
    pub fn connect(&self, dom: DomId) -> io::Result<MemXsConn> {
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        let mut st = lock(&self.state);
        let id = st.next_conn;
        st.next_conn += 1;
        Ok(MemXsConn {
            store: self.clone(),
            id,
            dom,
            queue: Arc::new(ConnQueue {
                fd,
                events: Mutex::new(VecDeque::new()),
            }),
        })
    }
}

/// One connection to a [`MemXenStore`]; implements [`XenStore`].
#[derive(Debug)]
pub struct MemXsConn {
    store: MemXenStore,
    id: u64,
    dom: DomId,
    queue: Arc<ConnQueue>,
}

impl MemXsConn {
    /// The domain this connection acts as.
    pub fn dom(&self) -> DomId {
        self.dom
    }

    fn abs(&self, path: &str) -> Result<String, XsError> {
        let p = if path.starts_with('/') {
            path.to_owned()
        } else if path.is_empty() {
            return Err(XsError::Errno(Errno::EINVAL));
        } else {
            format!("/local/domain/{}/{}", self.dom.0, path)
        };
        if !valid_abs(&p) {
            return Err(XsError::Errno(Errno::EINVAL));
        }
        Ok(p)
    }

    /// Run `f` on the tree for `tx` (the live tree, or the transaction's working copy).
    /// `f` returns the result and the list of changed paths (for watches / conflicts).
    /// Look at node `path` as this domain reads it: `None` if missing, EACCES without read
    /// permission, else `f(tree, absolute path, node)`.
    fn read_node<T>(
        &self,
        tx: Tx,
        path: &str,
        f: impl FnOnce(&Tree, &str, &Node) -> T,
    ) -> Result<Option<T>, XsError> {
        let p = self.abs(path)?;
        self.note_access(tx, &p);
        let dom = self.dom;
        self.with_tree(tx, |tree, _, _| match tree.get(&p) {
            None => Ok(None),
            Some(n) if !can(&n.perms, dom, Access::Read) => Err(XsError::Errno(Errno::EACCES)),
            Some(n) => Ok(Some(f(tree, &p, n))),
        })
    }

    fn with_tree<T>(
        &self,
        tx: Tx,
        f: impl FnOnce(&mut Tree, u64, &mut Vec<Change>) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        let mut st = lock(&self.store.state);
        let gen = st.gen;
        let mut changes = Vec::new();
        if tx == Tx::NONE {
            let r = f(&mut st.nodes, gen, &mut changes)?;
            if !changes.is_empty() {
                st.gen += 1;
                fire(&st, &changes);
            }
            return Ok(r);
        }
        let t = st
            .txs
            .get_mut(&tx.0)
            .filter(|t| t.conn == self.id)
            .ok_or(XsError::Errno(Errno::ENOENT))?;
        let mut touched = Vec::new();
        let r = f(&mut t.work, gen, &mut changes);
        // Record every path looked at, whatever the outcome.
        for c in &changes {
            touched.push(c.path.clone());
        }
        t.accessed.extend(touched);
        r
    }

    fn note_access(&self, tx: Tx, path: &str) {
        if tx == Tx::NONE {
            return;
        }
        let mut st = lock(&self.store.state);
        if let Some(t) = st.txs.get_mut(&tx.0) {
            t.accessed.insert(path.to_owned());
        }
    }
}

#[derive(Debug, Clone)]
struct Change {
    path: String,
    /// Removal: watches below `path` fire too.
    removed: bool,
}

fn fire(st: &State, changes: &[Change]) {
    for w in &st.watches {
        for c in changes {
            let hit = if is_at_or_below(&c.path, &w.path) {
                Some(c.path.as_str())
            } else if c.removed && is_at_or_below(&w.path, &c.path) {
                Some(w.path.as_str())
            } else {
                None
            };
            if let Some(p) = hit {
                push_event(w, p);
            }
        }
    }
}

fn push_event(w: &Watch, path: &str) {
    let shown = match &w.strip {
        Some(prefix) => path
            .strip_prefix(prefix.as_str())
            .map_or(path, |s| s.trim_start_matches('/')),
        None => path,
    };
    let mut q = lock(&w.queue.events);
    q.push_back(WatchEvent {
        path: shown.to_owned(),
        token: w.token.clone(),
    });
    let _ = w.queue.fd.write(1);
}

/// Create `path` (and missing parents) in `tree` as `dom`, or update its value.
fn tree_write(
    tree: &mut Tree,
    dom: DomId,
    path: &str,
    value: Option<&[u8]>,
    gen: u64,
    changes: &mut Vec<Change>,
) -> Result<(), XsError> {
    if let Some(n) = tree.get_mut(path) {
        if !can(&n.perms, dom, Access::Write) {
            return Err(XsError::Errno(Errno::EACCES));
        }
        if let Some(v) = value {
            n.value = v.to_vec();
            n.gen = gen;
        }
        changes.push(Change {
            path: path.to_owned(),
            removed: false,
        });
        return Ok(());
    }
    // Find the closest existing ancestor.
    let mut missing = vec![path.to_owned()];
    let mut cur = parent_of(path);
    let anc = loop {
        match cur {
            Some(p) if tree.contains_key(p) => break p.to_owned(),
            Some(p) => {
                missing.push(p.to_owned());
                cur = parent_of(p);
            }
            None => return Err(XsError::Errno(Errno::ENOENT)),
        }
    };
    let parent_perms = tree.get(&anc).map(|n| n.perms.clone()).unwrap_or_default();
    if !can(&parent_perms, dom, Access::Write) {
        return Err(XsError::Errno(Errno::EACCES));
    }
    // The ancestor's child list changes: bump its generation (transaction conflicts).
    if let Some(a) = tree.get_mut(&anc) {
        a.gen = gen;
    }
    let mut perms = parent_perms;
    if dom.0 != 0 {
        if let Some(owner) = perms.first_mut() {
            owner.dom = dom;
        }
    }
    for p in missing.iter().rev() {
        let v = if p == path { value.unwrap_or(&[]) } else { &[] };
        tree.insert(
            p.clone(),
            Node {
                value: v.to_vec(),
                perms: perms.clone(),
                gen,
            },
        );
        changes.push(Change {
            path: p.clone(),
            removed: false,
        });
    }
    Ok(())
}

fn children<'a>(tree: &'a Tree, path: &str) -> Vec<&'a str> {
    let prefix = if path == "/" {
        "/".to_owned()
    } else {
        format!("{path}/")
    };
    tree.range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, _)| &k[prefix.len()..])
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .collect()
}

impl AsFd for MemXsConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.queue.fd.as_fd()
    }
}

impl XenStore for MemXsConn {
    fn read(&self, tx: Tx, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        self.read_node(tx, path, |_, _, n| n.value.clone())
    }

    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<(), XsError> {
        let p = self.abs(path)?;
        if value.len() > wire::PAYLOAD_MAX {
            return Err(XsError::Errno(Errno::E2BIG));
        }
        self.note_access(tx, &p);
        let dom = self.dom;
        self.with_tree(tx, |tree, gen, ch| {
            tree_write(tree, dom, &p, Some(value), gen, ch)
        })
    }

    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>, XsError> {
        self.read_node(tx, path, |tree, p, _| {
            children(tree, p).into_iter().map(str::to_owned).collect()
        })?
        .ok_or(XsError::Errno(Errno::ENOENT))
    }

    fn mkdir(&self, tx: Tx, path: &str) -> Result<(), XsError> {
        let p = self.abs(path)?;
        self.note_access(tx, &p);
        let dom = self.dom;
        self.with_tree(tx, |tree, gen, ch| {
            if tree.contains_key(&p) {
                return Ok(());
            }
            tree_write(tree, dom, &p, None, gen, ch)
        })
    }

    fn rm(&self, tx: Tx, path: &str) -> Result<(), XsError> {
        let p = self.abs(path)?;
        if p == "/" {
            return Err(XsError::Errno(Errno::EINVAL));
        }
        self.note_access(tx, &p);
        let dom = self.dom;
        self.with_tree(tx, |tree, gen, ch| {
            let Some(n) = tree.get(&p) else {
                return match parent_of(&p) {
                    Some(parent) if tree.contains_key(parent) => Ok(()),
                    _ => Err(XsError::Errno(Errno::ENOENT)),
                };
            };
            // Deleting needs write access to the node's parent... and to the node itself
            // (xenstored checks the parent); we check the node, which covers owned subtrees.
            if !can(&n.perms, dom, Access::Write) {
                return Err(XsError::Errno(Errno::EACCES));
            }
            let doomed: Vec<String> = tree
                .keys()
                .filter(|k| is_at_or_below(k, &p))
                .cloned()
                .collect();
            for k in &doomed {
                tree.remove(k);
            }
            if let Some(parent) = parent_of(&p).and_then(|q| tree.get_mut(q)) {
                parent.gen = gen;
            }
            ch.push(Change {
                path: p.clone(),
                removed: true,
            });
            Ok(())
        })
    }

    fn get_perms(&self, tx: Tx, path: &str) -> Result<Vec<Perm>, XsError> {
        self.read_node(tx, path, |_, _, n| n.perms.clone())?
            .ok_or(XsError::Errno(Errno::ENOENT))
    }

    fn set_perms(&self, tx: Tx, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        let p = self.abs(path)?;
        if perms.is_empty() {
            return Err(XsError::Errno(Errno::EINVAL));
        }
        self.note_access(tx, &p);
        let dom = self.dom;
        self.with_tree(tx, |tree, gen, ch| {
            let n = tree.get_mut(&p).ok_or(XsError::Errno(Errno::ENOENT))?;
            // Only the owner (or dom0) may change permissions.
            if dom.0 != 0 && n.perms.first().map(|o| o.dom) != Some(dom) {
                return Err(XsError::Errno(Errno::EACCES));
            }
            n.perms = perms.to_vec();
            n.gen = gen;
            ch.push(Change {
                path: p.clone(),
                removed: false,
            });
            Ok(())
        })
    }

    fn begin(&self) -> Result<Tx, XsError> {
        let mut st = lock(&self.store.state);
        let id = st.next_tx;
        st.next_tx = st.next_tx.wrapping_add(1).max(1);
        let snap = st.nodes.clone();
        st.txs.insert(
            id,
            TxState {
                conn: self.id,
                base: snap.clone(),
                work: snap,
                accessed: BTreeSet::new(),
            },
        );
        Ok(Tx(id))
    }

    fn end(&self, tx: Tx, commit: bool) -> Result<Committed, XsError> {
        let mut st = lock(&self.store.state);
        let t = match st.txs.get(&tx.0) {
            Some(t) if t.conn == self.id => st.txs.remove(&tx.0),
            _ => None,
        }
        .ok_or(XsError::Errno(Errno::ENOENT))?;
        if !commit {
            return Ok(Committed::Done);
        }
        // Conflict: a node we accessed differs now from when the transaction started.
        let conflict = t.accessed.iter().any(|p| st.nodes.get(p) != t.base.get(p));
        if conflict {
            return Ok(Committed::Retry);
        }
        // Apply the difference between base and work.
        st.gen += 1;
        let gen = st.gen;
        let mut changes = Vec::new();
        for (k, n) in &t.work {
            if t.base.get(k) != Some(n) {
                let mut n = n.clone();
                n.gen = gen;
                st.nodes.insert(k.clone(), n);
                changes.push(Change {
                    path: k.clone(),
                    removed: false,
                });
            }
        }
        for k in t.base.keys() {
            if !t.work.contains_key(k) && st.nodes.remove(k).is_some() {
                changes.push(Change {
                    path: k.clone(),
                    removed: true,
                });
            }
        }
        fire(&st, &changes);
        Ok(Committed::Done)
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let (abs, strip) = if path.starts_with('@') {
            (path.to_owned(), None)
        } else {
            let abs = self.abs(path)?;
            let strip = (!path.starts_with('/')).then(|| format!("/local/domain/{}", self.dom.0));
            (abs, strip)
        };
        let mut st = lock(&self.store.state);
        if st
            .watches
            .iter()
            .any(|w| w.conn == self.id && w.path == abs && w.token == token)
        {
            return Err(XsError::Errno(Errno::EEXIST));
        }
        let w = Watch {
            conn: self.id,
            path: abs.clone(),
            token: token.to_owned(),
            strip,
            queue: Arc::clone(&self.queue),
        };
        // Fires once on registration, with the path as given.
        push_event(&w, &abs);
        st.watches.push(w);
        Ok(())
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let abs = if path.starts_with('@') {
            path.to_owned()
        } else {
            self.abs(path)?
        };
        let mut st = lock(&self.store.state);
        let before = st.watches.len();
        st.watches
            .retain(|w| !(w.conn == self.id && w.path == abs && w.token == token));
        if st.watches.len() == before {
            return Err(XsError::Errno(Errno::ENOENT));
        }
        Ok(())
    }

    fn take_watch_events(&self) -> Result<Vec<WatchEvent>, XsError> {
        let mut q = lock(&self.queue.events);
        let _ = self.queue.fd.read();
        Ok(q.drain(..).collect())
    }
}

impl Drop for MemXsConn {
    fn drop(&mut self) {
        let mut st = lock(&self.store.state);
        st.watches.retain(|w| w.conn != self.id);
        st.txs.retain(|_, t| t.conn != self.id);
    }
}

fn reply_for(conn: &MemXsConn, msg: &Message) -> Result<Vec<u8>, XsError> {
    let tx = Tx(msg.tx_id);
    let ok = || Ok(wire::join_strings(&["OK"]));
    match msg.ty {
        MsgType::Read => {
            let p = wire::single_string(&msg.payload)?;
            conn.read(tx, p)?.ok_or(XsError::Errno(Errno::ENOENT))
        }
        MsgType::Write => {
            let (p, v) = wire::split_write(&msg.payload)?;
            conn.write(tx, p, v)?;
            ok()
        }
        MsgType::Directory => {
            let p = wire::single_string(&msg.payload)?;
            Ok(wire::join_strings(&conn.directory(tx, p)?))
        }
        MsgType::Mkdir => {
            conn.mkdir(tx, wire::single_string(&msg.payload)?)?;
            ok()
        }
        MsgType::Rm => {
            conn.rm(tx, wire::single_string(&msg.payload)?)?;
            ok()
        }
        MsgType::GetPerms => {
            let perms = conn.get_perms(tx, wire::single_string(&msg.payload)?)?;
            let parts: Vec<String> = perms.iter().map(Perm::to_wire).collect();
            Ok(wire::join_strings(&parts))
        }
        MsgType::SetPerms => {
            let parts = wire::split_strings(&msg.payload)?;
            let (p, rest) = parts.split_first().ok_or(XsError::Errno(Errno::EINVAL))?;
            let perms = rest
                .iter()
                .map(|s| Perm::parse(s).map_err(|_| XsError::Errno(Errno::EINVAL)))
                .collect::<Result<Vec<_>, _>>()?;
            conn.set_perms(tx, p, &perms)?;
            ok()
        }
        MsgType::TransactionStart => {
            let t = conn.begin()?;
            Ok(wire::join_strings(&[t.0.to_string()]))
        }
        MsgType::TransactionEnd => {
            let arg = wire::single_string(&msg.payload)?;
            let commit = match arg {
                "T" => true,
                "F" => false,
                _ => return Err(XsError::Errno(Errno::EINVAL)),
            };
            match conn.end(tx, commit)? {
                Committed::Done => ok(),
                Committed::Retry => Err(XsError::Errno(Errno::EAGAIN)),
            }
        }
        MsgType::Watch | MsgType::Unwatch => {
            let parts = wire::split_strings(&msg.payload)?;
            if parts.len() < 2 {
                return Err(XsError::Errno(Errno::EINVAL));
            }
            if msg.ty == MsgType::Watch {
                conn.watch(parts[0], parts[1])?;
            } else {
                conn.unwatch(parts[0], parts[1])?;
            }
            ok()
        }
        _ => Err(XsError::Errno(Errno::ENOSYS)),
    }
}

fn send(fd: &OwnedFd, msg: &Message) -> io::Result<()> {
    let bytes = msg
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut buf = &bytes[..];
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Send the watch events pending on `conn` as WATCH_EVENT messages.
fn send_watch_events(conn: &MemXsConn, stream: &OwnedFd) -> io::Result<()> {
    for ev in conn
        .take_watch_events()
        .map_err(|e| io::Error::other(e.to_string()))?
    {
        let m = Message::new(
            MsgType::WatchEvent,
            0,
            0,
            wire::join_strings(&[ev.path, ev.token]),
        );
        send(stream, &m)?;
    }
    Ok(())
}

/// Serve the xenstore wire protocol on `stream` as domain `dom` until the peer closes it or
/// sends garbage: a fake xenstored for testing the real client. Watch events are sent as
/// they happen (also between requests). Run it on its own thread.
pub fn serve_wire(store: &MemXenStore, dom: DomId, stream: OwnedFd) -> io::Result<()> {
    let conn = store.connect(dom)?;
    let mut rbuf: Vec<u8> = Vec::new();
    loop {
        // Flush pending watch events first.
        send_watch_events(&conn, &stream)?;
        match wire::decode(&rbuf) {
            Ok(Some((msg, used))) => {
                rbuf.drain(..used);
                let (ty, payload) = match reply_for(&conn, &msg) {
                    Ok(p) => (msg.ty, p),
                    Err(e) => (MsgType::Error, wire::error_payload(e.errno())),
                };
                // Events caused by this request go out before its reply, like xenstored.
                send_watch_events(&conn, &stream)?;
                send(&stream, &Message::new(ty, msg.req_id, msg.tx_id, payload))?;
                continue;
            }
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        let mut fds = [
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(conn.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            let mut chunk = [0u8; 8192];
            match nix::unistd::read(&stream, &mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => rbuf.extend_from_slice(&chunk[..n]),
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
