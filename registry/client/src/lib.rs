//! A registry client over one connection (plain TCP, or TLS pinned to the registry's
//! certificate: [`tls`]): frames out, frames in, strictly one reply per request. Used by the
//! daemon's registry link, the beacon's registry authority, the load generator and the tests.
//!
//! The frame codec, the signed strings and the base64 forms come from the sans-IO
//! [`tunnel::registry`]; this crate only adds the tokio transport, so a node links no part of
//! the registry server.
//!
//! # Which protocol the registry speaks
//!
//! [`Client::negotiate`] sends the `hello` extension first. `pilot-registry` answers with a
//! session nonce ([`RegistryProtocol::Pilot`]): the node then proves its key and
//! authenticates the session. A v1 registry knows no `hello` and answers with its one error
//! form, `{"type":"error","error":"request failed"}` without a `code`
//! ([`RegistryProtocol::V1`]): the node then speaks only the v1 forms of wire §4.3, each
//! signed request carrying a fixed-string signature ([`sign_request_v1`]). A refusal that
//! carries a `code` comes from `pilot-registry` (throttled, say) and is an error, never a
//! reason to fall back.

use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tunnel::registry::auth::{b64, register_message, session_message};
use tunnel::registry::proto::{encode_frame, FrameDecoder, FrameError, Request};

pub mod failover;
pub mod tls;

pub use failover::{jitter_sample, AddrListError, Backoff, RegistryAddrs, Rotation};
pub use tls::{BadFingerprint, Fingerprint, RegistryStream, Transport};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("registry connection: {0}")]
    Io(#[from] std::io::Error),
    /// The registry's TLS certificate is not the pinned one; nothing was sent.
    #[error(
        "registry TLS certificate has fingerprint {presented}, but {expected} is pinned \
         (--registry-fingerprint); not talking to it"
    )]
    FingerprintMismatch {
        /// The pinned fingerprint.
        expected: Fingerprint,
        /// The fingerprint of the certificate the registry presented.
        presented: Fingerprint,
    },
    /// The TLS handshake failed for another reason (a registry serving plain TCP, say).
    #[error("TLS handshake with the registry {addr}: {source} (does it serve TLS?)")]
    Tls {
        /// The registry address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The registry closed the connection.
    #[error("registry closed the connection")]
    Closed,
    /// A frame too large in either direction.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The reply is not JSON.
    #[error("registry reply is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The registry refused the request.
    #[error("registry refused ({code}): {message}")]
    Refused {
        /// Stable error code ([`ClientError::V1_CODE`] when the refusal has none, as every
        /// refusal from a v1 registry).
        code: String,
        /// Reason.
        message: String,
    },
    /// A success reply lacks a field the request needs.
    #[error("registry reply to {request} has no {field}")]
    MissingField {
        /// The request's type.
        request: &'static str,
        /// The field.
        field: &'static str,
    },
}

impl ClientError {
    /// The code a refusal without a `code` field gets (v1 registries send none, wire §4.2).
    pub const V1_CODE: &'static str = "request_failed";
    /// The code of a refusal because another daemon process with the node's identity is
    /// live (extension).
    pub const DUPLICATE_INSTANCE: &'static str = "duplicate_instance";

    /// Whether the registry refused because another daemon with this node's identity is
    /// live.
    pub fn is_duplicate_instance(&self) -> bool {
        matches!(self, ClientError::Refused { code, .. } if code == Self::DUPLICATE_INSTANCE)
    }

    /// Whether this is a refusal in v1's form: an `error` string and no `code`.
    pub fn is_v1_refusal(&self) -> bool {
        matches!(self, ClientError::Refused { code, .. } if code == Self::V1_CODE)
    }
}

/// Which form of the registry protocol a connection speaks (see the crate documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryProtocol {
    /// `pilot-registry`: session nonce, proven registration, authenticated session, pushes.
    Pilot,
    /// A v1 registry: plain `register`, fixed-string signatures, polled handshakes.
    V1,
}

