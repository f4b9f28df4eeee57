//! Developer commands: `cargo xtask {bootstrap,build,run,test,bench}`.
//!
//! Everything a fresh Debian machine lacks is installed here, once: the
//! nightly toolchain's `rust-src` (the eBPF crate builds `core` itself),
//! LLVM 22 (apt) and `bpf-linker` built against it, and the tools the tests
//! drive (tcpdump, iproute2, bpftool, qemu, busybox). A second run only checks.
mod bench;
mod bootstrap;
mod vm;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "tcptrace developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Bootstrap,
    /// Build the eBPF object and the CLI (release).
    Build,
    /// Build, then run `tcptrace ARGS` (tracing needs root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: lint, unit, pcap, real-kernel tests on this host, and
    /// the same real-kernel tests in VMs on other kernels.
    Test(TestArgs),
    /// Measure tracing overhead and loss against a connection storm, and
    /// tcptrace's own per-event cost over a capture (`--userspace`: that
    /// alone, no root).
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the VM kernels (host tests only).
    #[arg(long, conflicts_with = "vm_only")]
    no_vm: bool,
    /// Only run the VM tests, for this kernel (a Debian kernel package name,
    /// a path to a vmlinuz, or `default` for the built-in matrix).
    #[arg(long, value_name = "KERNEL")]
    vm_only: Option<String>,
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Bootstrap => bootstrap::all(true),
        Cmd::Build => bootstrap::all(false)
            .and_then(|_| build_release())
            .map(|_| ()),
        Cmd::Run { args } => run(args),
        Cmd::Test(t) => test(t),
        Cmd::Bench(b) => bootstrap::all(false).and_then(|_| bench::run(b)),
    };
    if let Err(e) = res {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` when set (relative to
/// the workspace, where [`cargo`] runs), else `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || workspace_root().join("target"),
        |d| workspace_root().join(d),
    )
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c.env("PATH", bootstrap::path_with_cargo_bin());
    c
}

pub fn status(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

fn build_release() -> Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "--release", "-p", "tcptrace"]);
    status(c)?;
    Ok(target_dir().join("release/tcptrace"))
}

fn run(args: Vec<String>) -> Result<()> {
    bootstrap::all(false)?;
    let bin = build_release()?;
    let st = Command::new(&bin)
        .args(&args)
        .status()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    std::process::exit(st.code().unwrap_or(1));
}

fn test(t: TestArgs) -> Result<()> {
    bootstrap::all(true)?;
    let mut results: Vec<(String, Result<String>)> = Vec::new();
    if t.vm_only.is_none() {
        if !t.no_lint {
            let mut fmt = cargo();
            fmt.args(["fmt", "--all", "--check"]);
            status(fmt).context("cargo fmt --check: run `cargo fmt --all`")?;
            let mut clippy = cargo();
            // The eBPF crate only builds for bpfel-unknown-none (build.rs
            // compiles it there); checked for the host it would link std twice.
            clippy.args([
                "clippy",
                "--workspace",
                "--exclude",
                "tcptrace-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]);
            status(clippy)?;
        }
        results.push(("host".into(), host_tests()));
    }
    if !t.no_vm {
        let kernels = vm::matrix(t.vm_only.as_deref())?;
        for k in kernels {
            let name = format!("vm {}", k.label());
            let r = vm::run_tests(&k);
            results.push((name, r));
        }
    }
    println!();
    let mut failed = false;
    for (name, r) in &results {
        match r {
            Ok(line) => println!("{name}: {line}"),
            Err(e) => {
                failed = true;
                println!("{name}: FAILED: {e:#}");
            }
        }
    }
    if failed {
        bail!("some test runs failed");
    }
    Ok(())
}

/// Runs the workspace's tests on this host and returns a "N passed, M failed" line.
fn host_tests() -> Result<String> {
    let mut c = cargo();
    c.args([
        "test",
        "--workspace",
        "--exclude",
        "tcptrace-ebpf",
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ]);
    let (st, stdout) = tee_stdout(c)?;
    let (passed, failed) = count_results(&stdout);
    if !st.success() {
        bail!("{passed} passed, {failed} failed (cargo test exited {st})");
    }
    Ok(format!("{passed} passed, {failed} failed"))
}

/// Sums libtest's `test result: ok. N passed; M failed; …` lines.
pub fn count_results(stdout: &str) -> (u64, u64) {
    let mut passed = 0;
    let mut failed = 0;
    for line in stdout.lines() {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            continue;
        };
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            if let [.., n, what] = words.as_slice() {
                match *what {
                    "passed" => passed += n.parse::<u64>().unwrap_or(0),
                    "failed" => failed += n.parse::<u64>().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    (passed, failed)
}

/// Runs `cmd`, echoing its stdout as it comes (CI logs stay live) and keeping
/// a copy to read the results from.
pub fn tee_stdout(mut cmd: Command) -> Result<(std::process::ExitStatus, String)> {
    use std::io::{BufRead, BufReader, Write};
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let mut kept = String::new();
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout();
        for line in BufReader::new(out).lines() {
            let line = line.unwrap_or_default();
            let _ = writeln!(stdout, "{line}");
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    Ok((child.wait()?, kept))
}
