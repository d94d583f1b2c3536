//! Wire-compatible `tapdisk_message_t` codec.
//!
//! A control message is a fixed-size C struct in **host byte order with native alignment**:
//!
//! ```text
//!            x86_64 (and other LP64)      i686 (u64 aligned to 4, size_t = 4)
//!  type      u16 @0                        u16 @0
//!  cookie    u16 @2                        u16 @2
//!  union u   @8, 536 bytes                 @4, 532 bytes
//!  total     544 bytes                     536 bytes
//! ```
//!
//! Union members (offsets relative to the union, identical on both targets except `info`):
//! `params` (flags@0, devnum@4, domid@8, path\[256\]@12, prt_devnum@268, req_timeout u16@272,
//! secondary\[256\]@274), `image` (sectors u64@0, sector_size@8, info@12), `tapdisk_pid` i32@0,
//! `response` (error i32@0, message\[256\]@4), `list` (count@0, minor@4, state@8, path\[256\]@12),
//! `info` (type u16@0, cookie u16@2, length size_t@8 on LP64 / @4 on i686), `blkif` (domid@0,
//! devid@4, gref\[8\]@8, order@40, proto@44, pool\[256\]@48, port@304, poll_duration@308,
//! poll_idle_threshold@312; our extensions: gref_ext\[8\]@316, mq_magic@348, queue@352).
//!
//! # Extension: XENBLKIF_CONNECT with ring order 4
//!
//! The C struct carries `gref[8]`, so at most order 3 (8 ring pages). Linux blkback goes up to
//! order 4 (`XENBUS_MAX_RING_GRANT_ORDER`, 16 pages, 512 slots). The `blkif` member is 316
//! bytes but the union is 536 (LP64) / 532 (i686) bytes, so grant refs 8..15 travel in spare
//! union bytes right after `poll_idle_threshold`:
//!
//! ```text
//!  union offset  0 ........ 316   tapdisk_message_blkif_t, unchanged (gref[0..8] @8)
//!  union offset 316 ....... 348   u32 gref_ext[8] = grant refs 8..15, only when order == 4
//! ```
//!
//! The extension is read and written **only when `order == 4`**; for orders 0..=3 those bytes
//! are left zero on encode and ignored on decode, so every message a C tap-ctl produces decodes
//! exactly as before, and a message of ours with order ≤ 3 is byte-identical to C's. A C tapdisk
//! never sees a problem either: it rejects order 4 with EINVAL before looking at any gref, and a
//! C tap-ctl never sends order 4. Order > 4 is EINVAL on decode and on encode.
//!
//! # Extension: XENBLKIF_CONNECT for queue N of a multi-queue device
//!
//! A multi-queue blkfront (`multi-queue-num-queues` > 1) has one ring and event channel per
//! queue. Each queue is connected by its own XENBLKIF_CONNECT with the same domid/devid and
//! the queue index in two more spare words:
//!
//! ```text
//!  union offset 348 ....... 352   u32 mq_magic = MQ_MAGIC ("mqXB"), only when queue != 0
//!  union offset 352 ....... 356   u32 queue    (1..MAX_QUEUES)
//! ```
//!
//! Without the magic the message is queue 0, so a C tap-ctl's message (and any garbage in the
//! spare bytes) means what it always meant, and our queue-0 message stays byte-identical to
//! C's. XENBLKIF_DISCONNECT is unchanged and disconnects every queue of the device. A C
//! tapdisk does not know the extension: it would take queue 1 as a second connect of the same
//! device and refuse it, so tapback only works multi-queue with this tapdisk.
//!
//! The codec works on a private copy of the bytes and validates everything: every string must
//! be NUL-terminated within its field, every request must have a NUL inside `u.params.path`
//! (whatever its type, as tapdisk requires), unknown types and types without a handler are
//! errors, and nothing panics on any input. [`WireLayout::NATIVE`] is the layout of the
//! compilation target; the other layouts exist so that both can be tested on any host.
//!
//! Trailers: OPEN is followed by a 256-byte NUL-padded log path if `ADD_LOG`, then, if
//! `OPEN_ENCRYPTED`, one length byte (1..=128) and the key. RESUME (which uses the `params`
//! layout) is followed by the log path if `ADD_LOG`. A STATS reply is one STATS_RSP message whose
//! `info.length` counts the JSON bytes that follow. A LIST reply is one LIST_RSP per VBD with
//! `count` = N, N-1, ..., 1 and a terminator with count 0, minor -1.

use std::fmt;
use std::io::{self, Read, Write};

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};
use zeroize::Zeroizing;

use super::{ControlError, Result};
use crate::image::crypto::KeyBytes;

/// Length of every string field (path, secondary, pool, log path trailer).
pub const STRING_LEN: usize = 256;
/// Largest key accepted in an OPEN trailer.
pub const MAX_KEY_LEN: usize = 128;
/// STATS cookie meaning "every VBD".
pub const STATS_ALL: u16 = 0xFFFF;
/// Largest ring order a XENBLKIF_CONNECT can carry: 3 in the C struct (`gref[8]`), 4 with the
/// `gref_ext` extension (see the module doc).
pub const MAX_RING_ORDER: u32 = 4;
/// Number of grant references a XENBLKIF_CONNECT can carry (`1 << MAX_RING_ORDER`).
pub const MAX_RING_PAGES: usize = 1 << MAX_RING_ORDER;
/// Grant references in the C struct's `gref[8]`; the rest travel in `gref_ext`.
pub const BLKIF_C_GREFS: usize = 8;
/// The only order that uses the `gref_ext` extension.
const EXT_ORDER: u32 = 4;
/// Queues of one multi-queue device a XENBLKIF_CONNECT can name (`queue` 0..16).
pub const MAX_QUEUES: u32 = 16;
/// Marks the multi-queue extension in the spare union bytes (`"mqXB"` as a native u32).
pub const MQ_MAGIC: u32 = 0x4258_716D;
/// Upper bound on the STATS payload a client accepts.
pub const MAX_STATS_LEN: u64 = 64 << 20;
/// Upper bound on the LIST entries a client accepts in one reply.
pub const MAX_LIST_ENTRIES: usize = 1 << 16;

/// The byte layout of `tapdisk_message_t` on one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireLayout {
    /// `sizeof(tapdisk_message_t)`.
    pub msg_size: usize,
    /// `offsetof(tapdisk_message_t, u)`.
    pub union_offset: usize,
    /// `sizeof(size_t)` (the width of `u.info.length`).
    pub size_t_len: usize,
}

impl WireLayout {
    /// x86_64 and every other LP64 target: 544 bytes, union at 8, 8-byte size_t.
    pub const LP64: WireLayout = WireLayout {
        msg_size: 544,
        union_offset: 8,
        size_t_len: 8,
    };
    /// i686: u64 is 4-byte aligned inside structs: 536 bytes, union at 4, 4-byte size_t.
    pub const I686: WireLayout = WireLayout {
        msg_size: 536,
        union_offset: 4,
        size_t_len: 4,
    };
    /// 32-bit targets whose u64 is 8-byte aligned (arm): 544 bytes, union at 8, 4-byte size_t.
    pub const ILP32_ALIGN8: WireLayout = WireLayout {
        msg_size: 544,
        union_offset: 8,
        size_t_len: 4,
    };

