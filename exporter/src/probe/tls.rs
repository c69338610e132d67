//! TLS for probes: a rustls client configuration built once per probe (roots, optional client
//! certificate, verification on or off) and, per connection, a verifier that records the
//! earliest expiry in the chain the server presented, even when verification then fails.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How a probe speaks TLS, checked once at configuration time and kept across scrapes.
pub struct TlsSetup {
    provider: Arc<CryptoProvider>,
    webpki: Arc<WebPkiServerVerifier>,
    verify: bool,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("verify", &self.verify)
            .field("client_auth", &self.client_auth.is_some())
            .finish()
    }
}

/// What went wrong reading TLS files; the message names the file, never its content.
pub type SetupError = String;

impl TlsSetup {
    /// Trusts `ca_file` if given (instead of the built-in public roots), presents
    /// `cert_file`/`key_file` if given, and checks the server's certificate unless `verify`
    /// is false. `alpn` is offered as is (HTTP probes offer `http/1.1`).
    pub fn new(
        verify: bool,
        ca_file: Option<&Path>,
        client: Option<(&Path, &Path)>,
        alpn: &[&[u8]],
    ) -> Result<TlsSetup, SetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let certs = read_certs(path)?;
                for cert in certs {
                    roots.add(cert).map_err(|e| {
                        format!("{}: not a usable CA certificate: {e}", path.display())
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("cannot build a certificate verifier: {e}"))?;
        let client_auth = match client {
            Some((cert, key)) => {
                let certs = read_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("{}: no usable private key: {e}", key.display()))?;
                Some((certs, key))
            }
            None => None,
        };
        let setup = TlsSetup {
            provider,
            webpki,
            verify,
            client_auth,
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        };
        setup
            .connection_config()
            .map_err(|e| format!("the client certificate and key are not usable: {e}"))?;
        Ok(setup)
    }

    /// A client configuration for one connection, with a fresh recorder for the server's
    /// certificate chain. Fails only if rustls refuses the client key (checked at start).
    pub fn connection_config(&self) -> Result<(Arc<ClientConfig>, ChainExpiry), rustls::Error> {
        let expiry = ChainExpiry::default();
        let verifier = Arc::new(Recording {
            inner: self.webpki.clone(),
            verify: self.verify,
            expiry: expiry.clone(),
        });
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.client_auth {
            Some((certs, key)) => builder.with_client_auth_cert(certs.clone(), key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Ok((Arc::new(config), expiry))
    }
}

/// The `tls:` block of a probe, as written.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Check the server's certificate chain and name (default true).
    verify: Option<bool>,
    /// PEM file of CA certificates to trust instead of the built-in public roots.
    ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate (chain) to present.
    cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `cert_file`.
    key_file: Option<std::path::PathBuf>,
}

impl RawTls {
    /// Reads the files and builds the setup, recording a problem at `field` on failure.
    pub fn check(
        self,
        at: &crate::config::Located,
        field: &str,
        ctx: &crate::config::SectionContext,
        alpn: &[&[u8]],
        problems: &mut Vec<crate::config::Problem>,
    ) -> Option<TlsSetup> {
        let ca = self.ca_file.map(|p| ctx.resolve(&p));
        let client = match (self.cert_file, self.key_file) {
            (Some(c), Some(k)) => Some((ctx.resolve(&c), ctx.resolve(&k))),
            (None, None) => None,
            _ => {
                problems.push(
                    at.problem(field, "cert_file and key_file go together")
                        .hint("give both for a client certificate, or neither"),
                );
                return None;
            }
        };
        let client_refs = client.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        TlsSetup::new(
            self.verify.unwrap_or(true),
            ca.as_deref(),
            client_refs,
            alpn,
        )
        .map_err(|e| {
            problems.push(
                at.problem(field, e)
                    .hint("files must be PEM and readable by the user clusterwatch runs as"),
            )
        })
        .ok()
    }
}

/// Every certificate in a PEM file; the error names the file, never its content.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SetupError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// The earliest `notAfter` (unix seconds) of the chain a server presented on one connection.
#[derive(Clone, Debug, Default)]
pub struct ChainExpiry(Arc<Mutex<Option<f64>>>);

impl ChainExpiry {
    /// The recorded expiry, if the server got as far as presenting certificates.
    pub fn get(&self) -> Option<f64> {
        *crate::sync::lock(&self.0)
    }

