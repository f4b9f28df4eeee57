//! Kernel side of tcptrace: parse, filter early, emit. Every interpretation
//! (state names, step names, option decoding) happens in userspace.
//!
//! - `tcptrace_state` (tracepoint sock:inet_sock_set_state): one `StateEvent` per TCP state change,
//!   attributed to the socket's owner rather than to whoever was interrupted.
//! - `tcptrace_sockops` (sock_ops, cgroup v2 root): the same events for the sockets it follows,
//!   which the tracepoint program then leaves to it; the kernel can skip a tracepoint's program
//!   under load, never this one.
//! - `tcptrace_fexit` (fexit on inet_accept), or where the kernel cannot attach it
//!   `tcptrace_accept`, `tcptrace_accept4` (tracepoints syscalls:sys_exit_accept*): the
//!   accepting process becomes a child's owner.
//! - `tcptrace_in`, `tcptrace_eg` (TC classifiers): one `SegmentEvent` per control segment (SYN, FIN,
//!   RST, and the pure ACKs that complete a handshake or acknowledge a FIN).
#![no_std]
#![feature(asm_experimental_arch)]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated},
    macros::{classifier, fexit, map, sock_ops, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{FExitContext, SockOpsContext, TcContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use tcptrace_common::{
    FlowKey, ListenKey, SegmentEvent, SockInfo, StateEvent, AF_INET, AF_INET6, DIR_EGRESS,
    DIR_INGRESS, EVENT_SEGMENT, EVENT_STATE, FAULT_SKIP_FIRST_CHANGES, MAX_PORTS, SOCKOPS_EMITTED,
    SOCKOPS_HANDED_OFF, SOCKOPS_SEEN, TASK_COMM_LEN, TCP_OPTIONS_MAX,
};

/// Set by the CLI before load; read-only for the verifier, so disabled
/// filters cost a compare each.
#[no_mangle]
static FILTER: tcptrace_common::Filter = tcptrace_common::Filter::zeroed();

/// Both kinds of event share one ring so they arrive on one clock, in order
/// per CPU. The CLI sets the size (`--ring-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Events that found the ring full; the CLI reads and reports the sum.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-socket owner and time of the last state change, keyed by `struct sock *`.
/// Sized for 100,000 open connections with both ends on this host (about
/// 25 MiB of kernel memory); past that the oldest sockets lose their owner
/// and time-in-state, never their events.
#[map]
static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(262144, 0);

/// Owners of listening sockets, so children created in softirq inherit them.
#[map]
static LISTENERS: HashMap<ListenKey, SockInfo> = HashMap::with_max_entries(4096, 0);

/// Flows waiting for a handshake-completing ACK or the ACK of a FIN; the value
/// is the ack number that segment must carry. Bulk data costs one lookup here.
#[map]
static FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(65536, 0);

// RFC 9293 states with the kernel's numbering (include/net/tcp_states.h).
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;
const TCP_LISTEN: i32 = 10;

const IPPROTO_TCP: u8 = 6;
const TC_ACT_UNSPEC: i32 = -1;

const TH_FIN: u8 = 0x01;
const TH_SYN: u8 = 0x02;
const TH_RST: u8 = 0x04;
const TH_ACK: u8 = 0x10;

#[inline(always)]
fn filter() -> &'static tcptrace_common::Filter {
    // SAFETY: read of an immutable global the loader patched before load.
    unsafe { core::ptr::read_volatile(&&FILTER) }
}

/// Counts a dropped event; returns the new per-CPU total.
#[inline(always)]
fn count_lost() -> u64 {
    match LOST.get_ptr_mut(0) {
        Some(n) => {
            count(n);
            // SAFETY: a valid per-CPU slot; a nested run's count may show, which the
            // warning it feeds does not mind.
            unsafe { *n }
        }
        None => 0,
    }
}

/// An address as the events carry it (IPv4 in the first word), held as words:
/// zeroing or copying a `[u8; 16]` compiles to a byte-at-a-time `memset`/
/// `memcpy` subprogram call in BPF, which cost a tenth of each program run.
type Addr = [u32; 4];

#[inline(always)]
fn addr_eq(a: &[u8; 16], b: &Addr, family: u16) -> bool {
    // SAFETY: same size; u8 has no alignment requirement.
    let b: &[u8; 16] = unsafe { &*(b as *const Addr as *const [u8; 16]) };
    let n = if family == AF_INET { 4 } else { 16 };
    let mut i = 0;
    while i < n {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Shared by both programs: true when the user wants this 4-tuple.
#[inline(always)]
fn wanted(family: u16, local: &Addr, remote: &Addr, lport: u16, rport: u16) -> bool {
    let f = filter();
    if f.family != 0 && f.family != family {
        return false;
    }
    if f.nports != 0 {
        let mut hit = false;
        let mut i = 0;
        while i < MAX_PORTS {
            if (i as u16) < f.nports && (f.ports[i] == lport || f.ports[i] == rport) {
                hit = true;
            }
            i += 1;
        }
        if !hit {
            return false;
        }
    }
    if f.laddr_family != 0 && (f.laddr_family != family || !addr_eq(&f.laddr, local, family)) {
        return false;
    }
    if f.raddr_family != 0 && (f.raddr_family != family || !addr_eq(&f.raddr, remote, family)) {
        return false;
    }
    true
}

#[inline(always)]
fn current_owner(ts_ns: u64) -> SockInfo {
    // Not aya's wrapper, which zeroes its buffer first (a `memset` call, see
    // `Addr`): the helper fills all of it, with zeroes when it fails.
    let mut comm = core::mem::MaybeUninit::<[u8; TASK_COMM_LEN]>::uninit();
    // SAFETY: the buffer is TASK_COMM_LEN bytes and fully written by the helper.
    let comm = unsafe {
        generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), TASK_COMM_LEN as u32);
        comm.assume_init()
    };
    SockInfo {
        ts_ns,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        owner_known: 1,
        comm,
        netns: 0,
        state: 0,
    }
}

/// `current_owner` for programs that may not call bpf_get_current_comm or
/// bpf_get_current_pid_tgid (sock_ops on 6.1): the same fields, read
/// from the current task (`task_struct.tgid`, `.comm`; offsets from BTF).
#[inline(always)]
fn current_owner_from_task(ts_ns: u64) -> SockInfo {
    let f = filter();
    // SAFETY: returns the current task's address, a plain number here.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    let mut comm = core::mem::MaybeUninit::<[u8; TASK_COMM_LEN]>::uninit();
    // SAFETY: bpf_probe_read_kernel fills the buffer, with zeroes when it
    // fails, and fails cleanly on a bad address.
    let (pid, comm) = unsafe {
        generated::bpf_probe_read_kernel(
            comm.as_mut_ptr().cast(),
            TASK_COMM_LEN as u32,
            (task + f.off_task_comm as u64) as *const core::ffi::c_void,
        );
        (
            bpf_probe_read_kernel((task + f.off_task_tgid as u64) as *const u32).unwrap_or(0),
            comm.assume_init(),
        )
    };
    SockInfo {
        ts_ns,
        pid,
        owner_known: 1,
        comm,
        netns: 0,
        state: 0,
    }
}

/// Namespace inode of a socket: sk->__sk_common.skc_net.net->ns.inum, with
/// offsets the CLI read from this kernel's BTF.
#[inline(always)]
fn sock_netns(skaddr: u64) -> u32 {
    let f = filter();
    if f.off_sk_net == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_kernel tolerates bad pointers (returns an error).
    unsafe {
        let net: u64 = match bpf_probe_read_kernel((skaddr + f.off_sk_net as u64) as *const u64) {
            Ok(p) => p,
            Err(_) => return 0,
        };
        bpf_probe_read_kernel((net + f.off_net_ns_inum as u64) as *const u32).unwrap_or(0)
    }
}

// Field offsets of sock:inet_sock_set_state; the CLI checks them against the
// running kernel's format file before it attaches.
const TP_SKADDR: usize = 8;
const TP_OLDSTATE: usize = 16;
const TP_NEWSTATE: usize = 20;
const TP_SPORT: usize = 24;
const TP_DPORT: usize = 26;
const TP_FAMILY: usize = 28;
const TP_PROTOCOL: usize = 30;
const TP_SADDR: usize = 32;
const TP_DADDR: usize = 36;
const TP_SADDR_V6: usize = 40;
const TP_DADDR_V6: usize = 56;

/// A field of the tracepoint's record, loaded straight from the context: a
/// tracepoint program may read its record (aligned, within its size; the
/// kernel checks both when loading and attaching), and `read_at` would make
/// each field a bpf_probe_read_kernel call. `T` is at most 8 bytes and `off`
/// a multiple of its size.
#[inline(always)]
unsafe fn tp<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    // SAFETY: the caller keeps `off` inside the record and aligned.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().add(off) as *const T) }
}