    /// The layout of the compilation target.
    #[cfg(target_arch = "x86")]
    pub const NATIVE: WireLayout = WireLayout::I686;
    /// The layout of the compilation target.
    #[cfg(all(not(target_arch = "x86"), target_pointer_width = "64"))]
    pub const NATIVE: WireLayout = WireLayout::LP64;
    /// The layout of the compilation target.
    #[cfg(all(not(target_arch = "x86"), target_pointer_width = "32"))]
    pub const NATIVE: WireLayout = WireLayout::ILP32_ALIGN8;

    /// Offset of `u.info.length` inside the union.
    pub const fn info_length_offset(&self) -> usize {
        if self.size_t_len > 4 {
            self.size_t_len
        } else {
            4
        }
    }

    /// Absolute offset of `u.params.path` (20 on x86_64, 16 on i686).
    pub const fn params_path_offset(&self) -> usize {
        self.union_offset + std::mem::offset_of!(wire::Params, path)
    }
}

/// `sizeof(tapdisk_message_t)` on the compilation target.
pub const MSG_SIZE: usize = WireLayout::NATIVE.msg_size;
/// The largest message of any layout (buffer size).
pub const MAX_MSG_SIZE: usize = 544;

/// The members of `tapdisk_message_t` as blktap's `tapdisk-message.h` declares them, in
/// host byte order and without alignment: each sits at the union offset of its
/// [`WireLayout`], and its field offsets are the same on every target (checked against
/// gcc's `-m64` and `-m32` layout in `tests/layout_c.rs`). The codec reads and writes
/// messages only through these.
pub mod wire {
    use zerocopy::byteorder::native_endian::{I32, U16, U32, U64};
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

    use super::STRING_LEN;

    /// The message head: `type` and `cookie`; the union follows at the layout's offset.
    #[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub struct Head {
        pub ty: U16,
        pub cookie: U16,
    }

    /// `u.tapdisk_pid`.
    #[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub struct Pid {
        pub pid: I32,
    }

    /// `u.params` (OPEN, and RESUME, which sends this layout).
    #[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub struct Params {
        pub flags: U32,
        pub devnum: U32,
        pub domid: U32,
        pub path: [u8; STRING_LEN],
        pub prt_devnum: U32,
        pub req_timeout: U16,
        pub secondary: [u8; STRING_LEN],
        /// C's tail padding to the struct's 4-byte alignment.
        pub _pad: [u8; 2],
    }

    /// `u.image` (OPEN_RSP, DISK_INFO_RSP).
    #[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub struct Image {
        pub sectors: U64,
        pub sector_size: U32,
        pub info: U32,
    }

    /// `u.response` (ERROR: a positive errno; the message is unused).
    #[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub struct Response {
        pub error: I32,
        pub message: [u8; STRING_LEN],
    }

    /// `u.list` (LIST_RSP).
    #[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub struct List {
        pub count: I32,
        pub minor: I32,
        pub state: U32,
        pub path: [u8; STRING_LEN],
    }

    /// `u.info` (STATS_RSP) where `size_t` is 8 bytes (LP64).
    #[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub struct Info64 {
        pub ty: U16,
        pub cookie: U16,
        pub _pad: [u8; 4],
        pub length: U64,
    }

    /// `u.info` (STATS_RSP) where `size_t` is 4 bytes (i686, arm).
    #[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub struct Info32 {
        pub ty: U16,
        pub cookie: U16,
        pub length: U32,
    }

    /// `u.blkif` (XENBLKIF_CONNECT, DISCONNECT).
    #[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub struct Blkif {
        pub domid: U32,
        pub devid: U32,
        pub gref: [U32; super::BLKIF_C_GREFS],
        pub order: U32,
        pub proto: U32,
        pub pool: [u8; STRING_LEN],
        pub port: U32,
        pub poll_duration: U32,
        pub poll_idle_threshold: U32,
    }

    /// `u.blkif` followed by our extension: grant refs 8..15 of an order-4 ring, in the
    /// spare union bytes right after the C struct (see the module doc).
    #[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub struct BlkifExt {
        pub blkif: Blkif,
        pub gref_ext: [U32; super::MAX_RING_PAGES - super::BLKIF_C_GREFS],
        /// [`super::MQ_MAGIC`] when `queue` is meaningful (a queue other than 0).
        pub mq_magic: U32,
        pub queue: U32,
    }

    const _: () = assert!(size_of::<Head>() == 4);
    const _: () = assert!(size_of::<Params>() == 532);
    const _: () = assert!(size_of::<Image>() == 16);
    const _: () = assert!(size_of::<Response>() == 260);
    const _: () = assert!(size_of::<List>() == 268);
    const _: () = assert!(size_of::<Info64>() == 16);
    const _: () = assert!(size_of::<Info32>() == 8);
    const _: () = assert!(size_of::<Blkif>() == 316);
    const _: () = assert!(size_of::<BlkifExt>() == 356);
    // Every member fits in the smallest union (i686: 532 bytes).
    const _: () = assert!(
        size_of::<BlkifExt>()
            <= super::WireLayout::I686.msg_size - super::WireLayout::I686.union_offset
    );
    const _: () = assert!(
        size_of::<Params>()
            <= super::WireLayout::I686.msg_size - super::WireLayout::I686.union_offset
    );
}

#[cfg(target_arch = "x86_64")]
const _: () = assert!(MSG_SIZE == 544);
#[cfg(target_arch = "x86")]
const _: () = assert!(MSG_SIZE == 536);

/// Message types (`TAPDISK_MESSAGE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MsgType {
    Error = 1,
    RuntimeError = 2,
    Pid = 3,
    PidRsp = 4,
    Attach = 5,
    AttachRsp = 6,
    Open = 7,
    OpenRsp = 8,
    Pause = 9,
    PauseRsp = 10,
    Resume = 11,
    ResumeRsp = 12,
    Close = 13,
    CloseRsp = 14,
    Detach = 15,
    DetachRsp = 16,
    ListMinors = 17,
    ListMinorsRsp = 18,
    List = 19,
    ListRsp = 20,
    Stats = 21,
    StatsRsp = 22,
    ForceShutdown = 23,
    XenblkifConnect = 24,
    XenblkifConnectRsp = 25,
    XenblkifDisconnect = 26,
    XenblkifDisconnectRsp = 27,
    DiskInfo = 28,
    DiskInfoRsp = 29,
    Exit = 30,
}

impl MsgType {
    /// All types in numeric order.
    pub const ALL: [MsgType; 30] = [
        MsgType::Error,
        MsgType::RuntimeError,
        MsgType::Pid,
        MsgType::PidRsp,
        MsgType::Attach,
        MsgType::AttachRsp,
        MsgType::Open,
        MsgType::OpenRsp,
        MsgType::Pause,
        MsgType::PauseRsp,
        MsgType::Resume,
        MsgType::ResumeRsp,
        MsgType::Close,
        MsgType::CloseRsp,
        MsgType::Detach,
        MsgType::DetachRsp,
        MsgType::ListMinors,
        MsgType::ListMinorsRsp,
        MsgType::List,
        MsgType::ListRsp,
        MsgType::Stats,
        MsgType::StatsRsp,
        MsgType::ForceShutdown,
        MsgType::XenblkifConnect,
        MsgType::XenblkifConnectRsp,
        MsgType::XenblkifDisconnect,
        MsgType::XenblkifDisconnectRsp,
        MsgType::DiskInfo,
        MsgType::DiskInfoRsp,
        MsgType::Exit,
    ];

