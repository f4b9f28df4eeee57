//! Installs what the build and the tests need, checking first so that a
//! second run costs a few process spawns.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::status;

/// bpf-linker must be built against the LLVM the nightly rustc uses (22).
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13";

pub fn all(test_tools: bool) -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    if test_tools {
        apt_tools(&[
            ("tcpdump", "tcpdump"),
            ("ip", "iproute2"),
            ("bpftool", "bpftool"),
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("busybox", "busybox-static"),
            ("curl", "curl"),
        ])?;
    }
    Ok(())
}

pub fn path_with_cargo_bin() -> String {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        });
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{}:{path}", home.join("bin").display())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .env("PATH", format!("{}:/usr/sbin:/sbin", path_with_cargo_bin()))
        .status()
        .is_ok_and(|s| s.success())
}

fn nightly_rust_src() -> Result<()> {
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output();
    let has_nightly = sysroot.as_ref().is_ok_and(|o| o.status.success());
    if has_nightly {
        let root = String::from_utf8_lossy(&sysroot.as_ref().unwrap().stdout)
            .trim()
            .to_string();
        if Path::new(&root)
            .join("lib/rustlib/src/rust/library/core")
            .exists()
        {
            return Ok(());
        }
        eprintln!("xtask: adding rust-src to the nightly toolchain (the eBPF crate builds core)");
        let mut c = Command::new("rustup");
        c.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
        return status(c);
    }
    eprintln!("xtask: installing the nightly toolchain with rust-src (for the eBPF crate)");
    let mut c = Command::new("rustup");
    c.args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]);
    status(c)
}

fn bpf_linker() -> Result<()> {
    let out = Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path_with_cargo_bin())
        .output();
    if let Ok(o) = &out {
        if o.status.success()
            && String::from_utf8_lossy(&o.stdout).contains(&format!(" {BPF_LINKER_VERSION}."))
        {
            return Ok(());
        }
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        if !is_root() {
            bail!("LLVM 22 is missing; install it with `sudo apt-get install llvm-22-dev`, then rerun");
        }
        eprintln!("xtask: installing llvm-22-dev (bpf-linker links against it)");
        apt_install(&["llvm-22-dev"])?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (once, a few minutes)"
    );
    let mut c = Command::new("cargo");
    c.args([
        "install",
        "bpf-linker",
        "--locked",
        "--version",
        &format!("^{BPF_LINKER_VERSION}"),
        "--no-default-features",
        "--features",
        "llvm-22",
    ])
    .env("LLVM_PREFIX", LLVM_PREFIX);
    status(c).context("building bpf-linker")
}

fn apt_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the tests need: {}; install them with `sudo apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    apt_install(&missing)
}

pub fn apt_install(pkgs: &[&str]) -> Result<()> {
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    status(update)?;
    let mut c = Command::new("apt-get");
    c.args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive");
    status(c)
}
