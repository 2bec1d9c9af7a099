//! rustls certificate verifiers that accept exactly the pinned public keys.
//!
//! Certificates are self-signed and carry no meaning beyond their key: names, issuers and
//! validity dates are ignored, the key's fingerprint must match, and the TLS 1.3 handshake
//! signature proves the peer holds the private key.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::Fingerprint;

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn check(
    cert: &CertificateDer<'_>,
    allowed: &HashSet<Fingerprint>,
    seen: &Mutex<Option<Fingerprint>>,
    role: &str,
) -> Result<Fingerprint, Error> {
    let fp = Fingerprint::of_certificate(cert).map_err(|e| {
        tracing::warn!(peer_role = role, error = %e, "peer presented an unparsable certificate");
        Error::InvalidCertificate(CertificateError::BadEncoding)
    })?;
    if let Ok(mut s) = seen.lock() {
        *s = Some(fp);
    }
    if allowed.contains(&fp) {
        Ok(fp)
    } else {
        tracing::warn!(peer_role = role, peer_fingerprint = %fp, "refused peer with a key that is not pinned");
        Err(Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }
}

/// Client side: the receiver must present the pinned key.
#[derive(Debug)]
pub struct PinnedServer {
    allowed: HashSet<Fingerprint>,
    seen: Arc<Mutex<Option<Fingerprint>>>,
}

impl PinnedServer {
    /// Accept only `peer`. `seen` records the key the server presented, so a failed
    /// connection can say which key it was.
    pub fn new(peer: Fingerprint, seen: Arc<Mutex<Option<Fingerprint>>>) -> Self {
        PinnedServer {
            allowed: HashSet::from([peer]),
            seen,
        }
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        check(end_entity, &self.allowed, &self.seen, "receiver")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server side: the client must present one of the allowed keys.
#[derive(Debug)]
pub struct PinnedClients {
    allowed: HashSet<Fingerprint>,
    seen: Mutex<Option<Fingerprint>>,
}

impl PinnedClients {
    /// Accept clients whose key is in `allowed`.
    pub fn new(allowed: impl IntoIterator<Item = Fingerprint>) -> Self {
        PinnedClients {
            allowed: allowed.into_iter().collect(),
            seen: Mutex::new(None),
        }
    }
}

impl ClientCertVerifier for PinnedClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        check(end_entity, &self.allowed, &self.seen, "sender")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