    /// The type for a wire value, `None` outside 1..=30.
    pub fn from_u16(v: u16) -> Option<MsgType> {
        let i = usize::from(v);
        if (1..=30).contains(&i) {
            Some(Self::ALL[i - 1])
        } else {
            None
        }
    }

    /// Lower-case name as blktap's `tapdisk_message_name` prints it.
    pub fn name(self) -> &'static str {
        match self {
            MsgType::Error => "error",
            MsgType::RuntimeError => "runtime error",
            MsgType::Pid => "pid",
            MsgType::PidRsp => "pid response",
            MsgType::Attach => "attach",
            MsgType::AttachRsp => "attach response",
            MsgType::Open => "open",
            MsgType::OpenRsp => "open response",
            MsgType::Pause => "pause",
            MsgType::PauseRsp => "pause response",
            MsgType::Resume => "resume",
            MsgType::ResumeRsp => "resume response",
            MsgType::Close => "close",
            MsgType::CloseRsp => "close response",
            MsgType::Detach => "detach",
            MsgType::DetachRsp => "detach response",
            MsgType::ListMinors => "list minors",
            MsgType::ListMinorsRsp => "list minors response",
            MsgType::List => "list",
            MsgType::ListRsp => "list response",
            MsgType::Stats => "stats",
            MsgType::StatsRsp => "stats response",
            MsgType::ForceShutdown => "force shutdown",
            MsgType::XenblkifConnect => "xenblkif connect",
            MsgType::XenblkifConnectRsp => "xenblkif connect response",
            MsgType::XenblkifDisconnect => "xenblkif disconnect",
            MsgType::XenblkifDisconnectRsp => "xenblkif disconnect response",
            MsgType::DiskInfo => "disk info",
            MsgType::DiskInfoRsp => "disk info response",
            MsgType::Exit => "exit",
        }
    }
}

/// `params.flags` bits (`TAPDISK_MESSAGE_FLAG_*`).
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct OpenFlags(pub u32);

impl OpenFlags {
    pub const SHARED: OpenFlags = OpenFlags(0x001);
    pub const RDONLY: OpenFlags = OpenFlags(0x002);
    pub const ADD_CACHE: OpenFlags = OpenFlags(0x004);
    pub const VHD_INDEX: OpenFlags = OpenFlags(0x008);
    pub const ADD_LOG: OpenFlags = OpenFlags(0x010);
    pub const ADD_LCACHE: OpenFlags = OpenFlags(0x020);
    pub const REUSE_PRT: OpenFlags = OpenFlags(0x040);
    pub const SECONDARY: OpenFlags = OpenFlags(0x080);
    pub const STANDBY: OpenFlags = OpenFlags(0x100);
    pub const NO_O_DIRECT: OpenFlags = OpenFlags(0x200);
    pub const OPEN_ENCRYPTED: OpenFlags = OpenFlags(0x400);
    /// Every defined bit.
    pub const ALL: OpenFlags = OpenFlags(0x7ff);

    /// No flag set.
    pub const fn empty() -> Self {
        OpenFlags(0)
    }
    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: OpenFlags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Set or clear the bits of `other`.
    pub fn set(&mut self, other: OpenFlags, on: bool) {
        if on {
            self.0 |= other.0
        } else {
            self.0 &= !other.0
        }
    }
}

impl std::ops::BitOr for OpenFlags {
    type Output = OpenFlags;
    fn bitor(self, rhs: OpenFlags) -> OpenFlags {
        OpenFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for OpenFlags {
    fn bitor_assign(&mut self, rhs: OpenFlags) {
        self.0 |= rhs.0
    }
}

impl fmt::Debug for OpenFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpenFlags({:#x})", self.0)
    }
}

/// VBD state bits as `tap-ctl list` shows them (`TD_VBD_*`).
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct VbdState(pub u32);

impl VbdState {
    pub const DEAD: VbdState = VbdState(0x001);
    pub const CLOSED: VbdState = VbdState(0x002);
    pub const QUIESCE_REQUESTED: VbdState = VbdState(0x004);
    pub const QUIESCED: VbdState = VbdState(0x008);
    pub const PAUSE_REQUESTED: VbdState = VbdState(0x010);
    pub const PAUSED: VbdState = VbdState(0x020);
    pub const SHUTDOWN_REQUESTED: VbdState = VbdState(0x040);
    pub const LOCKING: VbdState = VbdState(0x080);
    pub const LOG_DROPPED: VbdState = VbdState(0x100);
    pub const RESUME_FAILED: VbdState = VbdState(0x200);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: VbdState) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for VbdState {
    type Output = VbdState;
    fn bitor(self, rhs: VbdState) -> VbdState {
        VbdState(self.0 | rhs.0)
    }
}

impl fmt::Debug for VbdState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VbdState({})", c_hex(self.0))
    }
}

/// Format like C's `%#x`: `0` for zero, `0x..` otherwise.
pub fn c_hex(v: u32) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// `blkif.proto`: the ring ABI of the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum BlkifProto {
    Native = 1,
    X86_32 = 2,
    X86_64 = 3,
}

impl BlkifProto {
    /// The protocol for a wire value (EPROTONOSUPPORT otherwise).
    pub fn from_u32(v: u32) -> Result<BlkifProto> {
        match v {
            1 => Ok(BlkifProto::Native),
            2 => Ok(BlkifProto::X86_32),
            3 => Ok(BlkifProto::X86_64),
            v => Err(ControlError::BadProto(v)),
        }
    }
}

/// An encryption key carried by OPEN. Zeroed on drop; `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(KeyBytes);

impl SecretKey {
    /// Wrap key bytes (1..=128 bytes to be sendable; tap-ctl only sends 32 or 64).
    pub fn new(bytes: &[u8]) -> Self {
        SecretKey(Zeroizing::new(bytes.to_vec()))
    }
    /// The key bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
    /// Hand the zeroizing buffer over (for `KeySource::Explicit`).
    pub fn into_key_bytes(self) -> KeyBytes {
        self.0
    }
    /// Key length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether the key is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(<{} bytes redacted>)", self.0.len())
    }
}

/// OPEN: open the image chain of VBD `minor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRequest {
    /// The cookie: the VBD's minor.
    pub minor: u16,
    /// Flags. On encode `ADD_LOG` and `OPEN_ENCRYPTED` are derived from `log_path`/`key`.
    pub flags: OpenFlags,
    /// `params.devnum` (tap-ctl sends the minor).
    pub devnum: u32,
    /// `params.domid` (unused by tapdisk, 0 from tap-ctl).
    pub domid: u32,
    /// `"type:/path"`.
    pub params: String,
    /// Parent minor for `REUSE_PRT`.
    pub prt_devnum: u32,
    /// Per-request timeout in seconds (0 = tapdisk's default).
    pub req_timeout: u16,
    /// Secondary `"type:/path"` (empty on the wire = `None`).
    pub secondary: Option<String>,
    /// Log path trailer (`ADD_LOG`).
    pub log_path: Option<String>,
    /// Key trailer (`OPEN_ENCRYPTED`).
    pub key: Option<SecretKey>,
}

