//! Writes the guest's whole root filesystem as one uncompressed newc cpio
//! archive. It is rebuilt on every run: that takes well under a second
//! (plain file copies), while compression would only move the cost into
//! the emulated guest, which is far slower at undoing it.
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use super::{output, which, Kernel, Payload};

/// Modules the tests need when the kernel builds them as modules; required
/// ones must be either loadable or built in. Their dependencies come along.
const MODULES: &[(&str, bool)] = &[
    // The tests give each connection its own namespaces joined by a veth pair.
    ("veth", true),
    // clsact (in sch_ingress) hosts tcptrace's TC classifiers, cls_bpf runs them.
    ("cls_bpf", true),
    ("sch_ingress", true),
    ("act_bpf", false),
    ("ipv6", true),
    // Lets tests drop or delay segments (`tc qdisc … netem`) to provoke
    // retransmissions; only needed by those that ask for it.
    ("sch_netem", false),
    // A tun device is the interface without an Ethernet header that the
    // `_l3` classifiers are tested on.
    ("tun", false),
];

/// Host tools the tests shell out to, copied with their libraries.
const TOOLS: &[&str] = &["ip", "tc", "tcpdump", "bpftool"];

pub(super) const MARK: &str = "@@tcptrace-vm";

/// Writes the initramfs for `k` to `out` and returns the modules `/init` loads, in order.
pub fn build(k: &Kernel, payload: &Payload, scratch: &Path, out: &Path) -> Result<Vec<String>> {
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut a = Archive::new(BufWriter::new(file));
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "tests",
        "lib/modules",
        "usr/bin",
        "usr/sbin",
    ] {
        a.dir(d)?;
    }
    // iproute2 and tcptrace name namespaces by /var/run/netns, as on the host.
    a.symlink("var/run", "../run")?;
    // The kernel opens /dev/console for /init before anything mounts devtmpfs.
    a.node("dev/console", 0o020600, (5, 1))?;

    // busybox-static's own sh runs its applets in preference to PATH, so
    // `sh -c "ip …"` from a test would get busybox's crippled ip; dash (the
    // host's /bin/sh on Debian) goes by PATH.
    match which("dash") {
        Some(dash) => a.elf("bin/sh", &dash)?,
        None => eprintln!("xtask: warning: no dash on the host; `sh -c` in the VM runs busybox applets, not the real tools"),
    }
    let busybox = which("busybox")
        .context("busybox is missing: run `cargo xtask bootstrap` (busybox-static)")?;
    a.elf("bin/busybox", &busybox)?;
    let mut sh = Command::new(&busybox);
    sh.arg("--list");
    let applets = String::from_utf8_lossy(&output(sh)?).into_owned();
    for applet in applets.lines().map(str::trim) {
        // The real tools win: busybox's ip and tc lack what the tests use.
        if !applet.is_empty() && !TOOLS.contains(&applet) {
            a.symlink(&format!("bin/{applet}"), "busybox")?;
        }
    }

    for tool in TOOLS {
        let Some(host) = which(tool) else {
            eprintln!(
                "xtask: warning: {tool} is not installed; tests that run it will fail in the VM"
            );
            continue;
        };
        let real = host.canonicalize().unwrap_or(host);
        let guest = match real.to_str() {
            Some(p) if p.starts_with("/usr/") => p.trim_start_matches('/').to_string(),
            _ => format!("usr/bin/{tool}"),
        };
        a.elf(&guest, &real)?;
    }
    // tc's netem reads its delay distributions from here.
    a.tree(Path::new("/usr/lib/tc"), "usr/lib/tc")?;

    a.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\ntcpdump:x:100:100::/nonexistent:/bin/false\n",
    )?;
    a.file("etc/group", 0o644, b"root:x:0:\ntcpdump:x:100:\n")?;
    a.file(
        "etc/hosts",
        0o644,
        b"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    )?;
    a.file(
        "etc/nsswitch.conf",
        0o644,
        b"passwd: files\ngroup: files\nhosts: files\n",
    )?;

    let modules = match &k.modules {
        Some(dir) => modules(dir)?,
        None => Vec::new(),
    };
    for (name, path) in &modules {
        a.file(
            &format!("lib/modules/{name}.ko"),
            0o644,
            &read_module(path)?,
        )?;
    }

    let stage = scratch.join("stripped");
    std::fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
    a.elf(
        "usr/bin/tcptrace",
        &stripped(&payload.tcptrace, &stage.join("tcptrace"))?,
    )?;
    for (name, host) in &payload.tests {
        a.elf(
            &format!("tests/{name}"),
            &stripped(host, &stage.join(name))?,
        )?;
    }
    // cargo runs test executables in their package directory; fixtures read
    // relative to it (or to CARGO_MANIFEST_DIR) then work the same here.
    let pkg_dir = crate::workspace_root().join("tcptrace");
    let pkg_guest = pkg_dir
        .to_string_lossy()
        .trim_start_matches('/')
        .to_string();
    a.dir(&pkg_guest)?;
    a.tree(
        &pkg_dir.join("tests/fixtures"),
        &format!("{pkg_guest}/tests/fixtures"),
    )?;

    let names: Vec<String> = modules.into_iter().map(|(n, _)| n).collect();
    a.file("init", 0o755, init_script(&names, &pkg_dir).as_bytes())?;
    a.finish()?;
    Ok(names)
}

