//! Generic-netlink messages for the kernel NBD driver: encoding and decoding only, no I/O.
//!
//! Layouts (every header in host byte order, every attribute padded to 4 bytes):
//!
//! ```text
//!  nlmsghdr   u32 len (header included), u16 type, u16 flags, u32 seq, u32 port id   16 bytes
//!  genlmsghdr u8 cmd, u8 version, u16 reserved                                          4 bytes
//!  nlattr     u16 len (header included, padding excluded), u16 type, data, pad to 4     4 bytes + data
//!  nlmsgerr   i32 error (0 = ACK, else -errno), then the offending request's header
//! ```
//!
//! Requests are built with [`GenlBuilder`]; a reply stream is fed datagram by datagram into an
//! [`Exchange`], which stops at the ACK/error for the request's sequence number. Replies are
//! untrusted: every length is checked against the buffer and nothing here panics on them.
//!
//! Constant values are those of Linux's `netlink.h`, `genetlink.h` and `nbd-netlink.h` UAPI.

/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Size of `struct genlmsghdr`.
pub const GENL_HDRLEN: usize = 4;
/// Size of `struct nlattr`.
pub const NLA_HDRLEN: usize = 4;

/// Control message types below `NLMSG_MIN_TYPE`.
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

/// `nlmsg_flags`.
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;

/// Attribute type flag bits; the type proper is the low 14 bits.
pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;
pub const NLA_TYPE_MASK: u16 = 0x3fff;

/// The generic-netlink controller family and its commands/attributes.
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_VERSION: u8 = 1;
pub const CTRL_CMD_NEWFAMILY: u8 = 1;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const CTRL_ATTR_VERSION: u16 = 3;
pub const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
pub const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
pub const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

/// The NBD family (`nbd-netlink.h`).
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
pub const NBD_GENL_VERSION: u8 = 1;
pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
pub const NBD_SOCK_ITEM: u16 = 1;
pub const NBD_SOCK_FD: u16 = 1;

/// Errors decoding (or, for oversized attributes, encoding) netlink messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetlinkError {
    /// A header or attribute runs past the end of its buffer.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A length field smaller than its own header.
    #[error("bad {0} length {1}")]
    BadLength(&'static str, usize),
    /// An attribute whose payload has the wrong size or encoding for its type.
    #[error("malformed attribute {0}")]
    BadAttr(u16),
    /// A required attribute is absent.
    #[error("missing attribute {0}")]
    Missing(&'static str),
    /// An attribute or message too large for its 16- or 32-bit length field.
    #[error("message too large")]
    TooLarge,
    /// The kernel reported lost messages.
    #[error("netlink overrun")]
    Overrun,
    /// The kernel answered with this positive errno.
    #[error("kernel error {0}")]
    Kernel(i32),
}

/// Round up to the 4-byte netlink alignment (saturating; callers bound the input).
pub fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes([s[0], s[1]]))
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// Builds one generic-netlink request: header, genl header, attributes (nesting allowed).
#[derive(Debug)]
pub struct GenlBuilder {
    buf: Vec<u8>,
    nests: Vec<usize>,
    too_large: bool,
}

impl GenlBuilder {
    /// A message to `family` (its numeric id) running `cmd`.
    pub fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> GenlBuilder {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: 0 = the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        GenlBuilder {
            buf,
            nests: Vec::new(),
            too_large: false,
        }
    }