impl OpenRequest {
    /// An OPEN of `params` on `minor` with tap-ctl's defaults (devnum = minor).
    pub fn new(minor: u16, params: impl Into<String>) -> Self {
        OpenRequest {
            minor,
            flags: OpenFlags::empty(),
            devnum: u32::from(minor),
            domid: 0,
            params: params.into(),
            prt_devnum: 0,
            req_timeout: 0,
            secondary: None,
            log_path: None,
            key: None,
        }
    }

    /// Set or clear the log path trailer (and `ADD_LOG`).
    pub fn set_log_path(&mut self, log_path: Option<String>) {
        self.flags.set(OpenFlags::ADD_LOG, log_path.is_some());
        self.log_path = log_path;
    }

    /// Set or clear the key trailer (and `OPEN_ENCRYPTED`).
    pub fn set_key(&mut self, key: Option<SecretKey>) {
        self.flags.set(OpenFlags::OPEN_ENCRYPTED, key.is_some());
        self.key = key;
    }
}

/// RESUME (tap-ctl unpause): reopen a paused VBD, optionally on a new leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeRequest {
    /// The cookie: the VBD's minor.
    pub minor: u16,
    /// Flags (`SECONDARY`, `ADD_LOG`, ...). On encode `ADD_LOG` follows `log_path`.
    pub flags: OpenFlags,
    /// New `"type:/path"` (empty on the wire = keep the current one).
    pub params: Option<String>,
    /// New secondary.
    pub secondary: Option<String>,
    /// Log path trailer (`ADD_LOG`); without it any log layer is dropped.
    pub log_path: Option<String>,
}

/// The blkif struct of XENBLKIF_CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blkif {
    pub domid: u32,
    pub devid: u32,
    /// Grant references; the first `1 << order` are meaningful. Entries 8..15 are carried on
    /// the wire only when `order == 4` (they decode as 0 otherwise).
    pub gref: [u32; MAX_RING_PAGES],
    /// Ring order, 0..=4 (4 uses the `gref_ext` extension).
    pub order: u32,
    pub proto: BlkifProto,
    /// Context ("pool") name; empty = default.
    pub pool: String,
    /// Event channel port.
    pub port: u32,
    /// Polling duration in microseconds.
    pub poll_duration: u32,
    /// Polling idle threshold in percent.
    pub poll_idle_threshold: u32,
    /// Queue index of a multi-queue device (0 for a single-queue device and for queue 0):
    /// each queue's ring is connected by its own XENBLKIF_CONNECT with the same domid/devid.
    /// On the wire only when non-zero (the `mq_magic`/`queue` extension).
    pub queue: u32,
}

impl Blkif {
    /// The grant references of the ring pages (`1 << order` of them).
    pub fn ring_refs(&self) -> &[u32] {
        let n = 1usize << self.order.min(MAX_RING_ORDER);
        &self.gref[..n]
    }
}

/// A decoded, validated request. The server hands these to the daemon's handler.
///
/// Types without a handler in tapdisk (ERROR, RUNTIME_ERROR, LIST_MINORS, EXIT and every
/// `*_RSP`) never decode; the server answers them with EINVAL itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// PID: reply [`Reply::Pid`]. Re-entrant.
    Pid,
    /// ATTACH: create VBD `minor` (lock its marker). Reply [`Reply::Attach`].
    Attach { minor: u16 },
    /// OPEN: reply [`Reply::Open`].
    Open(OpenRequest),
    /// PAUSE: reply [`Reply::Pause`].
    Pause { minor: u16 },
    /// RESUME: reply [`Reply::Resume`].
    Resume(ResumeRequest),
    /// CLOSE: reply [`Reply::Close`].
    Close { minor: u16 },
    /// FORCE_SHUTDOWN: close without waiting for dead rings. Reply [`Reply::Close`].
    ForceShutdown { minor: u16 },
    /// DETACH: reply [`Reply::Detach`].
    Detach { minor: u16 },
    /// LIST: reply [`Reply::List`].
    List,
    /// STATS of one VBD, or of all (`None`, cookie 0xFFFF). Reply [`Reply::Stats`]. Re-entrant.
    Stats { minor: Option<u16> },
    /// XENBLKIF_CONNECT: reply [`Reply::XenblkifConnect`].
    XenblkifConnect { minor: u16, blkif: Blkif },
    /// XENBLKIF_DISCONNECT (cookie ignored): reply [`Reply::XenblkifDisconnect`].
    XenblkifDisconnect { domid: u32, devid: u32 },
    /// DISK_INFO: reply [`Reply::DiskInfo`].
    DiskInfo { minor: u16 },
}

