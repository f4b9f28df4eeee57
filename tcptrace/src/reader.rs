//! Stage 2: drain the ring buffers as the kernel fills them. Each ring is
//! an `AsyncFd`: the task sleeps until the kernel signals data (epoll), takes
//! everything there is, then naps for [`NAP`] before it waits again.
//!
//! The nap is what keeps tracing cheap under load. The kernel signals a ring
//! when a record is submitted while the reader has caught up, and each signal
//! is an irq_work self-interrupt on the CPU running the traced code (in a VM,
//! an APIC write that exits to the hypervisor) plus a wakeup of this thread.
//! A reader that drains and immediately waits again has caught up after every
//! few records, so at 300,000 events/s that cost was paid tens of thousands
//! of times a second (a fifth of the host's CPU in `cargo xtask bench`).
//! Napping lets records pile up: one signal and one wakeup per nap.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::decode::{self, IfaceNames};
use crate::event::Event;
use crate::render::{self, Clock, Mode};

/// Events taken from a ring in one go, each with its output line. Lines
/// are rendered here, on the ring thread, because the other thread (which
/// matches, writes connections and does the write(2)s) is the one that falls
/// behind at saturation.
pub struct Batch {
    pub events: Vec<Event>,
    pub lines: Lines,
}

/// The output lines of a batch's events, back to back.
#[derive(Default)]
pub struct Lines {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Lines {
    /// Event `i`'s line; empty in modes that print no line per event.
    pub fn get(&self, i: usize) -> &[u8] {
        let Some(&end) = self.ends.get(i) else {
            return &[];
        };
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..end]
    }
}

/// Records the reader could not decode (a version mismatch or a bug): counted
/// and reported, never dropped silently.
#[derive(Default)]
pub struct ReaderStats {
    pub undecodable: AtomicU64,
}

pub async fn read_ring(
    ring: RingBuf<MapData>,
    names: Arc<IfaceNames>,
    (mode, clock): (Mode, Clock),
    stats: Arc<ReaderStats>,
    tx: mpsc::Sender<Batch>,
) -> Result<()> {
    // SAFETY: the AsyncFd owns the ring, so its fd outlives the registration.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? };
    loop {
        let mut guard = fd.readable_mut().await?;
        loop {
            let ring = guard.get_inner_mut();
            let mut batch = Vec::with_capacity(64);
            let mut lines = Lines::default();
            while batch.len() < MAX_BATCH {
                let Some(item) = ring.next() else { break };
                match decode::decode(&item, &names) {
                    Ok(ev) => {
                        if mode != Mode::Timeline {
                            render::write_event(&mut lines.bytes, mode, &ev, &clock)?;
                            lines.ends.push(lines.bytes.len());
                        }
                        batch.push(ev);
                    }
                    Err(e) => {
                        if stats.undecodable.fetch_add(1, Ordering::Relaxed) == 0 {
                            log::warn!("undecodable ring buffer record: {e}");
                        }
                    }
                }
            }
            let drained = batch.len() < MAX_BATCH;
            let batch = Batch {
                events: batch,
                lines,
            };
            if !batch.events.is_empty() && tx.send(batch).await.is_err() {
                return Ok(()); // the consumer is gone: we are shutting down
            }
            if drained {
                break;
            }
        }
        guard.clear_ready();
        tokio::time::sleep(NAP).await;
    }
}

/// How long the reader lets records pile up after draining a ring. Short
/// beside the matcher's hold-back (`REORDER_NS` in main.rs, 40 ms) and the time a
/// default ring takes to fill at saturation (4 MiB at ~600,000 events/s of
/// about 100 bytes: ~70 ms).
pub const NAP: std::time::Duration = std::time::Duration::from_millis(2);

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
