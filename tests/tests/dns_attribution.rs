//! DNS attribution end to end: a real resolver (dnsmasq) beyond the masquerading
//! gateway answers a real client (dig) in an OT zone; the sensor learns the answers
//! from the kernel's copies of the responses. A TLS call that names no endpoint by
//! its SNI (curl to an IP literal sends none) is attributed to the endpoint through
//! the name DNS gave for its destination; a server name whose answers gave another
//! address is flagged `sni_not_resolved`.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, ensure};
use conduit_lab::{
    Lab, Ns, SensorRun,
    ai::{LabPki, chromium_args, start_endpoints, start_lab_sensor},
    skip_unless_root,
    topology::{AI_V4, GatewayLab, GatewayLabOptions, NET_V4, OT1_V4},
};
use serde_json::Value;

/// The CNAME the resolver puts in front of api.openai.com, as a CDN would.
const CDN_NAME: &str = "api.openai.com.cdn.lab.example";

/// HTTPS record data: priority 1, target ".", ipv4hint=AI_V4[0], ech=<a config
/// list>, in SvcParam key order.
const HTTPS_RDATA: &str = concat!(
    "0001 00",
    // alpn=h2
    " 0001 0003 026832",
    // ipv4hint=203.0.113.10
    " 0004 0004 cb00710a",
    // ech: an ECHConfigList of one draft-13 (0xfe0d) config: id 1, X25519 HPKE key,
    // HKDF-SHA256 / AES-128-GCM, public name cloudflare-ech.com (the outer SNI).
    " 0005 0047 0045 fe0d 0041 01 0020 0020",
    " 0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20",
    " 0004 0001 0001 00 12 636c6f7564666c6172652d6563682e636f6d 0000",
);

/// Starts dnsmasq on the `net` side: api.openai.com is a CNAME to a CDN name at
/// AI_V4[0] (TTL 300) whose HTTPS record announces ECH (on the CNAME's target: a
/// name with a CNAME has no other records); harmless.example.org is
/// AI_V4[2]; api.anthropic.com is AI_V4[1].
fn start_resolver(lab: &mut Lab, net: &Ns) -> Result<()> {
    let args = [
        "dnsmasq".to_string(),
        "--keep-in-foreground".into(),
        "--log-facility=-".into(),
        "--log-queries".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={NET_V4}"),
        "--user=root".into(),
        "--group=root".into(),
        "--pid-file=".into(),
        "--local-ttl=300".into(),
        format!("--host-record={CDN_NAME},{}", AI_V4[0]),
        format!("--cname=api.openai.com,{CDN_NAME},300"),
        format!("--dns-rr={CDN_NAME},65,{}", HTTPS_RDATA.replace(' ', "")),
        format!("--address=/harmless.example.org/{}", AI_V4[2]),
        format!("--address=/api.anthropic.com/{}", AI_V4[1]),
    ];
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn(net, "dnsmasq", &refs)?;
    lab.wait_for_port(net, "udp", 53, Duration::from_secs(10))
}