impl Request {
    /// The wire type of this request.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Request::Pid => MsgType::Pid,
            Request::Attach { .. } => MsgType::Attach,
            Request::Open(_) => MsgType::Open,
            Request::Pause { .. } => MsgType::Pause,
            Request::Resume(_) => MsgType::Resume,
            Request::Close { .. } => MsgType::Close,
            Request::ForceShutdown { .. } => MsgType::ForceShutdown,
            Request::Detach { .. } => MsgType::Detach,
            Request::List => MsgType::List,
            Request::Stats { .. } => MsgType::Stats,
            Request::XenblkifConnect { .. } => MsgType::XenblkifConnect,
            Request::XenblkifDisconnect { .. } => MsgType::XenblkifDisconnect,
            Request::DiskInfo { .. } => MsgType::DiskInfo,
        }
    }

    /// The cookie this request is sent with.
    pub fn cookie(&self) -> u16 {
        match self {
            Request::Pid | Request::XenblkifDisconnect { .. } => 0,
            Request::List => 0xFFFF,
            Request::Attach { minor }
            | Request::Pause { minor }
            | Request::Close { minor }
            | Request::ForceShutdown { minor }
            | Request::Detach { minor }
            | Request::XenblkifConnect { minor, .. }
            | Request::DiskInfo { minor } => *minor,
            Request::Open(o) => o.minor,
            Request::Resume(r) => r.minor,
            Request::Stats { minor } => minor.unwrap_or(STATS_ALL),
        }
    }

    /// Whether tapdisk runs this request even while another one is in progress (PID, STATS).
    pub fn is_reentrant(&self) -> bool {
        matches!(self, Request::Pid | Request::Stats { .. })
    }

    /// The response type a successful reply has.
    pub fn reply_type(&self) -> MsgType {
        match self {
            Request::Pid => MsgType::PidRsp,
            Request::Attach { .. } => MsgType::AttachRsp,
            Request::Open(_) => MsgType::OpenRsp,
            Request::Pause { .. } => MsgType::PauseRsp,
            Request::Resume(_) => MsgType::ResumeRsp,
            Request::Close { .. } | Request::ForceShutdown { .. } => MsgType::CloseRsp,
            Request::Detach { .. } => MsgType::DetachRsp,
            Request::List => MsgType::ListRsp,
            Request::Stats { .. } => MsgType::StatsRsp,
            Request::XenblkifConnect { .. } => MsgType::XenblkifConnectRsp,
            Request::XenblkifDisconnect { .. } => MsgType::XenblkifDisconnectRsp,
            Request::DiskInfo { .. } => MsgType::DiskInfoRsp,
        }
    }

    /// Encode with the native layout (message plus trailers; zeroed on drop as it may hold a key).
    pub fn encode(&self) -> Result<Zeroizing<Vec<u8>>> {
        self.encode_with(WireLayout::NATIVE)
    }

    /// Encode with an explicit layout.
    pub fn encode_with(&self, layout: WireLayout) -> Result<Zeroizing<Vec<u8>>> {
        let mut m = Msg::new(layout, self.msg_type(), self.cookie());
        let mut trailer: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::new());
        match self {
            Request::Pid
            | Request::Attach { .. }
            | Request::Pause { .. }
            | Request::Close { .. }
            | Request::ForceShutdown { .. }
            | Request::Detach { .. }
            | Request::List
            | Request::Stats { .. }
            | Request::DiskInfo { .. } => {}
            Request::Open(o) => {
                let mut flags = o.flags;
                flags.set(OpenFlags::ADD_LOG, o.log_path.is_some());
                flags.set(OpenFlags::OPEN_ENCRYPTED, o.key.is_some());
                let mut p = wire::Params::new_zeroed();
                p.flags = flags.0.into();
                p.devnum = o.devnum.into();
                p.domid = o.domid.into();
                put_cstr(&mut p.path, &o.params, "params")?;
                p.prt_devnum = o.prt_devnum.into();
                p.req_timeout = o.req_timeout.into();
                put_cstr(
                    &mut p.secondary,
                    o.secondary.as_deref().unwrap_or(""),
                    "secondary",
                )?;
                m.set(&p);
                if let Some(l) = &o.log_path {
                    push_log_trailer(&mut trailer, l)?;
                }
                if let Some(k) = &o.key {
                    if k.is_empty() || k.len() > MAX_KEY_LEN {
                        return Err(ControlError::invalid(format!(
                            "key length {} (must be 1..={MAX_KEY_LEN})",
                            k.len()
                        )));
                    }
                    // Length checked just above: 1..=128 fits in a byte.
                    trailer.push(k.len() as u8);
                    trailer.extend_from_slice(k.bytes());
                }
            }
            Request::Resume(r) => {
                let mut flags = r.flags;
                flags.set(OpenFlags::ADD_LOG, r.log_path.is_some());
                let mut p = wire::Params::new_zeroed();
                p.flags = flags.0.into();
                p.devnum = u32::from(r.minor).into();
                put_cstr(&mut p.path, r.params.as_deref().unwrap_or(""), "params")?;
                put_cstr(
                    &mut p.secondary,
                    r.secondary.as_deref().unwrap_or(""),
                    "secondary",
                )?;
                m.set(&p);
                if let Some(l) = &r.log_path {
                    push_log_trailer(&mut trailer, l)?;
                }
            }
            Request::XenblkifConnect { blkif, .. } => {
                if blkif.order > MAX_RING_ORDER {
                    return Err(ControlError::invalid(format!("ring order {}", blkif.order)));
                }
                let mut b = wire::BlkifExt::new_zeroed();
                b.blkif.domid = blkif.domid.into();
                b.blkif.devid = blkif.devid.into();
                let (c_grefs, ext_grefs) = blkif.gref.split_at(BLKIF_C_GREFS);
                for (w, g) in b.blkif.gref.iter_mut().zip(c_grefs) {
                    *w = (*g).into();
                }
                if blkif.order == EXT_ORDER {
                    for (w, g) in b.gref_ext.iter_mut().zip(ext_grefs) {
                        *w = (*g).into();
                    }
                }
                b.blkif.order = blkif.order.into();
                b.blkif.proto = (blkif.proto as u32).into();
                put_cstr(&mut b.blkif.pool, &blkif.pool, "pool")?;
                b.blkif.port = blkif.port.into();
                b.blkif.poll_duration = blkif.poll_duration.into();
                b.blkif.poll_idle_threshold = blkif.poll_idle_threshold.into();
                if blkif.queue >= MAX_QUEUES {
                    return Err(ControlError::invalid(format!("queue {}", blkif.queue)));
                }
                if blkif.queue != 0 {
                    b.mq_magic = MQ_MAGIC.into();
                    b.queue = blkif.queue.into();
                }
                m.set(&b);
            }
            Request::XenblkifDisconnect { domid, devid } => {
                let mut b = wire::Blkif::new_zeroed();
                b.domid = (*domid).into();
                b.devid = (*devid).into();
                m.set(&b);
            }
        }
        // The server requires a NUL inside params.path whatever the type.
        if !m.view().member::<wire::Params>()?.path.contains(&0) {
            return Err(ControlError::invalid(
                "request (no NUL within params.path; pool too long?)",
            ));
        }
        let mut out = Zeroizing::new(Vec::with_capacity(layout.msg_size + trailer.len()));
        out.extend_from_slice(m.bytes());
        out.extend_from_slice(&trailer);
        Ok(out)
    }
}

fn push_log_trailer(trailer: &mut Vec<u8>, path: &str) -> Result<()> {
    let b = path.as_bytes();
    if b.is_empty() || b.len() >= STRING_LEN || b.contains(&0) {
        return Err(ControlError::invalid("log path"));
    }
    trailer.extend_from_slice(b);
    trailer.resize(trailer.len() + (STRING_LEN - b.len()), 0);
    Ok(())
}

/// How many bytes a request needs, judged from what has arrived so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// At least this many bytes in total are needed before the length is known.
    AtLeast(usize),
    /// The request (message plus trailers) is exactly this long.
    Exactly(usize),
}

/// The total wire length of the request that starts `buf` (message plus trailers), as far as
/// it can be judged from `buf`. Errors for a key length outside 1..=128.
pub fn request_len(buf: &[u8], layout: WireLayout) -> Result<Need> {
    let n = layout.msg_size;
    if buf.len() < n {
        return Ok(Need::AtLeast(n));
    }
    let m = MsgRef { buf, layout };
    let ty = MsgType::from_u16(m.head()?.ty.get());
    let flags = OpenFlags(m.member::<wire::Params>()?.flags.get());
    match ty {
        Some(MsgType::Open) => {
            let mut len = n;
            if flags.contains(OpenFlags::ADD_LOG) {
                len += STRING_LEN;
            }
            if flags.contains(OpenFlags::OPEN_ENCRYPTED) {
                let Some(&klen) = buf.get(len) else {
                    return Ok(Need::AtLeast(len + 1));
                };
                let klen = usize::from(klen);
                if klen == 0 || klen > MAX_KEY_LEN {
                    return Err(ControlError::invalid(format!("key length {klen}")));
                }
                len += 1 + klen;
            }
            Ok(Need::Exactly(len))
        }
        Some(MsgType::Resume) if flags.contains(OpenFlags::ADD_LOG) => {
            Ok(Need::Exactly(n + STRING_LEN))
        }
        _ => Ok(Need::Exactly(n)),
    }
}

