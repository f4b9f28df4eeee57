//! Child processes for the bench: the load generator, the tracers and the
//! capture-file runs, with their CPU time from wait4(2)'s rusage and their
//! peak RSS from their own /proc status (`VmHWM`): rusage's `ru_maxrss`
//! also counts the mm a child had before exec, a copy of the bench's own,
//! so it never reads below the bench's size at the spawn.
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::json;

/// The load generator, speaking its JSON Lines protocol.
pub struct Storm {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub port: u16,
}

impl Storm {
    /// Starts `tcpstorm --wait ARGS` and reads its ready line.
    pub fn start(bin: &Path, args: &[String]) -> Result<Storm> {
        let mut child = Command::new(bin)
            .arg("--wait")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut s = Storm {
            child,
            stdin,
            stdout,
            port: 0,
        };
        let ready = s.expect("ready")?;
        s.port = json::field_u64(&ready, "port").context("ready line without port")? as u16;
        Ok(s)
    }

    pub fn go(&mut self) -> Result<()> {
        writeln!(self.stdin, "go")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Reads lines until one of `{"type":"<what>"…}` and returns it.
    pub fn expect(&mut self, what: &str) -> Result<String> {
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line)? == 0 {
                let st = self.child.wait()?;
                bail!("tcpstorm exited ({st}) before saying {what:?}");
            }
            if json::field_str(&line, "type") == Some(what) {
                return Ok(line);
            }
        }
    }

    pub fn finish(mut self) -> Result<()> {
        drop(self.stdin);
        let st = self.child.wait()?;
        if !st.success() {
            bail!("tcpstorm failed ({st})");
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcptrace,
    Tcpstates,
}

/// A tracer writing its output to a file, as a user would run it.
pub struct Tracer {
    pub pid: i32,
    _child: Child, // never waited through std: wait4 below reaps it
    pub out: PathBuf,
    pub err: PathBuf,
    reaped: bool,
}

pub struct Usage {
    pub cpu_s: f64,
    pub user_s: f64,
    pub sys_s: f64,
    /// The highest `VmHWM` read while the child ran: its peak RSS but for
    /// growth in its last few milliseconds. None for a child that exited
    /// before it could be read (its exit status says why).
    pub maxrss_kb: Option<u64>,
    pub exit_ok: bool,
}

impl Usage {
    /// From wait4(2)'s status and rusage, and the peak RSS the caller read.
    fn of(status: i32, ru: &libc::rusage, peak: &PeakRss) -> Usage {
        let (user_s, sys_s) = times_s(ru);
        Usage {
            cpu_s: user_s + sys_s,
            user_s,
            sys_s,
            maxrss_kb: peak.kb,
            exit_ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        }
    }
}

/// A running child's peak RSS: `VmHWM` (the high-water mark of the mm it got
/// at exec), read while it runs; the last read before it exits is the peak.
/// (`spawn` returns once the child has exec'd, and its pid is ours until we
/// reap it.)
struct PeakRss {
    pid: i32,
    kb: Option<u64>,
}

impl PeakRss {
    fn new(pid: i32) -> PeakRss {
        PeakRss { pid, kb: None }
    }

    /// Reads it again (nothing once the child has exited).
    fn sample(&mut self) {
        if let Some(kb) = status_kb(self.pid, "VmHWM:") {
            self.kb = Some(self.kb.map_or(kb, |k| k.max(kb)));
        }
    }
}

/// A `kB` field of /proc/PID/status.
fn status_kb(pid: i32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with(field))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// An rusage's user and sys time, in seconds.
fn times_s(ru: &libc::rusage) -> (f64, f64) {
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// The whole machine's CPU time so far, from the first line of /proc/stat
/// (in clock ticks, all CPUs together).
#[derive(Clone, Copy, Default)]
pub struct MachineCpu {
    pub total: u64,
    /// idle + iowait.
    pub idle: u64,
    pub softirq: u64,
}

impl MachineCpu {
    pub fn now() -> MachineCpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = (stat.lines().next().unwrap_or(""))
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        MachineCpu {
            // user nice system idle iowait irq softirq steal (guest time is
            // already in user)
            total: (0..8).map(at).sum(),
            idle: at(3) + at(4),
            softirq: at(6),
        }
    }

    /// Shares of the machine's CPU time (0..1) from `self` until `later`:
    /// idle and softirq, or None when no time passed.
    pub fn shares(&self, later: &MachineCpu) -> Option<(f64, f64)> {
        let total = later.total.checked_sub(self.total).filter(|t| *t > 0)? as f64;
        Some((
            later.idle.saturating_sub(self.idle) as f64 / total,
            later.softirq.saturating_sub(self.softirq) as f64 / total,
        ))
    }
}

/// The calling thread's user+sys CPU time so far, in seconds.
pub fn thread_cpu_s() -> f64 {
    // SAFETY: getrusage with a valid out pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let (user, sys) = times_s(&ru);
    user + sys
}

/// Runs `bin ARGS` to its end, stdout and stderr into files, and returns its
/// CPU time (wait4(2): the child's own, not ours) and peak RSS.
pub fn run_to_end(bin: &Path, args: &[&str], out: &Path, err: &Path) -> Result<Usage> {
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(out)?)
        .stderr(File::create(err)?)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id() as i32;
    let mut peak = PeakRss::new(pid);
    let mut st = 0;
    // SAFETY: zeroed rusage is a valid out buffer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        peak.sample();
        // SAFETY: valid out pointers; reaps our own child, which std never waits for.
        match unsafe { libc::wait4(pid, &mut st, libc::WNOHANG, &mut ru) } {
            r if r == pid => break,
            r if r < 0 => bail!("wait4: {}", std::io::Error::last_os_error()),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    Ok(Usage::of(st, &ru, &peak))
}

pub fn cpus_online() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).max(1) as usize
}

