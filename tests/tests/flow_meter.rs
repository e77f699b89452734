//! The flow meter end to end: OT host → forwarding gateway running the sensor →
//! server, TCP and UDP over IPv4 and IPv6, in both directions. The sensor's
//! per-direction packet and byte counts must equal what nftables counts in the
//! gateway's forward hook (IP total length, offloads off), whether the sensor
//! watches only the zone-facing interface or all of them, with and without
//! masquerading on the uplink.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use conduit_lab::{
    SensorRun, last_flow_records, nft_counters, peer_script, skip_unless_root,
    topology::{
        AI_V4, AI_V6, GW_OT1_IF, GW_OT2_IF, GW_UPLINK_IF, GatewayLab, GatewayLabOptions, OT1_V4,
        OT1_V6,
    },
};

const NFT_RULES: &str = r#"
table inet acct {
  counter udp4_fwd {}
  counter udp4_rev {}
  counter tcp4_fwd {}
  counter tcp4_rev {}
  counter udp6_fwd {}
  counter udp6_rev {}
  chain forward_acct {
    type filter hook forward priority 0; policy accept;
    ip saddr 10.10.1.10 udp dport 5000 counter name udp4_fwd
    ip daddr 10.10.1.10 udp sport 5000 counter name udp4_rev
    ip saddr 10.10.1.10 tcp dport 7000 counter name tcp4_fwd
    ip daddr 10.10.1.10 tcp sport 7000 counter name tcp4_rev
    ip6 saddr fd00:10:1::10 udp dport 5000 counter name udp6_fwd
    ip6 daddr fd00:10:1::10 udp sport 5000 counter name udp6_rev
  }
}
"#;