/// The cookie of a message (0 if fewer than 4 bytes).
pub fn peek_cookie(buf: &[u8]) -> u16 {
    wire::Head::read_from_prefix(buf).map_or(0, |(h, _)| h.cookie.get())
}

/// Decode and validate one request: `buf` must be exactly the message plus its trailers.
pub fn decode_request(buf: &[u8], layout: WireLayout) -> Result<Request> {
    let n = layout.msg_size;
    if buf.len() < n {
        return Err(ControlError::invalid(format!(
            "request: {} bytes, need {n}",
            buf.len()
        )));
    }
    let m = MsgRef {
        buf: &buf[..n],
        layout,
    };
    // tapdisk's rule: a NUL within u.params.path, whatever the type.
    let params = m.member::<wire::Params>()?;
    if !params.path.contains(&0) {
        return Err(ControlError::invalid("request: params.path not terminated"));
    }
    let head = m.head()?;
    let (raw_type, cookie) = (head.ty.get(), head.cookie.get());
    let Some(ty) = MsgType::from_u16(raw_type) else {
        return Err(ControlError::invalid(format!("message type {raw_type}")));
    };
    let expect = match request_len(buf, layout)? {
        Need::Exactly(l) => l,
        Need::AtLeast(l) => {
            return Err(ControlError::invalid(format!(
                "request: truncated trailer ({} of at least {l} bytes)",
                buf.len()
            )))
        }
    };
    if buf.len() != expect {
        return Err(ControlError::invalid(format!(
            "request: {} bytes, expected {expect}",
            buf.len()
        )));
    }
    let trailer = &buf[n..];
    let req = match ty {
        MsgType::Pid => Request::Pid,
        MsgType::Attach => Request::Attach { minor: cookie },
        MsgType::Pause => Request::Pause { minor: cookie },
        MsgType::Close => Request::Close { minor: cookie },
        MsgType::ForceShutdown => Request::ForceShutdown { minor: cookie },
        MsgType::Detach => Request::Detach { minor: cookie },
        MsgType::List => Request::List,
        MsgType::DiskInfo => Request::DiskInfo { minor: cookie },
        MsgType::Stats => Request::Stats {
            minor: (cookie != STATS_ALL).then_some(cookie),
        },
        MsgType::Open => {
            let p = params;
            let flags = OpenFlags(p.flags.get());
            let params = cstring(&p.path, "params")?;
            let secondary = non_empty(cstring(&p.secondary, "secondary")?);
            let (log_path, rest) = split_log_trailer(trailer, flags)?;
            let key = if flags.contains(OpenFlags::OPEN_ENCRYPTED) {
                // request_len validated the length byte and the total length.
                let (len, key) = rest
                    .split_first()
                    .ok_or_else(|| ControlError::invalid("key trailer"))?;
                if usize::from(*len) != key.len() {
                    return Err(ControlError::invalid("key trailer length"));
                }
                Some(SecretKey::new(key))
            } else {
                None
            };
            Request::Open(OpenRequest {
                minor: cookie,
                flags,
                devnum: p.devnum.get(),
                domid: p.domid.get(),
                params,
                prt_devnum: p.prt_devnum.get(),
                req_timeout: p.req_timeout.get(),
                secondary,
                log_path,
                key,
            })
        }
        MsgType::Resume => {
            let p = params;
            let flags = OpenFlags(p.flags.get());
            let params = non_empty(cstring(&p.path, "params")?);
            let secondary = non_empty(cstring(&p.secondary, "secondary")?);
            let (log_path, _) = split_log_trailer(trailer, flags)?;
            Request::Resume(ResumeRequest {
                minor: cookie,
                flags,
                params,
                secondary,
                log_path,
            })
        }
        MsgType::XenblkifConnect => {
            let b = m.member::<wire::BlkifExt>()?;
            let order = b.blkif.order.get();
            if order > MAX_RING_ORDER {
                return Err(ControlError::invalid(format!("ring order {order}")));
            }
            let proto = BlkifProto::from_u32(b.blkif.proto.get())?;
            let mut gref = [0u32; MAX_RING_PAGES];
            let (c_grefs, ext_grefs) = gref.split_at_mut(BLKIF_C_GREFS);
            for (g, w) in c_grefs.iter_mut().zip(&b.blkif.gref) {
                *g = w.get();
            }
            if order == EXT_ORDER {
                for (g, w) in ext_grefs.iter_mut().zip(&b.gref_ext) {
                    *g = w.get();
                }
            }
            let queue = if b.mq_magic.get() == MQ_MAGIC {
                b.queue.get()
            } else {
                0
            };
            if queue >= MAX_QUEUES {
                return Err(ControlError::invalid(format!("queue {queue}")));
            }
            Request::XenblkifConnect {
                minor: cookie,
                blkif: Blkif {
                    domid: b.blkif.domid.get(),
                    devid: b.blkif.devid.get(),
                    gref,
                    order,
                    proto,
                    pool: cstring(&b.blkif.pool, "pool")?,
                    port: b.blkif.port.get(),
                    poll_duration: b.blkif.poll_duration.get(),
                    poll_idle_threshold: b.blkif.poll_idle_threshold.get(),
                    queue,
                },
            }
        }
        MsgType::XenblkifDisconnect => {
            let b = m.member::<wire::Blkif>()?;
            Request::XenblkifDisconnect {
                domid: b.domid.get(),
                devid: b.devid.get(),
            }
        }
        other => {
            return Err(ControlError::invalid(format!(
                "request type {} ({}) has no handler",
                other as u16,
                other.name()
            )))
        }
    };
    Ok(req)
}

fn split_log_trailer(trailer: &[u8], flags: OpenFlags) -> Result<(Option<String>, &[u8])> {
    if !flags.contains(OpenFlags::ADD_LOG) {
        return Ok((None, trailer));
    }
    if trailer.len() < STRING_LEN {
        return Err(ControlError::invalid("log path trailer truncated"));
    }
    let (field, rest) = trailer.split_at(STRING_LEN);
    let s = cstring(field, "log path")?;
    if s.is_empty() {
        return Err(ControlError::invalid("log path: empty"));
    }
    Ok((Some(s), rest))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn cstring(field: &[u8], what: &str) -> Result<String> {
    let Some(end) = field.iter().position(|&b| b == 0) else {
        return Err(ControlError::invalid(format!("{what}: not NUL-terminated")));
    };
    String::from_utf8(field[..end].to_vec())
        .map_err(|_| ControlError::invalid(format!("{what}: not UTF-8")))
}

/// Image geometry as OPEN_RSP and DISK_INFO_RSP carry it (`u.image`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DiskInfo {
    /// Size in sectors of `sector_size` bytes.
    pub sectors: u64,
    pub sector_size: u32,
    /// `VDISK_*` info bits (read-only = 0x4, cdrom = 0x1).
    pub info: u32,
}

/// One VBD of a LIST reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub minor: u16,
    pub state: VbdState,
    /// `"type:/path"`, or empty when the VBD has no image open.
    pub params: String,
}

