//! Test certificates: a throwaway CA and leaf certificates for `localhost`/127.0.0.1 signed by
//! it, valid, expired or about to expire, and client certificates, written as PEM files. Nothing here is trusted by
//! anything but the test that made it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};

/// A CA that signs leaf certificates; its certificate is at [`Ca::cert_path`].
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    cert_path: PathBuf,
}

/// PEM files of one leaf certificate and its key, and when it expires.
pub struct Leaf {
    /// Certificate file.
    pub cert: PathBuf,
    /// Private key file.
    pub key: PathBuf,
    /// `notAfter` as unix seconds.
    pub not_after: i64,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Sets the validity to [now + `from`, now + `to`] (seconds).
fn set_validity(params: &mut CertificateParams, from: i64, to: i64) {
    let at = |offset: i64| {
        let t = (unix_now() + offset).max(0) as u64;
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(t)
    };
    params.not_before = at(from);
    params.not_after = at(to);
}

impl Ca {
    /// Creates a CA valid from a year ago for ten years and writes `dir/ca.pem`.
    pub fn create(dir: &Path) -> Result<Ca> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "clusterwatch test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        set_validity(&mut params, -365 * 86_400, 10 * 365 * 86_400);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_path = dir.join("ca.pem");
        std::fs::write(&cert_path, cert.pem())
            .with_context(|| format!("could not write {}", cert_path.display()))?;
        Ok(Ca {
            cert,
            key,
            cert_path,
        })
    }

    /// The CA certificate's PEM file, for `ca_file`.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Signs a leaf for `localhost` and 127.0.0.1 that expires `expires_in_secs` from now
    /// (negative: already expired), written as `dir/NAME.pem` and `dir/NAME.key`.
    pub fn leaf(&self, dir: &Path, name: &str, expires_in_secs: i64) -> Result<Leaf> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        set_validity(
            &mut params,
            expires_in_secs.min(0) - 30 * 86_400,
            expires_in_secs,
        );
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let leaf = Leaf {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            not_after: unix_now() + expires_in_secs,
        };
        std::fs::write(&leaf.cert, cert.pem())?;
        std::fs::write(&leaf.key, key.serialize_pem())?;
        Ok(leaf)
    }

    /// Signs a client certificate for `common_name` (client-auth usage, valid for a day),
    /// written as `dir/NAME.pem` and `dir/NAME.key`.
    pub fn client(&self, dir: &Path, name: &str, common_name: &str) -> Result<Leaf> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut params, -86_400, 86_400);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let leaf = Leaf {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            not_after: unix_now() + 86_400,
        };
        std::fs::write(&leaf.cert, cert.pem())?;
        std::fs::write(&leaf.key, key.serialize_pem())?;
        Ok(leaf)
    }
}
