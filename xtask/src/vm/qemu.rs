//! Boots the guest, streams its console and reads the outcome from the
//! markers `/init` prints.
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::initramfs::MARK;
use super::Kernel;

/// Console lines quoted in errors.
const TAIL: usize = 40;

pub fn run(k: &Kernel, initrd: &Path, log: &Path, timeout: Duration) -> Result<String> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2G",
    ])
    // No default NIC, VGA, floppy or monitor: less to emulate, nothing on stdio but the console.
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&k.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    // panic=-1 turns a panic into a reboot, which -no-reboot turns into
    // an exit; loglevel=5 keeps kernel warnings but not the boot chatter;
    // mitigations only slow the emulation down.
    .args([
        "-append",
        "console=ttyS0 panic=-1 loglevel=5 mitigations=off rdinit=/init",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let shown = format!("{qemu:?}");
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;

    let (tx, rx) = mpsc::channel::<String>();
    let mut stdout = child.stdout.take().context("qemu stdout")?;
    std::thread::spawn(move || {
        let mut r = BufReader::new(&mut stdout);
        let mut buf = Vec::new();
        // A partial last line is sent too: libtest prints `test NAME ... `
        // before running a test and the rest after, so in a hung guest it
        // names the culprit.
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            buf.clear();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().context("qemu stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let mut log = std::io::BufWriter::new(
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?,
    );
    let prefix = format!("[vm {}] ", k.short());
    let mut out = std::io::stdout();
    let mut tail = VecDeque::with_capacity(TAIL);
    let mut all = String::new();
    let mut booted = None;
    let mut timed_out = false;
    let mut killed_at: Option<Instant> = None;
    let mut done_at: Option<Instant> = None;
    loop {
        let left = match (killed_at, done_at) {
            // After the kill, only the lines still in the pipe.
            (Some(at), _) => Duration::from_secs(2).saturating_sub(at.elapsed()),
            // The results are in; a guest that fails to power off costs
            // half a minute, not the whole timeout.
            (None, Some(at)) => Duration::from_secs(30).saturating_sub(at.elapsed()),
            (None, None) => timeout.saturating_sub(started.elapsed()),
        };
        match rx.recv_timeout(left) {
            Ok(line) => {
                if done_at.is_none() && line.contains(&format!("{MARK} done ")) {
                    done_at = Some(Instant::now());
                }
                let _ = writeln!(out, "{prefix}{line}");
                let _ = writeln!(log, "{line}");
                if booted.is_none() && line.contains(MARK) {
                    booted = Some(started.elapsed());
                }
                if tail.len() == TAIL {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) if killed_at.is_none() => {
                match done_at {
                    Some(_) => eprintln!(
                        "xtask: vm {}: the guest did not power off; killing it",
                        k.label()
                    ),
                    None => timed_out = true,
                }
                killed_at = Some(Instant::now());
                let _ = child.kill();
            }
            Err(_) => break,
        }
    }
    let exit = child.wait().context("waiting for qemu")?;
    let _ = log.flush();
    let elapsed = started.elapsed();
    let qemu_err = stderr.join().unwrap_or_default();
    eprintln!(
        "xtask: vm {}: guest ran {:.1}s{}",
        k.label(),
        elapsed.as_secs_f64(),
        booted
            .map(|b| format!(" (userspace up after {:.1}s)", b.as_secs_f64()))
            .unwrap_or_default()
    );

    let outcome = Outcome::parse(&all);
    let (passed, failed) = crate::count_results(&all);
    let counts = format!("{passed} passed, {failed} failed");
    let tail: Vec<String> = tail.into_iter().collect();
    let tail = tail.join("\n");
    let why = if timed_out {
        let during = outcome
            .unfinished
            .as_deref()
            .map(|t| format!(" in {t}"))
            .unwrap_or_default();
        Some(format!(
            "the guest was still running{during} after {}s and was killed (TCPTRACE_VM_TIMEOUT raises the limit)",
            timeout.as_secs()
        ))
    } else if outcome.done.is_none() {
        let qemu_err = qemu_err.trim();
        Some(if qemu_err.is_empty() {
            format!("the guest stopped before the tests finished (kernel panic?); qemu {exit}")
        } else {
            format!("qemu {exit}: {qemu_err}")
        })
    } else if !outcome.preflight.is_empty() {
        Some(format!(
            "the kernel does not suit the tests: {}",
            outcome.preflight.join("; ")
        ))
    } else if !outcome.failed_bins.is_empty() || outcome.done != Some(0) {
        let bins: Vec<String> = outcome
            .failed_bins
            .iter()
            .map(|(n, rc)| format!("{n} exited {rc}"))
            .collect();
        Some(bins.join(", "))
    } else {
        outcome
            .unfinished
            .map(|bin| format!("{bin} never finished"))
    };
    match why {
        Some(why) => bail!("{counts}: {why}\nlast console lines:\n{tail}"),
        None => Ok(counts),
    }
}

/// What `/init`'s markers say.
#[derive(Default, Debug)]
struct Outcome {
    /// `done STATUS`: the guest got through every test executable.
    done: Option<i32>,
    preflight: Vec<String>,
    failed_bins: Vec<(String, i32)>,
    /// A `begin` without its `end`.
    unfinished: Option<String>,
}

impl Outcome {
    fn parse(console: &str) -> Outcome {
        let mut o = Outcome::default();
        for line in console.lines() {
            // Kernel messages may share the line; the marker is what counts.
            let Some(at) = line.find(MARK) else { continue };
            let rest = line[at + MARK.len()..].trim();
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                ["begin", name] => o.unfinished = Some(name.to_string()),
                ["end", name, rc] => {
                    o.unfinished = None;
                    let rc = rc.parse().unwrap_or(-1);
                    if rc != 0 {
                        o.failed_bins.push((name.to_string(), rc));
                    }
                }
                ["done", status] => o.done = Some(status.parse().unwrap_or(-1)),
                _ => {
                    if let Some(what) = rest.strip_prefix("preflight failed:") {
                        o.preflight.push(what.trim().to_string());
                    }
                }
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_markers() {
        let o = Outcome::parse(&format!(
            "{MARK} preflight failed: veth pair\n{MARK} begin a\n{MARK} end a 0\n{MARK} begin b\n\
             [ 1.0] oops {MARK} end b 101\n{MARK} begin c\n{MARK} done 1\n"
        ));
        assert_eq!(o.done, Some(1));
        assert_eq!(o.preflight, ["veth pair"]);
        assert_eq!(o.failed_bins, [("b".to_string(), 101)]);
        assert_eq!(o.unfinished.as_deref(), Some("c"));
    }
}