    fn record(&self, certs: &[&CertificateDer<'_>]) {
        let earliest = certs
            .iter()
            .filter_map(|c| not_after(c.as_ref()))
            .fold(None, |acc: Option<i64>, t| {
                Some(acc.map_or(t, |a| a.min(t)))
            });
        *crate::sync::lock(&self.0) = earliest.map(|t| t as f64);
    }
}

/// Records the chain before delegating to webpki, so an expired certificate still reports
/// its expiry; with verification off it accepts any chain but still checks handshake
/// signatures (the server must hold the key of the certificate it sent).
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    verify: bool,
    expiry: ChainExpiry,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain: Vec<&CertificateDer<'_>> =
            std::iter::once(end_entity).chain(intermediates).collect();
        self.expiry.record(&chain);
        if self.verify {
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        } else {
            Ok(ServerCertVerified::assertion())
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One DER element: tag, contents, and what follows it.
fn der_element(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = d.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The `notAfter` of an X.509 certificate as unix seconds. Reads only the few DER elements
/// in front of the validity, so no full X.509 parser is needed for one date.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    let (_, certificate, _) = der_element(cert)?;
    let (_, tbs, _) = der_element(certificate)?;
    let mut rest = tbs;
    // Optional explicit version [0], then serial, signature algorithm, issuer.
    if rest.first() == Some(&0xa0) {
        rest = der_element(rest)?.2;
    }
    for _ in 0..3 {
        rest = der_element(rest)?.2;
    }
    let (_, validity, _) = der_element(rest)?;
    let (_, _, after) = der_element(validity)?;
    let (tag, time, _) = der_element(after)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        // UTCTime: two-digit years, 50..99 are 19xx (RFC 5280).
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2038, 1, 19), 24_855);
    }

    /// A minimal certificate skeleton: only the elements `not_after` walks over.
    fn skeleton(validity_after: &[u8], with_version: bool) -> Vec<u8> {
        fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut v = vec![tag];
            if content.len() < 0x80 {
                v.push(content.len() as u8);
            } else {
                v.push(0x82);
                v.extend_from_slice(&(content.len() as u16).to_be_bytes());
            }
            v.extend_from_slice(content);
            v
        }
        let mut tbs = Vec::new();
        if with_version {
            tbs.extend(tlv(0xa0, &tlv(0x02, &[2])));
        }
        tbs.extend(tlv(0x02, &[1, 2, 3]));
        tbs.extend(tlv(0x30, &[0x06, 0x01, 0x00]));
        tbs.extend(tlv(0x30, &[0u8; 200]));
        let mut validity = tlv(0x17, b"240101000000Z");
        validity.extend_from_slice(validity_after);
        tbs.extend(tlv(0x30, &validity));
        tlv(0x30, &tlv(0x30, &tbs))
    }

    #[test]
    fn reads_utc_and_generalized_not_after() {
        let utc = skeleton(&[&[0x17, 13][..], b"300615123045Z"].concat(), true);
        assert_eq!(not_after(&utc), Some(1_907_757_045));
        let gen = skeleton(&[&[0x18, 15][..], b"20500101000000Z"].concat(), false);
        assert_eq!(not_after(&gen), Some(2_524_608_000));
        let old = skeleton(&[&[0x17, 13][..], b"991231235959Z"].concat(), true);
        assert_eq!(not_after(&old), Some(946_684_799));
    }

    #[test]
    fn garbage_is_no_date() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x05, 1, 2]), None);
    }
}
