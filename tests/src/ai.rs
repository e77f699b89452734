//! Fake AI endpoints in the lab's `net` namespace: nginx (TLS over TCP) and an
//! aioquic server (QUIC), with certificates from a lab CA made with the openssl CLI.
//! And the real clients that call them from an OT host: curl, openssl s_client,
//! Python ssl, headless Chromium, aioquic.

use std::{fs, path::PathBuf, time::Duration};

use anyhow::{Result, bail};

use crate::{
    Lab, Ns, peer_script, sh,
    topology::{AI_V4, AI_V6},
};

/// Names the lab's endpoints answer to (every one resolves to [`AI_V4`] addresses
/// through client-side pinning; no DNS is involved).
pub const LAB_NAMES: &[&str] = &[
    "api.openai.com",
    "chat.openai.com",
    "plant01.openai.azure.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "api.mistral.ai",
    "updates.vendor.example",
];

/// The lab CA and server certificate.
pub struct LabPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl LabPki {
    /// Makes a CA and one server certificate with every name in [`LAB_NAMES`].
    pub fn create(lab: &Lab) -> Result<LabPki> {
        let dir = lab.workdir.join("pki");
        fs::create_dir_all(&dir)?;
        let p = |n: &str| dir.join(n).display().to_string();
        sh(std::process::Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=Conduit Lab CA",
        ]))?;
        let mut pki = LabPki {
            ca: dir.join("ca.pem"),
            cert: PathBuf::new(),
            key: PathBuf::new(),
        };
        let sans: Vec<String> = LAB_NAMES.iter().map(|n| format!("DNS:{n}")).collect();
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        (pki.cert, pki.key) = pki.issue(lab, "server", "api.openai.com", &sans, false)?;
        Ok(pki)
    }

    /// Issues a certificate from the lab CA: `cn`, DNS/IP SANs, for a server or a
    /// client (mTLS). Returns (cert, key).
    pub fn issue(
        &self,
        lab: &Lab,
        name: &str,
        cn: &str,
        sans: &[&str],
        client: bool,
    ) -> Result<(PathBuf, PathBuf)> {
        let dir = self
            .ca
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| lab.workdir.clone());
        let p = |n: &str| dir.join(n).display().to_string();
        let usage = if client { "clientAuth" } else { "serverAuth" };
        let mut ext = format!("extendedKeyUsage={usage}\n");
        if !sans.is_empty() {
            ext.push_str(&format!("subjectAltName={}\n", sans.join(",")));
        }
        fs::write(dir.join(format!("{name}.cnf")), ext)?;
        sh(std::process::Command::new("openssl").args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p(&format!("{name}.key")),
            "-out",
            &p(&format!("{name}.csr")),
            "-subj",
            &format!("/CN={cn}"),
        ]))?;
        sh(std::process::Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &self.ca.display().to_string(),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p(&format!("{name}.pem")),
            "-days",
            "2",
            "-extfile",
            &p(&format!("{name}.cnf")),
        ]))?;
        Ok((
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        ))
    }
}

