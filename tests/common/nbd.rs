//! Kernel NBD drivers for tests.

use std::sync::Arc;

use blktap3::nbd::kernel::{KernelNbd, SimKernelNbd};

/// A kernel NBD driver from before the backend identifier (Linux < 5.14, e.g. OpenXT 8's
/// 4.14): it connects and disconnects, but no device reports a backend.
#[derive(Debug)]
pub struct NoBackendKernel(pub Arc<SimKernelNbd>);

impl KernelNbd for NoBackendKernel {
    fn connect(
        &self,
        sock: std::os::fd::BorrowedFd<'_>,
        cfg: &blktap3::nbd::kernel::ConnectConfig<'_>,
    ) -> blktap3::nbd::kernel::Result<u32> {
        self.0.connect(sock, cfg)
    }
    fn disconnect(&self, index: u32) -> blktap3::nbd::kernel::Result<()> {
        self.0.disconnect(index)
    }
    fn devices(&self) -> Vec<(u32, String)> {
        Vec::new()
    }
}