impl RegistryProtocol {
    /// The name reported in the daemon's Info (`registry_protocol`).
    pub fn as_str(self) -> &'static str {
        match self {
            RegistryProtocol::Pilot => "pilot",
            RegistryProtocol::V1 => "v1",
        }
    }
}

impl std::fmt::Display for RegistryProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One connection to a registry.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    dec: FrameDecoder,
    buf: Vec<u8>,
    /// A nonce from [`Client::negotiate`] not yet signed; each nonce is signed once.
    nonce: Option<String>,
}

impl Client<tokio::net::TcpStream> {
    /// Connects over plain TCP.
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> Result<Self, ClientError> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Client::new(s))
    }
}

impl Client<RegistryStream> {
    /// Connects to `addr` (`host:port`) over `transport`. With [`Transport::TlsPinned`] the
    /// TLS handshake completes with the pinned certificate before anything else is sent; a
    /// failed handshake is an error, never a fallback to plain TCP.
    pub async fn connect_with(addr: &str, transport: &Transport) -> Result<Self, ClientError> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let stream = match *transport {
            Transport::Tcp => RegistryStream::Tcp(s),
            Transport::TlsPinned(pin) => {
                let connector = tls::pinned_connector(pin).map_err(|e| ClientError::Tls {
                    addr: addr.to_owned(),
                    source: std::io::Error::other(e),
                })?;
                match connector.connect(tls::server_name(addr), s).await {
                    Ok(t) => RegistryStream::Tls(Box::new(t)),
                    Err(e) => {
                        return Err(match tls::pin_mismatch(&e) {
                            Some(m) => ClientError::FingerprintMismatch {
                                expected: m.expected,
                                presented: m.presented,
                            },
                            None => ClientError::Tls {
                                addr: addr.to_owned(),
                                source: e,
                            },
                        })
                    }
                }
            }
        };
        Ok(Client::new(stream))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client over an established stream.
    pub fn new(stream: S) -> Self {
        Client {
            stream,
            dec: FrameDecoder::new(),
            buf: vec![0; 16 * 1024],
            nonce: None,
        }
    }

    /// Sends one request and returns the reply; a refusal (a string `error` field, or the
    /// type `error`) is [`ClientError::Refused`].
    pub async fn call(&mut self, req: &Value) -> Result<Value, ClientError> {
        let v = self.call_raw(req).await?;
        let message = v.get("error").and_then(Value::as_str);
        if message.is_none() && v.get("type").and_then(Value::as_str) != Some("error") {
            return Ok(v);
        }
        Err(ClientError::Refused {
            code: v
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or(ClientError::V1_CODE)
                .to_owned(),
            message: message.unwrap_or("request failed").to_owned(),
        })
    }

    /// Sends one request and returns the reply, refusals included.
    pub async fn call_raw(&mut self, req: &Value) -> Result<Value, ClientError> {
        let body = serde_json::to_vec(req)?;
        let mut wire = Vec::with_capacity(body.len() + 4);
        encode_frame(&body, &mut wire)?;
        self.stream.write_all(&wire).await?;
        self.next().await
    }

