//! The NBD protocol, pure: no sockets, no images. Bytes in, bytes out, typed results.
//!
//! [`Handshake`] is the fixed-newstyle negotiation as a state machine: feed it whatever bytes
//! arrived, it appends its replies to an output vector, reports how much input it consumed
//! and whether the connection moves on to the transmission phase or must close. Option
//! payloads it does not buffer (unknown options, oversize ones) are skipped as they stream in,
//! so a hostile client cannot make it allocate more than [`MAX_OPTION_DATA`].
//!
//! The transmission phase is covered by [`RequestHeader::parse`], [`validate`] (bounds, flags,
//! read-only) and the reply encoders.

use super::NbdError;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation extent flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

// NBD error values (the wire uses these, not the host's errno numbers).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// The one metadata context we serve and the id it gets.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Advertised block sizes. The minimum is 512 because images work in whole sectors: aligned
/// writes go straight through, unaligned writes get EINVAL (no read-modify-write races
/// between concurrent requests); unaligned reads are still served (widened internally).
pub const BLOCK_MIN: u32 = 512;
pub const BLOCK_PREF: u32 = 4096;
/// Largest READ/WRITE payload accepted (also advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload buffered; longer options are skipped and answered ERR_TOO_BIG.
pub const MAX_OPTION_DATA: u32 = 16 << 10;
/// Options accepted before the server gives up on a client.
pub const MAX_OPTIONS: u32 = 256;
/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;

/// What the handshake advertises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    pub read_only: bool,
    /// Name returned by NBD_OPT_LIST (any name is accepted by EXPORT_NAME/GO).
    pub name: String,
}

impl ExportInfo {
    /// Transmission flags for this export.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        f
    }
}

/// The result of a successful negotiation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    pub structured: bool,
    /// `base:allocation` was selected with NBD_OPT_SET_META_CONTEXT.
    pub base_allocation: bool,
}

/// What the caller should do after feeding input.
#[derive(Debug)]
pub enum Outcome {
    /// Waiting for more bytes.
    NeedMore,
    /// Negotiation finished: flush the output, then enter the transmission phase. Input
    /// past `consumed` already belongs to the transmission phase.
    Transmission(Negotiated),
    /// Flush the output, then close the connection.
    Close(NbdError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData {
        opt: u32,
        len: u32,
    },
    /// Discarding an option's payload; then reply `reply` (an error type) to `opt`.
    Skip {
        opt: u32,
        remaining: u32,
        reply: u32,
    },
    Done,
}

/// Fixed-newstyle handshake, server side.
#[derive(Debug)]
pub struct Handshake {
    export: ExportInfo,
    state: State,
    no_zeroes: bool,
    options: u32,
    neg: Negotiated,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Append an option reply.
fn opt_reply(out: &mut Vec<u8>, opt: u32, rtype: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&rtype.to_be_bytes());
    // Option replies we build are bounded (names come from MAX_OPTION_DATA-sized input).
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A bounds-checked reader over an option payload.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be_u16)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be_u32)
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        self.take(usize::try_from(n).ok()?)
    }
}

impl Handshake {
    pub fn new(export: ExportInfo) -> Self {
        Handshake {
            export,
            state: State::ClientFlags,
            no_zeroes: false,
            options: 0,
            neg: Negotiated::default(),
        }
    }

    /// The 18 bytes the server sends first.
    pub fn greeting(&self) -> Vec<u8> {
        let mut g = Vec::with_capacity(18);
        g.extend_from_slice(&NBDMAGIC.to_be_bytes());
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        g
    }

