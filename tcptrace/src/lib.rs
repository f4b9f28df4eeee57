//! tcptrace: the Linux TCP state machine, step by step, next to the segments
//! that drive it.
//!
//! The data's path, one module per stage:
//! - [`bpf`]: load the eBPF object and attach it (tracepoint, fexit, TC),
//!   with [`netns`] and [`btf`] as its helpers.
//! - [`reader`]: drain the ring buffer(s) without busy polling; each event's
//!   output line is rendered there too, off the matcher's thread.
//! - [`decode`]: kernel records (`tcptrace-common`) → [`event::Event`].
//! - [`pcap`]: capture files → [`event::Event`] (no root needed).
//! - [`matcher`]: events → one explained record per connection (pure; this is
//!   where a segment becomes a timeline step).
//! - [`render`] and [`timeline`]: lines, JSON and timelines for people and scripts;
//!   [`output`] writes a live run's records on a thread of its own; [`text`]
//!   assembles numbers and explanations without `fmt`.
//! - [`priority`]: a live run's threads take only CPU time the traced
//!   workload leaves idle, unless they fall behind.
//! - [`tally`]: what a run's connection records add up to, for its closing
//!   summary.
pub mod bpf;
pub mod btf;
pub mod decode;
pub mod demo;
pub mod event;
pub mod matcher;
pub mod netns;
pub mod output;
pub mod pcap;
pub mod priority;
pub mod reader;
pub mod render;
pub mod tally;
pub mod text;
pub mod timeline;
