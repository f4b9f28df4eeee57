//! Records shared by the eBPF programs and the CLI.
//!
//! Every record in the ring buffer starts with a `kind` byte so the reader can
//! tell a state change from a wire segment before it looks at the rest. Layouts
//! are `#[repr(C)]` with explicit padding so both sides agree byte for byte.
#![no_std]

/// Slots of the kernel side's `SOCKOPS` per-CPU counters: state changes
/// the sock_ops program saw (of any socket), the tracepoint program left
/// to it (of any socket), and it emitted (past the filter).
pub const SOCKOPS_SEEN: u32 = 0;
pub const SOCKOPS_HANDED_OFF: u32 = 1;
pub const SOCKOPS_EMITTED: u32 = 2;

pub const EVENT_STATE: u8 = 1;
pub const EVENT_SEGMENT: u8 = 2;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

pub const TASK_COMM_LEN: usize = 16;
/// TCP options fit in 40 bytes (data offset 15 words minus the fixed header).
pub const TCP_OPTIONS_MAX: usize = 40;
/// Most ports `--port` can name; the kernel side loops over this many.
pub const MAX_PORTS: usize = 8;

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// One call of the `sock:inet_sock_set_state` tracepoint.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StateEvent {
    pub kind: u8,
    pub oldstate: u8,
    pub newstate: u8,
    /// 1 when pid/comm come from the socket's owner (captured in process
    /// context), 0 when no owner was ever seen and they are the interrupted task.
    pub owner_known: u8,
    pub family: u16,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// 1 when `bytes_acked` and `bytes_received` are the socket's counters
    /// (read at → CLOSE), 0 when they are not filled in.
    pub counters: u8,
    pub _pad0: u8,
    pub pid: u32,
    pub ts_ns: u64,
    pub skaddr: u64,
    /// Time spent in `oldstate`, 0 when this socket was not seen entering it.
    pub prev_state_ns: u64,
    pub netns: u32,
    pub _pad1: u32,
    /// IPv4 addresses use the first four bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; TASK_COMM_LEN],
    /// The socket's `tcp_sock.bytes_acked` (bytes it sent that the peer
    /// acknowledged) and `bytes_received`, 64-bit, at → CLOSE.
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

/// One TCP control segment seen by a TC classifier.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SegmentEvent {
    pub kind: u8,
    pub dir: u8,
    /// The TCP flags byte as on the wire (FIN=0x01 … CWR=0x80).
    pub flags: u8,
    /// Bytes of `options` that are valid.
    pub opt_len: u8,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    /// Raw window field, not scaled.
    pub win: u16,
    pub ifindex: u32,
    pub ts_ns: u64,
    pub seq: u32,
    pub ack: u32,
    /// TCP payload bytes (a GSO/GRO super-segment counts all of them).
    pub len: u32,
    pub netns: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Raw TCP options; decoded in userspace.
    pub options: [u8; TCP_OPTIONS_MAX],
}

/// Filters applied in the kernel, set by the CLI as a read-only global.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Filter {
    /// Match either side's port against these; `nports == 0` means any.
    pub ports: [u16; MAX_PORTS],
    pub nports: u16,
    /// 0 = any, else AF_INET or AF_INET6.
    pub family: u16,
    /// 0 = no filter, else the family of `laddr` / `raddr`.
    pub laddr_family: u16,
    pub raddr_family: u16,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    /// Network namespace inode stamped on segments (TC programs cannot see it).
    pub netns: u32,
    /// Byte offsets, read from the running kernel's BTF, to go from a
    /// `struct sock *` to its namespace's inode number. 0 disables the lookup.
    pub off_sk_net: u32,
    pub off_net_ns_inum: u32,
    /// Offsets from the current task to the `struct sock` behind a file
    /// descriptor: task->files->fdt->fd[n]->private_data (a `struct socket`)
    /// ->sk. Used at accept() to name a child's owner. 0 disables it.
    pub off_task_files: u32,
    pub off_files_fdt: u32,
    pub off_fdt_fd: u32,
    pub off_file_private_data: u32,
    pub off_socket_sk: u32,
    /// `tcp_sock.bytes_acked` and `tcp_sock.bytes_received` from a `struct
    /// sock *` (a TCP socket's `struct sock` is the start of its
    /// `tcp_sock`). 0 disables reading them.
    pub off_bytes_acked: u32,
    pub off_bytes_received: u32,
    /// For the sock_ops program, which gets a socket rather than the
    /// tracepoint's record: `inet_sock.inet_saddr` and `inet_sport` (one
    /// read where they lie within 8 bytes). 0: no sock_ops.
    pub off_inet_saddr: u32,
    pub off_inet_sport: u32,
    /// `task_struct.tgid` and `.comm`, for the sock_ops program, which may
    /// not call bpf_get_current_pid_tgid / bpf_get_current_comm on every
    /// kernel.
    pub off_task_tgid: u32,
    pub off_task_comm: u32,
    /// Tests only (`FAULT_*`): makes the tracepoint program do what the
    /// kernel does under load, which a test cannot make it do on demand.
    pub fault: u32,
}

/// The tracepoint program passes over each socket's first change (CLOSE→
/// SYN_SENT, CLOSE→LISTEN, a child's LISTEN→SYN_RECV), as when the kernel
/// skips it, so that a test sees the sock_ops program make up for it.
pub const FAULT_SKIP_FIRST_CHANGES: u32 = 1;

impl Filter {
    pub const fn zeroed() -> Self {
        Filter {
            ports: [0; MAX_PORTS],
            nports: 0,
            family: 0,
            laddr_family: 0,
            raddr_family: 0,
            laddr: [0; 16],
            raddr: [0; 16],
            netns: 0,
            off_sk_net: 0,
            off_net_ns_inum: 0,
            off_task_files: 0,
            off_files_fdt: 0,
            off_fdt_fd: 0,
            off_file_private_data: 0,
            off_socket_sk: 0,
            off_bytes_acked: 0,
            off_bytes_received: 0,
            off_inet_saddr: 0,
            off_inet_sport: 0,
            off_task_tgid: 0,
            off_task_comm: 0,
            fault: 0,
        }
    }
}

/// Per-socket record kept by the kernel side (LRU, removed at CLOSE).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockInfo {
    /// When the socket entered its current state.
    pub ts_ns: u64,
    pub pid: u32,
    pub owner_known: u32,
    pub comm: [u8; TASK_COMM_LEN],
    /// Namespace inode, read once when the socket is first seen.
    pub netns: u32,
    /// The state it entered last (the kernel's TCP_* number), so that a
    /// socket's first change can tell its own entry from one a freed
    /// socket at the same address left (its →CLOSE unseen).
    pub state: u32,
}

/// Owner of a listening socket, keyed by (netns, port), so that children
/// created in softirq can inherit it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A flow waiting for the ACK that completes a handshake or acknowledges a FIN.
/// Keyed in the direction of that ACK. Addresses are held as words (IPv4 in
/// the first): the kernel side builds a key per segment, and byte arrays
/// compile to byte-at-a-time copies in BPF.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, every bit pattern valid, no padding left implicit.
    unsafe impl aya::Pod for super::Filter {}
    unsafe impl aya::Pod for super::SockInfo {}
    unsafe impl aya::Pod for super::ListenKey {}
    unsafe impl aya::Pod for super::FlowKey {}
}