    /// Feed input. Returns the number of bytes consumed and what to do next; replies are
    /// appended to `out`. Unconsumed bytes must be presented again with more input.
    pub fn input(&mut self, data: &[u8], out: &mut Vec<u8>) -> (usize, Outcome) {
        let mut pos = 0;
        loop {
            let avail = &data[pos..];
            match self.state {
                State::Done => return (pos, Outcome::Transmission(self.neg)),
                State::ClientFlags => {
                    if avail.len() < 4 {
                        return (pos, Outcome::NeedMore);
                    }
                    let flags = be_u32(avail);
                    pos += 4;
                    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
                        return (pos, Outcome::Close(NbdError::ClientFlags(flags)));
                    }
                    self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    if avail.len() < 16 {
                        return (pos, Outcome::NeedMore);
                    }
                    let magic = be_u64(avail);
                    let opt = be_u32(&avail[8..]);
                    let len = be_u32(&avail[12..]);
                    pos += 16;
                    if magic != IHAVEOPT {
                        return (pos, Outcome::Close(NbdError::OptionMagic(magic)));
                    }
                    self.options += 1;
                    if self.options > MAX_OPTIONS {
                        return (pos, Outcome::Close(NbdError::TooManyOptions));
                    }
                    self.state = match opt {
                        OPT_EXPORT_NAME
                        | OPT_ABORT
                        | OPT_LIST
                        | OPT_INFO
                        | OPT_GO
                        | OPT_STRUCTURED_REPLY
                        | OPT_LIST_META_CONTEXT
                        | OPT_SET_META_CONTEXT => {
                            if len > MAX_OPTION_DATA {
                                if opt == OPT_EXPORT_NAME {
                                    // No error reply exists for EXPORT_NAME.
                                    return (
                                        pos,
                                        Outcome::Close(NbdError::InvalidOption("export name")),
                                    );
                                }
                                State::Skip {
                                    opt,
                                    remaining: len,
                                    reply: REP_ERR_TOO_BIG,
                                }
                            } else {
                                State::OptionData { opt, len }
                            }
                        }
                        // STARTTLS and everything unknown: consume the payload, ERR_UNSUP.
                        _ => State::Skip {
                            opt,
                            remaining: len,
                            reply: REP_ERR_UNSUP,
                        },
                    };
                }
                State::Skip {
                    opt,
                    remaining,
                    reply,
                } => {
                    let n = remaining.min(u32::try_from(avail.len()).unwrap_or(u32::MAX));
                    pos += n as usize;
                    let remaining = remaining - n;
                    if remaining > 0 {
                        self.state = State::Skip {
                            opt,
                            remaining,
                            reply,
                        };
                        return (pos, Outcome::NeedMore);
                    }
                    opt_reply(out, opt, reply, &[]);
                    self.state = State::OptionHeader;
                }
                State::OptionData { opt, len } => {
                    let len_us = len as usize;
                    if avail.len() < len_us {
                        return (pos, Outcome::NeedMore);
                    }
                    let payload = &avail[..len_us];
                    pos += len_us;
                    self.state = State::OptionHeader;
                    if let Some(outcome) = self.option(opt, payload, out) {
                        return (pos, outcome);
                    }
                }
            }
        }
    }

    /// Handle one complete option; `Some` ends the handshake.
    fn option(&mut self, opt: u32, data: &[u8], out: &mut Vec<u8>) -> Option<Outcome> {
        match opt {
            OPT_EXPORT_NAME => {
                out.extend_from_slice(&self.export.size.to_be_bytes());
                out.extend_from_slice(&self.export.transmission_flags().to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                self.state = State::Done;
                Some(Outcome::Transmission(self.neg))
            }
            OPT_ABORT => {
                opt_reply(out, opt, REP_ACK, &[]);
                Some(Outcome::Close(NbdError::Aborted))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(out, opt, REP_ERR_INVALID, &[]);
                    return None;
                }
                let name = self.export.name.as_bytes();
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                d.extend_from_slice(name);
                opt_reply(out, opt, REP_SERVER, &d);
                opt_reply(out, opt, REP_ACK, &[]);
                None
            }
            OPT_INFO | OPT_GO => {
                if !Self::valid_info_request(data) {
                    opt_reply(out, opt, REP_ERR_INVALID, &[]);
                    return None;
                }
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&self.export.size.to_be_bytes());
                d.extend_from_slice(&self.export.transmission_flags().to_be_bytes());
                opt_reply(out, opt, REP_INFO, &d);
                let mut d = Vec::with_capacity(14);
                d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                d.extend_from_slice(&BLOCK_MIN.to_be_bytes());
                d.extend_from_slice(&BLOCK_PREF.to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                opt_reply(out, opt, REP_INFO, &d);
                opt_reply(out, opt, REP_ACK, &[]);
                if opt == OPT_GO {
                    self.state = State::Done;
                    return Some(Outcome::Transmission(self.neg));
                }
                None
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.neg.structured = true;
                    opt_reply(out, opt, REP_ACK, &[]);
                } else {
                    opt_reply(out, opt, REP_ERR_INVALID, &[]);
                }
                None
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(opt, data, out);
                None
            }
            _ => {
                opt_reply(out, opt, REP_ERR_UNSUP, &[]);
                None
            }
        }
    }

    /// INFO/GO payload: u32 name length, name, u16 count, count × u16, nothing else.
    fn valid_info_request(data: &[u8]) -> bool {
        let mut c = Cursor { b: data };
        let ok = (|| {
            c.string()?;
            let n = c.u16()?;
            c.take(usize::from(n) * 2)?;
            Some(())
        })();
        ok.is_some() && c.b.is_empty()
    }

    fn meta_context(&mut self, opt: u32, data: &[u8], out: &mut Vec<u8>) {
        let set = opt == OPT_SET_META_CONTEXT;
        if set && !self.neg.structured {
            opt_reply(out, opt, REP_ERR_INVALID, &[]);
            return;
        }
        let mut c = Cursor { b: data };
        let queries = (|| {
            c.string()?; // export name: any is accepted
            let n = c.u32()?;
            let mut q = Vec::new();
            for _ in 0..n {
                q.push(c.string()?);
            }
            Some(q)
        })();
        let queries = match queries {
            Some(q) if c.b.is_empty() => q,
            _ => {
                opt_reply(out, opt, REP_ERR_INVALID, &[]);
                return;
            }
        };
        let matches = if set {
            queries
                .iter()
                .any(|q| *q == META_BASE_ALLOCATION.as_bytes())
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == b"base:" || *q == META_BASE_ALLOCATION.as_bytes())
        };
        if set {
            self.neg.base_allocation = matches;
        }
        if matches {
            let mut d = Vec::new();
            d.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
            d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            opt_reply(out, opt, REP_META_CONTEXT, &d);
        }
        opt_reply(out, opt, REP_ACK, &[]);
    }
}