    /// The next frame the registry sends (a reply, or a push on a watching connection).
    pub async fn next(&mut self) -> Result<Value, ClientError> {
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(serde_json::from_slice(&f)?);
            }
            let n = self.stream.read(&mut self.buf).await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.dec.push(&self.buf[..n]);
        }
    }

    /// Asks for a fresh session nonce.
    pub async fn hello(&mut self) -> Result<String, ClientError> {
        let v = self.call(&json!({"type": "hello"})).await?;
        match v.get("nonce").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => Ok(n.to_owned()),
            _ => Err(ClientError::MissingField {
                request: "hello",
                field: "nonce",
            }),
        }
    }

    /// Finds out which protocol the registry speaks by sending `hello`. With
    /// [`RegistryProtocol::Pilot`] the nonce is kept for the next [`Client::register_proven`]
    /// or [`Client::authenticate`]. A v1-form refusal means [`RegistryProtocol::V1`]; any
    /// other failure is returned.
    pub async fn negotiate(&mut self) -> Result<RegistryProtocol, ClientError> {
        match self.hello().await {
            Ok(n) => {
                self.nonce = Some(n);
                Ok(RegistryProtocol::Pilot)
            }
            Err(e) if e.is_v1_refusal() => Ok(RegistryProtocol::V1),
            Err(e) => Err(e),
        }
    }

    /// The nonce [`Client::negotiate`] kept, or a fresh one.
    async fn unused_nonce(&mut self) -> Result<String, ClientError> {
        match self.nonce.take() {
            Some(n) => Ok(n),
            None => self.hello().await,
        }
    }

    /// Registers `key` with a proof of possession; the session is then bound to the node.
    /// Returns the `register_ok` reply.
    pub async fn register_proven(
        &mut self,
        key: &SigningKey,
        listen_addr: &str,
        hostname: Option<&str>,
    ) -> Result<Value, ClientError> {
        self.register_instance(key, listen_addr, hostname, None)
            .await
    }

    /// [`Client::register_proven`] naming the daemon process that registers (`instance`, at
    /// most [`tunnel::registry::proto::MAX_INSTANCE`] bytes): while that instance is live,
    /// the registry refuses any other instance of the node with the code
    /// [`ClientError::DUPLICATE_INSTANCE`].
    pub async fn register_instance(
        &mut self,
        key: &SigningKey,
        listen_addr: &str,
        hostname: Option<&str>,
        instance: Option<&str>,
    ) -> Result<Value, ClientError> {
        let nonce = self.unused_nonce().await?;
        let pk = b64(key.verifying_key().as_bytes());
        let proof = b64(&key
            .sign(register_message(&nonce, &pk).as_bytes())
            .to_bytes());
        let mut req = json!({"type": "register", "listen_addr": listen_addr, "public_key": pk, "proof": proof});
        if let Some(h) = hostname {
            req["hostname"] = json!(h);
        }
        if let Some(i) = instance {
            req["instance"] = json!(i);
        }
        self.call(&req).await
    }

    /// Authenticates the session as `node` with a fresh nonce.
    pub async fn authenticate(&mut self, node: u32, key: &SigningKey) -> Result<(), ClientError> {
        let nonce = self.unused_nonce().await?;
        let sig = b64(&key
            .sign(session_message(&nonce, node).as_bytes())
            .to_bytes());
        self.call(&json!({"type": "auth", "node_id": node, "signature": sig}))
            .await
            .map(drop)
    }

    /// Registers `key` in v1's form (wire §4.3: no proof; the session stays
    /// unauthenticated). Returns the `register_ok` reply.
    pub async fn register_v1(
        &mut self,
        key: &SigningKey,
        listen_addr: &str,
        hostname: Option<&str>,
        owner: Option<&str>,
    ) -> Result<Value, ClientError> {
        let pk = b64(key.verifying_key().as_bytes());
        let mut req = json!({"type": "register", "listen_addr": listen_addr, "public_key": pk});
        if let Some(h) = hostname {
            req["hostname"] = json!(h);
        }
        if let Some(o) = owner {
            req["owner"] = json!(o);
        }
        self.call(&req).await
    }
}

/// v1's fixed-string signature: standard base64 of `key`'s signature over `challenge`.
pub fn sign_v1(key: &SigningKey, challenge: &str) -> String {
    b64(&key.sign(challenge.as_bytes()).to_bytes())
}