/// An IPv6 address field (16 bytes at an 8-byte-aligned offset), as two loads.
#[inline(always)]
unsafe fn tp_addr6(ctx: &TracePointContext, off: usize) -> Addr {
    // SAFETY: as for `tp`.
    let (hi, lo): (u64, u64) = unsafe { (tp(ctx, off), tp(ctx, off + 8)) };
    [hi as u32, (hi >> 32) as u32, lo as u32, (lo >> 32) as u32]
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn tcptrace_state(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets checked against the tracepoint's format by the CLI.
    unsafe {
        if tp::<u16>(&ctx, TP_PROTOCOL) != IPPROTO_TCP as u16 {
            return 0;
        }
        let skaddr: u64 = tp(&ctx, TP_SKADDR);
        let (oldstate, newstate): (i32, i32) = (tp(&ctx, TP_OLDSTATE), tp(&ctx, TP_NEWSTATE));
        if left_to_sock_ops(skaddr, oldstate, newstate) {
            count_sockops(SOCKOPS_HANDED_OFF);
            return 0;
        }
        // A constant to the verifier, which drops this when it is 0.
        if filter().fault == FAULT_SKIP_FIRST_CHANGES && first_change(oldstate, newstate) {
            return 0;
        }
        let family: u16 = tp(&ctx, TP_FAMILY);
        let (saddr, daddr): (Addr, Addr) = if family == AF_INET {
            ([tp(&ctx, TP_SADDR), 0, 0, 0], [tp(&ctx, TP_DADDR), 0, 0, 0])
        } else if family == AF_INET6 {
            (tp_addr6(&ctx, TP_SADDR_V6), tp_addr6(&ctx, TP_DADDR_V6))
        } else {
            return 0;
        };
        let c = Change {
            skaddr,
            oldstate,
            newstate,
            family,
            sport: tp(&ctx, TP_SPORT),
            dport: tp(&ctx, TP_DPORT),
            saddr,
            daddr,
        };
        if !wanted(family, &c.saddr, &c.daddr, c.sport, c.dport) {
            return 0;
        }
        let _ = state_change(&ctx, c, current_owner);
    }
    0
}

/// The kernel skips a tracing program on a CPU where one is running already
/// (a softirq's backlog of ACKs that interrupts it, under a burst of
/// closes), and does not always count the skip. A sock_ops program is not
/// a tracing program and is never skipped: for the sockets it asked to
/// follow (`BPF_SOCK_OPS_STATE_CB_FLAG`), tcp_set_state() calls it just
/// before the tracepoint, and it emits the change instead, leaving a note
/// in `HANDLED`. Only that note hands a change off: a socket's flag alone
/// would not do, since some changes reach the tracepoint without
/// tcp_set_state() (→LISTEN, a child's →SYN_RECV, a child that lost the
/// race to the established hash going to CLOSE) and another tool can set
/// the flag where tcptrace's program does not run.
#[inline(always)]
fn left_to_sock_ops(skaddr: u64, oldstate: i32, newstate: i32) -> bool {
    let Some(notes) = HANDLED.get_ptr_mut(0) else {
        return false;
    };
    let states = handled_states(oldstate, newstate);
    // SAFETY: this CPU's notes, which only this CPU touches.
    let notes = unsafe { &mut *notes };
    let mut i = 0;
    while i < NOTES {
        if notes[i].skaddr == skaddr && notes[i].states == states {
            notes[i].states = 0;
            return true;
        }
        i += 1;
    }
    false
}

/// Changes tcptrace_sockops emitted, each waiting for the tracepoint's
/// program, which runs next in the same tcp_set_state() on this CPU. At
/// most two wait at a time (a softirq's change in between, for another
/// socket, waits for a moment on top of a task's); a note the tracepoint's
/// program never took (the kernel skipped it) is free again after
/// `NOTE_TTL_NS`, when its socket has moved on or is gone. Were all taken,
/// the oldest would be overwritten, and its change emitted twice, never
/// lost.
#[repr(C)]
#[derive(Clone, Copy)]
struct Note {
    skaddr: u64,
    ts_ns: u64,
    states: u32,
    _pad: u32,
}

const NOTES: usize = 8;
const NOTE_TTL_NS: u64 = 10_000_000;

#[map]
static HANDLED: PerCpuArray<[Note; NOTES]> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn handled_states(old: i32, new: i32) -> u32 {
    // Never 0, which marks a free note.
    0x10000 | ((old as u32 & 0xff) << 8) | (new as u32 & 0xff)
}

/// Leaves a note that this change was emitted here (see `Note`).
#[inline(always)]
fn note_handled(skaddr: u64, old: i32, new: i32) {
    let Some(notes) = HANDLED.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's notes. A softirq that interrupts this loop finishes
    // its own notes before it returns.
    let notes = unsafe { &mut *notes };
    // SAFETY: reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let (mut pick, mut oldest) = (0, u64::MAX);
    let mut i = 0;
    while i < NOTES {
        let n = notes[i];
        if n.states == 0 || now.wrapping_sub(n.ts_ns) > NOTE_TTL_NS {
            pick = i;
            break;
        }
        if n.ts_ns < oldest {
            (pick, oldest) = (i, n.ts_ns);
        }
        i += 1;
    }
    notes[pick] = Note {
        skaddr,
        ts_ns: now,
        states: handled_states(old, new),
        _pad: 0,
    };
}

/// Set by the CLI once `tcptrace_sockops` is attached; until then (and when
/// it could not be attached) the tracepoint program does all the work.
#[map]
static SOCKOPS_ON: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU counts: `SOCKOPS_SEEN` (changes tcptrace_sockops saw) less
/// `SOCKOPS_HANDED_OFF` (runs of tcptrace_state that left one to it) is the
/// changes the kernel skipped the tracepoint program for and sock_ops
/// covered, which the CLI takes off the tracepoint's skips before it
/// reports any as lost; both count every socket, as the kernel's skip count
/// does. `SOCKOPS_EMITTED`: the changes sock_ops emitted, past the filter.
#[map]
static SOCKOPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

#[inline(always)]
fn count_sockops(slot: u32) {
    if let Some(n) = SOCKOPS.get_ptr_mut(slot) {
        count(n);
    }
}

/// Adds one to a per-CPU counter with one atomic add: a program run in softirq
/// can interrupt one in a task on the same CPU between a plain load and
/// store, which would cost a count. Rust has no atomic read-modify-write on the
/// BPF target, hence the instruction itself (BPF_XADD, every kernel).
#[inline(always)]
fn count(n: *mut u64) {
    // SAFETY: `n` is a valid, aligned map value the caller got from the map.
    unsafe { core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) n, v = in(reg) 1u64) };
}

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
const BPF_SOCK_OPS_STATE_CB_FLAG: u8 = 4;

