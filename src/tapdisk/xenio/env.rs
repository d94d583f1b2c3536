//! The rings' environment: the Xen interfaces one tapdisk uses (an event-channel handle,
//! grant copy, grant mapping of ring pages), the real devices and (with feature `sim`, for
//! tests and benchmarks) the simulated ones.

use std::io;
use std::sync::Arc;

use crate::blkif::SharedMem;
use crate::xen::evtchn::EvtchnDev;
use crate::xen::gntdev::GntDev;
#[cfg(any(test, feature = "sim"))]
use crate::xen::sim::{SimEvtchn, SimGrants, SimXen};
use crate::xen::{DomId, EventChannel, GrantCopier, GrantMapper, GrantRef};

/// Shared ring memory as the data path holds it.
pub type RingMem = Arc<dyn SharedMem + Send + Sync>;

/// The Xen interfaces one tapdisk context uses: an event-channel handle, grant copy and
/// grant mapping of ring pages.
pub trait XenEnv: Send {
    fn evtchn(&self) -> &dyn EventChannel;
    fn grants(&self) -> &dyn GrantCopier;
    /// Map `refs` of `dom` read-write and contiguously.
    fn map_ring(&self, dom: DomId, refs: &[GrantRef]) -> io::Result<RingMem>;
}

/// Opens a [`XenEnv`] (at the first CONNECT).
pub trait XenOpener: Send + Sync + std::fmt::Debug {
    fn open(&self) -> io::Result<Box<dyn XenEnv>>;
}

/// The real devices: `/dev/xen/gntdev` and `/dev/xen/evtchn`.
#[derive(Debug)]
pub struct DevXen {
    gnt: GntDev,
    evt: EvtchnDev,
}

impl XenEnv for DevXen {
    fn evtchn(&self) -> &dyn EventChannel {
        &self.evt
    }
    fn grants(&self) -> &dyn GrantCopier {
        &self.gnt
    }
    fn map_ring(&self, dom: DomId, refs: &[GrantRef]) -> io::Result<RingMem> {
        Ok(Arc::new(self.gnt.map(dom, refs, true)?))
    }
}

/// Opens [`DevXen`] (the daemon's default).
#[derive(Debug, Default)]
pub struct DevXenOpener;

impl XenOpener for DevXenOpener {
    fn open(&self) -> io::Result<Box<dyn XenEnv>> {
        Ok(Box::new(DevXen {
            gnt: GntDev::open()?,
            evt: EvtchnDev::open()?,
        }))
    }
}

/// A backend domain on a [`SimXen`] (tests, benchmarks; feature `sim`).
#[cfg(any(test, feature = "sim"))]
#[derive(Debug)]
pub struct SimXenEnv {
    grants: SimGrants,
    evt: SimEvtchn,
}

#[cfg(any(test, feature = "sim"))]
impl XenEnv for SimXenEnv {
    fn evtchn(&self) -> &dyn EventChannel {
        &self.evt
    }
    fn grants(&self) -> &dyn GrantCopier {
        &self.grants
    }
    fn map_ring(&self, dom: DomId, refs: &[GrantRef]) -> io::Result<RingMem> {
        Ok(Arc::new(self.grants.map(dom, refs, true)?))
    }
}

/// Opens [`SimXenEnv`] for backend domain `dom` of `xen` (feature `sim`).
#[cfg(any(test, feature = "sim"))]
#[derive(Debug, Clone)]
pub struct SimXenOpener {
    pub xen: SimXen,
    pub dom: DomId,
}

#[cfg(any(test, feature = "sim"))]
impl XenOpener for SimXenOpener {
    fn open(&self) -> io::Result<Box<dyn XenEnv>> {
        Ok(Box::new(SimXenEnv {
            grants: self.xen.grants(self.dom),
            evt: self.xen.evtchn(self.dom)?,
        }))
    }
}
