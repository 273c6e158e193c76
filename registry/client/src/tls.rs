//! TLS to the registry with the certificate pinned by fingerprint (v1 wire §4.1 "TLS pinning"):
//! the SHA-256 of the registry's leaf certificate (DER), as `pilot-registry` logs it at start
//! (`fingerprint=<64 hex digits>`). Chain, name and validity are not checked, only the pin, as
//! in v1; the handshake signatures are verified, so the peer holds the pinned certificate's
//! key.
//!
//! Invariants:
//! - A [`Transport::TlsPinned`] connection never sends a byte of the registry protocol before
//!   the handshake completed with the pinned certificate; a failed handshake is an error, never
//!   a fallback to plain TCP.
//! - A certificate that does not match the pin fails with
//!   [`crate::ClientError::FingerprintMismatch`], which names both fingerprints.

use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// SHA-256 of a DER certificate: what a client pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        use sha2::Digest;
        Fingerprint(sha2::Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    /// Lowercase hex, as `pilot-registry` logs it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A fingerprint that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "expected 64 hex digits (SHA-256 of the registry's certificate), optionally separated by ':'"
)]
pub struct BadFingerprint;

impl FromStr for Fingerprint {
    type Err = BadFingerprint;

    /// 64 hex digits in either case; `:` separators (`ab:cd:...`, as openssl prints) are
    /// ignored.
    fn from_str(s: &str) -> Result<Fingerprint, BadFingerprint> {
        let digits: Vec<u8> = s.trim().bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(BadFingerprint);
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let hex = std::str::from_utf8(pair).map_err(|_| BadFingerprint)?;
            *o = u8::from_str_radix(hex, 16).map_err(|_| BadFingerprint)?;
        }
        Ok(Fingerprint(out))
    }
}

/// How a client reaches the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Plain TCP (v1's default).
    #[default]
    Tcp,
    /// TLS, accepting only a leaf certificate with this fingerprint.
    TlsPinned(Fingerprint),
}

/// The pin did not match (carried inside rustls' error, then turned into
/// [`crate::ClientError::FingerprintMismatch`]).
#[derive(Debug, thiserror::Error)]
#[error("registry certificate {presented} does not match the pinned {expected}")]
pub(crate) struct PinMismatch {
    pub(crate) expected: Fingerprint,
    pub(crate) presented: Fingerprint,
}

/// Accepts exactly the pinned leaf certificate; verifies handshake signatures with the
/// provider's algorithms.
#[derive(Debug)]
struct PinVerifier {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of_der(end_entity);
        if presented == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    expected: self.pin,
                    presented,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A connector that accepts only the certificate with fingerprint `pin`.
pub(crate) fn pinned_connector(
    pin: Fingerprint,
) -> Result<tokio_rustls::TlsConnector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier { pin, provider }))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// The name sent in the handshake (SNI for a DNS name): the host part of `host:port`. The pin
/// alone decides whether the certificate is accepted.
pub(crate) fn server_name(addr: &str) -> ServerName<'static> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_owned()).unwrap_or_else(|_| {
        ServerName::IpAddress(std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST).into())
    })
}

/// The pin mismatch inside a failed handshake's I/O error, if that is why it failed.
pub(crate) fn pin_mismatch(e: &std::io::Error) -> Option<&PinMismatch> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<PinMismatch>()
        }
        _ => None,
    }
}

/// A connection to the registry: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum RegistryStream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for RegistryStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RegistryStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            RegistryStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RegistryStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            RegistryStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            RegistryStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RegistryStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            RegistryStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RegistryStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            RegistryStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fingerprints_parse_in_both_cases_and_with_colons() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let f: Fingerprint = hex.parse().unwrap();
        assert_eq!(f.to_string(), hex);
        assert_eq!(hex.to_uppercase().parse::<Fingerprint>().unwrap(), f);
        let colons: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        assert_eq!(colons.join(":").parse::<Fingerprint>().unwrap(), f);
        for bad in [
            "",
            "00",
            &hex[1..],
            &format!("{hex}00"),
            &hex.replace('a', "g"),
        ] {
            assert_eq!(bad.parse::<Fingerprint>(), Err(BadFingerprint), "{bad}");
        }
    }

    #[test]
    fn fingerprint_is_sha256_of_the_der() {
        // SHA-256 of the empty string.
        assert_eq!(
            Fingerprint::of_der(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn server_names_come_from_the_host_part() {
        assert_eq!(
            server_name("registry.example:9000"),
            ServerName::try_from("registry.example").unwrap()
        );
        assert_eq!(
            server_name("[::1]:9000"),
            ServerName::IpAddress(std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST).into())
        );
        assert_eq!(
            server_name("127.0.0.1:9000"),
            ServerName::IpAddress(std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST).into())
        );
    }
}
