#!/usr/bin/env python3
"""Golden vectors for the v1 secure channel (v1 wire §8.5), computed independently of the Rust
code with the `cryptography` package.

Rerun:  pip install cryptography && python3 tunnel/tests/vectors/secure_channel.py
The output is the hex pasted into the `golden` tests of tunnel/src/secure.rs.

Layout reproduced here:
  key    = SHA-256("pilot-secure-v1:" || X25519(client, server))
  nonce  = role prefix (server 00000001, client 00000002) || u64 BE counter, first is 1
  record = u32 BE (12 + len(ct)) || nonce || AES-256-GCM(key, nonce, plaintext, aad = none)
"""
import hashlib
import struct

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CLIENT_SECRET = bytes(range(0x01, 0x21))  # 01 02 .. 20
SERVER_SECRET = bytes(range(0x41, 0x61))  # 41 42 .. 60
SERVER_PREFIX = b"\x00\x00\x00\x01"
CLIENT_PREFIX = b"\x00\x00\x00\x02"

CLIENT_PLAINTEXTS = [b"hello from the client", b""]
SERVER_PLAINTEXTS = [b"hello from the server", bytes(range(40))]


def raw_public(priv):
    return priv.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def records(key, prefix, plaintexts):
    out = []
    for counter, pt in enumerate(plaintexts, start=1):
        nonce = prefix + struct.pack(">Q", counter)
        ct = AESGCM(key).encrypt(nonce, pt, None)
        out.append(struct.pack(">I", len(nonce) + len(ct)) + nonce + ct)
    return out


def main():
    client = X25519PrivateKey.from_private_bytes(CLIENT_SECRET)
    server = X25519PrivateKey.from_private_bytes(SERVER_SECRET)
    shared = client.exchange(server.public_key())
    assert shared == server.exchange(client.public_key())
    key = hashlib.sha256(b"pilot-secure-v1:" + shared).digest()
    print("client_public", raw_public(client).hex())
    print("server_public", raw_public(server).hex())
    print("shared       ", shared.hex())
    print("key          ", key.hex())
    for i, rec in enumerate(records(key, CLIENT_PREFIX, CLIENT_PLAINTEXTS), start=1):
        print(f"client_record{i}", rec.hex())
    for i, rec in enumerate(records(key, SERVER_PREFIX, SERVER_PLAINTEXTS), start=1):
        print(f"server_record{i}", rec.hex())


if __name__ == "__main__":
    main()