/// On the cgroup v2 root: asks to follow each wanted TCP socket's state
/// changes from its first callback on (a listener's children inherit the
/// request), then emits them as the tracepoint program would. The socket's
/// 4-tuple is read where the tracepoint reads it, so both emit the same
/// event.
#[sock_ops]
pub fn tcptrace_sockops(ctx: SockOpsContext) -> u32 {
    if SOCKOPS_ON.get(0).copied().unwrap_or(0) == 0 {
        return 1;
    }
    match ctx.op() {
        op @ (BPF_SOCK_OPS_TCP_CONNECT_CB | BPF_SOCK_OPS_TCP_LISTEN_CB) => {
            if follow(&ctx) {
                follow_state_changes(&ctx);
                // The change that led here is the tracepoint's alone.
                let first = if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
                    TCP_SYN_SENT
                } else {
                    TCP_LISTEN
                };
                let _ = ops_first_change(&ctx, first);
            }
        }
        op @ (BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) => {
            if ctx.cb_flags() & BPF_SOCK_OPS_STATE_CB_FLAG as u32 == 0 && follow(&ctx) {
                follow_state_changes(&ctx);
                if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
                    followed_late(&ctx);
                }
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            let _ = sock_ops_state(&ctx);
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn follow_state_changes(ctx: &SockOpsContext) {
    let flags = ctx.cb_flags();
    if flags & BPF_SOCK_OPS_STATE_CB_FLAG as u32 == 0 {
        let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG as u32) as i32);
    }
}

/// The child this CPU's sock_ops program began to follow at its
/// PASSIVE_ESTABLISHED callback, which the kernel makes just before the
/// child's SYN_RECV→ESTABLISHED: its listener was not followed, so the
/// filter need not have wanted its LISTEN→SYN_RECV as the tracepoint
/// describes it (on 6.1 with the listener's addresses and ports), and the
/// missing trace of it in SOCKS proves no skip.
#[map]
static FOLLOWED_LATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn followed_late(ctx: &SockOpsContext) {
    if let (Ok(sk), Some(slot)) = (ops_sk(ctx), FOLLOWED_LATE.get_ptr_mut(0)) {
        // SAFETY: this CPU's slot.
        unsafe { *slot = sk };
    }
}