/// `dig` from `ns` at the lab's resolver; returns its short answer.
fn dig(lab: &Lab, ns: &Ns, name: &str, ty: &str) -> Result<String> {
    let out = lab.exec(
        ns,
        &["dig", &format!("@{NET_V4}"), name, ty, "+short", "+tries=3"],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A TLS call from `ns` to `addr` with `sni` (none: an IP literal, as curl sends it).
fn tls_call(lab: &Lab, ns: &Ns, addr: &str, sni: Option<&str>) -> Result<()> {
    let out = match sni {
        None => lab.exec(
            ns,
            &[
                "curl",
                "-sS",
                "-k",
                "--max-time",
                "10",
                "--http1.1",
                &format!("https://{addr}/"),
            ],
        )?,
        Some(name) => {
            let cmd = format!(
                "printf 'GET / HTTP/1.1\\r\\nHost: {name}\\r\\nConnection: close\\r\\n\\r\\n' | timeout 10 openssl s_client -quiet -connect {addr}:443 -servername {name}"
            );
            lab.exec(ns, &["sh", "-c", &cmd])?
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("ok from the lab"),
        "TLS call to {addr} ({sni:?}): {text}"
    );
    Ok(())
}

/// The flow_start of the TLS flow from OT1 to `addr` whose SNI is `sni`.
fn start_of<'a>(records: &'a [Value], addr: &str, sni: Option<&str>) -> Result<&'a Value> {
    records
        .iter()
        .find(|r| {
            r["event"]["action"] == "flow_start"
                && r["source"]["ip"] == OT1_V4
                && r["destination"]["ip"] == addr
                && r["destination"]["port"] == 443
                && r["tls"]["client"]["server_name"].as_str() == sni
        })
        .with_context(|| {
            let all: Vec<String> = records.iter().map(Value::to_string).collect();
            format!(
                "no flow_start to {addr} with SNI {sni:?}:\n{}",
                all.join("\n")
            )
        })
}

/// The lab gateway (masquerading) with its AI endpoints, the resolver, and the
/// sensor on the zone-facing interfaces with the lab's map, enforcing (its only
/// `block` conduit is cell-1 to anthropic).
fn start(tag: &str) -> Result<(GatewayLab, SensorRun)> {
    let mut lab = GatewayLab::build(tag, GatewayLabOptions { masquerade: true })?;
    let pki = LabPki::create(&lab.lab)?;
    let (gw, net) = (lab.gw.clone(), lab.net.clone());
    start_endpoints(&mut lab.lab, &net, &pki)?;
    start_resolver(&mut lab.lab, &net)?;
    let sensor = start_lab_sensor(&mut lab.lab, &gw, &["--enforce"])?;
    Ok((lab, sensor))
}

#[test]
fn flows_are_attributed_through_real_dns_answers() -> Result<()> {
    if skip_unless_root("flows_are_attributed_through_real_dns_answers") {
        return Ok(());
    }
    let (mut lab, sensor) = start("dns")?;
    let ot1 = lab.ot1.clone();
    let l = &lab.lab;

    let a = dig(l, &ot1, "api.openai.com", "A")?;
    ensure!(
        a.contains(CDN_NAME) && a.contains(AI_V4[0]),
        "dig api.openai.com: {a}"
    );
    let https = dig(l, &ot1, "api.openai.com", "TYPE65")?;
    ensure!(
        https.contains(CDN_NAME) && https.lines().count() == 2,
        "the CNAME and the HTTPS record: {https}"
    );
    let decoy = dig(l, &ot1, "harmless.example.org", "A")?;
    ensure!(
        decoy.contains(AI_V4[2]),
        "dig harmless.example.org: {decoy}"
    );

    // No SNI: an IP literal.
    tls_call(l, &ot1, AI_V4[0], None)?;
    // A name whose DNS answer gave another address, at api.openai.com's address.
    tls_call(l, &ot1, AI_V4[0], Some("harmless.example.org"))?;
    // The name DNS gave this address: nothing to flag.
    tls_call(l, &ot1, AI_V4[0], Some("api.openai.com"))?;
    // A conduit blocks cell-1 from anthropic: a flow attributed through DNS is
    // dropped like one attributed by its SNI.
    let anthropic = dig(l, &ot1, "api.anthropic.com", "A")?;
    ensure!(
        anthropic.contains(AI_V4[1]),
        "dig api.anthropic.com: {anthropic}"
    );
    ensure!(
        tls_call(l, &ot1, AI_V4[1], None).is_err(),
        "a DNS-attributed flow the map blocks went through"
    );
    let records = sensor.stop(&mut lab.lab)?;

    let r = start_of(&records, AI_V4[0], None)?;
    let what = format!("{r:#}");
    ensure!(r["conduit"]["attribution"] == "dns", "attribution: {what}");
    ensure!(r["conduit"]["endpoint"] == "openai", "endpoint: {what}");
    ensure!(r["conduit"]["zone"] == "cell-1", "zone: {what}");
    ensure!(r["conduit"]["verdict"] == "violation", "verdict: {what}");
    ensure!(
        r["destination"]["domain"] == "api.openai.com",
        "domain: {what}"
    );
    ensure!(
        r["conduit"]["ech_announced"] == true,
        "the HTTPS record's ECH config: {what}"
    );
    ensure!(r["conduit"]["anomalies"].is_null(), "anomalies: {what}");

    let r = start_of(&records, AI_V4[0], Some("harmless.example.org"))?;
    let what = format!("{r:#}");
    ensure!(
        r["conduit"]["anomalies"] == serde_json::json!(["sni_not_resolved"]),
        "anomalies: {what}"
    );
    ensure!(r["conduit"]["attribution"] == "dns", "attribution: {what}");
    ensure!(r["conduit"]["endpoint"] == "openai", "endpoint: {what}");

    let r = start_of(&records, AI_V4[1], None)?;
    let what = format!("{r:#}");
    ensure!(r["conduit"]["attribution"] == "dns", "attribution: {what}");
    ensure!(r["conduit"]["endpoint"] == "anthropic", "endpoint: {what}");
    ensure!(r["conduit"]["verdict"] == "blocked", "verdict: {what}");
    ensure!(r["conduit"]["id"] == "C-CELL1-ANTHROPIC", "conduit: {what}");

    let r = start_of(&records, AI_V4[0], Some("api.openai.com"))?;
    let what = format!("{r:#}");
    ensure!(r["conduit"]["attribution"] == "sni", "attribution: {what}");
    ensure!(r["conduit"]["anomalies"].is_null(), "anomalies: {what}");
    ensure!(
        r["destination"]["domain"] == "api.openai.com",
        "domain: {what}"
    );
    Ok(())
}

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over
/// /etc/resolv.conf: the namespace's clients ask the lab's resolver. Removed on drop.
struct NsResolvConf(PathBuf);

impl NsResolvConf {
    fn write(ns: &Ns) -> Result<NsResolvConf> {
        let dir = PathBuf::from("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {NET_V4}\n"))?;
        Ok(NsResolvConf(dir))
    }
}

