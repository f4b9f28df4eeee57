//! The live run's connection records and summary, written on a thread of
//! their own.
//!
//! Writing output is a good part of what tracing costs: every byte goes
//! into the page cache, and on a VM whose host takes back idle guest memory
//! a new page-cache page is a hypervisor fault (1-2 ns per byte measured on
//! the bench VM, against 0.2 where pages are warm). The main thread, which
//! matches, is the one that falls behind at saturation; with the write(2)s
//! here it only renders. Lines reach the writer whole, in order: a chunk is
//! handed over only between two writes, and every record is one write.
use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::priority::Threads;

/// Bytes collected before they are handed to the writer.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight to the writer; past that, writes wait (as a full
/// `BufWriter` would).
const QUEUED: usize = 64;
/// Emptied chunks kept for reuse (a fresh one is fresh pages, each a page
/// fault).
const SPARE: usize = 4;

pub struct Output {
    buf: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
    spare: Receiver<Vec<u8>>,
    writer: Option<JoinHandle<io::Result<()>>>,
}

impl Output {
    /// Starts the writer thread, writing to stdout.
    pub fn stdout(threads: Arc<Threads>) -> io::Result<Output> {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUED);
        let (spare_tx, spare) = sync_channel::<Vec<u8>>(SPARE);
        let writer = std::thread::Builder::new()
            .name("tcptrace-out".into())
            .spawn(move || -> io::Result<()> {
                threads.join();
                let mut out = io::stdout();
                for mut chunk in rx {
                    out.write_all(&chunk)?;
                    chunk.clear();
                    let _ = spare_tx.try_send(chunk);
                }
                out.flush()
            })?;
        Ok(Output {
            buf: Vec::with_capacity(CHUNK),
            tx: Some(tx),
            spare,
            writer: Some(writer),
        })
    }

    /// Hands what is collected to the writer.
    fn hand_over(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = (self.spare.try_recv()).unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        let chunk = std::mem::replace(&mut self.buf, next);
        let sent = self.tx.as_ref().map(|tx| tx.send(chunk));
        match sent {
            Some(Ok(())) => Ok(()),
            // The writer stopped: its error says why.
            _ => Err(self
                .close()
                .err()
                .unwrap_or_else(|| io::Error::other("output closed"))),
        }
    }

    /// Ends the writer and waits for it; its error, if it had one.
    fn close(&mut self) -> io::Result<()> {
        drop(self.tx.take());
        match self.writer.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(io::Error::other("the output thread panicked")),
        }
    }

    /// Writes out everything and waits until it is written.
    pub fn finish(mut self) -> io::Result<()> {
        self.hand_over()?;
        self.close()
    }
}

impl Write for Output {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        // Handed over before, not after: a chunk never ends inside a write.
        if self.buf.len() >= CHUNK {
            self.hand_over()?;
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    /// Hands over what is collected; does not wait for the write(2).
    fn flush(&mut self) -> io::Result<()> {
        self.hand_over()
    }
}

impl Drop for Output {
    /// Without `finish` (an error elsewhere ended the run), what is
    /// collected is still written.
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = self.hand_over();
            let _ = self.close();
        }
    }
}
