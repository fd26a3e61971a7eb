//! Certificates for the TLS tests, made with GnuTLS's certtool (package
//! gnutls-bin, installed by scripts/test.sh) in the directory layout that
//! qemu-nbd, nbdkit and libnbd share (docs/tls.md).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// One certificate authority: its key and self-signed certificate.
pub struct Ca {
    pub dir: PathBuf,
    pub key: PathBuf,
    pub cert: PathBuf,
}

/// `certtool OP --load-privkey KEY --template TEMPLATE --outfile OUT` with
/// `extra` arguments after OP.
fn certtool_sign(op: &str, extra: &[&Path], key: &Path, template: &Path, out: &Path) {
    let mut args = vec![op.to_string()];
    for (flag, p) in ["--load-ca-certificate", "--load-ca-privkey"].iter().zip(extra) {
        args.extend([flag.to_string(), p.display().to_string()]);
    }
    for (flag, p) in [("--load-privkey", key), ("--template", template), ("--outfile", out)] {
        args.extend([flag.to_string(), p.display().to_string()]);
    }
    certtool(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn certtool(args: &[&str]) {
    let out = Command::new("certtool").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run certtool ({e}): install gnutls-bin (scripts/test.sh does)");
    });
    assert!(out.status.success(), "certtool {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// RSA: qemu refuses a certificate whose key usage lacks key encipherment,
/// which an ECDSA certificate cannot have.
fn key(path: &Path) {
    certtool(&["--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", path.to_str().expect("utf-8")]);
}

/// What a leaf certificate says.
pub struct Leaf<'a> {
    pub cn: &'a str,
    /// dNSName SANs.
    pub dns: &'a [&'a str],
    pub ip: Option<&'a str>,
    /// `tls_www_server` and/or `tls_www_client`.
    pub server: bool,
    pub client: bool,
    /// Valid only in the past (an expired certificate).
    pub expired: bool,
    /// Expires this many days from now (default 3650).
    pub days: Option<u32>,
}

impl<'a> Leaf<'a> {
    pub fn new(cn: &'a str) -> Leaf<'a> {
        Leaf { cn, dns: &[], ip: None, server: true, client: true, expired: false, days: None }
    }
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let key_path = dir.join("ca-key.pem");
        let cert = dir.join("ca-cert.pem");
        key(&key_path);
        let info = dir.join("ca.info");
        std::fs::write(&info, format!("cn = {name}\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 3650\n"))
            .expect("write");
        certtool_sign("--generate-self-signed", &[], &key_path, &info, &cert);
        Ca { dir, key: key_path, cert }
    }

    /// Writes `dir/<stem>-cert.pem` and `dir/<stem>-key.pem` signed by this
    /// CA, and `dir/ca-cert.pem` (this CA).
    pub fn issue(&self, dir: &Path, stem: &str, leaf: &Leaf<'_>) {
        std::fs::create_dir_all(dir).expect("mkdir");
        let key_path = dir.join(format!("{stem}-key.pem"));
        let cert = dir.join(format!("{stem}-cert.pem"));
        key(&key_path);
        let mut t = format!("cn = {}\nencryption_key\nsigning_key\n", leaf.cn);
        for d in leaf.dns {
            t.push_str(&format!("dns_name = {d}\n"));
        }
        if let Some(ip) = leaf.ip {
            t.push_str(&format!("ip_address = {ip}\n"));
        }
        if leaf.server {
            t.push_str("tls_www_server\n");
        }
        if leaf.client {
            t.push_str("tls_www_client\n");
        }
        if leaf.expired {
            t.push_str(
                "activation_date = \"2019-01-01 00:00:00 UTC\"\nexpiration_date = \"2020-01-01 00:00:00 UTC\"\n",
            );
        } else {
            t.push_str(&format!("expiration_days = {}\n", leaf.days.unwrap_or(3650)));
        }
        let info = dir.join(format!("{stem}.info"));
        std::fs::write(&info, t).expect("write");
        certtool_sign("--generate-certificate", &[&self.cert, &self.key], &key_path, &info, &cert);
        std::fs::copy(&self.cert, dir.join("ca-cert.pem")).expect("copy CA");
    }

    /// A node's directory: server and client certificates naming `node`
    /// (and localhost / 127.0.0.1, for NBD clients).
    pub fn node_dir(&self, dir: &Path, node: &str) {
        let dns = [node, "localhost"];
        let leaf = Leaf { dns: &dns, ip: Some("127.0.0.1"), ..Leaf::new(node) };
        self.issue(dir, "server", &leaf);
        self.issue(dir, "client", &leaf);
    }

    /// An NBD client's directory (libnbd's `tls-certificates=DIR`, qemu's
    /// `tls-creds-x509,dir=DIR`).
    pub fn client_dir(&self, dir: &Path, cn: &str) {
        let leaf = Leaf { server: false, ..Leaf::new(cn) };
        self.issue(dir, "client", &leaf);
    }

    /// A directory with only the CA (a client without a certificate).
    pub fn ca_only_dir(&self, dir: &Path) {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::copy(&self.cert, dir.join("ca-cert.pem")).expect("copy CA");
    }
}