/// Starts nginx (TLS on 443 of every AI address) and the QUIC server (UDP 443) in
/// `net`. Both are stopped when the lab drops.
pub fn start_endpoints(lab: &mut Lab, net: &Ns, pki: &LabPki) -> Result<()> {
    let root = lab.workdir.join("nginx");
    fs::create_dir_all(root.join("tmp"))?;
    let mut listens = String::new();
    for a in AI_V4 {
        listens.push_str(&format!("    listen {a}:443 ssl;\n"));
    }
    listens.push_str(&format!("    listen [{AI_V6}]:443 ssl;\n"));
    let conf = format!(
        r#"daemon off;
worker_processes 1;
user root;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
  server {{
{listens}    server_name _;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    # TLS 1.3, as AI APIs serve today (bookworm's nginx 1.22 stops at 1.2 by default).
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ default_type text/plain; return 200 "ok from the lab's fake AI endpoint\n"; }}
  }}
}}
"#,
        root = root.display(),
        cert = pki.cert.display(),
        key = pki.key.display(),
    );
    let conf_path = root.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    lab.spawn(
        net,
        "nginx",
        &[
            "nginx",
            "-c",
            &conf_path.display().to_string(),
            "-e",
            &root.join("error.log").display().to_string(),
        ],
    )?;
    lab.wait_for_port(net, "tcp", 443, Duration::from_secs(10))?;

    let quic = peer_script("quic.py").display().to_string();
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let addrs = format!("{},{AI_V6}", AI_V4.join(","));
    lab.spawn(
        net,
        "quic-server",
        &["python3", &quic, "server", &addrs, "443", &cert, &key],
    )?;
    lab.wait_for_log("quic-server", "listening", Duration::from_secs(20))?;
    Ok(())
}

/// A real TLS or QUIC client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    Curl,
    OpensslSClient,
    PythonSsl,
    Chromium,
    Aioquic,
}

impl Client {
    pub fn name(self) -> &'static str {
        match self {
            Client::Curl => "curl",
            Client::OpensslSClient => "openssl",
            Client::PythonSsl => "python-ssl",
            Client::Chromium => "chromium",
            Client::Aioquic => "aioquic",
        }
    }
}

