//! Xenbus vocabulary for blkif: device states, xenstore key names and the parsing of the values
//! a frontend writes (ring refs, page order, event channel, protocol).

use super::abi::{Abi, MAX_RING_PAGE_ORDER};

/// `enum xenbus_state` (`io/xenbus.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// From the integer value.
    pub fn from_u32(v: u32) -> Option<XenbusState> {
        use XenbusState::*;
        Some(match v {
            0 => Unknown,
            1 => Initialising,
            2 => InitWait,
            3 => Initialised,
            4 => Connected,
            5 => Closing,
            6 => Closed,
            7 => Reconfiguring,
            8 => Reconfigured,
            _ => return None,
        })
    }

    /// Parse a xenstore `state` value (decimal, surrounding whitespace and a trailing NUL
    /// tolerated).
    pub fn parse(s: &str) -> Result<XenbusState, XenbusError> {
        let v: u32 = parse_uint(s)?;
        XenbusState::from_u32(v).ok_or_else(|| XenbusError::BadValue(s.to_owned()))
    }

    /// The value to write (`"4"`, ...).
    pub fn as_str(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }
}

/// xenstore key names used by blkfront/blkback (relative to the device directory).
pub mod keys {
    pub const STATE: &str = "state";
    pub const FRONTEND: &str = "frontend";
    pub const FRONTEND_ID: &str = "frontend-id";
    pub const BACKEND: &str = "backend";
    pub const BACKEND_ID: &str = "backend-id";
    pub const RING_REF: &str = "ring-ref";
    pub const RING_PAGE_ORDER: &str = "ring-page-order";
    pub const MAX_RING_PAGE_ORDER: &str = "max-ring-page-order";
    pub const EVENT_CHANNEL: &str = "event-channel";
    /// Backend: how many queues (rings) a frontend may use.
    pub const MULTI_QUEUE_MAX_QUEUES: &str = "multi-queue-max-queues";
    /// Frontend: how many it uses (absent = 1, keys at the top level).
    pub const MULTI_QUEUE_NUM_QUEUES: &str = "multi-queue-num-queues";
    pub const PROTOCOL: &str = "protocol";
    pub const FEATURE_BARRIER: &str = "feature-barrier";
    pub const FEATURE_FLUSH_CACHE: &str = "feature-flush-cache";
    pub const FEATURE_DISCARD: &str = "feature-discard";
    pub const FEATURE_PERSISTENT: &str = "feature-persistent";
    pub const FEATURE_MAX_INDIRECT_SEGMENTS: &str = "feature-max-indirect-segments";
    pub const DISCARD_GRANULARITY: &str = "discard-granularity";
    pub const DISCARD_ALIGNMENT: &str = "discard-alignment";
    pub const SECTORS: &str = "sectors";
    pub const SECTOR_SIZE: &str = "sector-size";
    pub const PHYSICAL_SECTOR_SIZE: &str = "physical-sector-size";
    pub const INFO: &str = "info";
    pub const MODE: &str = "mode";
    pub const DEVICE_TYPE: &str = "device-type";
    pub const VIRTUAL_DEVICE: &str = "virtual-device";
    pub const HOTPLUG_STATUS: &str = "hotplug-status";
}

/// `info` bits (`VDISK_*`).
pub mod vdisk {
    pub const CDROM: u32 = 0x1;
    pub const REMOVABLE: u32 = 0x2;
    pub const READONLY: u32 = 0x4;
}

/// Bad xenstore values from a frontend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XenbusError {
    /// Not a decimal number in range.
    #[error("bad value {0:?}")]
    BadValue(String),
    /// `protocol` names an ABI we do not serve.
    #[error("unknown protocol {0:?}")]
    UnknownProtocol(String),
    /// `ring-page-order` beyond what the backend advertised.
    #[error("ring page order {order} exceeds the maximum {max}")]
    OrderTooLarge { order: u32, max: u32 },
}

/// Parse a decimal xenstore value (`%u`): surrounding ASCII whitespace and trailing NULs are
/// ignored, anything else (sign, hex, empty, overflow) is an error.
pub fn parse_uint<T: std::str::FromStr>(s: &str) -> Result<T, XenbusError> {
    let t = s.trim_end_matches('\0').trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(XenbusError::BadValue(s.to_owned()));
    }
    t.parse().map_err(|_| XenbusError::BadValue(s.to_owned()))
}

/// The ABI named by the frontend's `protocol` key. A missing (or empty) key means the
/// backend's native ABI, as in blkback (the C tapback defaults to x86_32 instead: see the
/// reference, §5.2). `"x86_32-abi"` and `"x86_64-abi"` select those layouts.
pub fn parse_protocol(value: Option<&str>) -> Result<Abi, XenbusError> {
    let v = match value {
        None => return Ok(Abi::NATIVE),
        Some(v) => v.trim_end_matches('\0').trim(),
    };
    match v {
        "" => Ok(Abi::NATIVE),
        "x86_32-abi" => Ok(Abi::X86_32),
        "x86_64-abi" => Ok(Abi::X86_64),
        other => Err(XenbusError::UnknownProtocol(other.to_owned())),
    }
}

/// The ring-page order to use given the frontend's `ring-page-order` (absent = 0) and the
/// `max-ring-page-order` the backend advertised (clamped to what this crate supports).
pub fn negotiate_ring_order(frontend: Option<&str>, backend_max: u32) -> Result<u32, XenbusError> {
    let order = match frontend {
        None => 0,
        Some(v) => parse_uint::<u32>(v)?,
    };
    let max = backend_max.min(MAX_RING_PAGE_ORDER);
    if order > max {
        return Err(XenbusError::OrderTooLarge { order, max });
    }
    Ok(order)
}

/// Frontend side: the order to use given the backend's `max-ring-page-order` (absent = 0) and
/// the frontend's own limit.
pub fn frontend_ring_order(backend_max: Option<&str>, frontend_max: u32) -> u32 {
    let b = backend_max
        .and_then(|v| parse_uint::<u32>(v).ok())
        .unwrap_or(0);
    b.min(frontend_max).min(MAX_RING_PAGE_ORDER)
}

/// The frontend subdirectory of queue `q` when `num_queues` > 1 (`queue-<q>/`), else the
/// top level (`""`): where that queue's `ring-ref*` and `event-channel` are.
pub fn queue_prefix(num_queues: u32, q: u32) -> String {
    if num_queues > 1 {
        format!("queue-{q}/")
    } else {
        String::new()
    }
}

/// Key holding grant ref `i` of a ring of `2^order` pages: `ring-ref` for a single page,
/// `ring-ref0`..`ring-ref{n-1}` otherwise.
pub fn ring_ref_key(order: u32, i: u32) -> String {
    if order == 0 {
        keys::RING_REF.to_owned()
    } else {
        format!("{}{}", keys::RING_REF, i)
    }
}