fn init_script(modules: &[String], pkg_dir: &Path) -> String {
    // The root is already a writable tmpfs; a fresh mount on /run or /tmp
    // would only hide the package directory of a checkout that lives there.
    let scratch: Vec<String> = [("/run", "0755"), ("/tmp", "1777")]
        .iter()
        .filter(|(dir, _)| !pkg_dir.starts_with(dir))
        .map(|(dir, mode)| format!("mount -t tmpfs -o mode={mode} tmpfs {dir}"))
        .collect();
    format!(
        r#"#!/bin/sh
# PID 1 of the test VM, written by xtask/src/vm/initramfs.rs. It must end in
# poweroff: if it exits, the kernel panics and the host sees a crash.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
{scratch}
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpffs /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup

status=0
fail() {{ echo "{MARK} preflight failed: $*"; status=1; }}
for m in {modules}; do
    insmod /lib/modules/$m.ko || fail "insmod $m"
done
ip link set lo up || fail "ip link set lo up"
[ -e /sys/kernel/btf/vmlinux ] || fail "no /sys/kernel/btf/vmlinux: tcptrace needs CONFIG_DEBUG_INFO_BTF=y"
{{ ip netns add tcptrace-vm && ip netns del tcptrace-vm; }} || fail "ip netns add"
{{ ip link add tcptrace-vm0 type veth peer name tcptrace-vm1 && ip link del tcptrace-vm0; }} || fail "veth pair"
{{ tc qdisc add dev lo clsact && tc qdisc del dev lo clsact; }} || fail "clsact qdisc"
echo "{MARK} kernel $(uname -r), $(nproc) cpus, $(sed -n 's/MemTotal: *//p' /proc/meminfo) memory"

if [ $status = 0 ]; then
    export TCPTRACE_BIN=/usr/bin/tcptrace TCPTRACE_IN_VM=1 RUST_BACKTRACE=1
    export HOME=/root TMPDIR=/tmp CARGO_MANIFEST_DIR="{pkg}"
    cd "{pkg}" || fail "cd {pkg}"
    for t in /tests/*; do
        [ -x "$t" ] || continue
        n=${{t##*/}}
        echo "{MARK} begin $n"
        "$t" --test-threads=1
        rc=$?
        echo "{MARK} end $n $rc"
        [ $rc = 0 ] || status=1
    done
fi
echo "{MARK} done $status"
poweroff -f
sleep 10
echo o > /proc/sysrq-trigger
"#,
        modules = modules.join(" "),
        pkg = pkg_dir.display(),
        scratch = scratch.join("\n"),
    )
}

/// The modules from [`MODULES`] that `dir` has as loadable files, with their
/// dependencies first, as (module name, file).
fn modules(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut index = BTreeMap::new();
    index_modules(dir, &mut index)?;
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).ok();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for &(name, required) in MODULES {
        if index.contains_key(name) {
            visit(name, &index, &mut seen, &mut order)?;
            continue;
        }
        let Some(builtin) = &builtin else { continue };
        let is_builtin = builtin
            .lines()
            .any(|l| module_name(l).as_deref() == Some(name));
        if required && !is_builtin {
            bail!("the kernel in {} has no {name}, neither as a module nor built in; tcptrace's tests need it", dir.display());
        }
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    seen: &mut HashSet<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    // Not in the index: built in, which modules.builtin would confirm.
    let Some(path) = index.get(name) else {
        return Ok(());
    };
    for dep in depends(&read_module(path)?) {
        visit(&dep, index, seen, order)?;
    }
    order.push((name.to_string(), path.clone()));
    Ok(())
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = path.to_str().and_then(module_name) {
            index.insert(name, path);
        }
    }
    Ok(())
}

/// `veth` out of `…/veth.ko.xz`; the kernel spells module names with `_`.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file
        .split_once(".ko")
        .filter(|(_, ext)| ext.is_empty() || ext.starts_with('.'))?
        .0;
    Some(stem.replace('-', "_"))
}

