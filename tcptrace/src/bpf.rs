//! Stage 1: load the eBPF object and attach it.
//!
//! One loaded instance per network namespace that tcptrace watches: the TC
//! programs cannot see which namespace a packet is in, so each instance gets
//! that namespace's inode as a load-time constant. The instance in
//! tcptrace's own namespace also carries the tracepoint and the accept hook
//! (those see every namespace).
//!
//! TC attachment prefers TCX links (6.6+), which the kernel removes when the
//! process dies. Older kernels get netlink cls_bpf filters on a clsact qdisc;
//! tcptrace removes exactly the filters (and a qdisc only if it added it) on
//! exit, and records them under /run/tcptrace so `tcptrace cleanup` can remove
//! what a killed run left behind.
use std::collections::HashMap;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::tc::{self, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, TracePoint};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use tcptrace_common::Filter;

use crate::btf::{self, Btf};
use crate::netns::{self, Iface, Netns};

/// The eBPF object, built by build.rs (empty when built with AYA_BUILD_SKIP=1).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

pub const PROG_STATE: &str = "tcptrace_state";
/// The sock_ops program that backs the state tracepoint up (see the eBPF
/// source, `left_to_sock_ops`).
const PROG_SOCK_OPS: &str = "tcptrace_sockops";
/// At the return of inet_accept: the accepting process owns the child.
const PROG_ACCEPT_FEXIT: &str = "tcptrace_fexit";
/// The fallback: syscall-exit tracepoints for accept() and accept4().
const PROGS_ACCEPT: [(&str, &str); 2] = [
    ("tcptrace_accept", "sys_exit_accept"),
    ("tcptrace_accept4", "sys_exit_accept4"),
];
/// (program, attach point) for interfaces with and without an Ethernet header.
const PROGS_ETH: [(&str, TcAttachType); 2] = [
    ("tcptrace_in", TcAttachType::Ingress),
    ("tcptrace_eg", TcAttachType::Egress),
];
const PROGS_L3: [(&str, TcAttachType); 2] = [
    ("tcptrace_in_l3", TcAttachType::Ingress),
    ("tcptrace_eg_l3", TcAttachType::Egress),
];
pub const TC_PROG_NAMES: [&str; 4] = [
    "tcptrace_in",
    "tcptrace_eg",
    "tcptrace_in_l3",
    "tcptrace_eg_l3",
];

const STATE_DIR: &str = "/run/tcptrace";
const TRACEFS: &str = "/sys/kernel/tracing";

/// See `Tracer::skips`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Skips {
    pub missed: u64,
    pub rescued: u64,
    pub via_sock_ops: u64,
}

pub struct TraceConfig {
    pub filter: Filter,
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ring_size: u32,
    pub wire: bool,
    /// Back the state tracepoint up with a sock_ops program.
    pub sock_ops: bool,
    /// Tests only: learn who accepted a socket at syscall exit, as on a
    /// kernel that cannot attach fexit programs.
    pub accept_at_syscall_exit: bool,
    /// Interfaces to watch; empty = every interface that is up.
    pub ifaces: Vec<String>,
    /// Other namespaces whose interfaces to watch (names or paths).
    pub netns: Vec<String>,
}

struct Instance {
    netns: Netns,
    att: Attached,
}

struct Attached {
    ebpf: Ebpf,
    /// clsact qdiscs this run added (netlink fallback only).
    qdiscs_added: Vec<String>,
    /// Interfaces with netlink filters of ours (fallback only).
    netlink_ifaces: Vec<String>,
}

pub struct Tracer {
    home: Netns,
    instances: Vec<Instance>,
    /// (netns inode, ifindex) → interface name, for output.
    pub iface_names: crate::decode::IfaceNames,
    pub uses_tcx: bool,
    /// Whether the sock_ops backup is attached (and so whether a change
    /// can be delivered twice, see `reader::Repeats`).
    pub sock_ops: bool,
    /// How owners of accepted sockets are learned (the summary's `accept_hook`).
    pub accept_hook: AcceptHook,
    state_file: Option<PathBuf>,
    /// Readers of the kernel side's aya-log ring, for [`crate::reader::forward_logs`].
    pub loggers: Vec<Logger>,
}