/// What a handler answers. The server encodes it, echoing the request's cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// ERROR with this positive errno.
    Error(i32),
    /// PID_RSP.
    Pid(i32),
    /// ATTACH_RSP.
    Attach,
    /// OPEN_RSP with the image geometry.
    Open(DiskInfo),
    /// PAUSE_RSP.
    Pause,
    /// RESUME_RSP.
    Resume,
    /// CLOSE_RSP (for CLOSE and FORCE_SHUTDOWN).
    Close,
    /// DETACH_RSP.
    Detach,
    /// N LIST_RSP messages counting down, then the terminator.
    List(Vec<ListEntry>),
    /// STATS_RSP followed by these JSON bytes.
    Stats(Vec<u8>),
    /// XENBLKIF_CONNECT_RSP.
    XenblkifConnect,
    /// XENBLKIF_DISCONNECT_RSP.
    XenblkifDisconnect,
    /// DISK_INFO_RSP.
    DiskInfo(DiskInfo),
}

impl Reply {
    /// `Error` from a (positive or negative) errno; 0 maps to EIO.
    pub fn error(errno: i32) -> Reply {
        let e = errno.checked_abs().unwrap_or(libc::EIO);
        Reply::Error(if e == 0 { libc::EIO } else { e })
    }

    /// The wire type of the (first) reply message.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Reply::Error(_) => MsgType::Error,
            Reply::Pid(_) => MsgType::PidRsp,
            Reply::Attach => MsgType::AttachRsp,
            Reply::Open(_) => MsgType::OpenRsp,
            Reply::Pause => MsgType::PauseRsp,
            Reply::Resume => MsgType::ResumeRsp,
            Reply::Close => MsgType::CloseRsp,
            Reply::Detach => MsgType::DetachRsp,
            Reply::List(_) => MsgType::ListRsp,
            Reply::Stats(_) => MsgType::StatsRsp,
            Reply::XenblkifConnect => MsgType::XenblkifConnectRsp,
            Reply::XenblkifDisconnect => MsgType::XenblkifDisconnectRsp,
            Reply::DiskInfo(_) => MsgType::DiskInfoRsp,
        }
    }

    /// Write the reply (all its messages and payload) with `cookie` echoed.
    pub fn write_to<W: Write>(&self, w: &mut W, cookie: u16, layout: WireLayout) -> Result<()> {
        let wr = |w: &mut W, b: &[u8]| {
            w.write_all(b)
                .map_err(|e| ControlError::io("write reply", e))
        };
        let mut m = Msg::new(layout, self.msg_type(), cookie);
        match self {
            Reply::Error(e) => {
                let mut r = wire::Response::new_zeroed();
                r.error = (*e).into();
                m.set(&r);
            }
            Reply::Pid(p) => m.set(&wire::Pid { pid: (*p).into() }),
            Reply::Open(d) | Reply::DiskInfo(d) => m.set(&wire::Image {
                sectors: d.sectors.into(),
                sector_size: d.sector_size.into(),
                info: d.info.into(),
            }),
            Reply::List(entries) => {
                let n = entries.len();
                if n > i32::MAX as usize {
                    return Err(ControlError::invalid("list reply too long"));
                }
                for (i, e) in entries.iter().enumerate() {
                    let mut item = Msg::new(layout, MsgType::ListRsp, cookie);
                    let mut l = wire::List::new_zeroed();
                    // n - i <= n <= i32::MAX, checked above.
                    l.count = ((n - i) as i32).into();
                    l.minor = i32::from(e.minor).into();
                    l.state = e.state.0.into();
                    put_cstr(&mut l.path, &e.params, "list path")?;
                    item.set(&l);
                    wr(w, item.bytes())?;
                }
                let mut end = wire::List::new_zeroed();
                end.minor = (-1).into();
                m.set(&end);
            }
            Reply::Stats(payload) => {
                // Only `length` is set; `u.info.type` and `cookie` stay zero, as tapdisk
                // leaves them.
                let len = payload.len() as u64;
                if layout.size_t_len == 8 {
                    let mut i = wire::Info64::new_zeroed();
                    i.length = len.into();
                    m.set(&i);
                } else {
                    let len = u32::try_from(len)
                        .map_err(|_| ControlError::invalid("stats payload too long"))?;
                    let mut i = wire::Info32::new_zeroed();
                    i.length = len.into();
                    m.set(&i);
                }
                wr(w, m.bytes())?;
                return wr(w, payload);
            }
            Reply::Attach
            | Reply::Pause
            | Reply::Resume
            | Reply::Close
            | Reply::Detach
            | Reply::XenblkifConnect
            | Reply::XenblkifDisconnect => {}
        }
        wr(w, m.bytes())
    }

    /// Encode the reply into bytes (see [`Reply::write_to`]).
    pub fn encode_with(&self, cookie: u16, layout: WireLayout) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.write_to(&mut v, cookie, layout)?;
        Ok(v)
    }
}

/// One reply message, as a client sees it before assembling LIST and STATS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete single-message reply.
    Reply(Reply),
    /// A LIST_RSP: `entry` is `None` for the terminator (count 0).
    ListItem {
        count: i32,
        entry: Option<ListEntry>,
    },
    /// A STATS_RSP header: this many payload bytes follow.
    StatsHeader(u64),
}

/// Decode one reply message (exactly `layout.msg_size` bytes). Returns the cookie too.
pub fn decode_frame(buf: &[u8], layout: WireLayout) -> Result<(u16, Frame)> {
    if buf.len() != layout.msg_size {
        return Err(ControlError::invalid(format!(
            "reply: {} bytes, need {}",
            buf.len(),
            layout.msg_size
        )));
    }
    let m = MsgRef { buf, layout };
    let head = m.head()?;
    let (raw_type, cookie) = (head.ty.get(), head.cookie.get());
    let ty = MsgType::from_u16(raw_type).ok_or(ControlError::UnexpectedReply(raw_type))?;
    let image = || -> Result<DiskInfo> {
        let i = m.member::<wire::Image>()?;
        Ok(DiskInfo {
            sectors: i.sectors.get(),
            sector_size: i.sector_size.get(),
            info: i.info.get(),
        })
    };
    let frame = match ty {
        MsgType::Error => Frame::Reply(Reply::Error(m.member::<wire::Response>()?.error.get())),
        MsgType::PidRsp => Frame::Reply(Reply::Pid(m.member::<wire::Pid>()?.pid.get())),
        MsgType::AttachRsp => Frame::Reply(Reply::Attach),
        MsgType::OpenRsp => Frame::Reply(Reply::Open(image()?)),
        MsgType::PauseRsp => Frame::Reply(Reply::Pause),
        MsgType::ResumeRsp => Frame::Reply(Reply::Resume),
        MsgType::CloseRsp => Frame::Reply(Reply::Close),
        MsgType::DetachRsp => Frame::Reply(Reply::Detach),
        MsgType::XenblkifConnectRsp => Frame::Reply(Reply::XenblkifConnect),
        MsgType::XenblkifDisconnectRsp => Frame::Reply(Reply::XenblkifDisconnect),
        MsgType::DiskInfoRsp => Frame::Reply(Reply::DiskInfo(image()?)),
        MsgType::StatsRsp => Frame::StatsHeader(if layout.size_t_len == 8 {
            m.member::<wire::Info64>()?.length.get()
        } else {
            u64::from(m.member::<wire::Info32>()?.length.get())
        }),
        MsgType::ListRsp => {
            let l = m.member::<wire::List>()?;
            let count = l.count.get();
            if count < 0 {
                return Err(ControlError::invalid(format!("list count {count}")));
            }
            if count == 0 {
                Frame::ListItem { count, entry: None }
            } else {
                let minor = l.minor.get();
                let minor = u16::try_from(minor)
                    .map_err(|_| ControlError::invalid(format!("list minor {minor}")))?;
                Frame::ListItem {
                    count,
                    entry: Some(ListEntry {
                        minor,
                        state: VbdState(l.state.get()),
                        params: cstring(&l.path, "list path")?,
                    }),
                }
            }
        }
        other => return Err(ControlError::UnexpectedReply(other as u16)),
    };
    Ok((cookie, frame))
}