    /// Append one attribute with raw `data` (padding added).
    pub fn bytes(&mut self, typ: u16, data: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + data.len();
        let Ok(len16) = u16::try_from(len) else {
            self.too_large = true;
            return self;
        };
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&typ.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn u16(&mut self, typ: u16, v: u16) -> &mut Self {
        self.bytes(typ, &v.to_ne_bytes())
    }

    pub fn u32(&mut self, typ: u16, v: u32) -> &mut Self {
        self.bytes(typ, &v.to_ne_bytes())
    }

    pub fn u64(&mut self, typ: u16, v: u64) -> &mut Self {
        self.bytes(typ, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn string(&mut self, typ: u16, s: &str) -> &mut Self {
        let mut d = Vec::with_capacity(s.len() + 1);
        d.extend_from_slice(s.as_bytes());
        d.push(0);
        self.bytes(typ, &d)
    }

    /// Open a nested attribute (`NLA_F_NESTED` set); close it with [`GenlBuilder::end_nested`].
    pub fn begin_nested(&mut self, typ: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(typ | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Close the innermost nested attribute, fixing its length.
    pub fn end_nested(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            match u16::try_from(self.buf.len() - start) {
                Ok(l) => self.buf[start..start + 2].copy_from_slice(&l.to_ne_bytes()),
                Err(_) => self.too_large = true,
            }
        }
        self
    }

    fn pad(&mut self) {
        let n = align4(self.buf.len());
        self.buf.resize(n, 0);
    }

    /// The finished message (open nests are closed).
    pub fn finish(mut self) -> Result<Vec<u8>, NetlinkError> {
        while !self.nests.is_empty() {
            self.end_nested();
        }
        let len = u32::try_from(self.buf.len()).map_err(|_| NetlinkError::TooLarge)?;
        if self.too_large {
            return Err(NetlinkError::TooLarge);
        }
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        Ok(self.buf)
    }
}

/// One netlink message of a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlMsg<'a> {
    pub typ: u16,
    pub flags: u16,
    pub seq: u32,
    pub port: u32,
    /// Everything after the 16-byte header, up to the message's own length.
    pub payload: &'a [u8],
}

/// Split a datagram into its netlink messages.
pub fn split_messages(buf: &[u8]) -> Result<Vec<NlMsg<'_>>, NetlinkError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let hdr = |at| ne_u32(rest, at).ok_or(NetlinkError::Truncated("netlink header"));
        if rest.len() < NLMSG_HDRLEN {
            return Err(NetlinkError::Truncated("netlink header"));
        }
        let len = hdr(0)? as usize;
        if len < NLMSG_HDRLEN {
            return Err(NetlinkError::BadLength("netlink message", len));
        }
        if len > rest.len() {
            return Err(NetlinkError::Truncated("netlink message"));
        }
        let half = |at| ne_u16(rest, at).ok_or(NetlinkError::Truncated("netlink header"));
        out.push(NlMsg {
            typ: half(4)?,
            flags: half(6)?,
            seq: hdr(8)?,
            port: hdr(12)?,
            payload: &rest[NLMSG_HDRLEN..len],
        });
        rest = &rest[align4(len).min(rest.len())..];
    }
    Ok(out)
}

/// The positive errno of an `NLMSG_ERROR` payload (0 = ACK).
pub fn error_code(payload: &[u8]) -> Result<i32, NetlinkError> {
    let raw = ne_u32(payload, 0).ok_or(NetlinkError::Truncated("netlink error"))? as i32;
    // -errno; anything positive is not a valid kernel answer: report it as EIO.
    Ok(if raw > 0 {
        libc::EIO
    } else {
        raw.checked_neg().unwrap_or(libc::EIO)
    })
}

/// A generic-netlink payload: command, version and the attribute area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenlMsg<'a> {
    pub cmd: u8,
    pub version: u8,
    pub attrs: &'a [u8],
}

/// Decode the genl header of a message payload.
pub fn genl_message(payload: &[u8]) -> Result<GenlMsg<'_>, NetlinkError> {
    if payload.len() < GENL_HDRLEN {
        return Err(NetlinkError::Truncated("genl header"));
    }
    Ok(GenlMsg {
        cmd: payload[0],
        version: payload[1],
        attrs: &payload[GENL_HDRLEN..],
    })
}

/// One attribute: type without flag bits, whether `NLA_F_NESTED` was set, payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    pub typ: u16,
    pub nested: bool,
    pub data: &'a [u8],
}

impl<'a> Attr<'a> {
    fn fixed<const N: usize>(&self) -> Result<[u8; N], NetlinkError> {
        <[u8; N]>::try_from(self.data).map_err(|_| NetlinkError::BadAttr(self.typ))
    }

    pub fn u16(&self) -> Result<u16, NetlinkError> {
        self.fixed().map(u16::from_ne_bytes)
    }

    pub fn u32(&self) -> Result<u32, NetlinkError> {
        self.fixed().map(u32::from_ne_bytes)
    }

    pub fn u64(&self) -> Result<u64, NetlinkError> {
        self.fixed().map(u64::from_ne_bytes)
    }

