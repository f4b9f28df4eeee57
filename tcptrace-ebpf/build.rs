// Rebuild the eBPF object when bpf-linker changes (it does the final link).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