/// Checks that tracing can work here and says what to do when it cannot.
pub fn preflight() -> Result<()> {
    if EBPF_OBJECT.is_empty() {
        bail!("this tcptrace binary was built without its eBPF object (AYA_BUILD_SKIP=1); rebuild it with `cargo xtask build`");
    }
    let caps = effective_caps();
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let has = |c: u32| caps & (1u64 << c) != 0;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && has(CAP_NET_ADMIN))) {
        bail!("tracing needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN): run it with sudo; `tcptrace pcap FILE` needs no privileges");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing; it needs CONFIG_DEBUG_INFO_BTF=y): tcptrace reads socket namespaces and accept()ed sockets through it");
    }
    ensure_tracefs()?;
    check_tracepoint_format()
}

/// The process's effective capabilities (CapEff), as a bit set.
pub(crate) fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn ensure_tracefs() -> Result<()> {
    let events = Path::new(TRACEFS).join("events");
    if events.exists() {
        return Ok(());
    }
    // Minimal systems (and our test VMs) may not have tracefs mounted yet.
    let st = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status();
    if !events.exists() {
        bail!("tracefs is not mounted at {TRACEFS} and mounting it failed ({st:?}): mount it with `mount -t tracefs nodev {TRACEFS}`");
    }
    Ok(())
}

/// The kernel side reads the tracepoint's fields at fixed offsets; make sure
/// this kernel lays them out that way before trusting what it reads.
fn check_tracepoint_format() -> Result<()> {
    let path = Path::new(TRACEFS).join("events/sock/inet_sock_set_state/format");
    let fmt = std::fs::read_to_string(&path).with_context(|| {
        format!("tracepoint sock:inet_sock_set_state is missing ({}): tcptrace needs Linux 4.16 or later", path.display())
    })?;
    let expected = [
        ("skaddr", 8),
        ("oldstate", 16),
        ("newstate", 20),
        ("sport", 24),
        ("dport", 26),
        ("family", 28),
        ("protocol", 30),
        ("saddr", 32),
        ("daddr", 36),
        ("saddr_v6", 40),
        ("daddr_v6", 56),
    ];
    for (field, off) in expected {
        let found = fmt.lines().any(|l| {
            let l = l.trim();
            l.contains(&format!(" {field};")) || l.contains(&format!(" {field}["))
        } && l.contains(&format!("offset:{off};")));
        if !found {
            bail!("sock:inet_sock_set_state on this kernel does not have field `{field}` at offset {off} (see {}); this tcptrace does not support its layout", path.display());
        }
    }
    Ok(())
}

pub type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Loads one instance; its logger must live as long as its programs (it
/// owns the log ring they write to), so it is returned alongside.
fn load_instance(cfg: &TraceConfig, filter: &Filter) -> Result<(Ebpf, Option<Logger>)> {
    let mut ebpf = EbpfLoader::new()
        .override_global("FILTER", filter, true)
        .map_max_entries("EVENTS", cfg.ring_size)
        .load(EBPF_OBJECT)
        .map_err(|e| explain_load_error(anyhow!(e)))?;
    let logger = aya_log::EbpfLogger::init(&mut ebpf)
        .map_err(|e| log::debug!("eBPF logger not initialised: {e}"))
        .ok();
    Ok((ebpf, logger))
}

/// How tcptrace learns which process accepted a socket (its owner from then
/// on), as the summary's `accept_hook` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptHook {
    /// fexit on inet_accept: costs only the accepts.
    Fexit,
    /// The syscall-exit tracepoints of accept() and accept4(), where fexit
    /// cannot attach: while attached, every syscall on the host takes the
    /// kernel's slow exit path.
    Syscalls,
    /// Neither: accepted sockets keep their listener's owner.
    None,
}

