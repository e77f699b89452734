//! How the collector connects to NATS, for the JetStream chains and the NATS export
//! alike: TLS with a private CA, a client certificate for servers that require one
//! (`tls { verify: true }`), and the user and password, or token, that the URL
//! carries (`tls://user:password@host:4222`, `tls://token@host:4222`; percent-escapes
//! decoded). async-nats itself ignores a URL's credentials, so they are taken here.
//! Without a CA or a certificate, the URL's scheme decides (`tls://` asks for TLS
//! with the system's roots).

use std::path::PathBuf;

use async_nats::{ConnectOptions, ServerAddr};

/// TLS settings of the collector's NATS connections (`--nats-ca`, `--nats-cert`,
/// `--nats-key`; `nats_tls:` in collector.yaml).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// CA certificate(s) (PEM) that the servers' certificates must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) and its key.
    pub cert: Option<(PathBuf, PathBuf)>,
}

impl NatsTls {
    /// Connection options named `name` for `url` (one or several comma-separated
    /// servers; the first that carries credentials gives them), with TLS required as
    /// soon as a CA or a client certificate is given.
    pub fn options(&self, name: &str, url: &str) -> ConnectOptions {
        let mut o = ConnectOptions::new().name(name);
        match credentials(url) {
            Some(Credentials::UserPassword(user, password)) => {
                o = o.user_and_password(user, password);
            }
            Some(Credentials::Token(token)) => o = o.token(token),
            None => {}
        }
        if let Some(ca) = &self.ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.cert {
            o = o
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        o
    }
}

/// `url` with any password or token replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let u = u.trim();
            let Some((scheme, rest)) = u.split_once("://") else {
                return u.to_owned();
            };
            let Some((userinfo, host)) = rest.rsplit_once('@') else {
                return u.to_owned();
            };
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://***@{host}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    UserPassword(String, String),
    Token(String),
}

/// The credentials of the first server in `url` that carries any.
fn credentials(url: &str) -> Option<Credentials> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    url.split(',')
        .filter_map(|u| u.trim().parse::<ServerAddr>().ok())
        .find(ServerAddr::has_user_pass)
        .and_then(|a| match (a.username(), a.password()) {
            (Some(user), Some(password)) => {
                Some(Credentials::UserPassword(decode(user), decode(password)))
            }
            (Some(token), None) => Some(Credentials::Token(decode(token))),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact("tls://collector:s3cret@n1:4222, nats://tok@n2:4222,nats://n3:4222"),
            "tls://collector:***@n1:4222,nats://***@n2:4222,nats://n3:4222"
        );
    }

    #[test]
    fn credentials_come_from_the_first_server_that_has_them() {
        assert_eq!(credentials("nats://10.0.0.5:4222"), None);
        assert_eq!(
            credentials("tls://collector:s%40cret@n1:4222,tls://n2:4222"),
            Some(Credentials::UserPassword(
                "collector".into(),
                "s@cret".into()
            ))
        );
        assert_eq!(
            credentials("nats://n1:4222, nats://abc123@n2:4222"),
            Some(Credentials::Token("abc123".into()))
        );
    }
}
