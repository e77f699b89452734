use which::which;

/// Rebuild the eBPF object when bpf-linker changes (aya-template does the same): the
/// linker is not a cargo dependency, so cargo would not notice on its own.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