    /// A string attribute: UTF-8 up to the first NUL (or the end).
    pub fn str(&self) -> Result<&'a str, NetlinkError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.data.len());
        std::str::from_utf8(&self.data[..end]).map_err(|_| NetlinkError::BadAttr(self.typ))
    }

    /// The attributes nested inside this one.
    pub fn nested_attrs(&self) -> Result<Vec<Attr<'a>>, NetlinkError> {
        parse_attrs(self.data)
    }
}

/// Parse an attribute area.
pub fn parse_attrs(buf: &[u8]) -> Result<Vec<Attr<'_>>, NetlinkError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let (Some(len), Some(typ)) = (ne_u16(rest, 0), ne_u16(rest, 2)) else {
            return Err(NetlinkError::Truncated("attribute header"));
        };
        let len = usize::from(len);
        if len < NLA_HDRLEN {
            return Err(NetlinkError::BadLength("attribute", len));
        }
        if len > rest.len() {
            return Err(NetlinkError::Truncated("attribute"));
        }
        out.push(Attr {
            typ: typ & NLA_TYPE_MASK,
            nested: typ & NLA_F_NESTED != 0,
            data: &rest[NLA_HDRLEN..len],
        });
        rest = &rest[align4(len).min(rest.len())..];
    }
    Ok(out)
}

/// A generic-netlink reply message kept from an [`Exchange`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenlReply {
    pub cmd: u8,
    pub attrs: Vec<u8>,
}

/// Collects the replies to one request (sent with `NLM_F_ACK`) from the datagrams that come
/// back: genl messages of `family` with the request's sequence number are kept, other
/// messages (stale sequence numbers, other types, `NLMSG_NOOP`) ignored; the `NLMSG_ERROR`
/// for the sequence number ends the exchange, successfully for an ACK (error 0), with
/// [`NetlinkError::Kernel`] otherwise.
#[derive(Debug)]
pub struct Exchange {
    family: u16,
    seq: u32,
    replies: Vec<GenlReply>,
    done: bool,
}

impl Exchange {
    pub fn new(family: u16, seq: u32) -> Exchange {
        Exchange {
            family,
            seq,
            replies: Vec::new(),
            done: false,
        }
    }

    /// Take in one datagram. `Ok(true)` once the exchange is complete.
    pub fn absorb(&mut self, datagram: &[u8]) -> Result<bool, NetlinkError> {
        for m in split_messages(datagram)? {
            if self.done {
                break;
            }
            if m.typ == NLMSG_OVERRUN {
                return Err(NetlinkError::Overrun);
            }
            if m.seq != self.seq {
                continue;
            }
            match m.typ {
                NLMSG_ERROR => match error_code(m.payload)? {
                    0 => self.done = true,
                    e => return Err(NetlinkError::Kernel(e)),
                },
                NLMSG_DONE => self.done = true,
                t if t == self.family => {
                    let g = genl_message(m.payload)?;
                    self.replies.push(GenlReply {
                        cmd: g.cmd,
                        attrs: g.attrs.to_vec(),
                    });
                }
                _ => {}
            }
        }
        Ok(self.done)
    }

    /// Whether the final ACK has been seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The genl replies collected.
    pub fn replies(&self) -> &[GenlReply] {
        &self.replies
    }
}

/// A multicast group of a family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McastGroup {
    pub name: String,
    pub id: u32,
}

/// What `CTRL_CMD_GETFAMILY` tells about a family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub id: u16,
    pub name: String,
    pub version: u32,
    pub mcast_groups: Vec<McastGroup>,
}

/// `CTRL_CMD_GETFAMILY` for the family called `name`.
pub fn get_family_request(seq: u32, name: &str) -> Result<Vec<u8>, NetlinkError> {
    let mut b = GenlBuilder::new(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        CTRL_VERSION,
    );
    b.string(CTRL_ATTR_FAMILY_NAME, name);
    b.finish()
}

