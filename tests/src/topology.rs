//! The standard lab: two OT zones behind a forwarding gateway, and an "internet"
//! namespace that hosts the fake AI endpoints.
//!
//! ```text
//!  ot1 (cell-1)  10.10.1.10/24 ─ eth-ot1 ┐
//!                                         gw ─ eth-up 198.51.100.1 ─ net 198.51.100.10
//!  ot2 (mes)     10.20.0.10/16 ─ eth-ot2 ┘                           + AI endpoints on lo
//! ```
//! All addresses are documentation or private ranges and exist only inside the lab.

use anyhow::Result;

use crate::{Lab, Ns};

pub const OT1_V4: &str = "10.10.1.10";
pub const OT1_V6: &str = "fd00:10:1::10";
pub const OT2_V4: &str = "10.20.0.10";
pub const OT2_V6: &str = "fd00:20::10";
pub const GW_UPLINK_V4: &str = "198.51.100.1";
pub const NET_V4: &str = "198.51.100.10";
pub const NET_V6: &str = "2001:db8:100::10";
/// Addresses of the fake AI endpoints (on the `net` namespace's loopback).
pub const AI_V4: [&str; 3] = ["203.0.113.10", "203.0.113.20", "203.0.113.30"];
pub const AI_V6: &str = "2001:db8:a1::10";

/// Interfaces of the gateway.
pub const GW_OT1_IF: &str = "eth-ot1";
pub const GW_OT2_IF: &str = "eth-ot2";
pub const GW_UPLINK_IF: &str = "eth-up";

pub struct GatewayLab {
    pub lab: Lab,
    pub ot1: Ns,
    pub ot2: Ns,
    pub gw: Ns,
    pub net: Ns,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct GatewayLabOptions {
    /// Masquerade (SNAT) on the gateway's uplink, as most edge gateways do.
    pub masquerade: bool,
}

impl GatewayLab {
    pub fn build(tag: &str, opts: GatewayLabOptions) -> Result<GatewayLab> {
        let mut lab = Lab::new(tag)?;
        let ot1 = lab.ns("ot1")?;
        let ot2 = lab.ns("ot2")?;
        let gw = lab.ns("gw")?;
        let net = lab.ns("net")?;
        // Forwarding first, so the interfaces get IPv6 forwarding behaviour too.
        lab.exec(&gw, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        lab.exec(&gw, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;

        lab.link(&ot1, "eth0", &gw, GW_OT1_IF)?;
        lab.link(&ot2, "eth0", &gw, GW_OT2_IF)?;
        lab.link(&gw, GW_UPLINK_IF, &net, "eth0")?;

        lab.addr(&ot1, "eth0", "10.10.1.10/24")?;
        lab.addr(&ot1, "eth0", "fd00:10:1::10/64")?;
        lab.addr(&gw, GW_OT1_IF, "10.10.1.1/24")?;
        lab.addr(&gw, GW_OT1_IF, "fd00:10:1::1/64")?;
        lab.addr(&ot2, "eth0", "10.20.0.10/16")?;
        lab.addr(&ot2, "eth0", "fd00:20::10/64")?;
        lab.addr(&gw, GW_OT2_IF, "10.20.0.1/16")?;
        lab.addr(&gw, GW_OT2_IF, "fd00:20::1/64")?;
        lab.addr(&gw, GW_UPLINK_IF, "198.51.100.1/24")?;
        lab.addr(&gw, GW_UPLINK_IF, "2001:db8:100::1/64")?;
        lab.addr(&net, "eth0", "198.51.100.10/24")?;
        lab.addr(&net, "eth0", "2001:db8:100::10/64")?;
        for ai in AI_V4 {
            lab.addr(&net, "lo", &format!("{ai}/32"))?;
        }
        lab.addr(&net, "lo", &format!("{AI_V6}/128"))?;

        for ns in [&ot1, &ot2] {
            let gw4 = if ns.name == ot1.name {
                "10.10.1.1"
            } else {
                "10.20.0.1"
            };
            let gw6 = if ns.name == ot1.name {
                "fd00:10:1::1"
            } else {
                "fd00:20::1"
            };
            lab.exec(ns, &["ip", "route", "add", "default", "via", gw4])?;
            lab.exec(ns, &["ip", "-6", "route", "add", "default", "via", gw6])?;
        }
        lab.exec(
            &gw,
            &["ip", "route", "add", "203.0.113.0/24", "via", NET_V4],
        )?;
        lab.exec(
            &gw,
            &[
                "ip",
                "-6",
                "route",
                "add",
                "2001:db8:a1::/48",
                "via",
                NET_V6,
            ],
        )?;
        lab.exec(
            &net,
            &["ip", "route", "add", "default", "via", GW_UPLINK_V4],
        )?;
        lab.exec(
            &net,
            &[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8:100::1",
            ],
        )?;
        if opts.masquerade {
            lab.exec(
                &gw,
                &[
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-o",
                    GW_UPLINK_IF,
                    "-j",
                    "MASQUERADE",
                ],
            )?;
            lab.exec(
                &gw,
                &[
                    "ip6tables",
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-o",
                    GW_UPLINK_IF,
                    "-j",
                    "MASQUERADE",
                ],
            )?;
            // Without a route back to the zones, return traffic only works through NAT.
            lab.exec(&net, &["ip", "route", "del", "default"])?;
            lab.exec(&net, &["ip", "-6", "route", "del", "default"])?;
        }
        Ok(GatewayLab {
            lab,
            ot1,
            ot2,
            gw,
            net,
        })
    }

    /// Sends `count` one-datagram UDP flows from OT host 1 to `AI_V4[0]`, each its
    /// own (source port, destination port) pair from `port` up, paced over
    /// `seconds`, with `tests/peers/udp_burst.py` (a raw socket: one syscall per
    /// datagram). Every datagram goes out once; see [`Burst`].
    pub fn udp_burst(&self, port: u16, count: u64, seconds: f64) -> Result<Burst> {
        // A static neighbour entry for the gateway: raw datagrams queued behind ARP
        // resolution would be dropped before they reach it.
        let mac = self.lab.exec(
            &self.gw,
            &["cat", &format!("/sys/class/net/{GW_OT1_IF}/address")],
        )?;
        let mac = String::from_utf8_lossy(&mac.stdout).trim().to_string();
        self.lab.exec(
            &self.ot1,
            &[
                "ip",
                "neigh",
                "replace",
                "10.10.1.1",
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
        let blaster = crate::peer_script("udp_burst.py").display().to_string();
        let out = self.lab.exec(
            &self.ot1,
            &[
                "python3",
                &blaster,
                OT1_V4,
                AI_V4[0],
                &port.to_string(),
                &count.to_string(),
                &seconds.to_string(),
            ],
        )?;
        let out = String::from_utf8_lossy(&out.stdout);
        let mut fields = out.split_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next()) {
            (Some(Ok(sent)), Some(Ok(resent))) => Ok(Burst { sent, resent }),
            _ => anyhow::bail!("udp_burst.py printed {out:?}"),
        }
    }
}

/// What [`GatewayLab::udp_burst`] sent: `sent` datagrams, `resent` of which the
/// OT host's veth refused at first (its peer's XDP ring full: counted in its
/// `tx_dropped`, never seen by the gateway) and took on a second try.
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    pub sent: u64,
    pub resent: u64,
}