impl AcceptHook {
    pub fn name(self) -> &'static str {
        match self {
            AcceptHook::Fexit => "fexit",
            AcceptHook::Syscalls => "syscalls",
            AcceptHook::None => "none",
        }
    }
}

/// Attaches the accept hook: fexit where the kernel loads it (BTF, BPF
/// trampolines, and no policy against tracing programs), else the
/// syscall-exit tracepoints; each only with the offsets it reads, so that
/// the summary never names a hook that does nothing.
fn attach_accept(ebpf: &mut Ebpf, cfg: &TraceConfig, filter: &Filter) -> Result<AcceptHook> {
    if filter.off_socket_sk == 0 {
        return Ok(AcceptHook::None);
    }
    if !cfg.accept_at_syscall_exit {
        let mut fexit = || -> Result<()> {
            let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
            let prog: &mut aya::programs::FExit = program(ebpf, PROG_ACCEPT_FEXIT)?.try_into()?;
            prog.load("inet_accept", &btf).context("loading")?;
            prog.attach().context("attaching")?;
            Ok(())
        };
        match fexit() {
            Ok(()) => return Ok(AcceptHook::Fexit),
            Err(e) => log::debug!(
                "no fexit on inet_accept ({e:#}); the accept() syscalls' exit tracepoints instead"
            ),
        }
    }
    if filter.off_task_files == 0 {
        log::warn!("accepted sockets keep their listener's owner: no fexit on inet_accept, and this kernel's BTF lacks the descriptor walk the fallback needs");
        return Ok(AcceptHook::None);
    }
    let mut attached = false;
    for (name, tp_name) in PROGS_ACCEPT {
        let tp: &mut TracePoint = program(ebpf, name)?.try_into()?;
        tp.load()
            .map_err(|e| explain_load_error(anyhow!(e).context(name)))?;
        // Without syscall tracepoints (CONFIG_FTRACE_SYSCALLS) children
        // keep their listener's owner; say so rather than fail.
        match tp.attach("syscalls", tp_name) {
            Ok(_) => attached = true,
            Err(e) => log::warn!("cannot attach to syscalls:{tp_name} ({e}); accepted sockets keep their listener's owner"),
        }
    }
    Ok(if attached {
        AcceptHook::Syscalls
    } else {
        AcceptHook::None
    })
}

/// Attaches the sock_ops program to the cgroup v2 root, where it sees every
/// socket of the host (beside other programs there), then turns it on.
fn attach_sock_ops(ebpf: &mut Ebpf) -> Result<()> {
    // Before 5.7 a cgroup program is attached without a link, and would
    // stay attached if tcptrace were killed.
    if !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 7, 0)) {
        bail!("this kernel has no BPF links for cgroups (5.7 and later)");
    }
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let root = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| f[1].to_string())
        .context("no cgroup v2 hierarchy is mounted")?;
    let cgroup = std::fs::File::open(&root).with_context(|| format!("opening {root}"))?;
    // The hierarchy's root directory is inode 1; inside a cgroup namespace
    // (a container) the mount is a subtree, and sockets outside it are left
    // to the tracepoint.
    if std::os::unix::fs::MetadataExt::ino(&cgroup.metadata()?) != 1 {
        log::warn!("{root} is not the root of the cgroup v2 hierarchy (a cgroup namespace?): the sock_ops backup covers only the sockets of processes under it");
    }
    let prog: &mut aya::programs::SockOps = program(ebpf, PROG_SOCK_OPS)?.try_into()?;
    prog.load()
        .map_err(|e| explain_load_error(anyhow!(e).context(PROG_SOCK_OPS)))?;
    // On 5.7 and later this is a BPF link, which always runs beside the
    // cgroup's other programs (and goes away with tcptrace); the link API
    // refuses the multi flag itself.
    let link = prog
        .attach(cgroup, aya::programs::CgroupAttachMode::Single)
        .with_context(|| format!("attaching {PROG_SOCK_OPS} to {root}"))?;
    let on = ebpf
        .map_mut("SOCKOPS_ON")
        .context("map SOCKOPS_ON missing from the eBPF object")
        .and_then(|m| Ok(aya::maps::Array::<_, u32>::try_from(m)?))
        .and_then(|mut on| Ok(on.set(0, 1, 0)?));
    if let Err(e) = on {
        // Not left attached, doing nothing, for the rest of the run.
        let prog: &mut aya::programs::SockOps = program(ebpf, PROG_SOCK_OPS)?.try_into()?;
        let _ = prog.detach(link);
        return Err(e.context("turning sock_ops on"));
    }
    log::debug!("{PROG_SOCK_OPS} attached to {root}");
    Ok(())
}

