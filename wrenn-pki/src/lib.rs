//! The certificates of a Wrenn cluster. The control plane reaches its host agents over
//! mutual TLS with two CAs of its own:
//! - the **host CA** signs each agent's server certificate, for the DNS name
//!   [`host_name`] of its host id: the control plane checks that name, so one host's
//!   certificate cannot stand in for another host;
//! - the **control-plane CA** signs the control plane's client certificate, the only
//!   client certificates agents accept, so a host's certificate cannot act as the
//!   control plane towards another agent.
//!
//! Neither is a user credential: the HTTP API takes no certificates.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what}: not valid PEM")]
    Pem { what: &'static str },
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The DNS name a host's certificate is issued for (and checked against).
pub fn host_name(host_id: &str) -> String {
    format!("{host_id}.hosts.wrenn.internal")
}

/// The name of the control plane's client certificates.
pub const CONTROL_PLANE_NAME: &str = "control-plane.wrenn.internal";

/// A certificate and its key, PEM encoded, with what the control plane records of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub fingerprint: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Which of the cluster's CAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaKind {
    Hosts,
    ControlPlane,
}

impl CaKind {
    /// Its name (where it is stored, and in its certificate).
    pub fn name(self) -> &'static str {
        match self {
            CaKind::Hosts => "hosts",
            CaKind::ControlPlane => "control-plane",
        }
    }
}

/// One of the cluster's CAs.
pub struct Ca {
    kind: CaKind,
    key: KeyPair,
    /// Its certificate as stored (and handed to whoever trusts it).
    cert_pem: String,
    /// The same subject and key, to sign with (the stored certificate is not parsed:
    /// what a signature names of its issuer is the subject and the key).
    issuer: rcgen::Certificate,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);

fn ca_params(kind: CaKind) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Wrenn");
    dn.push(DnType::CommonName, format!("Wrenn {} CA", kind.name()));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn validity(p: &mut CertificateParams, valid_for: Duration) -> SystemTime {
    let now = SystemTime::now();
    // A little slack for clocks that differ between machines.
    let from = now - Duration::from_secs(300);
    let until = now + valid_for;
    p.not_before = from.into();
    p.not_after = until.into();
    until
}

fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Ca {
    /// A new CA.
    pub fn generate(kind: CaKind) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(kind);
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            kind,
            key,
            cert_pem,
            issuer: cert,
        })
    }

    /// A stored CA: its certificate and key as [`Ca::cert_pem`] and [`Ca::key_pem`] gave.
    pub fn from_pem(kind: CaKind, cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = ca_params(kind).self_signed(&key)?;
        parse_certs(cert_pem, "CA certificate")?;
        Ok(Ca {
            kind,
            key,
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key (to store it sealed).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn issue(
        &self,
        name: &str,
        usage: ExtendedKeyUsagePurpose,
        valid_for: Duration,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Wrenn");
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        let not_after = validity(&mut p, valid_for);
        let cert = p.signed_by(&key, &self.issuer, &self.key)?;
        Ok(Issued {
            fingerprint: fingerprint(cert.der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    /// A server certificate for host `host_id` (host CA).
    pub fn issue_host(&self, host_id: &str, valid_for: Duration) -> Result<Issued, PkiError> {
        self.issue(
            &host_name(host_id),
            ExtendedKeyUsagePurpose::ServerAuth,
            valid_for,
        )
    }

    /// A client certificate for the control plane (control-plane CA).
    pub fn issue_control_plane(&self, valid_for: Duration) -> Result<Issued, PkiError> {
        self.issue(
            CONTROL_PLANE_NAME,
            ExtendedKeyUsagePurpose::ClientAuth,
            valid_for,
        )
    }
}

fn parse_certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PkiError::Pem { what })?;
    if certs.is_empty() {
        return Err(PkiError::Pem { what });
    }
    Ok(certs)
}

fn parse_key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, PkiError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .ok()
        .flatten()
        .ok_or(PkiError::Pem { what })
}

fn roots(ca_pem: &str, what: &'static str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for c in parse_certs(ca_pem, what)? {
        roots.add(c)?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring builds without a C toolchain's cmake; the link between a control plane and
    // its agents does not need the post-quantum key exchange only aws-lc-rs offers.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An agent's TLS: its host certificate, and the CA whose client certificates it
/// accepts (the control plane's).
#[derive(Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: String,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentIdentity(<redacted>)")
    }
}

impl AgentIdentity {
    /// The agent's server settings (HTTP/2 only: gRPC).
    pub fn server_config(&self) -> Result<ServerConfig, PkiError> {
        Ok(self.rotating_server_config()?.0)
    }

    /// The agent's server settings and the slot its certificate is in: what is put
    /// in the slot later (a renewed certificate) is what new connections see.
    pub fn rotating_server_config(&self) -> Result<(ServerConfig, CertSlot), PkiError> {
        let slot = CertSlot::new(&self.cert_pem, &self.key_pem)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(&self.client_ca_pem, "control-plane CA")?),
            provider(),
        )
        .build()?;
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(slot.clone()));
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok((c, slot))
    }
}