/// Read exactly `buf.len()` bytes; a clean EOF before the first byte or in the middle is
/// [`ControlError::Closed`], a timeout is [`ControlError::Timeout`].
pub fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(ControlError::Closed),
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return Err(ControlError::Timeout)
            }
            Err(e) => return Err(ControlError::io("read", e)),
        }
    }
    Ok(())
}

/// Read one whole reply (every LIST_RSP up to the terminator, or the STATS payload).
/// Returns the cookie of the first message and the assembled reply.
pub fn read_reply<R: Read>(r: &mut R, layout: WireLayout) -> Result<(u16, Reply)> {
    let mut buf = [0u8; MAX_MSG_SIZE];
    let buf = &mut buf[..layout.msg_size];
    read_full(r, buf)?;
    let (cookie, frame) = decode_frame(buf, layout)?;
    match frame {
        Frame::Reply(rep) => Ok((cookie, rep)),
        Frame::StatsHeader(len) => {
            if len > MAX_STATS_LEN {
                return Err(ControlError::invalid(format!("stats length {len}")));
            }
            // len <= 64 MiB fits usize on every target.
            let mut payload = vec![0u8; len as usize];
            read_full(r, &mut payload)?;
            Ok((cookie, Reply::Stats(payload)))
        }
        Frame::ListItem { count, entry } => {
            let mut entries = Vec::new();
            let mut count = count;
            let mut entry = entry;
            while let Some(e) = entry {
                entries.push(e);
                if entries.len() > MAX_LIST_ENTRIES {
                    return Err(ControlError::invalid("list reply too long"));
                }
                read_full(r, buf)?;
                match decode_frame(buf, layout)? {
                    (_, Frame::ListItem { count: c, entry: e }) => {
                        if c != 0 && c != count - 1 {
                            log::debug!("list reply count {c} after {count}");
                        }
                        count = c;
                        entry = e;
                    }
                    (_, Frame::Reply(Reply::Error(e))) => return Err(ControlError::Remote(e)),
                    (_, other) => {
                        return Err(ControlError::invalid(format!(
                            "list reply interrupted by {other:?}"
                        )))
                    }
                }
            }
            Ok((cookie, Reply::List(entries)))
        }
    }
}

/// Read one whole request (message plus trailers) from `r`. On error the cookie read so far
/// (0 if none) is returned with it so that the ERROR reply can echo it. The buffer holding a
/// key is zeroed on drop.
pub fn read_request<R: Read>(
    r: &mut R,
    layout: WireLayout,
) -> std::result::Result<(u16, Request), (u16, ControlError)> {
    let mut buf: Zeroizing<Vec<u8>> = Zeroizing::new(vec![0u8; layout.msg_size]);
    read_full(r, &mut buf).map_err(|e| (0, e))?;
    let cookie = peek_cookie(&buf);
    loop {
        match request_len(&buf, layout).map_err(|e| (cookie, e))? {
            Need::Exactly(n) if n == buf.len() => break,
            Need::Exactly(n) | Need::AtLeast(n) => {
                let have = buf.len();
                if n <= have {
                    return Err((cookie, ControlError::invalid("request length")));
                }
                // Grow without reallocating away from the zeroizing buffer: copy into a new
                // zeroizing buffer of the final size.
                let mut bigger: Zeroizing<Vec<u8>> = Zeroizing::new(vec![0u8; n]);
                bigger[..have].copy_from_slice(&buf);
                read_full(r, &mut bigger[have..]).map_err(|e| (cookie, e))?;
                buf = bigger;
            }
        }
    }
    decode_request(&buf, layout)
        .map(|req| (cookie, req))
        .map_err(|e| (cookie, e))
}

/// Split `"type:/path"` into its type and path (EINVAL without a `:` or with an empty part).
pub fn split_params(params: &str) -> Result<(&str, &str)> {
    match params.split_once(':') {
        Some((t, p)) if !t.is_empty() && !p.is_empty() => Ok((t, p)),
        _ => Err(ControlError::invalid(format!(
            "params {params:?} (expected type:/path)"
        ))),
    }
}

// ---- message access through the declared members ------------------------------------------

/// Store `s` NUL-terminated in a string field (the rest stays zero).
fn put_cstr(field: &mut [u8; STRING_LEN], s: &str, what: &str) -> Result<()> {
    let b = s.as_bytes();
    if b.len() >= STRING_LEN || b.contains(&0) {
        return Err(ControlError::invalid(format!(
            "{what}: longer than {} bytes or contains NUL",
            STRING_LEN - 1
        )));
    }
    field[..b.len()].copy_from_slice(b);
    Ok(())
}

/// A read-only view of one message (at least `layout.msg_size` bytes).
struct MsgRef<'a> {
    buf: &'a [u8],
    layout: WireLayout,
}

impl MsgRef<'_> {
    fn head(&self) -> Result<wire::Head> {
        wire::Head::read_from_prefix(self.buf)
            .map(|(h, _)| h)
            .map_err(|_| ControlError::invalid("message too short"))
    }

    /// The union read as member `T`.
    fn member<T: FromBytes + KnownLayout + Immutable>(&self) -> Result<T> {
        let u = self
            .buf
            .get(self.layout.union_offset..self.layout.msg_size)
            .unwrap_or_default();
        T::read_from_prefix(u)
            .map(|(t, _)| t)
            .map_err(|_| ControlError::invalid("message too short"))
    }
}

/// A message being built (zero-initialised).
struct Msg {
    buf: [u8; MAX_MSG_SIZE],
    layout: WireLayout,
}

impl Msg {
    fn new(layout: WireLayout, ty: MsgType, cookie: u16) -> Self {
        let mut m = Msg {
            buf: [0u8; MAX_MSG_SIZE],
            layout,
        };
        let head = wire::Head {
            ty: (ty as u16).into(),
            cookie: cookie.into(),
        };
        m.buf[..size_of::<wire::Head>()].copy_from_slice(head.as_bytes());
        m
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.layout.msg_size]
    }

    fn view(&self) -> MsgRef<'_> {
        MsgRef {
            buf: self.bytes(),
            layout: self.layout,
        }
    }

    /// Write member `T` at the start of the union (every member fits in every layout's
    /// union: asserted in [`wire`]).
    fn set<T: IntoBytes + Immutable>(&mut self, member: &T) {
        let b = member.as_bytes();
        let at = self.layout.union_offset;
        self.buf[at..at + b.len()].copy_from_slice(b);
    }
}

#[cfg(test)]
mod tests;
