"""HTTPS end to end: a throwaway CA signs the server's certificate; a device that trusts the CA
gets Θ_d, one that does not refuses the server and falls back."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stablesynth.cloud.server import CloudModel, create_app
from stablesynth_device.client import AdaptClient


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca_and_server_cert(out: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA valid for a day and a certificate for 127.0.0.1 it signed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("stablesynth test CA")).issuer_name(_name("stablesynth test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = out / "ca.pem", out / "server.pem", out / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    return paths


@pytest.mark.slow
def test_round_trip_over_https_and_a_client_without_the_ca_refuses(cloud: CloudModel, live_server: Any,
                                                                    export_test_bundle: Any, tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    bundle = export_test_bundle(cloud, tmp_path / "bundle")
    feature = np.random.default_rng(0).standard_normal(192).astype("<f4")
    with live_server(create_app({"easyvqa": cloud}), ssl_certfile=str(cert), ssl_keyfile=str(key)) as srv:
        url = f"https://127.0.0.1:{srv.port}"
        with AdaptClient(url, bundle, ca_file=ca, cache_dir=tmp_path / "c1", timeout=10) as trusting:
            good = trusting.adapt(feature)
        with AdaptClient(url, bundle, cache_dir=tmp_path / "c2", timeout=10, retries=0) as stranger:
            refused = stranger.adapt(feature)
        # A reply far larger than one TLS record and the socket buffers arrives whole.
        big = httpx.post(url + "/v1/noop?bytes=3000000", content=feature.tobytes(), verify=str(ca), timeout=10,
                         headers={"Content-Type": "application/octet-stream"})
        with pytest.raises(httpx.HTTPError):  # plain http to the https port gets no service
            httpx.get(f"http://127.0.0.1:{srv.port}/healthz", timeout=5).raise_for_status()
    assert good.source == "server" and good.error is None
    assert refused.source == "global" and "CERTIFICATE_VERIFY_FAILED" in (refused.error or ""), refused.error
    assert big.status_code == 200 and len(big.content) == 3_000_000
