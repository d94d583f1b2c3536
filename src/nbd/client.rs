//! A small blocking NBD client (fixed newstyle, NBD_OPT_GO, optional structured replies).
//!
//! Used by tests and tools to talk to an export at the protocol level, including sending
//! requests a well-behaved client never would.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::proto::*;

/// A connected client in the transmission phase.
#[derive(Debug)]
pub struct Client {
    pub stream: UnixStream,
    /// Export size and transmission flags from NBD_INFO_EXPORT.
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
}

/// A reply as received.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientReply {
    Simple {
        cookie: u64,
        error: u32,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        typ: u16,
        payload: Vec<u8>,
    },
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn read_u32(s: &mut UnixStream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut UnixStream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_opt(s: &mut UnixStream, opt: u32, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option too long"))?;
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v)
}

/// Read one option reply: (type, data).
fn read_opt_reply(s: &mut UnixStream) -> io::Result<(u32, Vec<u8>)> {
    if read_u64(s)? != OPT_REPLY_MAGIC {
        return Err(bad("bad option reply magic"));
    }
    let _opt = read_u32(s)?;
    let typ = read_u32(s)?;
    let len = read_u32(s)?;
    if len > MAX_OPTION_DATA {
        return Err(bad("option reply too long"));
    }
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d)?;
    Ok((typ, d))
}

impl Client {
    /// Connect and negotiate with NBD_OPT_GO (after STRUCTURED_REPLY and
    /// SET_META_CONTEXT base:allocation when `structured`).
    pub fn connect(path: &Path, structured: bool) -> io::Result<Client> {
        let mut s = UnixStream::connect(path)?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        if g[..8] != NBDMAGIC.to_be_bytes() || g[8..16] != IHAVEOPT.to_be_bytes() {
            return Err(bad("not a newstyle NBD server"));
        }
        s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())?;
        if structured {
            send_opt(&mut s, OPT_STRUCTURED_REPLY, &[])?;
            if read_opt_reply(&mut s)?.0 != REP_ACK {
                return Err(bad("structured replies refused"));
            }
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
            d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            send_opt(&mut s, OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (t, _) = read_opt_reply(&mut s)?;
                if t == REP_ACK {
                    break;
                }
                if t != REP_META_CONTEXT {
                    return Err(bad("meta context refused"));
                }
            }
        }
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&0u16.to_be_bytes());
        send_opt(&mut s, OPT_GO, &d)?;
        let (mut size, mut flags) = (0, 0);
        loop {
            let (t, d) = read_opt_reply(&mut s)?;
            match t {
                REP_ACK => break,
                REP_INFO if d.len() >= 12 && d[..2] == INFO_EXPORT.to_be_bytes() => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&d[2..10]);
                    size = u64::from_be_bytes(b);
                    flags = u16::from_be_bytes([d[10], d[11]]);
                }
                REP_INFO => {}
                _ => return Err(bad("GO refused")),
            }
        }
        Ok(Client {
            stream: s,
            size,
            flags,
            structured,
        })
    }

    /// Send a request header (and payload) without waiting.
    pub fn send(&mut self, h: &RequestHeader, payload: &[u8]) -> io::Result<()> {
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        self.stream.write_all(&v)
    }

    /// Send bytes as they are (the rest of a payload sent in parts, or anything a test
    /// peer wants to put on the wire).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Read one reply header; for a simple reply to a successful read of `read_len` bytes,
    /// pass the length to also consume its data (returned in `data`).
    pub fn recv(&mut self, read_len: Option<usize>, data: &mut Vec<u8>) -> io::Result<ClientReply> {
        let magic = read_u32(&mut self.stream)?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = read_u32(&mut self.stream)?;
                let cookie = read_u64(&mut self.stream)?;
                if error == 0 {
                    if let Some(n) = read_len {
                        data.resize(n, 0);
                        self.stream.read_exact(data)?;
                    }
                }
                Ok(ClientReply::Simple { cookie, error })
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.stream.read_exact(&mut h)?;
                let flags = u16::from_be_bytes([h[0], h[1]]);
                let typ = u16::from_be_bytes([h[2], h[3]]);
                let mut c = [0u8; 8];
                c.copy_from_slice(&h[4..12]);
                let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
                if len > MAX_PAYLOAD + 64 {
                    return Err(bad("chunk too long"));
                }
                let mut payload = vec![0u8; len as usize];
                self.stream.read_exact(&mut payload)?;
                Ok(ClientReply::Chunk {
                    cookie: u64::from_be_bytes(c),
                    flags,
                    typ,
                    payload,
                })
            }
            _ => Err(bad("bad reply magic")),
        }
    }

    /// Simple-reply READ (no structured replies negotiated).
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let h = RequestHeader {
            flags: 0,
            typ: CMD_READ,
            cookie: offset,
            offset,
            length: len,
        };
        self.send(&h, &[])?;
        let mut data = Vec::new();
        match self.recv(Some(len as usize), &mut data)? {
            ClientReply::Simple { error: 0, .. } => Ok(Ok(data)),
            ClientReply::Simple { error, .. } => Ok(Err(error)),
            ClientReply::Chunk { .. } => Err(bad("unexpected chunk")),
        }
    }

    /// WRITE (with FUA when `fua`); returns the NBD error (0 = success).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<u32> {
        let length = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "write larger than 4 GiB"))?;
        let h = RequestHeader {
            flags: if fua { CMD_FLAG_FUA } else { 0 },
            typ: CMD_WRITE,
            cookie: offset,
            offset,
            length,
        };
        self.send(&h, data)?;
        match self.recv(None, &mut Vec::new())? {
            ClientReply::Simple { error, .. } => Ok(error),
            ClientReply::Chunk { .. } => Err(bad("unexpected chunk")),
        }
    }
}