fn scenario(tag: &str, masquerade: bool, watch: &[&str]) -> Result<()> {
    let mut lab = GatewayLab::build(tag, GatewayLabOptions { masquerade })?;
    let rules = lab.lab.workdir.join("acct.nft");
    std::fs::write(&rules, NFT_RULES)?;
    lab.lab
        .exec(&lab.gw, &["nft", "-f", &rules.display().to_string()])?;

    let echo = peer_script("echo.py").display().to_string();
    let (net, ot1, gw) = (lab.net.clone(), lab.ot1.clone(), lab.gw.clone());
    lab.lab.spawn(
        &net,
        "udp4-server",
        &["python3", &echo, "server", "udp", AI_V4[0], "5000"],
    )?;
    lab.lab.spawn(
        &net,
        "tcp4-server",
        &["python3", &echo, "server", "tcp", AI_V4[0], "7000"],
    )?;
    lab.lab.spawn(
        &net,
        "udp6-server",
        &["python3", &echo, "server", "udp", AI_V6, "5000"],
    )?;
    lab.lab
        .wait_for_port(&net, "udp", 5000, Duration::from_secs(10))?;
    lab.lab
        .wait_for_port(&net, "tcp", 7000, Duration::from_secs(10))?;

    let mut args = Vec::new();
    for iface in watch {
        args.extend(["--iface", iface]);
    }
    args.extend(["--idle-timeout", "120s"]);
    let sensor = SensorRun::start(&mut lab.lab, &gw, "sensor", &args)?;

    lab.lab.exec(
        &ot1,
        &[
            "python3", &echo, "client", "udp", AI_V4[0], "5000", "10", "100",
        ],
    )?;
    lab.lab.exec(
        &ot1,
        &[
            "python3", &echo, "client", "tcp", AI_V4[0], "7000", "5", "1000",
        ],
    )?;
    lab.lab.exec(
        &ot1,
        &["python3", &echo, "client", "udp", AI_V6, "5000", "7", "333"],
    )?;
    // Let the last ACKs of the TCP close pass before the drain.
    std::thread::sleep(Duration::from_millis(500));

    let counters = nft_counters(&lab.lab, &gw, "inet", "acct")?;
    let records = sensor.stop(&mut lab.lab)?;
    let flows = last_flow_records(&records);

    let expect = |transport: &str,
                  src: &str,
                  dst: &str,
                  port: u64,
                  fwd: &str,
                  rev: &str|
     -> Result<()> {
        let (src_ip, dst_ip): (std::net::IpAddr, std::net::IpAddr) = (src.parse()?, dst.parse()?);
        let rec = flows
            .iter()
            .find(|((t, s, _, d, dp), _)| {
                t == transport && *s == src_ip && *d == dst_ip && *dp == port
            })
            .map(|(_, r)| r)
            .with_context(|| {
                format!(
                    "{tag}: no {transport} flow {src} -> {dst}:{port} in {} records: {records:#?}",
                    records.len()
                )
            })?;
        let (fp, fb) = counters[fwd];
        let (rp, rb) = counters[rev];
        ensure!(fp > 0 && rp > 0, "{tag}: nft saw no traffic: {counters:?}");
        let got = (
            rec["source"]["packets"].as_u64(),
            rec["source"]["bytes"].as_u64(),
            rec["destination"]["packets"].as_u64(),
            rec["destination"]["bytes"].as_u64(),
        );
        ensure!(
            got == (Some(fp), Some(fb), Some(rp), Some(rb)),
            "{tag}: {transport} {src}->{dst}:{port}: sensor (pkts, bytes, pkts, bytes) = {got:?}, nft = ({fp}, {fb}, {rp}, {rb})\n{rec:#}"
        );
        ensure!(
            rec["observer"]["ingress"]["interface"]["name"] == GW_OT1_IF,
            "{tag}: wrong interface: {rec:#}"
        );
        ensure!(
            rec["network"]["community_id"]
                .as_str()
                .is_some_and(|c| c.starts_with("1:")),
            "{tag}: no community id"
        );
        Ok(())
    };
    expect("udp", OT1_V4, AI_V4[0], 5000, "udp4_fwd", "udp4_rev")?;
    expect("tcp", OT1_V4, AI_V4[0], 7000, "tcp4_fwd", "tcp4_rev")?;
    expect("udp", OT1_V6, AI_V6, 5000, "udp6_fwd", "udp6_rev")?;
    // UDP payloads are known exactly: IPv4 20 + UDP 8 + 100 bytes, 10 each way.
    ensure!(
        counters["udp4_fwd"] == (10, 10 * 128),
        "{tag}: nft udp4 {:?}",
        counters["udp4_fwd"]
    );

    // Every record is chained: sequence numbers are contiguous from the first.
    let seqs: Vec<u64> = records
        .iter()
        .filter_map(|r| r["event"]["sequence"].as_u64())
        .collect();
    ensure!(
        !seqs.is_empty() && seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "{tag}: sequence not contiguous: {seqs:?}"
    );
    for r in &records {
        ensure!(
            r["event"]["hash"].as_str().is_some_and(|h| h.len() == 64),
            "{tag}: record without hash: {r}"
        );
        ensure!(
            r["chain"]["prev_hash"]
                .as_str()
                .is_some_and(|h| h.len() == 64),
            "{tag}: record without prev_hash: {r}"
        );
    }
    Ok(())
}

#[test]
fn counts_match_nftables_on_the_zone_facing_interface() -> Result<()> {
    if skip_unless_root("counts_match_nftables_on_the_zone_facing_interface") {
        return Ok(());
    }
    scenario("zone", false, &[GW_OT1_IF])
}

#[test]
fn counts_match_nftables_on_all_interfaces_without_double_counting() -> Result<()> {
    if skip_unless_root("counts_match_nftables_on_all_interfaces_without_double_counting") {
        return Ok(());
    }
    scenario("all", false, &[GW_OT1_IF, GW_OT2_IF, GW_UPLINK_IF])
}

#[test]
fn counts_match_nftables_with_masquerade_on_the_uplink() -> Result<()> {
    if skip_unless_root("counts_match_nftables_with_masquerade_on_the_uplink") {
        return Ok(());
    }
    scenario("nat", true, &[GW_OT1_IF])
}

#[test]
fn counts_match_nftables_with_masquerade_watching_all_interfaces() -> Result<()> {
    if skip_unless_root("counts_match_nftables_with_masquerade_watching_all_interfaces") {
        return Ok(());
    }
    scenario("natall", true, &[GW_OT1_IF, GW_OT2_IF, GW_UPLINK_IF])
}
