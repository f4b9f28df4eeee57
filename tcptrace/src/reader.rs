//! Stage 2: drain the ring buffers as the kernel fills them. Each ring is
//! an `AsyncFd`: the task sleeps until the kernel signals data (epoll), then
//! takes everything there is in one batch.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::decode::{self, IfaceNames};
use crate::event::Event;

/// Records the reader could not decode (a version mismatch or a bug): counted
/// and reported, never dropped silently.
#[derive(Default)]
pub struct ReaderStats {
    pub undecodable: AtomicU64,
}

pub async fn read_ring(
    ring: RingBuf<MapData>,
    names: Arc<IfaceNames>,
    stats: Arc<ReaderStats>,
    tx: mpsc::Sender<Vec<Event>>,
) -> Result<()> {
    // SAFETY: the AsyncFd owns the ring, so its fd outlives the registration.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? };
    loop {
        let mut guard = fd.readable_mut().await?;
        loop {
            let ring = guard.get_inner_mut();
            let mut batch = Vec::with_capacity(64);
            while batch.len() < MAX_BATCH {
                let Some(item) = ring.next() else { break };
                match decode::decode(&item, &names) {
                    Ok(ev) => batch.push(ev),
                    Err(e) => {
                        if stats.undecodable.fetch_add(1, Ordering::Relaxed) == 0 {
                            log::warn!("undecodable ring buffer record: {e}");
                        }
                    }
                }
            }
            let drained = batch.len() < MAX_BATCH;
            if !batch.is_empty() && tx.send(batch).await.is_err() {
                return Ok(()); // the consumer is gone: we are shutting down
            }
            if drained {
                break;
            }
        }
        guard.clear_ready();
    }
}

/// Events per batch: a full ring is taken in several, so that the queue to
/// the matcher is bounded in events, not only in batches.
pub const MAX_BATCH: usize = 1024;

/// Forwards the eBPF programs' aya-log records to the `log` crate (RUST_LOG).
pub async fn forward_logs(logger: crate::bpf::Logger) -> Result<()> {
    // SAFETY: the AsyncFd owns the logger, so its fd outlives the registration.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)? };
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