/// Whether `sk` is the child `followed_late` saw last on this CPU; forgets it.
#[inline(always)]
fn was_followed_late(sk: u64) -> bool {
    match FOLLOWED_LATE.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        Some(slot) if unsafe { *slot } == sk => {
            unsafe { *slot = 0 };
            true
        }
        _ => false,
    }
}

/// A socket's first changes (CLOSE→SYN_SENT, CLOSE→LISTEN, a child's
/// LISTEN→SYN_RECV) come before any callback that could ask to follow
/// it, so only the tracepoint sees them, and the kernel can skip its
/// program for them as for any other.
#[inline(always)]
fn first_change(old: i32, new: i32) -> bool {
    matches!(
        (old, new),
        (TCP_CLOSE, TCP_SYN_SENT) | (TCP_CLOSE, TCP_LISTEN) | (TCP_LISTEN, TCP_SYN_RECV)
    )
}

/// At connect's or listen's callback, just after CLOSE→SYN_SENT or
/// CLOSE→LISTEN: see `rescue_first_change`. The change is described as the
/// tracepoint would have: at SYN_SENT the local port is not chosen yet (0;
/// the port bound before connect(), where there was one, is not told apart).
#[inline(always)]
fn ops_first_change(ctx: &SockOpsContext, new: i32) -> Result<(), i32> {
    let sk = ops_sk(ctx)?;
    if first_change_seen(sk, new) {
        return Ok(()); // the tracepoint program ran: the common case, settled early
    }
    let Some(mut c) = ops_change(ctx, sk, TCP_CLOSE, new)? else {
        return Ok(());
    };
    if new == TCP_SYN_SENT {
        c.sport = 0;
    }
    if wanted(c.family, &c.saddr, &c.daddr, c.sport, c.dport) {
        let _ = rescue_first_change(ctx, c)?;
    }
    Ok(())
}

/// Emits a socket's first change (see `first_change`) when the tracepoint
/// program left no trace of the socket: the kernel skipped it. The change
/// comes a moment late (at the next callback: connect's, listen's, or the
/// child's first state callback), with the owner the tracepoint program
/// would have given it. Counted as seen and not handed off, so in
/// `rescued`. True when it was made up for.
#[inline(always)]
fn rescue_first_change(ctx: &SockOpsContext, c: Change) -> Result<bool, i32> {
    if first_change_seen(c.skaddr, c.newstate) {
        return Ok(false);
    }
    count_sockops(SOCKOPS_SEEN);
    emit_from_sock_ops(ctx, c)?;
    Ok(true)
}

/// Whether the tracepoint program saw a socket's first change into `new`:
/// it left the socket an entry in that state. An entry in another state is
/// a freed socket's at the same address (its →CLOSE unseen), no sign that
/// this socket's change was seen.
#[inline(always)]
fn first_change_seen(sk: u64, new: i32) -> bool {
    match SOCKS.get_ptr(sk) {
        // SAFETY: the socket's entry in SOCKS.
        Some(info) => unsafe { (*info).state == new as u32 },
        None => false,
    }
}

/// Emits a change from the sock_ops program.
#[inline(always)]
fn emit_from_sock_ops(ctx: &SockOpsContext, c: Change) -> Result<(), i32> {
    if state_change(ctx, c, current_owner_from_task)? {
        count_sockops(SOCKOPS_EMITTED);
    }
    Ok(())
}

/// A 32-bit field of the sock_ops context. The verifier rewrites each load
/// from the context into the kernel's own layout, so it accepts only a load
/// at a constant offset from the context pointer itself; a volatile load of
/// each word keeps the compiler from stepping a pointer through an array.
#[inline(always)]
fn ops_u32(ctx: &SockOpsContext, off: usize) -> u32 {
    // SAFETY: `off` is a field offset inside struct bpf_sock_ops.
    unsafe { core::ptr::read_volatile((ctx.ops as *const u8).add(off) as *const u32) }
}

#[inline(always)]
fn ops_addr6(ctx: &SockOpsContext, off: usize) -> Addr {
    [
        ops_u32(ctx, off),
        ops_u32(ctx, off + 4),
        ops_u32(ctx, off + 8),
        ops_u32(ctx, off + 12),
    ]
}

/// `inet_sock.inet_saddr` and `inet_sport` (in host order), where the
/// tracepoint reads a socket's local address and port: one read where they
/// lie within 8 bytes (6.18), two where they do not (6.1); the offsets are
/// constants to the verifier, which drops the other branch.
#[inline(always)]
fn inet_saddr_sport(sk: u64) -> Result<(u32, u16), i32> {
    let f = filter();
    let (a, p) = (f.off_inet_saddr, f.off_inet_sport);
    // SAFETY: the socket's inet_sock fields, through bpf_probe_read_kernel.
    unsafe {
        if p >= a + 4 && p + 2 <= a + 8 {
            let both: u64 = bpf_probe_read_kernel((sk + a as u64) as *const u64)?;
            Ok((both as u32, u16::from_be((both >> (8 * (p - a))) as u16)))
        } else {
            let saddr: u32 = bpf_probe_read_kernel((sk + a as u64) as *const u32)?;
            let sport: u16 = bpf_probe_read_kernel((sk + p as u64) as *const u16)?;
            Ok((saddr, u16::from_be(sport)))
        }
    }
}