fn explain_load_error(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    // A verifier log runs to thousands of lines; its end says what went wrong.
    let lines: Vec<&str> = text.lines().collect();
    let e = if lines.len() > 30 {
        anyhow!(
            "{}\n  [… {} verifier lines …]\n{}",
            lines[0],
            lines.len() - 21,
            lines[lines.len() - 20..].join("\n")
        )
    } else {
        e
    };
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        e.context("the kernel refused to load eBPF: run as root (or with CAP_BPF and CAP_PERFMON)")
    } else {
        e.context("loading tcptrace's eBPF object failed")
    }
}

impl Tracer {
    pub fn start(cfg: &TraceConfig) -> Result<Self> {
        preflight()?;
        let home = Netns::current()?;
        let btf = Btf::from_sys_fs()?;
        let (off_sk_net, off_net_ns_inum) = btf::netns_offsets(&btf)
            .context("cannot find how to read a socket's namespace in this kernel's BTF")?;
        let uses_tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let mut tracer = Tracer {
            home,
            instances: Vec::new(),
            iface_names: HashMap::new(),
            uses_tcx,
            sock_ops: false,
            accept_hook: AcceptHook::None,
            state_file: None,
            loggers: Vec::new(),
        };

        let mut filter = cfg.filter;
        filter.off_sk_net = off_sk_net;
        filter.off_net_ns_inum = off_net_ns_inum;
        // Each accept hook runs only with what it reads (see `attach_accept`).
        match btf::socket_sk_offset(&btf) {
            Ok(sk) => filter.off_socket_sk = sk,
            Err(e) => log::warn!("accept() will not refine socket owners: {e:#}"),
        }
        match btf::accept_offsets(&btf) {
            Ok([a, b, c, d]) => {
                (
                    filter.off_task_files,
                    filter.off_files_fdt,
                    filter.off_fdt_fd,
                    filter.off_file_private_data,
                ) = (a, b, c, d);
            }
            Err(e) => log::debug!("no descriptor walk for the syscall-exit accept hook: {e:#}"),
        }
        match btf::byte_counter_offsets(&btf) {
            Ok((acked, received)) => {
                (filter.off_bytes_acked, filter.off_bytes_received) = (acked, received);
            }
            Err(e) => log::warn!("bytes each way will come from sequence numbers only: {e:#}"),
        }
        match btf::sock_ops_offsets(&btf) {
            Ok([saddr, sport, tgid, comm]) => {
                (filter.off_inet_saddr, filter.off_inet_sport) = (saddr, sport);
                (filter.off_task_tgid, filter.off_task_comm) = (tgid, comm);
            }
            Err(e) => log::warn!("no sock_ops backup for the state tracepoint: {e:#}"),
        }
        filter.netns = tracer.home.inode;
        let (mut ebpf, logger) = load_instance(cfg, &filter)?;
        tracer.loggers.extend(logger);
        {
            let tp: &mut TracePoint = program(&mut ebpf, PROG_STATE)?.try_into()?;
            tp.load()
                .map_err(|e| explain_load_error(anyhow!(e).context(PROG_STATE)))?;
            tp.attach("sock", "inet_sock_set_state")
                .context("attaching to tracepoint sock:inet_sock_set_state")?;
        }
        tracer.accept_hook = attach_accept(&mut ebpf, cfg, &filter)?;
        if cfg.sock_ops && filter.off_inet_saddr != 0 {
            match attach_sock_ops(&mut ebpf) {
                Ok(()) => tracer.sock_ops = true,
                Err(e) => log::warn!("state changes the kernel skips under load can be lost: no sock_ops backup ({e:#})"),
            }
        }
        let home_ns = Netns::current()?;
        tracer.instances.push(Instance {
            netns: home_ns,
            att: Attached {
                ebpf,
                qdiscs_added: vec![],
                netlink_ifaces: vec![],
            },
        });

        if cfg.wire {
            for spec in &cfg.netns {
                let ns = Netns::open(spec)?;
                if ns.inode == tracer.home.inode {
                    continue;
                }
                let mut f = filter;
                f.netns = ns.inode;
                let (ebpf, logger) = load_instance(cfg, &f)?;
                tracer.loggers.extend(logger);
                tracer.instances.push(Instance {
                    netns: ns,
                    att: Attached {
                        ebpf,
                        qdiscs_added: vec![],
                        netlink_ifaces: vec![],
                    },
                });
            }
            let explicit = !cfg.ifaces.is_empty();
            let mut matched = vec![false; cfg.ifaces.len()];
            for i in 0..tracer.instances.len() {
                let (home, Instance { netns, att }) = (&tracer.home, &mut tracer.instances[i]);
                let names = netns.enter(home, || {
                    attach_wire(att, &cfg.ifaces, &mut matched, uses_tcx)
                })?;
                for (idx, name) in names {
                    tracer.iface_names.insert((netns.inode, idx), name.into());
                }
            }
            if explicit {
                if let Some(pos) = matched.iter().position(|m| !m) {
                    bail!(
                        "unknown interface {:?}: `ip link` lists the interfaces (add --netns NAME for one inside a namespace)",
                        cfg.ifaces[pos]
                    );
                }
            }
            tracer.record_state()?;
        }
        Ok(tracer)
    }