/// Client settings that trust only the CA(s) in `ca_pem` (e.g. a Kubernetes API
/// server's), without a client certificate.
pub fn client_config_trusting(ca_pem: &str) -> Result<ClientConfig, PkiError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem, "CA certificate")?)
        .with_no_client_auth())
}

/// A certificate and key that can be replaced while connections are made with it:
/// each TLS handshake takes the one in the slot at that moment (certificate
/// rotation without a restart).
#[derive(Clone)]
pub struct CertSlot(Arc<RwLock<Arc<CertifiedKey>>>);

impl std::fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertSlot(<redacted>)")
    }
}

fn certified(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, PkiError> {
    let certs = parse_certs(cert_pem, "certificate")?;
    let key = parse_key(key_pem, "key")?;
    let signer = provider().key_provider.load_private_key(key)?;
    let ck = CertifiedKey::new(certs, signer);
    // The key must be the certificate's.
    ck.keys_match()?;
    Ok(Arc::new(ck))
}

impl CertSlot {
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<CertSlot, PkiError> {
        Ok(CertSlot(Arc::new(RwLock::new(certified(
            cert_pem, key_pem,
        )?))))
    }

    /// Puts a new certificate and key in the slot (checked first: on error the slot
    /// keeps what it had).
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        let ck = certified(cert_pem, key_pem)?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = ck;
        Ok(())
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The control plane's TLS towards agents: the CA its agents' certificates come from,
/// and its own client certificate (in a slot: renewing it reaches the connections
/// made with this identity).
#[derive(Clone)]
pub struct ControlPlaneIdentity {
    pub host_ca_pem: String,
    pub cert: CertSlot,
}

impl std::fmt::Debug for ControlPlaneIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlPlaneIdentity(<redacted>)")
    }
}

impl ControlPlaneIdentity {
    pub fn new(
        host_ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<ControlPlaneIdentity, PkiError> {
        roots(host_ca_pem, "host CA")?;
        Ok(ControlPlaneIdentity {
            host_ca_pem: host_ca_pem.to_string(),
            cert: CertSlot::new(cert_pem, key_pem)?,
        })
    }

    /// The client settings (HTTP/2 only: gRPC); the caller checks the server's name.
    pub fn client_config(&self) -> Result<ClientConfig, PkiError> {
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(&self.host_ca_pem, "host CA")?)
            .with_client_cert_resolver(Arc::new(self.cert.clone()));
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_ca_signs_what_its_certificate_verifies() {
        let hosts = Ca::generate(CaKind::Hosts).expect("CA");
        let stored = Ca::from_pem(CaKind::Hosts, hosts.cert_pem(), &hosts.key_pem()).expect("load");
        let cp = Ca::generate(CaKind::ControlPlane).expect("CA");
        let host = stored
            .issue_host("host-a", Duration::from_secs(3600))
            .expect("issue");
        assert_eq!(host.fingerprint.len(), 64);
        let client = cp
            .issue_control_plane(Duration::from_secs(3600))
            .expect("issue");
        // Both sides' settings build from what was issued (parsing, key match).
        AgentIdentity {
            cert_pem: host.cert_pem,
            key_pem: host.key_pem,
            client_ca_pem: cp.cert_pem().into(),
        }
        .server_config()
        .expect("server settings");
        let cp_identity =
            ControlPlaneIdentity::new(hosts.cert_pem(), &client.cert_pem, &client.key_pem)
                .expect("identity");
        cp_identity.client_config().expect("client settings");
        // A slot takes only a matching pair, and keeps what it had otherwise.
        let other = stored
            .issue_host("host-b", Duration::from_secs(3600))
            .expect("issue");
        assert!(cp_identity
            .cert
            .replace(&other.cert_pem, &client.key_pem)
            .is_err());
        cp_identity
            .cert
            .replace(&other.cert_pem, &other.key_pem)
            .expect("a matching pair");
        assert!(Ca::from_pem(CaKind::Hosts, "junk", &hosts.key_pem()).is_err());
    }
}
