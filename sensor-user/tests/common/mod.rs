//! Packet builders shared by the kernel tests.
#![allow(dead_code, reason = "each test uses a subset")]

pub fn u16be(v: usize) -> [u8; 2] {
    (v as u16).to_be_bytes()
}

pub fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
    let mut e = ty.to_be_bytes().to_vec();
    e.extend_from_slice(&u16be(data.len()));
    e.extend_from_slice(data);
    e
}

pub fn sni_ext(name: &str) -> Vec<u8> {
    let mut d = u16be(name.len() + 3).to_vec();
    d.push(0);
    d.extend_from_slice(&u16be(name.len()));
    d.extend_from_slice(name.as_bytes());
    ext(0, &d)
}

/// A TLS record with a ClientHello carrying `exts` (32-byte session id, 3 suites).
pub fn client_hello(exts: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x11; 32]);
    body.push(32);
    body.extend_from_slice(&[0x22; 32]);
    body.extend_from_slice(&[0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend_from_slice(&[1, 0]);
    let all: Vec<u8> = exts.concat();
    body.extend_from_slice(&u16be(all.len()));
    body.extend_from_slice(&all);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&u16be(body.len()));
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&u16be(hs.len()));
    rec.extend_from_slice(&hs);
    rec
}

/// Load options of the kernel tests. `CONDUIT_TEST_KERNEL_VARIANTS=oldest` loads
/// the variants a 5.10 kernel gets (legacy flow programs, bounded classifiers) on
/// any kernel, so that the host checks them too (`cargo xtask test` runs the suite
/// both ways).
pub fn kernel_options() -> sensor_user::kernel::KernelOptions {
    use sensor_user::kernel::{ClassifierVariant, FlowVariant, KernelOptions};
    match std::env::var("CONDUIT_TEST_KERNEL_VARIANTS").as_deref() {
        Ok("oldest") => KernelOptions {
            best_flow: FlowVariant::Legacy,
            best_classifier: ClassifierVariant::Bounded,
            ..KernelOptions::default()
        },
        Ok("") | Err(_) => KernelOptions::default(),
        Ok(other) => panic!("CONDUIT_TEST_KERNEL_VARIANTS={other}: only `oldest` is known"),
    }
}