    /// Each instance's ring buffer, to be read by [`crate::reader`].
    pub fn take_rings(&mut self) -> Result<Vec<RingBuf<MapData>>> {
        self.instances
            .iter_mut()
            .map(|i| {
                let map = i
                    .att
                    .ebpf
                    .take_map("EVENTS")
                    .context("EVENTS map missing from the eBPF object")?;
                Ok(RingBuf::try_from(map)?)
            })
            .collect()
    }

    /// Events the kernel side could not queue because the ring was full.
    pub fn lost(&self) -> u64 {
        self.instances
            .iter()
            .filter_map(|i| i.att.ebpf.map("LOST"))
            .filter_map(|m| PerCpuArray::<_, u64>::try_from(m).ok())
            .filter_map(|a| a.get(&0, 0).ok())
            .map(|v| v.iter().sum::<u64>())
            .sum()
    }

    /// The state changes the kernel skipped tcptrace_state for, from one
    /// reading of the counters (the programs are still running):
    /// - `missed`: lost. The skips the kernel counted (`recursion_misses`,
    ///   6.6 and later; older kernels skip without counting), less those the
    ///   sock_ops program covered, plus changes left to sock_ops that it
    ///   never saw (should there be any, a sign of a bug).
    /// - `rescued`: skips the sock_ops program covered (it saw the change,
    ///   and the tracepoint program never ran to take its note), of any
    ///   socket, as the kernel's count is; those the filter wants were
    ///   delivered.
    /// - `via_sock_ops`: changes the sock_ops program delivered.
    ///
    /// `duplicates`: changes the tracepoint program emitted again, not
    /// finding sock_ops's note (see `reader::Repeats`); it ran for them, so
    /// they count as handed off.
    pub fn skips(&self, duplicates: u64) -> Skips {
        let [seen, handed_off, emitted] = self.sock_ops_counts();
        let handed_off = handed_off + duplicates;
        let rescued = seen.saturating_sub(handed_off);
        Skips {
            missed: self.skipped().saturating_sub(rescued) + handed_off.saturating_sub(seen),
            rescued,
            via_sock_ops: emitted,
        }
    }

