//! Signing keys. `signing.key` is the ed25519 private key as PKCS#8 PEM
//! ("-----BEGIN PRIVATE KEY-----", what `openssl genpkey -algorithm ed25519` writes),
//! mode 0600; `signing.pub` is the 32-byte public key as 64 lower-case hex digits and
//! a newline, mode 0644. Public key files may also be SPKI PEM ("BEGIN PUBLIC KEY").

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _};
use ed25519_dalek::{SigningKey, VerifyingKey};

pub const KEY_FILE: &str = "signing.key";
pub const PUB_FILE: &str = "signing.pub";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: already exists; refusing to overwrite a signing key", path.display())]
    Exists { path: PathBuf },
    #[error(
        "{}: mode {mode:04o} lets group or others read the signing key; run `chmod 600 {}`",
        path.display(), path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: not an ed25519 key ({what})", path.display())]
    Format { path: PathBuf, what: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` with `mode`, atomically and never over an existing file:
/// a temporary file is hard-linked into place (fails if the name exists).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    if path.exists() {
        return Err(KeyError::Exists {
            path: path.to_owned(),
        });
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits we want (0644 for the public key).
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(KeyError::Exists {
            path: path.to_owned(),
        }),
        Err(e) => Err(KeyError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Creates `out_dir/signing.key` (0600) and `out_dir/signing.pub` (0644); refuses to
/// overwrite either. Returns the key.
pub fn keygen(out_dir: &Path) -> Result<SigningKey, KeyError> {
    fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let key_path = out_dir.join(KEY_FILE);
    let pub_path = out_dir.join(PUB_FILE);
    for p in [&key_path, &pub_path] {
        if p.exists() {
            return Err(KeyError::Exists { path: p.clone() });
        }
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Format {
            path: key_path.clone(),
            what: e.to_string(),
        })?;
    write_new(&key_path, pem.as_bytes(), 0o600)?;
    write_new(
        &pub_path,
        public_key_hex(&key.verifying_key()).as_bytes(),
        0o644,
    )?;
    Ok(key)
}

/// `hex(public key)` and a newline: the content of `signing.pub`.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    format!("{}\n", hex::encode(key.as_bytes()))
}

/// Loads a signing key, refusing a file that group or others can read.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Format {
        path: path.to_owned(),
        what: e.to_string(),
    })
}

/// The agent's start: loads `spool_dir/signing.key`, creating it (and `signing.pub`)
/// on first start. Returns the key and whether it was created.
pub fn load_or_create(spool_dir: &Path) -> Result<(SigningKey, bool), KeyError> {
    let key_path = spool_dir.join(KEY_FILE);
    if key_path.exists() {
        let key = load_signing_key(&key_path)?;
        // Recreate a lost signing.pub so verify-chain finds it.
        write_public_key_if_missing(spool_dir, &key)?;
        return Ok((key, false));
    }
    Ok((keygen(spool_dir)?, true))
}

/// Writes `dir/signing.pub` for `key` unless the file exists.
pub fn write_public_key_if_missing(dir: &Path, key: &SigningKey) -> Result<(), KeyError> {
    let pub_path = dir.join(PUB_FILE);
    match write_new(
        &pub_path,
        public_key_hex(&key.verifying_key()).as_bytes(),
        0o644,
    ) {
        Ok(()) | Err(KeyError::Exists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads a public key file: 64 hex digits, or SPKI PEM.
pub fn read_public_key(path: &Path) -> Result<[u8; 32], KeyError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    let text = text.trim();
    let format = |what: String| KeyError::Format {
        path: path.to_owned(),
        what,
    };
    if text.starts_with("-----BEGIN") {
        let key = VerifyingKey::from_public_key_pem(text).map_err(|e| format(e.to_string()))?;
        return Ok(key.to_bytes());
    }
    let bytes = hex::decode(text).map_err(|e| format(format!("expected 64 hex digits: {e}")))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format(format!("expected 32 bytes, found {}", b.len())))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format(e.to_string()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_modes_refuse_overwrite_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = keygen(dir.path()).expect("keygen");
        let kp = dir.path().join(KEY_FILE);
        let pp = dir.path().join(PUB_FILE);
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&kp), 0o600);
        assert_eq!(mode(&pp), 0o644);
        assert!(matches!(keygen(dir.path()), Err(KeyError::Exists { .. })));
        let loaded = load_signing_key(&kp).expect("load");
        assert_eq!(loaded.to_bytes(), key.to_bytes());
        assert_eq!(
            read_public_key(&pp).expect("pub"),
            key.verifying_key().to_bytes()
        );
        let (again, created) = load_or_create(dir.path()).expect("load_or_create");
        assert!(!created);
        assert_eq!(again.to_bytes(), key.to_bytes());
    }

    #[test]
    fn refuses_readable_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        keygen(dir.path()).expect("keygen");
        let kp = dir.path().join(KEY_FILE);
        fs::set_permissions(&kp, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_signing_key(&kp).expect_err("must refuse");
        let msg = err.to_string();
        assert!(msg.contains("0644"), "{msg}");
        assert!(
            msg.contains(&format!("chmod 600 {}", kp.display())),
            "{msg}"
        );
    }

    #[test]
    fn load_or_create_creates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, created) = load_or_create(dir.path()).expect("create");
        assert!(created);
        let (again, created) = load_or_create(dir.path()).expect("load");
        assert!(!created);
        assert_eq!(key.to_bytes(), again.to_bytes());
    }
}
