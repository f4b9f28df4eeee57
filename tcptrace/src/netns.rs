//! Network namespaces: finding them, entering them for a moment, and the
//! interfaces inside them.
use std::ffi::CStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// A namespace tcptrace attaches in: its file (kept open) and inode.
pub struct Netns {
    pub label: String,
    pub file: File,
    pub inode: u32,
}

impl Netns {
    pub fn current() -> Result<Self> {
        Self::open_path("host", Path::new("/proc/self/ns/net"))
    }

    /// `NAME` (under /var/run/netns, as `ip netns` makes them) or a path such
    /// as /proc/PID/ns/net.
    pub fn open(spec: &str) -> Result<Self> {
        let path = if spec.contains('/') {
            PathBuf::from(spec)
        } else {
            Path::new("/var/run/netns").join(spec)
        };
        Self::open_path(spec, &path)
    }

    fn open_path(label: &str, path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| {
            format!("cannot open network namespace {label} ({}): give a name listed by `ip netns list` or a /proc/PID/ns/net path", path.display())
        })?;
        let inode = file.metadata()?.ino() as u32;
        Ok(Netns {
            label: label.to_string(),
            file,
            inode,
        })
    }

    /// Runs `f` with this thread inside the namespace, then returns to `home`.
    pub fn enter<T>(&self, home: &Netns, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.inode == home.inode {
            return f();
        }
        setns(&self.file)
            .with_context(|| format!("cannot enter network namespace {}", self.label))?;
        let r = f();
        setns(&home.file).context("cannot return to the original network namespace")?;
        r
    }
}

fn setns(f: &File) -> Result<()> {
    // SAFETY: valid fd; CLONE_NEWNET only affects this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// ARPHRD types (include/uapi/linux/if_arp.h) that decide where the IP header starts.
pub const ARPHRD_ETHER: u16 = 1;
pub const ARPHRD_LOOPBACK: u16 = 772;

#[derive(Clone, Debug)]
pub struct Iface {
    pub name: String,
    pub index: u32,
    pub up: bool,
    pub loopback: bool,
    /// True when frames start with an Ethernet header at the TC hook.
    pub ethernet: bool,
}

/// The interfaces of the namespace this thread is in (asks the kernel through
/// a socket, which lives in the current namespace, unlike /sys/class/net).
pub fn interfaces() -> Result<Vec<Iface>> {
    // SAFETY: if_nameindex returns a list we free with if_freenameindex.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        bail!(
            "cannot list network interfaces: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut names = Vec::new();
    let mut p = list;
    // SAFETY: the list ends with a zeroed entry.
    unsafe {
        while (*p).if_index != 0 {
            names.push((
                (*p).if_index,
                CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(),
            ));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    // SAFETY: plain socket for ioctls.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    for (index, name) in names {
        // SAFETY: zeroed ifreq with a NUL-terminated name that fits.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        let flags = if unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) } == 0 {
            unsafe { req.ifr_ifru.ifru_flags as i32 }
        } else {
            0
        };
        let hwtype = if unsafe { libc::ioctl(sock, libc::SIOCGIFHWADDR, &mut req) } == 0 {
            unsafe { req.ifr_ifru.ifru_hwaddr.sa_family }
        } else {
            ARPHRD_ETHER
        };
        out.push(Iface {
            name,
            index,
            up: flags & libc::IFF_UP != 0,
            loopback: flags & libc::IFF_LOOPBACK != 0,
            ethernet: hwtype == ARPHRD_ETHER || hwtype == ARPHRD_LOOPBACK,
        });
    }
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(sock) };
    Ok(out)
}