/// A socket's 4-tuple as the sock_ops context has it: (family, local and
/// remote address, local and remote port in host order). The local
/// address is the bound one, which is the tracepoint's but for an IPv4
/// socket bound to any address. None for a family tcptrace does not trace.
#[inline(always)]
fn ops_tuple(ctx: &SockOpsContext) -> Option<(u16, Addr, Addr, u16, u16)> {
    use aya_ebpf::bindings::bpf_sock_ops as Ops;
    use core::mem::offset_of;
    let family = ops_u32(ctx, offset_of!(Ops, family)) as u16;
    let (local, remote): (Addr, Addr) = if family == AF_INET {
        (
            [ops_u32(ctx, offset_of!(Ops, local_ip4)), 0, 0, 0],
            [ops_u32(ctx, offset_of!(Ops, remote_ip4)), 0, 0, 0],
        )
    } else if family == AF_INET6 {
        (
            ops_addr6(ctx, offset_of!(Ops, local_ip6)),
            ops_addr6(ctx, offset_of!(Ops, remote_ip6)),
        )
    } else {
        return None;
    };
    let lport = ops_u32(ctx, offset_of!(Ops, local_port)) as u16;
    // The context shifts the big-endian port into the upper half.
    let rport = u16::from_be((ops_u32(ctx, offset_of!(Ops, remote_port)) >> 16) as u16);
    Some((family, local, remote, lport, rport))
}

/// Whether to follow this socket's state changes: only the user's, so that
/// other sockets cost the host no sock_ops run per change.
#[inline(always)]
fn follow(ctx: &SockOpsContext) -> bool {
    ops_tuple(ctx).is_some_and(|(family, local, remote, lport, rport)| {
        wanted(family, &local, &remote, lport, rport)
    })
}

/// The socket of a sock_ops context, as a plain number (the key of the
/// socket maps, and a base for reads).
#[inline(always)]
fn ops_sk(ctx: &SockOpsContext) -> Result<u64, i32> {
    use aya_ebpf::bindings::bpf_sock_ops as Ops;
    use core::mem::offset_of;
    // SAFETY: `ops` is the program's context; `sk` in it is the socket.
    let skp = unsafe {
        core::ptr::read_volatile(
            (ctx.ops as *const u8).add(offset_of!(Ops, __bindgen_anon_2)) as *const u64,
        )
    };
    // The verifier types `sk` as a socket pointer, with which no arithmetic
    // is allowed; read back from the stack, it is a plain number.
    let slot = core::hint::black_box(skp);
    // SAFETY: reads 8 bytes of this stack slot.
    let sk: u64 = unsafe { bpf_probe_read_kernel(&slot as *const u64)? };
    if sk == 0 {
        return Err(0);
    }
    Ok(sk)
}

/// A change of the context's socket as the tracepoint describes it; None
/// for a family tcptrace does not trace.
#[inline(always)]
fn ops_change(
    ctx: &SockOpsContext,
    sk: u64,
    oldstate: i32,
    newstate: i32,
) -> Result<Option<Change>, i32> {
    let Some((family, mut saddr, daddr, _, dport)) = ops_tuple(ctx) else {
        return Ok(None);
    };
    // The local port and IPv4 address where the tracepoint reads them.
    let (saddr4, sport) = inet_saddr_sport(sk)?;
    if family == AF_INET {
        saddr[0] = saddr4;
    }
    Ok(Some(Change {
        skaddr: sk,
        oldstate,
        newstate,
        family,
        sport,
        dport,
        saddr,
        daddr,
    }))
}

fn sock_ops_state(ctx: &SockOpsContext) -> Result<(), i32> {
    use aya_ebpf::bindings::bpf_sock_ops as Ops;
    use core::mem::offset_of;
    let sk = ops_sk(ctx)?;
    let args = offset_of!(Ops, __bindgen_anon_1);
    let (oldstate, newstate) = (ops_u32(ctx, args) as i32, ops_u32(ctx, args + 4) as i32);
    let Some(c) = ops_change(ctx, sk, oldstate, newstate)? else {
        return Ok(());
    };
    note_handled(sk, oldstate, newstate);
    count_sockops(SOCKOPS_SEEN);
    if !wanted(c.family, &c.saddr, &c.daddr, c.sport, c.dport) {
        return Ok(());
    }
    if oldstate == TCP_SYN_RECV && !was_followed_late(sk) {
        // A child's first state callback; its LISTEN→SYN_RECV was the
        // tracepoint's alone.
        let first = Change {
            oldstate: TCP_LISTEN,
            newstate: TCP_SYN_RECV,
            ..c
        };
        if rescue_first_change(ctx, first)? {
            // Made up for only now: how long the child was in SYN_RECV is
            // not known (0), rather than the moment since.
            if let Some(info) = SOCKS.get_ptr_mut(sk) {
                // SAFETY: the socket's entry, just written by this program.
                unsafe { (*info).ts_ns = 0 };
            }
        }
    }
    emit_from_sock_ops(ctx, c)
}

/// One TCP state change, as the tracepoint describes it (ports in host order).
#[derive(Clone, Copy)]
struct Change {
    skaddr: u64,
    oldstate: i32,
    newstate: i32,
    family: u16,
    sport: u16,
    dport: u16,
    saddr: Addr,
    daddr: Addr,
}

