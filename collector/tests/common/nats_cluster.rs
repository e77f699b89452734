//! A 3-node nats-server cluster with JetStream on loopback, for the JetStream tests
//! and the collector benchmark (`#[path]`-included there): each node its own store
//! and log in the given directory; killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn installed() -> bool {
    Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One nats-server of the cluster; killed on drop.
pub struct Node {
    child: Option<Child>,
    conf: PathBuf,
    log: PathBuf,
    port: u16,
}

impl Node {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self) {
        let log = std::fs::File::create(&self.log).expect("nats log");
        self.child = Some(
            Command::new("nats-server")
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("nats-server"),
        );
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three clustered nats-servers with JetStream, each with its own store.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// None (with a SKIP line) when nats-server is not installed.
    pub async fn start(dir: &Path) -> Option<Cluster> {
        if !installed() {
            println!("SKIP: nats-server not installed");
            return None;
        }
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, r)| format!("nats-route://127.0.0.1:{r}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let conf = dir.join(format!("n{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{port}\nmax_payload: 8MB\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: conduit\n listen: 127.0.0.1:{route}\n routes: [{}] }}\n",
                    dir.join(format!("n{i}")).display(),
                    routes.join(", ")
                ),
            )
            .expect("nats conf");
            let mut n = Node {
                child: None,
                conf,
                log: dir.join(format!("n{i}.log")),
                port: *port,
            };
            n.start();
            nodes.push(n);
        }
        let c = Cluster { nodes };
        c.wait_ready().await;
        Some(c)
    }

    /// The nodes' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "{}:\n{}",
                    n.log.display(),
                    std::fs::read_to_string(&n.log).unwrap_or_default()
                )
            })
            .collect()
    }

    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Ready: every live node answers a JetStream request (a meta leader is elected).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let mut ok = false;
            while !ok && Instant::now() < deadline {
                // The raw API: async-nats cannot parse nats-server 2.9's account info.
                if let Ok(c) = async_nats::connect(n.url()).await
                    && let Ok(m) = c.request("$JS.API.INFO", "".into()).await
                {
                    let body = String::from_utf8_lossy(&m.payload);
                    ok = body.contains("account_info_response") && !body.contains("\"error\"");
                }
                if !ok {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            assert!(
                ok,
                "JetStream cluster not ready; {}:\n{}",
                n.log.display(),
                std::fs::read_to_string(&n.log).unwrap_or_default()
            );
        }
    }
}