    /// The kernel side's `SOCKOPS` counters, summed over CPUs, by slot.
    fn sock_ops_counts(&self) -> [u64; 3] {
        let mut total = [0; 3];
        for i in &self.instances {
            let Some(a) = i
                .att
                .ebpf
                .map("SOCKOPS")
                .and_then(|m| PerCpuArray::<_, u64>::try_from(m).ok())
            else {
                continue;
            };
            for (slot, t) in total.iter_mut().enumerate() {
                *t += a
                    .get(&(slot as u32), 0)
                    .map(|v| v.iter().sum::<u64>())
                    .unwrap_or(0);
            }
        }
        total
    }

    /// The state program's `recursion_misses`, rescued or not.
    fn skipped(&self) -> u64 {
        self.instances
            .iter()
            .filter_map(|i| i.att.ebpf.program("tcptrace_state"))
            .filter_map(|p| p.fd().ok())
            .filter_map(|fd| fdinfo_field(fd.as_fd().as_raw_fd(), "recursion_misses"))
            .sum()
    }

    fn record_state(&mut self) -> Result<()> {
        if self.uses_tcx
            || self
                .instances
                .iter()
                .all(|i| i.att.netlink_ifaces.is_empty())
        {
            return Ok(());
        }
        std::fs::create_dir_all(STATE_DIR)?;
        let path = Path::new(STATE_DIR).join(format!("{}.state", std::process::id()));
        let mut text = String::new();
        for i in &self.instances {
            let ns_path = format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                std::os::fd::AsRawFd::as_raw_fd(&i.netns.file)
            );
            let ns_path = std::fs::read_link(&ns_path)
                .map(|_| i.netns.label.clone())
                .unwrap_or(ns_path);
            for iface in &i.att.netlink_ifaces {
                let added = i.att.qdiscs_added.contains(iface);
                text.push_str(&format!("{}\t{}\t{}\n", ns_path, iface, added as u8));
            }
        }
        std::fs::write(&path, text)?;
        self.state_file = Some(path);
        Ok(())
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))
}

/// Attaches the TC programs of `inst` to the chosen interfaces of the
/// namespace this thread is in. Returns (ifindex, name) of what it attached.
fn attach_wire(
    inst: &mut Attached,
    wanted: &[String],
    matched: &mut [bool],
    tcx: bool,
) -> Result<Vec<(u32, String)>> {
    let ifaces: Vec<Iface> = netns::interfaces()?
        .into_iter()
        .filter(|i| {
            if wanted.is_empty() {
                return i.up;
            }
            match wanted.iter().position(|w| *w == i.name) {
                Some(p) => {
                    matched[p] = true;
                    true
                }
                None => false,
            }
        })
        .collect();
    // Only the programs some interface needs: each load is a verifier pass,
    // which is most of start-up on a slow machine, and is repeated per
    // namespace.
    let mut loaded: Vec<&str> = Vec::new();
    for (name, _) in ifaces.iter().flat_map(tc_hooks) {
        if !loaded.contains(&name) {
            let p: &mut SchedClassifier = program(&mut inst.ebpf, name)?.try_into()?;
            p.load()
                .map_err(|e| explain_load_error(anyhow!(e).context(name)))?;
            loaded.push(name);
        }
    }
    let mut attached = Vec::new();
    for iface in ifaces {
        if !tcx {
            match tc::qdisc_add_clsact(&iface.name) {
                Ok(()) => inst.qdiscs_added.push(iface.name.clone()),
                // EEXIST: someone else's clsact; use it, never delete it.
                Err(e) if format!("{e:?}").contains("17") || e.to_string().contains("exists") => {}
                Err(e) => {
                    return Err(
                        anyhow!(e).context(format!("adding a clsact qdisc to {}", iface.name))
                    )
                }
            }
        }
        for (name, at) in tc_hooks(&iface) {
            let p: &mut SchedClassifier = program(&mut inst.ebpf, name)?.try_into()?;
            let opts = if tcx {
                TcAttachOptions::TcxOrder(LinkOrder::default())
            } else {
                TcAttachOptions::Netlink(tc::NlOptions::default())
            };
            p.attach_with_options(&iface.name, at, opts)
                .with_context(|| format!("attaching {name} to {} ({at:?})", iface.name))?;
        }
        if !tcx {
            inst.netlink_ifaces.push(iface.name.clone());
        }
        attached.push((iface.index, iface.name));
    }
    Ok(attached)
}