/// Emits a change the user wants (the caller applied the filter) and keeps
/// the socket's owner and time in state. True when the event went into the
/// ring (false: the ring was full, counted in LOST).
#[inline(always)]
fn state_change<C: EbpfContext>(
    ctx: &C,
    c: Change,
    current_owner: impl Fn(u64) -> SockInfo,
) -> Result<bool, i32> {
    let Change {
        skaddr,
        oldstate,
        newstate,
        family,
        sport,
        dport,
        saddr,
        daddr,
    } = c;
    // SAFETY: map pointers and the reserved ring record, as commented below.
    unsafe {
        let now = bpf_ktime_get_ns();

        // These transitions run in the owning process (connect, listen,
        // close/shutdown); the rest often run in softirq on behalf of
        // whichever task was interrupted, so they keep the recorded owner.
        let owner_ctx = matches!(
            (oldstate, newstate),
            (TCP_CLOSE, TCP_SYN_SENT)
                | (TCP_CLOSE, TCP_LISTEN)
                | (TCP_ESTABLISHED, TCP_FIN_WAIT1)
                | (TCP_CLOSE_WAIT, TCP_LAST_ACK)
        );
        // Kept as a pointer: a known socket's record is updated in place
        // below, since an insert into an LRU map takes a fresh element from
        // the free list and returns the old one, at every state change.
        let slot = SOCKS.get_ptr_mut(skaddr);
        // A socket's first change starts it afresh: an entry at its address
        // is a freed socket's whose →CLOSE went unseen (its owner, namespace
        // and time are not this socket's).
        let known = if first_change(oldstate, newstate) {
            None
        } else {
            slot.map(|p| *p)
        };
        // A socket never changes namespace: two pointer reads at its first
        // state change, none after.
        let netns = match known {
            Some(i) => i.netns,
            None => sock_netns(skaddr),
        };
        let listen_key = ListenKey {
            netns,
            port: sport,
            _pad: 0,
        };
        let mut info = match known {
            Some(i) => i,
            None if oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV => {
                // A passively opened child: it belongs to its listener's owner
                // until accept() says who took it.
                LISTENERS.get(listen_key).copied().unwrap_or(SockInfo {
                    owner_known: 0,
                    ..current_owner(0)
                })
            }
            None => SockInfo {
                owner_known: 0,
                ..current_owner(0)
            },
        };
        let prev_state_ns = if known.is_some() && info.ts_ns != 0 {
            now - info.ts_ns
        } else {
            0
        };
        if owner_ctx {
            info = current_owner(info.ts_ns);
        }
        info.netns = netns;

        // A socket's byte counters are final when it closes: 64-bit, where
        // FIN seq − ISN wraps at 4 GiB and a reset leaves no FIN at all.
        let f = filter();
        let (counters, bytes_acked, bytes_received) =
            if newstate == TCP_CLOSE && oldstate != TCP_LISTEN && f.off_bytes_acked != 0 {
                let at = |off: u32| (skaddr + off as u64) as *const u64;
                match (
                    bpf_probe_read_kernel(at(f.off_bytes_acked)),
                    bpf_probe_read_kernel(at(f.off_bytes_received)),
                ) {
                    (Ok(a), Ok(r)) => (1u8, a, r),
                    _ => (0, 0, 0),
                }
            } else {
                (0, 0, 0)
            };

        let delivered = match EVENTS.reserve::<StateEvent>(0) {
            Some(mut entry) => {
                let ev = entry.as_mut_ptr();
                // `ev` points at a reserved, exclusively owned record; the
                // address and comm fields are 8-byte aligned in it (see `Addr`
                // for why they are written as words).
                {
                    (*ev).kind = EVENT_STATE;
                    (*ev).oldstate = oldstate as u8;
                    (*ev).newstate = newstate as u8;
                    (*ev).owner_known = info.owner_known as u8;
                    (*ev).family = family;
                    (*ev).sport = sport;
                    (*ev).dport = dport;
                    (*ev).counters = counters;
                    (*ev)._pad0 = 0;
                    (*ev).pid = info.pid;
                    (*ev).ts_ns = now;
                    (*ev).skaddr = skaddr;
                    (*ev).prev_state_ns = prev_state_ns;
                    (*ev).netns = netns;
                    (*ev)._pad1 = 0;
                    *(core::ptr::addr_of_mut!((*ev).saddr) as *mut Addr) = saddr;
                    *(core::ptr::addr_of_mut!((*ev).daddr) as *mut Addr) = daddr;
                    *(core::ptr::addr_of_mut!((*ev).comm) as *mut [u64; 2]) =
                        *(info.comm.as_ptr() as *const [u64; 2]);
                    (*ev).bytes_acked = bytes_acked;
                    (*ev).bytes_received = bytes_received;
                }
                entry.submit(0);
                true
            }
            None => {
                // Once per CPU: LOST counts every drop, and a log line per
                // drop would flood the log ring exactly when it is full too.
                if count_lost() == 1 {
                    warn!(ctx, "tcptrace: ring buffer full, dropping state changes");
                }
                false
            }
        };

        if newstate == TCP_LISTEN {
            let _ = LISTENERS.insert(listen_key, info, 0);
        } else if oldstate == TCP_LISTEN && newstate == TCP_CLOSE {
            let _ = LISTENERS.remove(listen_key);
        }
        info.ts_ns = now;
        info.state = newstate as u32;
        match slot {
            _ if newstate == TCP_CLOSE => {
                let _ = SOCKS.remove(skaddr);
            }
            Some(p) => *p = info,
            None => {
                let _ = SOCKS.insert(skaddr, info, 0);
            }
        }
        Ok(delivered)
    }
}

/// accept() runs in the process that takes the child: it is the owner from
/// now on. At the return of inet_accept (every TCP accept: accept(2),
/// accept4(2), io_uring's), whose second argument is the new `struct
/// socket`, grafted onto the child when the accept succeeded: one read. An
/// fexit program costs only the accepts; a syscall-exit tracepoint, the
/// fallback below, sends every syscall of every process on the host through
/// the kernel's slow exit path while it is attached.
#[fexit(function = "inet_accept")]
pub fn tcptrace_fexit(ctx: FExitContext) -> i32 {
    let f = filter();
    if f.off_socket_sk == 0 {
        return 0;
    }
    let newsock: u64 = ctx.arg(1);
    // SAFETY: read with bpf_probe_read_kernel, which fails cleanly on a bad
    // address; a failed accept left the new socket's `sk` NULL.
    if let Ok(sk) =
        unsafe { bpf_probe_read_kernel((newsock + f.off_socket_sk as u64) as *const u64) }
    {
        take_ownership(sk);
    }
    0
}

