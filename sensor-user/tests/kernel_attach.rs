//! Attach / detach on a throw-away veth pair (needs root).
#![expect(clippy::unwrap_used, reason = "tests")]

use std::process::Command;

use sensor_user::kernel::{Kernel, KernelOptions, XdpAttachMode};

struct Dummy(&'static str);

impl Dummy {
    fn new(name: &'static str) -> Dummy {
        let _ = Command::new("ip").args(["link", "del", name]).status();
        let ok = Command::new("ip")
            .args(["link", "add", name, "type", "veth", "peer", "name", "cskt1"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip link add {name}");
        Command::new("ip")
            .args(["link", "set", name, "up"])
            .status()
            .unwrap();
        Dummy(name)
    }

    fn show(&self) -> String {
        let out = Command::new("ip")
            .args(["-d", "link", "show", self.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", self.0]).status();
    }
}

#[test]
fn attach_and_detach_leave_interface_as_found() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return;
    }
    let dev = Dummy::new("cskt0");
    let before = dev.show();
    assert!(!before.contains("xdp"), "{before}");
    let mut k = Kernel::load(&KernelOptions::default()).unwrap();
    let info = k.attach(dev.0).unwrap();
    // veth supports native XDP.
    assert_eq!(info.xdp_mode, XdpAttachMode::Driver);
    assert!(dev.show().contains("xdp"), "{}", dev.show());
    k.detach_all();
    let after = dev.show();
    assert!(!after.contains("xdp"), "{after}");
    // Attach again and let Drop clean up.
    k.attach(dev.0).unwrap();
    drop(k);
    let after = dev.show();
    assert!(!after.contains("xdp"), "{after}");
}