/// A transmission-phase request header, decoded but not yet validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Decode 28 bytes; a bad magic is connection-fatal.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, NbdError> {
        let magic = be_u32(b);
        if magic != REQUEST_MAGIC {
            return Err(NbdError::RequestMagic(magic));
        }
        Ok(RequestHeader {
            flags: be_u16(&b[4..]),
            typ: be_u16(&b[6..]),
            cookie: be_u64(&b[8..]),
            offset: be_u64(&b[16..]),
            length: be_u32(&b[24..]),
        })
    }

    /// Encode (used by tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Bytes of payload that follow this header on the wire (whatever its validity).
    pub fn payload_len(&self) -> u32 {
        if self.typ == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A validated command. Offsets and lengths are in bytes and lie inside the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        /// NO_HOLE: zeroes must be written as data (no hole may stay or appear).
        no_hole: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// Check a request against the export and the negotiated options. `Err` carries the NBD
/// error to reply with (the connection stays up).
pub fn validate(h: &RequestHeader, export: &ExportInfo, neg: &Negotiated) -> Result<Command, u32> {
    let allowed = match h.typ {
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    };
    if h.flags & !allowed != 0 {
        return Err(NBD_EINVAL);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let in_range = h
        .offset
        .checked_add(u64::from(h.length))
        .is_some_and(|end| end <= export.size);
    let aligned =
        h.offset.is_multiple_of(u64::from(BLOCK_MIN)) && h.length.is_multiple_of(BLOCK_MIN);
    let (offset, len) = (h.offset, h.length);
    match h.typ {
        CMD_READ => {
            if len > MAX_PAYLOAD {
                return Err(if neg.structured {
                    NBD_EOVERFLOW
                } else {
                    NBD_EINVAL
                });
            }
            if !in_range {
                return Err(NBD_EINVAL);
            }
            Ok(Command::Read { offset, len })
        }
        CMD_WRITE | CMD_WRITE_ZEROES => {
            if export.read_only {
                return Err(NBD_EPERM);
            }
            if h.typ == CMD_WRITE && len > MAX_PAYLOAD {
                return Err(NBD_EINVAL);
            }
            if !in_range {
                return Err(NBD_ENOSPC);
            }
            if !aligned {
                return Err(NBD_EINVAL);
            }
            if h.typ == CMD_WRITE {
                Ok(Command::Write { offset, len, fua })
            } else {
                Ok(Command::WriteZeroes {
                    offset,
                    len,
                    fua,
                    no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                })
            }
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => {
            if export.read_only {
                return Err(NBD_EPERM);
            }
            if !in_range {
                return Err(NBD_EINVAL);
            }
            Ok(Command::Trim { offset, len, fua })
        }
        CMD_BLOCK_STATUS => {
            if !neg.structured || !neg.base_allocation || len == 0 || !in_range {
                return Err(NBD_EINVAL);
            }
            Ok(Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        _ => Err(NBD_EINVAL),
    }
}

/// Map a host errno to the NBD wire error.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => NBD_EPERM,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::EOPNOTSUPP | libc::ENOSYS => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

/// Simple reply header (16 bytes); a successful READ's data follows it.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

fn chunk_header(out: &mut Vec<u8>, flags: u16, typ: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Header of a final OFFSET_DATA chunk carrying `data_len` bytes read at `offset` (the data
/// follows). `data_len` is at most [`MAX_PAYLOAD`].
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + data_len,
    );
    b.extend_from_slice(&offset.to_be_bytes());
    b
}

/// A final NONE chunk (success with no data, e.g. a zero-length read).
pub fn none_chunk(cookie: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    b
}

/// A final ERROR chunk.
pub fn error_chunk(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut b = Vec::with_capacity(26 + msg.len());
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// A final BLOCK_STATUS chunk for context `ctx`: `(length, flags)` descriptors.
pub fn block_status_chunk(cookie: u64, ctx: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut b = Vec::with_capacity(20 + len);
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    );
    b.extend_from_slice(&ctx.to_be_bytes());
    for (l, f) in extents {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> ExportInfo {
        ExportInfo {
            size: 1 << 20,
            read_only: false,
            name: "tapdisk".into(),
        }
    }

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_payload(queries: &[&str]) -> Vec<u8> {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Parse option replies: (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(be_u64(out), OPT_REPLY_MAGIC);
            let len = be_u32(&out[16..]) as usize;
            v.push((
                be_u32(&out[8..]),
                be_u32(&out[12..]),
                out[20..20 + len].to_vec(),
            ));
            out = &out[20 + len..];
        }
        v
    }

    fn start() -> (Handshake, Vec<u8>) {
        let mut hs = Handshake::new(export());
        let mut out = Vec::new();
        let flags = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes();
        let (n, o) = hs.input(&flags, &mut out);
        assert_eq!(n, 4);
        assert!(matches!(o, Outcome::NeedMore));
        (hs, out)
    }

    #[test]
    fn greeting_is_fixed_newstyle_with_no_zeroes() {
        let g = Handshake::new(export()).greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be_u16(&g[16..]), 3);
    }

    #[test]
    fn go_replies_export_and_block_size_then_enters_transmission() {
        let (mut hs, mut out) = start();
        let input = opt(OPT_GO, &go_payload("", &[INFO_BLOCK_SIZE]));
        let (n, o) = hs.input(&input, &mut out);
        assert_eq!(n, input.len());
        assert!(matches!(
            o,
            Outcome::Transmission(Negotiated {
                structured: false,
                ..
            })
        ));
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].1, be_u16(&r[0].2)), (REP_INFO, INFO_EXPORT));
        assert_eq!(be_u64(&r[0].2[2..]), 1 << 20);
        let flags = be_u16(&r[0].2[10..]);
        assert_eq!(flags & TFLAG_READ_ONLY, 0);
        assert_ne!(flags & TFLAG_SEND_WRITE_ZEROES, 0);
        assert_eq!(be_u16(&r[1].2), INFO_BLOCK_SIZE);
        assert_eq!(be_u32(&r[1].2[2..]), 512);
        assert_eq!(be_u32(&r[1].2[10..]), MAX_PAYLOAD);
        assert_eq!(r[2].1, REP_ACK);
    }

    #[test]
    fn input_split_byte_by_byte_gives_same_result() {
        let (mut hs, mut out) = start();
        let mut input = opt(OPT_STRUCTURED_REPLY, &[]);
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_payload(&["base:allocation"]),
        ));
        input.extend(opt(OPT_GO, &go_payload("x", &[])));
        input.extend_from_slice(&[0xaa; 3]); // transmission bytes already in flight
        let mut buf = Vec::new();
        let mut result = None;
        for b in &input {
            buf.push(*b);
            let (n, o) = hs.input(&buf, &mut out);
            buf.drain(..n);
            if let Outcome::Transmission(neg) = o {
                result = Some(neg);
                break;
            }
        }
        let neg = result.unwrap();
        assert!(neg.structured && neg.base_allocation);
        let r = replies(&out);
        assert_eq!(r[0], (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
        assert_eq!(r[1].1, REP_META_CONTEXT);
        assert_eq!(be_u32(&r[1].2), META_BASE_ALLOCATION_ID);
        assert_eq!(&r[1].2[4..], b"base:allocation");
        assert_eq!(r[2].1, REP_ACK);
    }

    #[test]
    fn export_name_sends_size_flags_and_zeroes_unless_no_zeroes() {
        let mut hs = Handshake::new(export());
        let mut out = Vec::new();
        let mut input = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b"anything"));
        let (n, o) = hs.input(&input, &mut out);
        assert_eq!(n, input.len());
        assert!(matches!(o, Outcome::Transmission(_)));
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(be_u64(&out), 1 << 20);
        let (mut hs, mut out) = start();
        hs.input(&opt(OPT_EXPORT_NAME, b""), &mut out);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn unknown_and_starttls_options_are_consumed_and_refused() {
        let (mut hs, mut out) = start();
        let mut input = opt(42, &[7u8; 1000]);
        input.extend(opt(OPT_STARTTLS, &[]));
        input.extend(opt(OPT_LIST, &[]));
        let (n, o) = hs.input(&input, &mut out);
        assert_eq!(n, input.len());
        assert!(matches!(o, Outcome::NeedMore));
        let r = replies(&out);
        assert_eq!(r[0], (42, REP_ERR_UNSUP, vec![]));
        assert_eq!(r[1], (OPT_STARTTLS, REP_ERR_UNSUP, vec![]));
        assert_eq!(r[2].1, REP_SERVER);
        assert_eq!(&r[2].2[4..], b"tapdisk");
        assert_eq!(r[3].1, REP_ACK);
    }

    #[test]
    fn oversize_option_is_skipped_in_pieces_and_answered_too_big() {
        let (mut hs, mut out) = start();
        let big = MAX_OPTION_DATA + 10;
        let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&OPT_GO.to_be_bytes());
        hdr.extend_from_slice(&big.to_be_bytes());
        let (n, _) = hs.input(&hdr, &mut out);
        assert_eq!(n, 16);
        let chunk = vec![0u8; 4096];
        let mut left = big as usize;
        while left > 0 {
            let k = left.min(chunk.len());
            let (n, o) = hs.input(&chunk[..k], &mut out);
            assert_eq!(n, k);
            assert!(matches!(o, Outcome::NeedMore));
            left -= k;
        }
        assert_eq!(replies(&out), vec![(OPT_GO, REP_ERR_TOO_BIG, vec![])]);
        // still negotiating
        let (_, o) = hs.input(&opt(OPT_GO, &go_payload("", &[])), &mut out);
        assert!(matches!(o, Outcome::Transmission(_)));
    }

    #[test]
    fn bad_sequences_are_rejected() {
        // unknown client flag
        let mut hs = Handshake::new(export());
        let (_, o) = hs.input(&8u32.to_be_bytes(), &mut Vec::new());
        assert!(matches!(o, Outcome::Close(NbdError::ClientFlags(8))));
        // bad option magic
        let (mut hs, mut out) = start();
        let (_, o) = hs.input(&[0u8; 16], &mut out);
        assert!(matches!(o, Outcome::Close(NbdError::OptionMagic(0))));
        // SET_META_CONTEXT before STRUCTURED_REPLY
        let (mut hs, mut out) = start();
        hs.input(
            &opt(OPT_SET_META_CONTEXT, &meta_payload(&["base:allocation"])),
            &mut out,
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        // STRUCTURED_REPLY with a payload, GO with a truncated payload, LIST with data
        let (mut hs, mut out) = start();
        hs.input(&opt(OPT_STRUCTURED_REPLY, &[1]), &mut out);
        hs.input(&opt(OPT_GO, &[0, 0, 0, 9, 1]), &mut out);
        hs.input(&opt(OPT_LIST, &[1]), &mut out);
        let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(types, vec![REP_ERR_INVALID; 3]);
        // ABORT
        let (mut hs, mut out) = start();
        let (_, o) = hs.input(&opt(OPT_ABORT, &[]), &mut out);
        assert!(matches!(o, Outcome::Close(NbdError::Aborted)));
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    #[test]
    fn too_many_options_closes() {
        let (mut hs, mut out) = start();
        let mut input = Vec::new();
        for _ in 0..=MAX_OPTIONS {
            input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        }
        let (_, o) = hs.input(&input, &mut out);
        assert!(matches!(o, Outcome::Close(NbdError::TooManyOptions)));
    }

    #[test]
    fn list_meta_context_lists_base_allocation() {
        let (mut hs, mut out) = start();
        hs.input(&opt(OPT_LIST_META_CONTEXT, &meta_payload(&[])), &mut out);
        hs.input(
            &opt(OPT_LIST_META_CONTEXT, &meta_payload(&["qemu:dirty"])),
            &mut out,
        );
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(r[1].1, REP_ACK);
        assert_eq!(r[2].1, REP_ACK);
    }

    #[test]
    fn validate_checks_bounds_flags_alignment_and_read_only() {
        let ex = export();
        let neg = Negotiated {
            structured: true,
            base_allocation: true,
        };
        let h = |typ, flags, offset, length| RequestHeader {
            flags,
            typ,
            cookie: 1,
            offset,
            length,
        };
        assert_eq!(
            validate(&h(CMD_READ, 0, 0, 4096), &ex, &neg),
            Ok(Command::Read {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            validate(&h(CMD_READ, 0, 1 << 20, 1), &ex, &neg),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&h(CMD_READ, 0, u64::MAX, 512), &ex, &neg),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&h(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &ex, &neg),
            Err(NBD_EOVERFLOW)
        );
        assert_eq!(
            validate(&h(CMD_WRITE, 0, 1, 512), &ex, &neg),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&h(CMD_WRITE, 0, 1 << 20, 512), &ex, &neg),
            Err(NBD_ENOSPC)
        );
        assert_eq!(
            validate(&h(CMD_WRITE, CMD_FLAG_FUA, 512, 512), &ex, &neg),
            Ok(Command::Write {
                offset: 512,
                len: 512,
                fua: true
            })
        );
        assert_eq!(
            validate(&h(CMD_READ, CMD_FLAG_FUA, 0, 512), &ex, &neg),
            Err(NBD_EINVAL)
        );
        assert_eq!(validate(&h(99, 0, 0, 0), &ex, &neg), Err(NBD_EINVAL));
        assert_eq!(
            validate(&h(CMD_BLOCK_STATUS, 0, 0, 512), &ex, &Negotiated::default()),
            Err(NBD_EINVAL)
        );
        let ro = ExportInfo {
            read_only: true,
            ..export()
        };
        assert_ne!(ro.transmission_flags() & TFLAG_READ_ONLY, 0);
        assert_eq!(
            validate(&h(CMD_WRITE, 0, 0, 512), &ro, &neg),
            Err(NBD_EPERM)
        );
        assert_eq!(validate(&h(CMD_TRIM, 0, 0, 512), &ro, &neg), Err(NBD_EPERM));
        assert_eq!(
            validate(&h(CMD_WRITE_ZEROES, 0, 0, 512), &ro, &neg),
            Err(NBD_EPERM)
        );
        assert_eq!(
            validate(&h(CMD_FLUSH, 0, 0, 0), &ro, &neg),
            Ok(Command::Flush)
        );
    }

    #[test]
    fn request_header_roundtrip_and_bad_magic() {
        let h = RequestHeader {
            flags: 1,
            typ: CMD_WRITE,
            cookie: 0x1122334455667788,
            offset: 4096,
            length: 512,
        };
        let b = h.encode();
        assert_eq!(RequestHeader::parse(&b).unwrap(), h);
        assert_eq!(h.payload_len(), 512);
        let mut bad = b;
        bad[0] = 0;
        assert!(matches!(
            RequestHeader::parse(&bad),
            Err(NbdError::RequestMagic(_))
        ));
    }

    #[test]
    fn reply_encoders_have_the_wire_layout() {
        let s = simple_reply(7, NBD_EIO);
        assert_eq!(be_u32(&s), SIMPLE_REPLY_MAGIC);
        assert_eq!(be_u32(&s[4..]), 5);
        assert_eq!(be_u64(&s[8..]), 7);
        let d = offset_data_header(9, 4096, 512);
        assert_eq!(d.len(), 28);
        assert_eq!(be_u16(&d[4..]), REPLY_FLAG_DONE);
        assert_eq!(be_u16(&d[6..]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be_u32(&d[16..]), 520);
        assert_eq!(be_u64(&d[20..]), 4096);
        let e = error_chunk(9, NBD_EINVAL, "bad");
        assert_eq!(be_u32(&e[16..]), 9);
        assert_eq!(be_u32(&e[20..]), NBD_EINVAL);
        assert_eq!(&e[26..], b"bad");
        let b = block_status_chunk(3, 1, &[(512, 0), (1024, 3)]);
        assert_eq!(be_u32(&b[16..]), 20);
        assert_eq!(be_u32(&b[20..]), 1);
        assert_eq!(be_u32(&b[32..]), 1024);
        assert_eq!(be_u32(&b[36..]), 3);
        assert_eq!(errno_to_nbd(libc::EROFS), NBD_EPERM);
        assert_eq!(errno_to_nbd(libc::EBADF), NBD_EIO);
    }

    proptest::proptest! {
        /// Arbitrary input, split anywhere, never panics, never over-consumes, and the
        /// output is always whole option replies.
        #[test]
        fn handshake_survives_arbitrary_input(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            cut in 0usize..2048,
            prefix in proptest::prelude::any::<bool>(),
        ) {
            let mut input = Vec::new();
            if prefix {
                input.extend_from_slice(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
                input.extend_from_slice(&IHAVEOPT.to_be_bytes());
            }
            input.extend_from_slice(&data);
            let mut hs = Handshake::new(export());
            let mut out = Vec::new();
            let cut = cut.min(input.len());
            let mut buf = input[..cut].to_vec();
            let (n, o) = hs.input(&buf, &mut out);
            proptest::prop_assert!(n <= buf.len());
            if matches!(o, Outcome::NeedMore) {
                buf.drain(..n);
                buf.extend_from_slice(&input[cut..]);
                let (n2, _) = hs.input(&buf, &mut out);
                proptest::prop_assert!(n2 <= buf.len());
            }
            // Output parses as a sequence of option replies, or is an EXPORT_NAME answer.
            let mut rest = &out[..];
            while rest.len() >= 20 && be_u64(rest) == OPT_REPLY_MAGIC {
                let len = be_u32(&rest[16..]) as usize;
                proptest::prop_assert!(rest.len() >= 20 + len);
                rest = &rest[20 + len..];
            }
            proptest::prop_assert!(rest.is_empty() || rest.len() == 10 || rest.len() == 134);
        }

        #[test]
        fn validated_requests_stay_inside_the_export(
            typ in 0u16..10, flags in 0u16..32, offset in proptest::prelude::any::<u64>(),
            length in proptest::prelude::any::<u32>(), ro in proptest::prelude::any::<bool>(),
        ) {
            let ex = ExportInfo { read_only: ro, ..export() };
            let neg = Negotiated { structured: true, base_allocation: true };
            let h = RequestHeader { flags, typ, cookie: 0, offset, length };
            if let Ok(cmd) = validate(&h, &ex, &neg) {
                match cmd {
                    Command::Read { offset, len } | Command::Write { offset, len, .. }
                    | Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. }
                    | Command::BlockStatus { offset, len, .. } => {
                        proptest::prop_assert!(offset + u64::from(len) <= ex.size);
                        let unbounded = !matches!(cmd, Command::Read { .. } | Command::Write { .. });
                        proptest::prop_assert!(len <= MAX_PAYLOAD || unbounded);
                    }
                    Command::Disconnect | Command::Flush => {}
                }
                if ro {
                    let writes = matches!(cmd, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. });
                    proptest::prop_assert!(!writes);
                }
            }
        }
    }
}