/// Where the kernel will not load or attach the fexit program (no BPF
/// trampolines, or a policy against tracing programs: EPERM on the
/// development VM), this reads the returned descriptor's socket at syscall
/// exit instead: task->files->fdt->fd[ret]->private_data->sk.
#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn tcptrace_accept4(ctx: TracePointContext) -> u32 {
    let _ = try_accept(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn tcptrace_accept(ctx: TracePointContext) -> u32 {
    let _ = try_accept(&ctx);
    0
}

/// Offset of `long ret` in the syscalls:sys_exit_* tracepoints.
const TP_SYSCALL_RET: usize = 16;

fn try_accept(ctx: &TracePointContext) -> Result<(), i32> {
    let f = filter();
    if f.off_task_files == 0 {
        return Ok(());
    }
    // SAFETY: every pointer is read with bpf_probe_read_kernel, which fails
    // cleanly on a bad address.
    unsafe {
        let fd: i64 = ctx.read_at(TP_SYSCALL_RET)?;
        if !(0..65536).contains(&fd) {
            return Ok(());
        }
        let task = aya_ebpf::helpers::bpf_get_current_task();
        let files: u64 = bpf_probe_read_kernel((task + f.off_task_files as u64) as *const u64)?;
        let fdt: u64 = bpf_probe_read_kernel((files + f.off_files_fdt as u64) as *const u64)?;
        let fds: u64 = bpf_probe_read_kernel((fdt + f.off_fdt_fd as u64) as *const u64)?;
        let file: u64 = bpf_probe_read_kernel((fds + fd as u64 * 8) as *const u64)?;
        let sock: u64 =
            bpf_probe_read_kernel((file + f.off_file_private_data as u64) as *const u64)?;
        let sk: u64 = bpf_probe_read_kernel((sock + f.off_socket_sk as u64) as *const u64)?;
        take_ownership(sk);
    }
    Ok(())
}

/// The current process accepted `sk`: its owner from now on.
#[inline(always)]
fn take_ownership(sk: u64) {
    // Only sockets already tracked (so filtered ones stay untouched).
    if let Some(info) = SOCKS.get_ptr_mut(sk) {
        let owner = current_owner(0);
        // SAFETY: the socket's entry in SOCKS.
        unsafe {
            (*info).pid = owner.pid;
            (*info).comm = owner.comm;
            (*info).owner_known = 1;
        }
    }
}

// One pair of classifiers per link-layer framing: `tcptrace_in`/`tcptrace_eg` for interfaces with an
// Ethernet header (loopback included), `*_l3` for those without (tun,
// wireguard), so the parser never guesses where the IP header starts.
#[classifier]
pub fn tcptrace_in(ctx: TcContext) -> i32 {
    let _ = try_segment(&ctx, DIR_INGRESS, 14);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn tcptrace_eg(ctx: TcContext) -> i32 {
    let _ = try_segment(&ctx, DIR_EGRESS, 14);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn tcptrace_in_l3(ctx: TcContext) -> i32 {
    let _ = try_segment(&ctx, DIR_INGRESS, 0);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn tcptrace_eg_l3(ctx: TcContext) -> i32 {
    let _ = try_segment(&ctx, DIR_EGRESS, 0);
    TC_ACT_UNSPEC
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Where header fields come from. Headers nearly always sit in the skb's
/// linear part, where they are read directly; `bpf_skb_load_bytes` (a helper
/// call per field, a sixth of each run when every read used it) is the
/// fallback when they do not.
trait Headers {
    fn load<T: Copy>(&self, off: usize) -> Result<T, i64>;
}

/// Direct packet access, bounds-checked against `data_end` as the verifier
/// requires.
struct Linear {
    data: usize,
    end: usize,
}

impl Headers for Linear {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, i64> {
        let p = self.data + off;
        // At least two bytes: LLVM turns `p + 1 > end` into `p >= end`, from
        // which the verifier learns no readable range. Every field read here
        // is followed by more header, so the extra byte is always there.
        if p + core::mem::size_of::<T>().max(2) > self.end {
            return Err(-1);
        }
        // SAFETY: in bounds (checked above); packet data has no alignment.
        Ok(unsafe { core::ptr::read_unaligned(p as *const T) })
    }
}

/// Copies out of the skb wherever the bytes are.
struct Copied<'a>(&'a TcContext);

impl Headers for Copied<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, i64> {
        self.0.load(off)
    }
}

#[inline(always)]
fn try_segment(ctx: &TcContext, dir: u8, l2_len: usize) -> Result<(), i64> {
    let linear = Linear {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    // Nothing is changed before the last header load, so a segment whose
    // headers are not all linear is parsed again from the start.
    match parse_segment(ctx, &linear, dir, l2_len) {
        Err(_) => parse_segment(ctx, &Copied(ctx), dir, l2_len),
        done => done,
    }
}

#[inline(always)]
fn parse_segment<H: Headers>(ctx: &TcContext, h: &H, dir: u8, l2_len: usize) -> Result<(), i64> {
    // SAFETY: ctx.skb points at the __sk_buff the kernel handed us.
    let (proto, ifindex, skb_len) = unsafe {
        let skb = &*ctx.skb.skb;
        (u16::from_be(skb.protocol as u16), skb.ifindex, skb.len)
    };
    let family;
    let saddr: Addr;
    let daddr: Addr;
    let l4: usize;
    // Bytes from the TCP header to the end of the IP payload; 0 when the IP
    // header does not say (IPv6 jumbograms, BIG TCP), then the skb length is used.
    let ip_payload: u32;
    if proto == ETH_P_IP {
        family = AF_INET;
        let vihl: u8 = h.load(l2_len)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return Ok(());
        }
        if h.load::<u8>(l2_len + 9)? != IPPROTO_TCP {
            return Ok(());
        }
        // A non-first fragment carries no TCP header.
        if u16::from_be(h.load::<u16>(l2_len + 6)?) & 0x1fff != 0 {
            return Ok(());
        }
        let tot_len = u16::from_be(h.load::<u16>(l2_len + 2)?) as u32;
        ip_payload = tot_len.saturating_sub(ihl as u32);
        saddr = [h.load(l2_len + 12)?, 0, 0, 0];
        daddr = [h.load(l2_len + 16)?, 0, 0, 0];
        l4 = l2_len + ihl;
    } else if proto == ETH_P_IPV6 {
        family = AF_INET6;
        let payload_len = u16::from_be(h.load::<u16>(l2_len + 4)?) as u32;
        let mut next: u8 = h.load(l2_len + 6)?;
        saddr = h.load(l2_len + 8)?;
        daddr = h.load(l2_len + 24)?;
        let mut off = l2_len + 40;
        // Walk the extension headers a TCP segment may sit behind; anything
        // else (fragments, ESP, no-next-header) is skipped, never misparsed.
        let mut i = 0;
        while i < 6 && next != IPPROTO_TCP {
            let hdr: [u8; 2] = h.load(off)?;
            off += match next {
                0 | 43 | 60 => (hdr[1] as usize + 1) * 8,
                51 => (hdr[1] as usize + 2) * 4,
                _ => return Ok(()),
            };
            next = hdr[0];
            i += 1;
        }
        if next != IPPROTO_TCP {
            return Ok(());
        }
        let ext = (off - l2_len - 40) as u32;
        ip_payload = if payload_len == 0 {
            0
        } else {
            payload_len.saturating_sub(ext)
        };
        l4 = off;
    } else {
        return Ok(());
    }

    let ports: [u8; 4] = h.load(l4)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let (local, remote, lport, rport) = if dir == DIR_EGRESS {
        (&saddr, &daddr, sport, dport)
    } else {
        (&daddr, &saddr, dport, sport)
    };
    if !wanted(family, local, remote, lport, rport) {
        return Ok(());
    }
    let doff_flags: [u8; 2] = h.load(l4 + 12)?;
    let doff = ((doff_flags[0] >> 4) as usize) * 4;
    let flags = doff_flags[1];
    if doff < 20 {
        return Ok(());
    }
    let seq = u32::from_be(h.load::<u32>(l4 + 4)?);
    let ack = u32::from_be(h.load::<u32>(l4 + 8)?);
    let win = u16::from_be(h.load::<u16>(l4 + 14)?);
    let tcp_and_payload = if ip_payload != 0 {
        ip_payload
    } else {
        skb_len.saturating_sub(l4 as u32)
    };
    let len = tcp_and_payload.saturating_sub(doff as u32);

    let key = FlowKey {
        saddr,
        daddr,
        sport,
        dport,
        family,
        _pad: 0,
    };
    let control = flags & (TH_SYN | TH_FIN | TH_RST) != 0;
    let mut emit = control;
    if flags & TH_ACK != 0 {
        // SAFETY: value copied out right away.
        if let Some(expected) = unsafe { FLOWS.get(key) } {
            if *expected == ack {
                emit = true;
                let _ = FLOWS.remove(key);
            }
        }
    }
    if !emit {
        return Ok(());
    }
    // Wait for the segment that will answer this one, in the other direction.
    if control && flags & TH_RST == 0 && (flags & TH_FIN != 0 || flags & TH_ACK != 0) {
        let reply = FlowKey {
            saddr: daddr,
            daddr: saddr,
            sport: dport,
            dport: sport,
            family,
            _pad: 0,
        };
        // SYN-ACK occupies one sequence number; a FIN one after its payload.
        let syn = (flags & TH_SYN != 0) as u32;
        let fin = (flags & TH_FIN != 0) as u32;
        let expected = seq.wrapping_add(syn).wrapping_add(len).wrapping_add(fin);
        let _ = FLOWS.insert(reply, expected, 0);
    }

    let netns = filter().netns;
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    match EVENTS.reserve::<SegmentEvent>(0) {
        Some(mut entry) => {
            let opt_len = (doff - 20) as u32;
            let ev = entry.as_mut_ptr();
            // SAFETY: `ev` points at a reserved, exclusively owned record;
            // addresses and options are 8-byte aligned in it (see `Addr`).
            unsafe {
                (*ev).kind = EVENT_SEGMENT;
                (*ev).dir = dir;
                (*ev).flags = flags;
                (*ev).opt_len = 0;
                (*ev).family = family;
                (*ev).sport = sport;
                (*ev).dport = dport;
                (*ev).win = win;
                (*ev).ifindex = ifindex;
                (*ev).ts_ns = ts_ns;
                (*ev).seq = seq;
                (*ev).ack = ack;
                (*ev).len = len;
                (*ev).netns = netns;
                *(core::ptr::addr_of_mut!((*ev).saddr) as *mut Addr) = saddr;
                *(core::ptr::addr_of_mut!((*ev).daddr) as *mut Addr) = daddr;
                // Word by word and volatile, or LLVM merges the stores into
                // a `memset` call (see `Addr`).
                let opts = core::ptr::addr_of_mut!((*ev).options) as *mut u64;
                let mut w = 0;
                while w < TCP_OPTIONS_MAX / 8 {
                    core::ptr::write_volatile(opts.add(w), 0);
                    w += 1;
                }
                // Options come in whole 32-bit words (data offset counts
                // words). Copying one word per fixed-size load keeps every
                // length a constant, which every verifier (6.1 included)
                // accepts; a variable-length load is not tracked well enough.
                // Options past the linear part are copied out of the skb.
                let words = opt_len as usize / 4;
                let dst = core::ptr::addr_of_mut!((*ev).options) as *mut [u8; 4];
                let mut i = 0;
                while i < TCP_OPTIONS_MAX / 4 && i < words {
                    let off = l4 + 20 + i * 4;
                    match h.load::<[u8; 4]>(off).or_else(|_| ctx.load::<[u8; 4]>(off)) {
                        Ok(w) => core::ptr::write_unaligned(dst.add(i), w),
                        Err(_) => break,
                    }
                    i += 1;
                }
                (*ev).opt_len = (i * 4) as u8;
            }
            entry.submit(0);
        }
        None => {
            count_lost();
        }
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