/// Calls `https://<name>/` at `addr` from `ns` with `client`; fails if the call does.
pub fn call(
    lab: &Lab,
    ns: &Ns,
    client: Client,
    name: &str,
    addr: &str,
    pki: &LabPki,
) -> Result<String> {
    let ca = pki.ca.display().to_string();
    let host = if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_string()
    };
    // Each client's own limit, in seconds, scaled like the lab's deadlines.
    let limit = |secs: u32| (secs * crate::timeout_scale()).to_string();
    let out = match client {
        Client::Curl => lab.exec_any(
            ns,
            &[
                "curl",
                "-sS",
                "--max-time",
                &limit(10),
                "--http1.1",
                "--cacert",
                &ca,
                "--resolve",
                &format!("{name}:443:{host}"),
                &format!("https://{name}/"),
            ],
        )?,
        Client::OpensslSClient => {
            // s_client reads stdin; give it a request and let it close.
            let cmd = format!(
                "printf 'GET / HTTP/1.1\\r\\nHost: {name}\\r\\nConnection: close\\r\\n\\r\\n' | timeout {} openssl s_client -quiet -connect {host}:443 -servername {name} -CAfile {ca} -verify_return_error",
                limit(10)
            );
            lab.exec_any(ns, &["sh", "-c", &cmd])?
        }
        Client::PythonSsl => {
            let script = peer_script("tls_client.py").display().to_string();
            lab.exec_any(ns, &["python3", &script, addr, "443", name, &ca])?
        }
        Client::Chromium => {
            let profile = lab.workdir.join(format!("chromium-{}", std::process::id()));
            let _ = fs::remove_dir_all(&profile);
            let mut args = vec!["timeout".to_owned(), limit(40)];
            args.extend(chromium_args(
                &profile,
                &[
                    "--ignore-certificate-errors",
                    &format!("--host-resolver-rules=MAP {name} {addr}"),
                ],
                &format!("https://{name}/"),
            ));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.exec_any(ns, &refs)?
        }
        Client::Aioquic => {
            let script = peer_script("quic.py").display().to_string();
            lab.exec_any(ns, &["python3", &script, "client", addr, "443", name, &ca])?
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || stdout.trim().is_empty() {
        bail!(
            "{} to {name} at {addr} failed ({}): {stdout}{}",
            client.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Path of the lab's conduit map (`tests/lab/conduits.yaml`).
pub fn lab_conduits() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("lab")
        .join("conduits.yaml")
}

/// A headless Chromium that prints the DOM of `url` (over TCP: no QUIC), with its
/// profile in `profile` and `extra` flags.
pub fn chromium_args(profile: &std::path::Path, extra: &[&str], url: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.push(format!("--user-data-dir={}", profile.display()));
    args.extend(["--dump-dom".to_owned(), url.to_owned()]);
    args
}

/// The sensor on the lab gateway's zone-facing interfaces with the lab's map, and
/// `extra` flags (`--enforce`: the map's only `block` conduit is cell-1 to
/// anthropic).
pub fn start_lab_sensor(lab: &mut Lab, gw: &Ns, extra: &[&str]) -> Result<crate::SensorRun> {
    let conduits = lab_conduits().display().to_string();
    let mut args = vec![
        "--iface",
        crate::topology::GW_OT1_IF,
        "--iface",
        crate::topology::GW_OT2_IF,
        "--conduits",
        &conduits,
    ];
    args.extend_from_slice(extra);
    crate::SensorRun::start(lab, gw, "sensor", &args)
}

/// Like [`call`] but expects failure (a blocked flow); returns the error text.
pub fn call_expect_failure(
    lab: &Lab,
    ns: &Ns,
    client: Client,
    name: &str,
    addr: &str,
    pki: &LabPki,
) -> Result<String> {
    match call(lab, ns, client, name, addr, pki) {
        Ok(out) => bail!(
            "{} to {name} succeeded but should have been blocked: {out}",
            client.name()
        ),
        Err(err) => Ok(format!("{err:#}")),
    }
}

/// A collector running in the lab, with the mTLS material a sensor needs.
pub struct LabCollector {
    pub url: String,
    pub store: PathBuf,
    pub export: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    ca: PathBuf,
}

impl LabCollector {
    /// Starts `conduit-collector` (label `collector`) in `ns` on `addr`:7443 with mTLS
    /// (server certificate for the address, client certificates from the lab CA),
    /// trust on first use, and a JSON-lines export; issues the client certificate
    /// of `sensor_id`.
    pub fn start(
        lab: &mut Lab,
        ns: &Ns,
        addr: &str,
        pki: &LabPki,
        sensor_id: &str,
    ) -> Result<LabCollector> {
        let (srv_cert, srv_key) = pki.issue(
            lab,
            "collector",
            "collector.lab",
            &[&format!("IP:{addr}")],
            false,
        )?;
        let (client_cert, client_key) = pki.issue(
            lab,
            "sensor-client",
            sensor_id,
            &[&format!("DNS:{sensor_id}")],
            true,
        )?;
        let store = lab.workdir.join("collector-store");
        let export = lab.workdir.join("collector.jsonl");
        let listen = format!("{addr}:7443");
        let s = |p: &PathBuf| p.display().to_string();
        let bin = s(&crate::workspace_bin("conduit-collector"));
        lab.spawn(
            ns,
            "collector",
            &[
                &bin,
                "run",
                "--listen",
                &listen,
                "--store",
                &s(&store),
                "--jsonl",
                &s(&export),
                "--tofu",
                "--tls-cert",
                &s(&srv_cert),
                "--tls-key",
                &s(&srv_key),
                "--client-ca",
                &s(&pki.ca),
            ],
        )?;
        lab.wait_for_port(ns, "tcp", 7443, Duration::from_secs(20))?;
        Ok(LabCollector {
            url: format!("https://{listen}"),
            store,
            export,
            client_cert,
            client_key,
            ca: pki.ca.clone(),
        })
    }

    /// The sensor flags that stream to this collector.
    pub fn sensor_args(&self) -> Vec<String> {
        let s = |p: &PathBuf| p.display().to_string();
        vec![
            "--collector".into(),
            self.url.clone(),
            "--tls-cert".into(),
            s(&self.client_cert),
            "--tls-key".into(),
            s(&self.client_key),
            "--tls-ca".into(),
            s(&self.ca),
        ]
    }
}