/// The module's `depends=` entry from its `.modinfo` section (what depmod
/// would put in modules.dep, which kernel packages leave to install time).
fn depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    let mut at = None;
    for i in 0..ko.len().saturating_sub(KEY.len()) {
        if &ko[i..i + KEY.len()] == KEY && (i == 0 || ko[i - 1] == 0) {
            at = Some(i + KEY.len());
            break;
        }
    }
    let Some(start) = at else { return Vec::new() };
    let end = ko[start..]
        .iter()
        .position(|&b| b == 0)
        .map_or(ko.len(), |n| start + n);
    String::from_utf8_lossy(&ko[start..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The module as insmod takes it: busybox's insmod cannot decompress, so
/// `.ko.xz`/`.ko.zst`/`.ko.gz` are unpacked here, on the fast side.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return std::fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let mut c = Command::new(tool);
    c.arg("-dc").arg(path);
    output(c).with_context(|| format!("decompressing {} (is {tool} installed?)", path.display()))
}

/// A copy of `host` without debug info: test executables carry hundreds of
/// MiB of it, all of which the guest would hold in RAM. Symbols stay, so
/// backtraces still name functions.
fn stripped(host: &Path, to: &Path) -> Result<PathBuf> {
    let Some(strip) = which("strip") else {
        return Ok(host.to_path_buf());
    };
    let mut c = Command::new(strip);
    c.arg("--strip-debug").arg("-o").arg(to).arg(host);
    output(c).with_context(|| format!("stripping {}", host.display()))?;
    Ok(to.to_path_buf())
}

/// The shared libraries `ldd` says `elf` loads, the dynamic loader included,
/// by the paths the loader will look for them at.
fn libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .context("cannot run ldd (libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Static executables (busybox-static) have nothing to copy.
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
            || text.contains("statically linked")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            elf.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            bail!("{} needs a library the host lacks: {line}", elf.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// A newc ("070701") cpio writer, the format the kernel unpacks initramfs
/// from. Directories are created on demand; a path written twice keeps the
/// first copy (libraries are shared between executables).
struct Archive<W: Write> {
    w: W,
    ino: u32,
    written: HashSet<String>,
}

impl<W: Write> Archive<W> {
    fn new(w: W) -> Self {
        Archive {
            w,
            ino: 1,
            written: HashSet::new(),
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) -> Result<()> {
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        let mut h = String::from("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.w.write_all(h.as_bytes())?;
        self.w.write_all(name.as_bytes())?;
        self.w.write_all(&[0])?;
        self.pad(110 + name.len() + 1)
    }

    fn pad(&mut self, len: usize) -> Result<()> {
        self.w.write_all(&[0; 3][..(4 - len % 4) % 4])?;
        Ok(())
    }

    /// Records `path` and its missing parents; false if it was already there.
    fn claim(&mut self, path: &str) -> Result<bool> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(self.written.insert(path.to_string()))
    }

    fn dir(&mut self, path: &str) -> Result<()> {
        if self.claim(path)? {
            self.header(path, 0o040755, 0, (0, 0))?;
        }
        Ok(())
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        if self.claim(path)? {
            self.header(path, 0o100000 | mode, data.len(), (0, 0))?;
            self.w.write_all(data)?;
            self.pad(data.len())?;
        }
        Ok(())
    }

    fn host_file(&mut self, path: &str, mode: u32, host: &Path) -> Result<()> {
        if !self.written.contains(path) {
            let data =
                std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
            self.file(path, mode, &data)?;
        }
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        if self.claim(path)? {
            self.header(path, 0o120777, target.len(), (0, 0))?;
            self.w.write_all(target.as_bytes())?;
            self.pad(target.len())?;
        }
        Ok(())
    }

    fn node(&mut self, path: &str, mode: u32, rdev: (u32, u32)) -> Result<()> {
        if self.claim(path)? {
            self.header(path, mode, 0, rdev)?;
        }
        Ok(())
    }

    /// An executable plus every library it loads, at the same paths as on the host.
    fn elf(&mut self, path: &str, host: &Path) -> Result<()> {
        for lib in libraries(host)? {
            let guest = lib.to_string_lossy().trim_start_matches('/').to_string();
            self.host_file(&guest, 0o755, &lib)?;
        }
        self.host_file(path, 0o755, host)
    }

    /// Regular files under `host` (if it exists), at `guest`.
    fn tree(&mut self, host: &Path, guest: &str) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(host) else {
            return Ok(());
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let (h, g) = (entry.path(), format!("{guest}/{name}"));
            if h.is_dir() {
                self.tree(&h, &g)?;
            } else if h.is_file() {
                self.host_file(&g, 0o644, &h)?;
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.w.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/drivers/net/veth.ko").as_deref(),
            Some("veth")
        );
        assert_eq!(
            module_name("/m/sch-ingress.ko.xz").as_deref(),
            Some("sch_ingress")
        );
        assert_eq!(module_name("/m/modules.order"), None);
        assert_eq!(module_name("/m/foo.kobj"), None);
    }

    #[test]
    fn modinfo_depends() {
        assert_eq!(
            depends(b"\x7fELF..\0license=GPL\0depends=libcrc32c,nf_conntrack\0name=x\0"),
            ["libcrc32c", "nf_conntrack"]
        );
        assert!(depends(b"\0depends=\0name=veth\0").is_empty());
    }

    #[test]
    fn cpio_is_aligned() {
        let mut buf = Vec::new();
        let mut a = Archive::new(&mut buf);
        a.file("a/b", 0o644, b"12345").unwrap();
        a.symlink("a/c", "b").unwrap();
        a.finish().unwrap();
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