fn fd_links(pid: i32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            if let Ok(l) = std::fs::read_link(e.path()) {
                v.push((
                    e.file_name().to_string_lossy().into_owned(),
                    l.to_string_lossy().into_owned(),
                ));
            }
        }
    }
    v
}

impl Tracer {
    pub fn start(
        kind: Kind,
        bin: &Path,
        args: &[String],
        out: PathBuf,
        err: PathBuf,
    ) -> Result<Tracer> {
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut t = Tracer {
            pid: child.id() as i32,
            _child: child,
            out,
            err,
            reaped: false,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if t.exited_early() {
                bail!(
                    "{} exited before it was tracing: {}",
                    bin.display(),
                    std::fs::read_to_string(&t.err).unwrap_or_default().trim()
                );
            }
            let ready = match kind {
                // It says so on stderr once every program is attached.
                Kind::Tcptrace => std::fs::read_to_string(&t.err)
                    .unwrap_or_default()
                    .contains("tcptrace: tracing"),
                // libbpf-tools print their header to a (buffered) file only at
                // exit; wait for the tracepoint's and the perf buffer's
                // per-CPU perf events instead.
                Kind::Tcpstates => {
                    let n = fd_links(t.pid)
                        .iter()
                        .filter(|(_, l)| l.contains("[perf_event]"))
                        .count();
                    if n > cpus_online() {
                        std::thread::sleep(Duration::from_millis(300));
                        true
                    } else {
                        false
                    }
                }
            };
            if ready {
                return Ok(t);
            }
            if Instant::now() > deadline {
                t.kill();
                bail!("{} not tracing after 30 s", bin.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn exited_early(&mut self) -> bool {
        let mut st = 0;
        // SAFETY: our own child; WNOHANG.
        let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
        if r == self.pid {
            self.reaped = true;
        }
        self.reaped
    }

    /// Current resident set size (kB).
    pub fn rss_kb(&self) -> Option<u64> {
        status_kb(self.pid, "VmRSS:")
    }

    /// Waits until the output file has not grown for `quiet` (the tracer
    /// has caught up), at most `max`; returns how long it kept growing.
    pub fn wait_quiet(&self, quiet: Duration, max: Duration) -> f64 {
        let t0 = Instant::now();
        let mut last = u64::MAX;
        let mut last_change = t0;
        loop {
            let len = std::fs::metadata(&self.out).map(|m| m.len()).unwrap_or(0);
            let now = Instant::now();
            if len != last {
                last = len;
                last_change = now;
            } else if now - last_change >= quiet || now - t0 >= max {
                return (last_change - t0).as_secs_f64();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGINT, then reaps it with wait4 for its rusage (SIGKILL after 60 s).
    pub fn stop(mut self) -> Result<Usage> {
        if self.reaped {
            bail!("tracer {} already exited", self.pid);
        }
        let mut peak = PeakRss::new(self.pid);
        peak.sample();
        // SAFETY: signalling and reaping our own child.
        unsafe { libc::kill(self.pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut st = 0;
        // SAFETY: zeroed rusage is a valid out buffer.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            peak.sample();
            // SAFETY: valid out pointers, our own child.
            let r = unsafe { libc::wait4(self.pid, &mut st, libc::WNOHANG, &mut ru) };
            if r == self.pid {
                break;
            }
            if r < 0 {
                bail!("wait4: {}", std::io::Error::last_os_error());
            }
            if Instant::now() > deadline {
                // SAFETY: as above.
                unsafe {
                    libc::kill(self.pid, libc::SIGKILL);
                    libc::wait4(self.pid, &mut st, 0, &mut ru);
                }
                self.reaped = true;
                bail!("tracer {} ignored SIGINT for 60 s; killed", self.pid);
            }
            // Often enough that what the drain allocates last is seen.
            std::thread::sleep(Duration::from_millis(2));
        }
        self.reaped = true;
        Ok(Usage::of(st, &ru, &peak))
    }

    pub fn kill(&mut self) {
        if !self.reaped {
            let mut st = 0;
            // SAFETY: our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, &mut st, 0);
            }
            self.reaped = true;
        }
    }

    /// Program runs the kernel skipped because another BPF program was
    /// already running on that CPU (e.g. a softirq state change while a
    /// process-context one is being traced): `recursion_misses`, summed over
    /// the tracer's programs. These events are gone without a trace.
    /// Programs whose name says "accept" (tcptrace's owner hooks) emit no
    /// events, so their misses are left out.
    pub fn prog_misses(&self) -> u64 {
        self.prog_fdinfos()
            .iter()
            .map(|info| (info.field("recursion_misses:"), info))
            .filter(|(misses, info)| *misses > 0 && !info.name().contains("accept"))
            .map(|(misses, _)| misses)
            .sum()
    }

    /// The tracer's programs as the kernel counts them while
    /// `kernel.bpf_stats_enabled` is 1: (name, runs, total run time ns,
    /// program type) of those that ran; none when the statistics are off.
    pub fn prog_run_stats(&self) -> Vec<(String, u64, u64, u64)> {
        let mut v: Vec<_> = self
            .prog_fdinfos()
            .iter()
            // Statistics off (or a program that never ran): no name needed.
            .filter(|info| info.field("run_cnt:") > 0)
            .map(|info| {
                (
                    info.name(),
                    info.field("run_cnt:"),
                    info.field("run_time_ns:"),
                    info.field("prog_type:"),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// /proc fdinfo of each BPF program the tracer holds open.
    fn prog_fdinfos(&self) -> Vec<ProgInfo> {
        fd_links(self.pid)
            .into_iter()
            .filter(|(_, l)| l == "anon_inode:bpf-prog")
            .map(|(fd, _)| {
                ProgInfo(
                    std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", self.pid))
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The tracer's BPF maps: (name, type, max_entries, memlock bytes, entries now).
    pub fn bpf_maps(&self) -> Vec<BpfMap> {
        let mut maps = Vec::new();
        for (fd, link) in fd_links(self.pid) {
            if link != "anon_inode:bpf-map" {
                continue;
            }
            let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", self.pid))
                .unwrap_or_default();
            let get = |k: &str| -> u64 {
                info.lines()
                    .find_map(|l| l.strip_prefix(k).map(|v| v.trim().parse().unwrap_or(0)))
                    .unwrap_or(0)
            };
            let id = get("map_id:");
            let map_type = get("map_type:");
            let show = Command::new("bpftool")
                .args(["map", "show", "id", &id.to_string()])
                .output();
            let name = show
                .ok()
                .and_then(|o| {
                    let s = String::from_utf8_lossy(&o.stdout).into_owned();
                    let mut w = s.split_whitespace();
                    w.position(|x| x == "name")
                        .and_then(|_| w.next().map(str::to_string))
                })
                .unwrap_or_else(|| format!("id{id}"));
            // Hash maps (1 hash, 9 lru_hash): count what is in them now.
            let entries = if map_type == 1 || map_type == 9 {
                Command::new("bpftool")
                    .args(["map", "dump", "id", &id.to_string()])
                    .output()
                    .ok()
                    .and_then(|o| {
                        let s = String::from_utf8_lossy(&o.stdout).into_owned();
                        s.lines().rev().find_map(|l| {
                            l.trim()
                                .strip_prefix("Found ")
                                .and_then(|r| r.split_whitespace().next()?.parse().ok())
                        })
                    })
            } else {
                None
            };
            maps.push(BpfMap {
                name,
                map_type,
                max_entries: get("max_entries:"),
                memlock: get("memlock:"),
                entries,
            });
        }
        maps.sort_by(|a, b| a.name.cmp(&b.name));
        maps
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.kill(); // an error path: leave nothing attached
    }
}

pub struct BpfMap {
    pub name: String,
    pub map_type: u64,
    pub max_entries: u64,
    pub memlock: u64,
    pub entries: Option<u64>,
}

impl BpfMap {
    pub fn json(&self) -> json::J {
        json::J::obj()
            .with("name", self.name.as_str())
            .with("map_type", self.map_type)
            .with("max_entries", self.max_entries)
            .with("memlock_bytes", self.memlock)
            .with("entries", self.entries)
    }
}

/// A BPF program's /proc fdinfo text.
struct ProgInfo(String);

impl ProgInfo {
    /// A numeric field (`key` with its colon), 0 when absent.
    fn field(&self, key: &str) -> u64 {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// The program's name, from bpftool (fdinfo has only its id); "?" if unknown.
    fn name(&self) -> String {
        let id = self.field("prog_id:").to_string();
        let show = Command::new("bpftool")
            .args(["prog", "show", "id", &id])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        show.split_whitespace()
            .skip_while(|w| *w != "name")
            .nth(1)
            .unwrap_or("?")
            .to_string()
    }
}
