//! Turns a matrix entry into a bootable kernel: a Debian package fetched and
//! unpacked once under `target/vm/kernels/`, or a vmlinuz given by path.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use super::{output, vm_dir, Kernel};

pub fn resolve(spec: &str) -> Result<Kernel> {
    if spec.contains('/') || Path::new(spec).is_file() {
        from_vmlinuz(Path::new(spec))
    } else {
        from_package(spec)
    }
}

fn from_vmlinuz(path: &Path) -> Result<Kernel> {
    let vmlinuz = path
        .canonicalize()
        .with_context(|| format!("no kernel image at {}", path.display()))?;
    let file_name = vmlinuz
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let release = bzimage_release(&vmlinuz)
        .or_else(|| file_name.strip_prefix("vmlinuz-").map(str::to_string))
        .unwrap_or(file_name);
    let modules = match std::env::var_os("TCPTRACE_VM_MODULES") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if !dir.is_dir() {
                bail!("TCPTRACE_VM_MODULES={} is not a directory", dir.display());
            }
            Some(dir)
        }
        // The layout of an unpacked kernel package or `make install INSTALL_PATH=… INSTALL_MOD_PATH=…`.
        None => vmlinuz
            .parent()
            .and_then(Path::parent)
            .and_then(|root| modules_dir(root, &release)),
    };
    if modules.is_none() {
        eprintln!(
            "xtask: {}: no modules directory (set TCPTRACE_VM_MODULES); assuming veth, clsact and cls_bpf are built in",
            vmlinuz.display()
        );
    }
    Ok(Kernel {
        label: release,
        vmlinuz,
        modules,
    })
}

fn from_package(name: &str) -> Result<Kernel> {
    let dir = vm_dir().join("kernels");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (pkg, version, deb) = match fetch(name, &dir) {
        Ok(found) => found,
        // Stale or missing apt lists: the candidate is unknown, or the mirror
        // has already replaced it (Debian drops superseded kernels).
        Err(first) => {
            eprintln!("xtask: {first:#}; refreshing the apt lists and retrying");
            let mut update = Command::new("apt-get");
            update.args(["update", "-qq"]);
            output(update).map_err(|e| {
                first.context(format!(
                    "and `apt-get update` failed too ({e:#}); run `sudo apt-get update` and retry"
                ))
            })?;
            fetch(name, &dir)?
        }
    };
    let root = dir.join(format!("{pkg}_{version}"));
    let stamp = root.join(".unpacked");
    if !stamp.exists() {
        // A partly unpacked tree (interrupted run) must not be mistaken for a whole one.
        if root.exists() {
            std::fs::remove_dir_all(&root)
                .with_context(|| format!("removing {}", root.display()))?;
        }
        let mut x = Command::new("dpkg-deb");
        x.arg("-x").arg(&deb).arg(&root);
        output(x).context("unpacking the kernel package (dpkg-deb is in the dpkg package)")?;
        std::fs::write(&stamp, b"").with_context(|| format!("writing {}", stamp.display()))?;
    }
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("{pkg} has no /boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{pkg} has no /boot/vmlinuz-*: is it a kernel image package?"))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_string)
        .context("vmlinuz file name is not UTF-8")?;
    let modules = modules_dir(&root, &release);
    Ok(Kernel {
        label: release,
        vmlinuz,
        modules,
    })
}

/// Resolves a metapackage to the package that holds the kernel, and makes
/// sure its .deb is in `dir`. Returns (package, version, .deb path).
fn fetch(name: &str, dir: &Path) -> Result<(String, String, PathBuf)> {
    let pkg = real_package(name)?;
    let version = candidate(&pkg)?;
    // apt-get download names files pkg_version_arch.deb with ':' (epochs) escaped.
    let prefix = format!("{pkg}_{}_", version.replace(':', "%3a"));
    let cached = |dir: &Path| -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(&prefix) && n.ends_with(".deb")
                })
            })
    };
    if let Some(deb) = cached(dir) {
        return Ok((pkg, version, deb));
    }
    eprintln!("xtask: downloading {pkg} {version} into {}", dir.display());
    let mut dl = Command::new("apt-get");
    dl.current_dir(dir).args(["download", "-q"]);
    if is_root() {
        // As root apt drops to the _apt user, who cannot write here; it would
        // still work but warn on every download.
        dl.args(["-o", "APT::Sandbox::User=root"]);
    }
    dl.arg(format!("{pkg}={version}"));
    output(dl).with_context(|| format!("downloading {pkg} {version}"))?;
    let deb = cached(dir).with_context(|| {
        format!(
            "apt-get download left no {prefix}*.deb in {}",
            dir.display()
        )
    })?;
    Ok((pkg, version, deb))
}

/// Follows a metapackage (`linux-image-cloud-amd64`) down to the versioned
/// package (`linux-image-6.1.0-44-cloud-amd64`) through its `Depends:`.
fn real_package(name: &str) -> Result<String> {
    let mut pkg = name.to_string();
    for _ in 0..4 {
        let mut c = Command::new("apt-cache");
        c.args([
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
        ])
        .args(["--no-enhances", &pkg]);
        let out = output(c).with_context(|| {
            format!("apt-cache knows no package {pkg} (this needs Debian's apt sources; or pass a vmlinuz path)")
        })?;
        let text = String::from_utf8_lossy(&out);
        let next = text.lines().find_map(|l| {
            let dep = l.trim().strip_prefix("Depends: ")?;
            (dep.starts_with("linux-image-") && !dep.starts_with('<')).then(|| dep.to_string())
        });
        match next {
            Some(n) => pkg = n,
            None => return Ok(pkg),
        }
    }
    bail!("{name}: more than 4 levels of linux-image metapackages")
}

fn candidate(pkg: &str) -> Result<String> {
    let mut c = Command::new("apt-cache");
    c.args(["policy", pkg]);
    let out = output(c)?;
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .map(str::to_string)
        .with_context(|| format!("apt has no candidate version of {pkg}"))
}

fn modules_dir(root: &Path, release: &str) -> Option<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(release))
        .find(|d| d.is_dir())
}

/// The release string a bzImage carries in its setup header (the
/// `kernel_version` field, Documentation/arch/x86/boot.rst), so that a bare
/// vmlinuz gets the same label `uname -r` would print.
fn bzimage_release(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = vec![0u8; 64 * 1024];
    let mut f = std::fs::File::open(path).ok()?;
    let n = f.read(&mut head).ok()?;
    let head = &head[..n];
    if head.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([*head.get(0x20e)?, *head.get(0x20f)?]) as usize;
    if ptr == 0 {
        return None;
    }
    let s = head.get(ptr + 0x200..)?;
    let end = s.iter().position(|&b| b == 0 || b == b' ')?;
    std::str::from_utf8(&s[..end])
        .ok()
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the effective uid; no unsafe geteuid needed.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