/// Decode the attributes of a `CTRL_CMD_NEWFAMILY` reply. The id and name are required;
/// unknown attributes are skipped.
pub fn parse_family(attrs: &[u8]) -> Result<Family, NetlinkError> {
    let (mut id, mut name, mut version, mut groups) = (None, None, 0, Vec::new());
    for a in parse_attrs(attrs)? {
        match a.typ {
            CTRL_ATTR_FAMILY_ID => id = Some(a.u16()?),
            CTRL_ATTR_FAMILY_NAME => name = Some(a.str()?.to_string()),
            CTRL_ATTR_VERSION => version = a.u32()?,
            CTRL_ATTR_MCAST_GROUPS => {
                for g in a.nested_attrs()? {
                    let (mut gname, mut gid) = (None, None);
                    for f in g.nested_attrs()? {
                        match f.typ {
                            CTRL_ATTR_MCAST_GRP_NAME => gname = Some(f.str()?.to_string()),
                            CTRL_ATTR_MCAST_GRP_ID => gid = Some(f.u32()?),
                            _ => {}
                        }
                    }
                    groups.push(McastGroup {
                        name: gname.ok_or(NetlinkError::Missing("mcast group name"))?,
                        id: gid.ok_or(NetlinkError::Missing("mcast group id"))?,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(Family {
        id: id.ok_or(NetlinkError::Missing("family id"))?,
        name: name.ok_or(NetlinkError::Missing("family name"))?,
        version,
        mcast_groups: groups,
    })
}

/// The family described by the replies of a GETFAMILY exchange.
pub fn family_from_replies(replies: &[GenlReply]) -> Result<Family, NetlinkError> {
    let r = replies
        .iter()
        .find(|r| r.cmd == CTRL_CMD_NEWFAMILY)
        .ok_or(NetlinkError::Missing("family reply"))?;
    parse_family(&r.attrs)
}

/// The parameters of `NBD_CMD_CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConnect<'a> {
    /// The device index to use; `None` lets the kernel pick a free one.
    pub index: Option<u32>,
    pub size_bytes: u64,
    /// Logical block size (a power of two 512..=page size); `None` = the kernel's default.
    pub block_size: Option<u64>,
    /// NBD transmission flags from the handshake.
    pub server_flags: u64,
    /// Connected sockets, one per connection.
    pub socket_fds: &'a [u32],
    /// Shown as `/sys/block/nbdN/backend`.
    pub backend: Option<&'a str>,
}

/// `NBD_CMD_CONNECT` to family id `family`.
pub fn nbd_connect_request(
    family: u16,
    seq: u32,
    c: &NbdConnect<'_>,
) -> Result<Vec<u8>, NetlinkError> {
    let mut b = GenlBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_CONNECT,
        NBD_GENL_VERSION,
    );
    if let Some(i) = c.index {
        b.u32(NBD_ATTR_INDEX, i);
    }
    b.u64(NBD_ATTR_SIZE_BYTES, c.size_bytes);
    if let Some(bs) = c.block_size {
        b.u64(NBD_ATTR_BLOCK_SIZE_BYTES, bs);
    }
    b.u64(NBD_ATTR_SERVER_FLAGS, c.server_flags);
    b.begin_nested(NBD_ATTR_SOCKETS);
    for &fd in c.socket_fds {
        b.begin_nested(NBD_SOCK_ITEM);
        b.u32(NBD_SOCK_FD, fd);
        b.end_nested();
    }
    b.end_nested();
    if let Some(id) = c.backend {
        b.string(NBD_ATTR_BACKEND_IDENTIFIER, id);
    }
    b.finish()
}

/// `NBD_CMD_DISCONNECT` of device `index`.
pub fn nbd_disconnect_request(family: u16, seq: u32, index: u32) -> Result<Vec<u8>, NetlinkError> {
    let mut b = GenlBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_DISCONNECT,
        NBD_GENL_VERSION,
    );
    b.u32(NBD_ATTR_INDEX, index);
    b.finish()
}

/// The device index of a successful CONNECT exchange (the `NBD_CMD_CONNECT` reply's
/// `NBD_ATTR_INDEX`).
pub fn connect_index(replies: &[GenlReply]) -> Result<u32, NetlinkError> {
    for r in replies.iter().filter(|r| r.cmd == NBD_CMD_CONNECT) {
        if let Some(a) = parse_attrs(&r.attrs)?
            .into_iter()
            .find(|a| a.typ == NBD_ATTR_INDEX)
        {
            return a.u32();
        }
    }
    Err(NetlinkError::Missing("device index"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Hand-computed layouts below are little-endian (x86, i686: the dom0 targets).

    #[cfg(target_endian = "little")]
    #[test]
    fn getfamily_request_bytes() {
        let m = get_family_request(0x01020304, "nbd").unwrap();
        #[rustfmt::skip]
        let want = [
            28, 0, 0, 0,   0x10, 0,   5, 0,   4, 3, 2, 1,   0, 0, 0, 0, // nlmsghdr
            3, 1, 0, 0,                                                  // GETFAMILY v1
            8, 0, 2, 0,   b'n', b'b', b'd', 0,                           // FAMILY_NAME "nbd\0"
        ];
        assert_eq!(m, want);
        // A name needing padding: "abcde\0" is 6 bytes, attr len 10, padded to 12.
        let m = get_family_request(1, "abcde").unwrap();
        assert_eq!(m.len(), 16 + 4 + 12);
        assert_eq!(&m[20..24], &[10, 0, 2, 0]);
        assert_eq!(&m[24..32], b"abcde\0\0\0");
        assert_eq!(m[0], 32);
    }

    /// A NEWFAMILY reply like the kernel's for `nbd`: id, name, version, hdrsize, maxattr,
    /// ops (skipped), one multicast group.
    #[cfg(target_endian = "little")]
    #[rustfmt::skip]
    fn family_reply(seq: u32) -> Vec<u8> {
        let mut attrs: Vec<u8> = vec![
            6, 0, 1, 0,   0x1b, 0, 0, 0,                   // FAMILY_ID u16 27 + pad
            8, 0, 2, 0,   b'n', b'b', b'd', 0,             // FAMILY_NAME
            8, 0, 3, 0,   1, 0, 0, 0,                      // VERSION 1
            8, 0, 4, 0,   0, 0, 0, 0,                      // HDRSIZE 0
            8, 0, 5, 0,   10, 0, 0, 0,                     // MAXATTR 10
            12, 0, 6, 0x80,                                // OPS (nested, opaque here)
              8, 0, 1, 0,   1, 0, 0, 0,
            36, 0, 7, 0x80,                                // MCAST_GROUPS
              32, 0, 1, 0x80,                              //   group #1
                17, 0, 1, 0,   b'n', b'b', b'd', b'_', b'm', b'c', b'_', b'g', b'r',
                               b'o', b'u', b'p', 0, 0, 0, 0, // NAME "nbd_mc_group\0" + pad
                8, 0, 2, 0,    0x0c, 0, 0, 0,             //   ID 12
        ];
        let len = (16 + 4 + attrs.len()) as u32;
        let mut m = len.to_le_bytes().to_vec();
        m.extend_from_slice(&[0x10, 0, 0, 0]);
        m.extend_from_slice(&seq.to_le_bytes());
        m.extend_from_slice(&[0x39, 0x30, 0, 0]);
        m.extend_from_slice(&[CTRL_CMD_NEWFAMILY, 2, 0, 0]);
        m.append(&mut attrs);
        m
    }

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = 36u32.to_ne_bytes().to_vec();
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&77u32.to_ne_bytes());
        m.extend_from_slice(&(-errno).to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]); // the original request header
        m
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn family_reply_parses_with_id_and_groups() {
        let mut d = family_reply(9);
        d.extend_from_slice(&ack(9, 0));
        let mut x = Exchange::new(GENL_ID_CTRL, 9);
        assert!(x.absorb(&d).unwrap());
        let f = family_from_replies(x.replies()).unwrap();
        assert_eq!(
            f,
            Family {
                id: 27,
                name: "nbd".into(),
                version: 1,
                mcast_groups: vec![McastGroup {
                    name: "nbd_mc_group".into(),
                    id: 12
                }],
            }
        );
    }

    #[test]
    fn reply_split_over_datagrams_and_stale_sequence_ignored() {
        let mut x = Exchange::new(GENL_ID_CTRL, 5);
        // A stale error for another request changes nothing.
        assert!(!x.absorb(&ack(4, libc::ENOENT)).unwrap());
        #[cfg(target_endian = "little")]
        assert!(!x.absorb(&family_reply(5)).unwrap());
        assert!(x.absorb(&ack(5, 0)).unwrap());
        assert!(x.is_done());
        #[cfg(target_endian = "little")]
        assert_eq!(family_from_replies(x.replies()).unwrap().id, 27);
    }

    #[test]
    fn nlmsg_error_decoding() {
        let m = ack(3, libc::ENOENT);
        let msgs = split_messages(&m).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].typ, NLMSG_ERROR);
        assert_eq!(msgs[0].seq, 3);
        assert_eq!(msgs[0].port, 77);
        assert_eq!(msgs[0].payload.len(), 20);
        assert_eq!(error_code(msgs[0].payload), Ok(libc::ENOENT));
        let mut x = Exchange::new(GENL_ID_CTRL, 3);
        assert_eq!(x.absorb(&m), Err(NetlinkError::Kernel(libc::ENOENT)));
        // ACK, positive (invalid) code, i32::MIN, too short.
        assert_eq!(error_code(&0i32.to_ne_bytes()), Ok(0));
        assert_eq!(error_code(&5i32.to_ne_bytes()), Ok(libc::EIO));
        assert_eq!(error_code(&i32::MIN.to_ne_bytes()), Ok(libc::EIO));
        assert_eq!(
            error_code(&[0, 0]),
            Err(NetlinkError::Truncated("netlink error"))
        );
        // An overrun aborts.
        let mut o = ack(3, 0);
        o[4..6].copy_from_slice(&NLMSG_OVERRUN.to_ne_bytes());
        assert_eq!(
            Exchange::new(GENL_ID_CTRL, 3).absorb(&o),
            Err(NetlinkError::Overrun)
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn connect_request_bytes_with_nested_sockets() {
        let c = NbdConnect {
            index: None,
            size_bytes: 0x1_0000_0200,
            block_size: Some(512),
            server_flags: 1,
            socket_fds: &[7],
            backend: Some("/r/nbd5.2"),
        };
        let m = nbd_connect_request(0x1b, 0x11, &c).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            88, 0, 0, 0,   0x1b, 0,   5, 0,   0x11, 0, 0, 0,   0, 0, 0, 0,
            1, 1, 0, 0,                                           // CONNECT v1
            12, 0, 2, 0,   0, 2, 0, 0, 1, 0, 0, 0,                // SIZE_BYTES
            12, 0, 3, 0,   0, 2, 0, 0, 0, 0, 0, 0,                // BLOCK_SIZE_BYTES 512
            12, 0, 5, 0,   1, 0, 0, 0, 0, 0, 0, 0,                // SERVER_FLAGS
            16, 0, 7, 0x80,                                       // SOCKETS (nested)
              12, 0, 1, 0x80,                                     //   SOCK_ITEM (nested)
                8, 0, 1, 0,   7, 0, 0, 0,                         //     SOCK_FD 7
            14, 0, 10, 0,  b'/', b'r', b'/', b'n', b'b', b'd', b'5', b'.', b'2', 0, 0, 0,
        ];
        assert_eq!(m, want);
        // With an index, two sockets and no block size/backend.
        let c = NbdConnect {
            index: Some(3),
            block_size: None,
            socket_fds: &[4, 5],
            backend: None,
            ..c
        };
        let m = nbd_connect_request(0x1b, 1, &c).unwrap();
        assert_eq!(&m[20..28], &[8, 0, 1, 0, 3, 0, 0, 0]);
        let msgs = split_messages(&m).unwrap();
        let attrs = parse_attrs(genl_message(msgs[0].payload).unwrap().attrs).unwrap();
        let socks = attrs.iter().find(|a| a.typ == NBD_ATTR_SOCKETS).unwrap();
        assert!(socks.nested);
        let fds: Vec<u32> = socks
            .nested_attrs()
            .unwrap()
            .iter()
            .map(|i| {
                assert_eq!(i.typ, NBD_SOCK_ITEM);
                i.nested_attrs().unwrap()[0].u32().unwrap()
            })
            .collect();
        assert_eq!(fds, vec![4, 5]);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn disconnect_request_bytes() {
        let m = nbd_disconnect_request(0x1b, 2, 3).unwrap();
        #[rustfmt::skip]
        let want = [
            28, 0, 0, 0,   0x1b, 0,   5, 0,   2, 0, 0, 0,   0, 0, 0, 0,
            2, 1, 0, 0,
            8, 0, 1, 0,   3, 0, 0, 0,
        ];
        assert_eq!(m, want);
    }

    #[test]
    fn connect_reply_index() {
        let mut b = GenlBuilder::new(0x1b, 0, 8, NBD_CMD_CONNECT, 1);
        b.u32(NBD_ATTR_INDEX, 3);
        let mut d = b.finish().unwrap();
        d.extend_from_slice(&ack(8, 0));
        let mut x = Exchange::new(0x1b, 8);
        assert!(x.absorb(&d).unwrap());
        assert_eq!(connect_index(x.replies()), Ok(3));
        // No reply message (only the ACK): the index is missing.
        assert_eq!(
            connect_index(&[]),
            Err(NetlinkError::Missing("device index"))
        );
        // A wrongly sized index is rejected.
        let mut b = GenlBuilder::new(0x1b, 0, 8, NBD_CMD_CONNECT, 1);
        b.u16(NBD_ATTR_INDEX, 3);
        let m = b.finish().unwrap();
        let r = GenlReply {
            cmd: NBD_CMD_CONNECT,
            attrs: m[20..].to_vec(),
        };
        assert_eq!(
            connect_index(&[r]),
            Err(NetlinkError::BadAttr(NBD_ATTR_INDEX))
        );
    }

    #[test]
    fn truncated_and_garbage_replies_are_rejected() {
        let good = ack(1, 0);
        // Every strict prefix of a message is an error, never a panic.
        for n in 1..good.len() {
            assert!(split_messages(&good[..n]).is_err(), "prefix {n}");
        }
        // Length smaller than the header, and length past the buffer.
        let mut m = good.clone();
        m[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(
            split_messages(&m),
            Err(NetlinkError::BadLength("netlink message", 8))
        );
        m[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(
            split_messages(&m),
            Err(NetlinkError::Truncated("netlink message"))
        );
        // Genl header missing.
        assert!(genl_message(&[1, 2]).is_err());
        // Attributes: short header, len < 4, len past the end.
        assert!(parse_attrs(&[8, 0]).is_err());
        assert_eq!(
            parse_attrs(&[2, 0, 1, 0]),
            Err(NetlinkError::BadLength("attribute", 2))
        );
        assert!(parse_attrs(&[9, 0, 1, 0, 1, 2, 3, 4]).is_err());
        // A family reply without an id, with a bad id size, or with bad UTF-8 in the name.
        let mut b = GenlBuilder::new(GENL_ID_CTRL, 0, 1, CTRL_CMD_NEWFAMILY, 2);
        b.string(CTRL_ATTR_FAMILY_NAME, "nbd");
        let m = b.finish().unwrap();
        assert_eq!(
            parse_family(&m[20..]),
            Err(NetlinkError::Missing("family id"))
        );
        let mut b = GenlBuilder::new(GENL_ID_CTRL, 0, 1, CTRL_CMD_NEWFAMILY, 2);
        b.u32(CTRL_ATTR_FAMILY_ID, 27);
        let m = b.finish().unwrap();
        assert_eq!(
            parse_family(&m[20..]),
            Err(NetlinkError::BadAttr(CTRL_ATTR_FAMILY_ID))
        );
        let mut b = GenlBuilder::new(GENL_ID_CTRL, 0, 1, CTRL_CMD_NEWFAMILY, 2);
        b.u16(CTRL_ATTR_FAMILY_ID, 27);
        b.bytes(CTRL_ATTR_FAMILY_NAME, &[0xff, 0xfe, 0]);
        let m = b.finish().unwrap();
        assert_eq!(
            parse_family(&m[20..]),
            Err(NetlinkError::BadAttr(CTRL_ATTR_FAMILY_NAME))
        );
        // No NEWFAMILY message at all.
        assert!(family_from_replies(&[]).is_err());
    }

    #[test]
    fn oversized_attribute_is_refused() {
        let mut b = GenlBuilder::new(0x1b, 0, 1, NBD_CMD_CONNECT, 1);
        b.bytes(NBD_ATTR_BACKEND_IDENTIFIER, &vec![b'x'; 70_000]);
        assert_eq!(b.finish(), Err(NetlinkError::TooLarge));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz over the decoders.
        let mut s = 0x1234_5678u32;
        for _ in 0..2000 {
            let n = (s % 96) as usize;
            let mut d = Vec::with_capacity(n);
            for _ in 0..n {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                d.push(s as u8);
            }
            // Plausible lengths make the decoders go deeper.
            if d.len() >= 4 {
                let l = d.len() as u32;
                d[0..4].copy_from_slice(&l.to_ne_bytes());
            }
            let _ = split_messages(&d);
            let _ = Exchange::new(GENL_ID_CTRL, 0).absorb(&d);
            let _ = parse_attrs(&d);
            let _ = parse_family(&d);
            if let Ok(a) = parse_attrs(&d) {
                for x in a {
                    let _ = x.nested_attrs();
                    let _ = x.str();
                }
            }
        }
    }
}
