//! Runs the real-kernel tests (`tcptrace/tests/live_*.rs`) inside QEMU VMs on
//! other kernels, the way aya tests itself: no disk image, only a kernel and
//! an initramfs.
//!
//! For each kernel in [`MATRIX`]:
//! 1. the Debian kernel package is resolved with apt-cache, fetched with
//!    `apt-get download` and unpacked with `dpkg-deb -x` under `target/vm/`
//!    (both kept, so a second run costs no network);
//! 2. an initramfs is written from scratch: busybox-static, the kernel
//!    modules the tests need (with their dependencies), iproute2, tcpdump and
//!    bpftool with their shared libraries, the `live_*` test executables and
//!    the tcptrace CLI (`cargo test --no-run` / `cargo build`, debug profile,
//!    the same build the host tests use);
//! 3. `qemu-system-x86_64` boots it under TCG with the serial console on a
//!    pipe; `/init` mounts what tcptrace needs, runs each test executable with
//!    `--test-threads=1` between markers and powers off. The console is
//!    streamed with a `[vm 6.1]` prefix and kept in `target/vm/<kernel>/console.log`.
//!
//! Environment knobs: `TCPTRACE_VM_TIMEOUT` (seconds per guest, default 900),
//! `TCPTRACE_VM_MODULES` (the `lib/modules/<release>` directory for a kernel
//! given as a vmlinuz path), `TCPTRACE_VM_TESTS` (colon-separated test
//! executables to run instead of the `live_*` targets, for working on this
//! runner itself).
mod initramfs;
mod kernel;
mod qemu;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

/// The kernels `cargo xtask test` boots. An entry is either a Debian kernel
/// package (a metapackage such as `linux-image-cloud-amd64` follows the apt
/// sources of this host to its current ABI package) or a path to a vmlinuz
/// (modules from `TCPTRACE_VM_MODULES`, or from `../lib/modules/<release>`
/// next to its `boot/` directory, or none). Adding a kernel is adding a line.
///
/// The host's own kernel is covered by the host test run, not here.
pub const MATRIX: &[&str] = &[
    // Debian bookworm's cloud kernel (6.1 LTS): small, BTF, virtio/serial built in.
    "linux-image-cloud-amd64",
];

/// A kernel ready to boot.
pub struct Kernel {
    label: String,
    vmlinuz: PathBuf,
    /// `lib/modules/<release>`, when the kernel has loadable modules.
    modules: Option<PathBuf>,
}

impl Kernel {
    /// The kernel release, e.g. `6.1.0-44-cloud-amd64`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// `6.1` out of `6.1.0-44-cloud-amd64`: short enough to prefix every console line.
    fn short(&self) -> &str {
        let mut dots = self.label.match_indices('.').map(|(i, _)| i);
        let end = dots.nth(1).unwrap_or(self.label.len());
        &self.label[..end]
    }
}

/// The default matrix (`None` or `"default"`), or the single kernel `only`
/// names: a Debian kernel package or a path to a vmlinuz.
pub fn matrix(only: Option<&str>) -> Result<Vec<Kernel>> {
    let specs: Vec<&str> = match only {
        None | Some("default") => MATRIX.to_vec(),
        Some(one) => vec![one],
    };
    specs
        .into_iter()
        .map(|s| kernel::resolve(s).with_context(|| format!("preparing VM kernel `{s}`")))
        .collect()
}

/// Boots `k` with the real-kernel tests and returns "N passed, M failed".
/// Errors when a test failed, the guest crashed or it outlived the timeout.
pub fn run_tests(k: &Kernel) -> Result<String> {
    which("qemu-system-x86_64")
        .context("qemu-system-x86_64 is missing: run `cargo xtask bootstrap`")?;
    let payload = payload()?;
    if payload.tests.is_empty() {
        eprintln!("xtask: no tcptrace/tests/live_*.rs targets; the VM only checks that the kernel suits tcptrace");
    }
    let dir = vm_dir().join(k.label());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let initrd = dir.join("initramfs.cpio");
    let started = std::time::Instant::now();
    let modules = initramfs::build(k, &payload, &dir, &initrd)?;
    eprintln!(
        "xtask: vm {}: initramfs {} ({} MiB, modules: {}) in {:.1}s",
        k.label(),
        initrd.display(),
        std::fs::metadata(&initrd)
            .map(|m| m.len() >> 20)
            .unwrap_or(0),
        if modules.is_empty() {
            "none".to_string()
        } else {
            modules.join(" ")
        },
        started.elapsed().as_secs_f64()
    );
    qemu::run(k, &initrd, &dir.join("console.log"), timeout()?)
}

