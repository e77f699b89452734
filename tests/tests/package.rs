//! The Debian packages under real systemd: `cargo xtask vm --kernel 6.1 --systemd`
//! boots bookworm with systemd as PID 1 and runs tests/package/install.sh in it,
//! which installs both packages from target/debian/ (built by `cargo xtask
//! package`), starts both services (mTLS between them), sends traffic through a
//! watched veth, reloads with a good and a broken map, stops, and checks the
//! journal and the records. Root only (qemu's 9p server must read everything).
//!
//! `cargo xtask package && cargo test --release -p conduit-tests --test package -- --ignored`

use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[test]
#[ignore = "needs `cargo xtask package` first; `cargo xtask test` runs it after packaging"]
fn packages_install_start_reload_and_stop_under_systemd() {
    if conduit_lab::skip_unless_root("packages_install_start_reload_and_stop_under_systemd") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let version = env!("CARGO_PKG_VERSION");
    for name in ["conduit-sensor", "conduit-collector"] {
        let deb = root
            .join("target/debian")
            .join(format!("{name}_{version}_amd64.deb"));
        assert!(
            deb.is_file(),
            "{} is missing: run `cargo xtask package` first",
            deb.display()
        );
    }
    let guest_root = format!("/host{}", root.display());
    let started = Instant::now();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "xtask",
            "vm",
            "--kernel",
            "6.1",
            "--systemd",
            "--timeout",
            "900",
            "--",
        ])
        .arg("bash")
        .arg(format!("{guest_root}/tests/package/install.sh"))
        .arg(&guest_root)
        .arg(version)
        .output()
        .expect("cargo xtask vm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    println!(
        "package test: {:.0} s wall time (boot included)",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "install test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("PACKAGE TEST PASSED"), "{stdout}");
}
