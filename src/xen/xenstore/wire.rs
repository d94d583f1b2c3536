//! The xenstore wire protocol (`io/xs_wire.h`): a 16-byte header `{type, req_id, tx_id, len}`
//! in host byte order followed by `len <= 4096` payload bytes. Pure code, no I/O: the client,
//! the fake xenstored and the fuzz target all go through here.

use nix::errno::Errno;

/// Header size.
pub const HEADER_SIZE: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`.
pub const PAYLOAD_MAX: usize = 4096;

/// Message types (`enum xsd_sockmsg_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    ResetWatches = 21,
    DirectoryPart = 22,
    GetFeature = 23,
    SetFeature = 24,
    GetQuota = 25,
    SetQuota = 26,
}

impl TryFrom<u32> for MsgType {
    type Error = WireError;
    fn try_from(v: u32) -> Result<MsgType, WireError> {
        use MsgType::*;
        Ok(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            23 => GetFeature,
            24 => SetFeature,
            25 => GetQuota,
            26 => SetQuota,
            other => return Err(WireError::UnknownType(other)),
        })
    }
}

/// Malformed wire data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown message type {0}")]
    UnknownType(u32),
    #[error("payload length {0} exceeds {PAYLOAD_MAX}")]
    TooLong(usize),
    #[error("payload is not a NUL-separated string list")]
    BadStrings,
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    #[error("bad permission {0:?}")]
    BadPerm(String),
    #[error("unknown error name {0:?}")]
    UnknownError(String),
    #[error("bad transaction id {0:?}")]
    BadTxId(String),
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub ty: MsgType,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: Vec<u8>,
}

impl Message {
    /// Build a message.
    pub fn new(ty: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Message {
        Message {
            ty,
            req_id,
            tx_id,
            payload,
        }
    }

    /// Header + payload bytes. Fails if the payload exceeds [`PAYLOAD_MAX`].
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        if self.payload.len() > PAYLOAD_MAX {
            return Err(WireError::TooLong(self.payload.len()));
        }
        let mut out = Vec::with_capacity(HEADER_SIZE + self.payload.len());
        out.extend_from_slice(&(self.ty as u32).to_ne_bytes());
        out.extend_from_slice(&self.req_id.to_ne_bytes());
        out.extend_from_slice(&self.tx_id.to_ne_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_ne_bytes());
        out.extend_from_slice(&self.payload);
        Ok(out)
    }
}

/// Decode one message from the front of `buf`. `Ok(None)` means more bytes are needed;
/// on success the second value is the number of bytes consumed. A header announcing more than
/// [`PAYLOAD_MAX`] bytes or an unknown type is an error (the stream cannot be trusted after it).
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    if buf.len() < HEADER_SIZE {
        return Ok(None);
    }
    let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let len = word(12) as usize;
    if len > PAYLOAD_MAX {
        return Err(WireError::TooLong(len));
    }
    let ty = MsgType::try_from(word(0))?;
    if buf.len() < HEADER_SIZE + len {
        return Ok(None);
    }
    Ok(Some((
        Message {
            ty,
            req_id: word(4),
            tx_id: word(8),
            payload: buf[HEADER_SIZE..HEADER_SIZE + len].to_vec(),
        },
        HEADER_SIZE + len,
    )))
}

/// Split a payload of NUL-terminated strings (`"a\0b\0"`). An empty payload is an empty list;
/// a missing final NUL is tolerated for the last element (xenstored's replies always have it).
pub fn split_strings(payload: &[u8]) -> Result<Vec<&str>, WireError> {
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    let body = payload.strip_suffix(b"\0").unwrap_or(payload);
    body.split(|&b| b == 0)
        .map(|s| std::str::from_utf8(s).map_err(|_| WireError::NotUtf8))
        .collect()
}

/// Join strings, each NUL-terminated.
pub fn join_strings<S: AsRef<str>>(parts: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// A `WRITE` payload: `path\0value` (value not NUL-terminated).
pub fn write_payload(path: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + 1 + value.len());
    out.extend_from_slice(path.as_bytes());
    out.push(0);
    out.extend_from_slice(value);
    out
}

/// Split a `WRITE` payload into path and value.
pub fn split_write(payload: &[u8]) -> Result<(&str, &[u8]), WireError> {
    let nul = payload
        .iter()
        .position(|&b| b == 0)
        .ok_or(WireError::BadStrings)?;
    let path = std::str::from_utf8(&payload[..nul]).map_err(|_| WireError::NotUtf8)?;
    Ok((path, &payload[nul + 1..]))
}

/// A single NUL-terminated string payload (`path\0`), NUL optional.
pub fn single_string(payload: &[u8]) -> Result<&str, WireError> {
    let body = payload.strip_suffix(b"\0").unwrap_or(payload);
    if body.contains(&0) {
        return Err(WireError::BadStrings);
    }
    std::str::from_utf8(body).map_err(|_| WireError::NotUtf8)
}

/// The error names of `xsd_errors[]`.
const ERRORS: &[(Errno, &str)] = &[
    (Errno::EINVAL, "EINVAL"),
    (Errno::EACCES, "EACCES"),
    (Errno::EEXIST, "EEXIST"),
    (Errno::EISDIR, "EISDIR"),
    (Errno::ENOENT, "ENOENT"),
    (Errno::ENOMEM, "ENOMEM"),
    (Errno::ENOSPC, "ENOSPC"),
    (Errno::EIO, "EIO"),
    (Errno::ENOTEMPTY, "ENOTEMPTY"),
    (Errno::ENOSYS, "ENOSYS"),
    (Errno::EROFS, "EROFS"),
    (Errno::EBUSY, "EBUSY"),
    (Errno::EAGAIN, "EAGAIN"),
    (Errno::EISCONN, "EISCONN"),
    (Errno::E2BIG, "E2BIG"),
    (Errno::EPERM, "EPERM"),
];

/// Wire name of an errno (`EINVAL` for anything not in the table, like xenstored).
pub fn errno_name(e: Errno) -> &'static str {
    ERRORS
        .iter()
        .find(|(x, _)| *x == e)
        .map_or("EINVAL", |(_, n)| n)
}

/// Errno of an `ERROR` payload (`"ENOENT\0"`).
pub fn parse_error(payload: &[u8]) -> Result<Errno, WireError> {
    let name = single_string(payload)?;
    ERRORS
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(e, _)| *e)
        .ok_or_else(|| WireError::UnknownError(name.to_owned()))
}

/// An `ERROR` reply payload.
pub fn error_payload(e: Errno) -> Vec<u8> {
    join_strings(&[errno_name(e)])
}

/// Parse a decimal transaction id reply (`"17\0"`).
pub fn parse_tx_id(payload: &[u8]) -> Result<u32, WireError> {
    let s = single_string(payload)?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WireError::BadTxId(s.to_owned()));
    }
    s.parse().map_err(|_| WireError::BadTxId(s.to_owned()))
}