/// The classifiers an interface gets, and where.
fn tc_hooks(iface: &Iface) -> impl Iterator<Item = (&'static str, TcAttachType)> {
    let progs = if iface.ethernet { PROGS_ETH } else { PROGS_L3 };
    // On loopback a segment passes egress and then ingress: one hook sees it
    // once.
    let loopback = iface.loopback;
    progs
        .into_iter()
        .filter(move |(_, at)| !(loopback && *at == TcAttachType::Ingress))
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let home = &self.home;
        for inst in self.instances.drain(..) {
            let Instance {
                netns,
                att: Attached {
                    ebpf, qdiscs_added, ..
                },
            } = inst;
            // Netlink filters are removed through a socket in their own
            // namespace, so drop (detach) there.
            let r = netns.enter(home, || {
                drop(ebpf);
                for q in &qdiscs_added {
                    del_clsact(q);
                }
                Ok(())
            });
            if let Err(e) = r {
                eprintln!("tcptrace: detaching in namespace {}: {e:#}", netns.label);
            }
        }
        if let Some(p) = &self.state_file {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn del_clsact(iface: &str) {
    let _ = std::process::Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .status();
}

/// `tcptrace cleanup`: removes TC filters (and qdiscs it added) that killed
/// netlink-mode runs left behind. TCX links need no cleanup: the kernel drops
/// them with the process.
pub fn cleanup() -> Result<usize> {
    let home = Netns::current()?;
    let mut removed = 0;
    let mut namespaces: Vec<Netns> = vec![Netns::current()?];
    let mut added_qdiscs: Vec<(String, String)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir(STATE_DIR) {
        for entry in dir.flatten() {
            let path = entry.path();
            let pid: Option<u32> = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok());
            if pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
                continue; // that run is alive and will clean up itself
            }
            for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
                let f: Vec<&str> = line.split('\t').collect();
                if let [ns, iface, added] = f.as_slice() {
                    if *added == "1" {
                        added_qdiscs.push((ns.to_string(), iface.to_string()));
                    }
                    if *ns != "host" {
                        if let Ok(n) = Netns::open(ns) {
                            if !namespaces.iter().any(|x| x.inode == n.inode) {
                                namespaces.push(n);
                            }
                        }
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    for ns in &namespaces {
        removed += ns.enter(&home, || {
            let mut n = 0;
            for iface in netns::interfaces()? {
                for name in TC_PROG_NAMES {
                    for at in [TcAttachType::Ingress, TcAttachType::Egress] {
                        if tc::qdisc_detach_program(&iface.name, at, name).is_ok() {
                            n += 1;
                        }
                    }
                }
                if added_qdiscs.iter().any(|(l, i)| {
                    (l == &ns.label || (l == "host" && ns.label == "host")) && *i == iface.name
                }) {
                    del_clsact(&iface.name);
                }
            }
            Ok(n)
        })?;
    }
    Ok(removed)
}

/// A numeric field of a BPF object's fdinfo (`recursion_misses` of a
/// program, `max_entries` of a map): some are in no aya type.
pub(crate) fn fdinfo_field(fd: std::os::fd::RawFd, field: &str) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}