impl Drop for NsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Chromium resolves api.openai.com through the lab's resolver with its own DNS
/// client, gets the HTTPS record's ECH config and sends an Encrypted Client Hello
/// whose outer name is cloudflare-ech.com. The lab's nginx does not speak ECH, so the
/// call fails; the flow is still recorded, attributed to openai through DNS.
#[test]
fn chromium_ech_is_attributed_through_dns() -> Result<()> {
    if skip_unless_root("chromium_ech_is_attributed_through_dns") {
        return Ok(());
    }
    let (mut lab, sensor) = start("ech")?;
    let ot1 = lab.ot1.clone();
    let _resolv = NsResolvConf::write(&ot1)?;
    let profile = lab.lab.workdir.join("chromium-ech");
    let mut args = vec!["timeout".to_owned(), "60".to_owned()];
    args.extend(chromium_args(
        &profile,
        &["--enable-features=AsyncDns,EncryptedClientHello,UseDnsHttpsSvcb"],
        "https://api.openai.com/",
    ));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.lab.exec_any(&ot1, &refs)?;
    let records = sensor.stop(&mut lab.lab)?;
    let log = std::fs::read_to_string(lab.lab.log_path("dnsmasq")).unwrap_or_default();
    let r = start_of(&records, AI_V4[0], Some("cloudflare-ech.com")).with_context(|| {
        format!(
            "chromium: {}\n{}\ndnsmasq:\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let what = format!("{r:#}");
    ensure!(r["conduit"]["ech"] == true, "ech: {what}");
    ensure!(r["conduit"]["attribution"] == "dns", "attribution: {what}");
    ensure!(r["conduit"]["endpoint"] == "openai", "endpoint: {what}");
    ensure!(
        r["destination"]["domain"] == "api.openai.com",
        "domain: {what}"
    );
    ensure!(
        r["conduit"]["ech_announced"] == true,
        "ech_announced: {what}"
    );
    Ok(())
}