/// What goes into the guest besides the fixed tools.
pub(crate) struct Payload {
    /// (name in the guest, host path).
    tests: Vec<(String, PathBuf)>,
    tcptrace: PathBuf,
}

/// Builds the test executables and the CLI with the same profile and flags
/// as the host test run, so the VM stage reuses that build.
fn payload() -> Result<Payload> {
    let tests = match std::env::var_os("TCPTRACE_VM_TESTS") {
        Some(list) => std::env::split_paths(&list)
            .map(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, p)
            })
            .collect(),
        None => cargo_artifacts(&["test", "-p", "tcptrace", "--no-run"])?
            .into_iter()
            .filter(|a| a.kind == "test" && a.name.starts_with("live_"))
            .map(|a| (a.name, a.executable))
            .collect(),
    };
    let tcptrace = cargo_artifacts(&["build", "-p", "tcptrace"])?
        .into_iter()
        .find(|a| a.kind == "bin" && a.name == "tcptrace")
        .map(|a| a.executable)
        .context("`cargo build -p tcptrace` reported no tcptrace executable")?;
    Ok(Payload { tests, tcptrace })
}

struct Artifact {
    kind: String,
    name: String,
    executable: PathBuf,
}

/// Runs `cargo ARGS --message-format=json` and lists the executables built.
fn cargo_artifacts(args: &[&str]) -> Result<Vec<Artifact>> {
    let mut c = crate::cargo();
    // Diagnostics rendered by cargo on stderr, as in a plain build; only
    // artifact messages on stdout.
    c.args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit());
    let shown = format!("cargo {}", args.join(" "));
    let out = c
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({}); its errors are above", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains(r#""reason":"compiler-artifact""#) {
            continue;
        }
        let Some(target) = line.find(r#""target":{"#).map(|i| &line[i..]) else {
            continue;
        };
        let (Some(kind), Some(name), Some(exe)) = (
            json_str(target, "kind\":["),
            json_str(target, "name\":"),
            json_str(line, "executable\":"),
        ) else {
            continue;
        };
        found.push(Artifact {
            kind,
            name,
            executable: PathBuf::from(exe),
        });
    }
    Ok(found)
}

/// The string right after `"KEY` in a line of cargo's JSON (the first one:
/// callers slice the line so that it is the one they mean). Enough JSON for
/// cargo's messages without a serde dependency in xtask.
fn json_str(text: &str, key: &str) -> Option<String> {
    let start = text.find(&format!("\"{key}\""))? + key.len() + 2;
    let mut out = String::new();
    let mut chars = text[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
}

/// Where downloaded kernels, initramfs images and console logs live.
fn vm_dir() -> PathBuf {
    let root = crate::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    root.join(target).join("vm")
}

fn timeout() -> Result<Duration> {
    match std::env::var("TCPTRACE_VM_TIMEOUT") {
        Ok(s) => {
            let secs: u64 = s.trim().parse().with_context(|| {
                format!("TCPTRACE_VM_TIMEOUT={s:?}: expected a number of seconds")
            })?;
            Ok(Duration::from_secs(secs))
        }
        Err(_) => Ok(Duration::from_secs(15 * 60)),
    }
}

/// Finds a host tool on PATH or in the sbin directories a non-root PATH lacks.
fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(cmd))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `cmd` and returns its stdout; the error carries its stderr.
fn output(mut cmd: Command) -> Result<Vec<u8>> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cargo_artifact_lines() {
        let line = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"crate_types":["bin"],"name":"live_states","src_path":"/x/tests/live_states.rs"},"profile":{"test":true},"executable":"/t/deps/live_states-1a2b","fresh":true}"#;
        let target = &line[line.find(r#""target":{"#).unwrap()..];
        assert_eq!(json_str(target, "kind\":[").as_deref(), Some("test"));
        assert_eq!(json_str(target, "name\":").as_deref(), Some("live_states"));
        assert_eq!(
            json_str(line, "executable\":").as_deref(),
            Some("/t/deps/live_states-1a2b")
        );
        assert_eq!(json_str(r#"{"executable":null}"#, "executable\":"), None);
    }

    #[test]
    fn short_label() {
        let k = |l: &str| Kernel {
            label: l.into(),
            vmlinuz: PathBuf::new(),
            modules: None,
        };
        assert_eq!(k("6.1.0-44-cloud-amd64").short(), "6.1");
        assert_eq!(k("6").short(), "6");
    }
}
