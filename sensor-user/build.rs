use anyhow::{Context as _, anyhow};

/// Builds `sensor-ebpf` for the BPF target with the nightly toolchain pinned in
/// `sensor-ebpf/rust-toolchain.toml` and embeds the object (aya-template's approach).
/// `AYA_BUILD_SKIP=1` skips it, e.g. for fuzzing on machines without bpf-linker.
fn main() -> anyhow::Result<()> {
    // With the eBPF build skipped (fuzzing, tools without bpf-linker) the crate still
    // compiles: the embedded object is empty and `Kernel::load` fails at run time.
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
        std::fs::write(std::path::Path::new(&out_dir).join("sensor"), [])?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "sensor-ebpf")
        .ok_or_else(|| anyhow!("sensor-ebpf package not found"))?;
    let root_dir = ebpf_package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("sensor-ebpf manifest has no parent directory"))?;
    let toolchain_file = root_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={toolchain_file}");
    let channel = pinned_channel(toolchain_file.as_std_path())?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf_package.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&channel),
    )
}

/// `[toolchain] channel` of a rust-toolchain.toml.
fn pinned_channel(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    table
        .get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{}: no [toolchain] channel", path.display()))
}