/// Gives `req` the `signature` a v1 registry checks (wire §4.3: `key`'s signature over the
/// request's fixed challenge string, e.g. `heartbeat:7`). Requests v1 does not sign, requests
/// that do not parse (the registry will refuse them anyway) and requests that already carry
/// a signature are left as they are.
pub fn sign_request_v1(key: &SigningKey, req: &mut Value) {
    if req
        .get("signature")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return;
    }
    let Ok(parsed) = serde_json::from_value::<Request>(req.clone()) else {
        return;
    };
    if let (Some(challenge), Some(o)) = (parsed.challenge(), req.as_object_mut()) {
        o.insert("signature".into(), json!(sign_v1(key, &challenge)));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::DuplexStream;

    /// Reads one request frame from the far end of the pipe.
    async fn read_request(far: &mut DuplexStream) -> Value {
        let mut dec = FrameDecoder::new();
        let mut buf = [0u8; 1024];
        loop {
            if let Some(f) = dec.next_frame().unwrap() {
                return serde_json::from_slice(&f).unwrap();
            }
            let n = far.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "client closed before a whole request");
            dec.push(&buf[..n]);
        }
    }

    /// Writes `body` as one frame to the client.
    async fn reply(far: &mut DuplexStream, body: &[u8]) {
        let mut wire = Vec::new();
        encode_frame(body, &mut wire).unwrap();
        far.write_all(&wire).await.unwrap();
    }

    #[tokio::test]
    async fn replies_and_refusals() {
        let (near, mut far) = tokio::io::duplex(4096);
        let mut c = Client::new(near);
        let server = tokio::spawn(async move {
            assert_eq!(
                read_request(&mut far).await,
                json!({"type": "lookup", "node_id": 7})
            );
            reply(&mut far, br#"{"type":"lookup_ok","node_id":7}"#).await;
            read_request(&mut far).await;
            reply(&mut far, br#"{"type":"error","error":"request failed"}"#).await;
            read_request(&mut far).await;
            reply(
                &mut far,
                br#"{"type":"error","error":"slow down","code":"throttled"}"#,
            )
            .await;
            read_request(&mut far).await;
            reply(&mut far, b"not json").await;
        });
        let v = c
            .call(&json!({"type": "lookup", "node_id": 7}))
            .await
            .unwrap();
        assert_eq!(v["node_id"], 7);
        match c.call(&json!({"type": "lookup", "node_id": 8})).await {
            Err(ClientError::Refused { code, message }) => {
                assert_eq!(
                    (code.as_str(), message.as_str()),
                    ("request_failed", "request failed")
                );
            }
            other => panic!("{other:?}"),
        }
        match c.call(&json!({"type": "lookup", "node_id": 9})).await {
            Err(ClientError::Refused { code, .. }) => assert_eq!(code, "throttled"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.call(&json!({"type": "lookup", "node_id": 10})).await,
            Err(ClientError::Json(_))
        ));
        server.await.unwrap();
        // The far end is gone.
        assert!(matches!(c.next().await, Err(ClientError::Closed)));
    }

    #[tokio::test]
    async fn oversized_frames_are_errors() {
        let (near, mut far) = tokio::io::duplex(4096);
        let mut c = Client::new(near);
        far.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        assert!(matches!(
            c.next().await,
            Err(ClientError::Frame(FrameError::TooLarge(_)))
        ));
        let big = json!({"type": "set_hostname", "hostname": "x".repeat(1 << 20)});
        assert!(matches!(
            c.call(&big).await,
            Err(ClientError::Frame(FrameError::TooLarge(_)))
        ));
    }

    /// A TLS server on loopback with a fresh self-signed certificate that answers one
    /// request; returns its address, the certificate's fingerprint and the task, which yields
    /// the request it read (`None` when the handshake failed).
    async fn tls_registry() -> (String, Fingerprint, tokio::task::JoinHandle<Option<Value>>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let fp = Fingerprint::of_der(ck.cert.der());
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut t = acceptor.accept(s).await.ok()?;
            let mut dec = FrameDecoder::new();
            let mut buf = [0u8; 1024];
            let req: Value = loop {
                if let Some(f) = dec.next_frame().unwrap() {
                    break serde_json::from_slice(&f).unwrap();
                }
                let n = t.read(&mut buf).await.unwrap();
                dec.push(&buf[..n]);
            };
            let mut wire = Vec::new();
            encode_frame(br#"{"type":"hello_ok","nonce":"bm9uY2U="}"#, &mut wire).unwrap();
            t.write_all(&wire).await.unwrap();
            t.flush().await.unwrap();
            Some(req)
        });
        (addr, fp, task)
    }

    #[tokio::test]
    async fn tls_with_the_pinned_certificate_carries_requests() {
        let (addr, fp, server) = tls_registry().await;
        let mut c = Client::connect_with(&addr, &Transport::TlsPinned(fp))
            .await
            .unwrap();
        assert!(matches!(c.stream, RegistryStream::Tls(_)));
        assert_eq!(c.hello().await.unwrap(), "bm9uY2U=");
        assert_eq!(server.await.unwrap().unwrap()["type"], "hello");
    }

    #[tokio::test]
    async fn a_wrong_pin_names_both_fingerprints_and_sends_nothing() {
        let (addr, fp, server) = tls_registry().await;
        let wrong = Fingerprint([0xab; 32]);
        let e = Client::connect_with(&addr, &Transport::TlsPinned(wrong))
            .await
            .unwrap_err();
        match &e {
            ClientError::FingerprintMismatch {
                expected,
                presented,
            } => {
                assert_eq!((*expected, *presented), (wrong, fp));
            }
            other => panic!("{other:?}"),
        }
        let text = e.to_string();
        assert!(
            text.contains(&fp.to_string()) && text.contains(&wrong.to_string()),
            "{text}"
        );
        // The server's handshake failed: no request reached it.
        assert_eq!(server.await.unwrap(), None);
    }

    #[tokio::test]
    async fn tls_to_a_plain_tcp_registry_is_a_handshake_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            // A plain registry answers what it reads as a frame length with an error frame
            // and closes; here: an arbitrary frame, then close.
            let mut wire = Vec::new();
            encode_frame(br#"{"type":"error","error":"bad frame"}"#, &mut wire).unwrap();
            let _ = s.write_all(&wire).await;
        });
        let e = Client::connect_with(&addr, &Transport::TlsPinned(Fingerprint([1; 32])))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
        assert!(e.to_string().contains("does it serve TLS?"), "{e}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn proven_registration_signs_the_session_nonce() {
        let (near, mut far) = tokio::io::duplex(4096);
        let mut c = Client::new(near);
        let key = SigningKey::from_bytes(&[5; 32]);
        let pk = b64(key.verifying_key().as_bytes());
        let server = tokio::spawn(async move {
            assert_eq!(read_request(&mut far).await["type"], "hello");
            reply(&mut far, br#"{"type":"hello_ok","nonce":"bm9uY2U="}"#).await;
            let reg = read_request(&mut far).await;
            reply(&mut far, br#"{"type":"register_ok","node_id":3}"#).await;
            reg
        });
        let v = c
            .register_proven(&key, ":4000", Some("agent"))
            .await
            .unwrap();
        assert_eq!(v["node_id"], 3);
        let reg = server.await.unwrap();
        assert_eq!(reg["public_key"], pk.as_str());
        assert_eq!(reg["hostname"], "agent");
        let proof = reg["proof"].as_str().unwrap();
        let raw = tunnel::registry::auth::decode_key(&pk).unwrap();
        assert_eq!(
            tunnel::registry::auth::verify(
                &raw,
                register_message("bm9uY2U=", &pk).as_bytes(),
                proof
            ),
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_v1_refusal_of_hello_means_a_v1_registry_and_a_coded_one_is_an_error() {
        let (near, mut far) = tokio::io::duplex(4096);
        let mut c = Client::new(near);
        let server = tokio::spawn(async move {
            assert_eq!(read_request(&mut far).await["type"], "hello");
            reply(&mut far, br#"{"type":"error","error":"request failed"}"#).await;
            assert_eq!(read_request(&mut far).await["type"], "hello");
            // A v1 registry's error form without any `error` string is a refusal too.
            reply(&mut far, br#"{"type":"error"}"#).await;
            assert_eq!(read_request(&mut far).await["type"], "hello");
            reply(
                &mut far,
                br#"{"type":"error","error":"slow down","code":"throttled"}"#,
            )
            .await;
            assert_eq!(read_request(&mut far).await["type"], "hello");
            reply(&mut far, br#"{"type":"hello_ok","nonce":"bm9uY2U="}"#).await;
            // The negotiated nonce is the one the registration proves.
            read_request(&mut far).await
        });
        assert_eq!(c.negotiate().await.unwrap(), RegistryProtocol::V1);
        assert_eq!(c.negotiate().await.unwrap(), RegistryProtocol::V1);
        let e = c.negotiate().await.unwrap_err();
        assert!(!e.is_v1_refusal(), "{e}");
        assert_eq!(c.negotiate().await.unwrap(), RegistryProtocol::Pilot);
        let key = SigningKey::from_bytes(&[6; 32]);
        let pk = b64(key.verifying_key().as_bytes());
        // The far end stops answering after the register it reads.
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            c.register_proven(&key, ":4000", None),
        )
        .await;
        let reg = server.await.unwrap();
        assert_eq!(reg["type"], "register");
        let raw = tunnel::registry::auth::decode_key(&pk).unwrap();
        assert_eq!(
            tunnel::registry::auth::verify(
                &raw,
                register_message("bm9uY2U=", &pk).as_bytes(),
                reg["proof"].as_str().unwrap()
            ),
            Ok(())
        );
    }

    #[test]
    fn v1_requests_get_their_fixed_string_signatures() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let raw = key.verifying_key().to_bytes();
        let cases = [
            (json!({"type": "heartbeat", "node_id": 12}), "heartbeat:12"),
            (
                json!({"type": "resolve", "node_id": 3, "requester_id": 12}),
                "resolve:12:3",
            ),
            (
                json!({"type": "request_handshake", "from_node_id": 12, "to_node_id": 3,
                       "justification": "hi"}),
                "handshake:12:3",
            ),
            (
                json!({"type": "respond_handshake", "node_id": 12, "peer_id": 3, "accept": true}),
                "respond:12:3",
            ),
            (
                json!({"type": "poll_handshakes", "node_id": 12}),
                "poll_handshakes:12",
            ),
            (
                json!({"type": "set_hostname", "node_id": 12, "hostname": "a"}),
                "set_hostname:12",
            ),
        ];
        for (mut req, challenge) in cases {
            sign_request_v1(&key, &mut req);
            let sig = req["signature"].as_str().unwrap();
            assert_eq!(
                tunnel::registry::auth::verify(&raw, challenge.as_bytes(), sig),
                Ok(()),
                "{req}"
            );
        }
        // Unsigned requests stay unsigned; a signature already there is kept.
        let mut lookup = json!({"type": "lookup", "node_id": 3});
        sign_request_v1(&key, &mut lookup);
        assert!(lookup.get("signature").is_none());
        let mut rotate = json!({"type": "rotate_key", "node_id": 12, "signature": "kept",
                                "new_public_key": "x"});
        sign_request_v1(&key, &mut rotate);
        assert_eq!(rotate["signature"], "kept");
    }

    #[tokio::test]
    async fn v1_registration_sends_no_proof() {
        let (near, mut far) = tokio::io::duplex(4096);
        let mut c = Client::new(near);
        let key = SigningKey::from_bytes(&[5; 32]);
        let server = tokio::spawn(async move {
            let reg = read_request(&mut far).await;
            reply(&mut far, br#"{"type":"register_ok","node_id":4}"#).await;
            reg
        });
        let v = c
            .register_v1(&key, ":4000", Some("agent"), Some("ops"))
            .await
            .unwrap();
        assert_eq!(v["node_id"], 4);
        let reg = server.await.unwrap();
        assert_eq!(
            reg,
            json!({"type": "register", "listen_addr": ":4000",
                   "public_key": b64(key.verifying_key().as_bytes()),
                   "hostname": "agent", "owner": "ops"})
        );
    }
}
