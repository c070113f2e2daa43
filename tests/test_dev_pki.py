"""The dev PKI: a certs folder made before an identity was added gets it on the next start, and only it."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from runtime import pki

IDENTITIES = (*pki.SERVICE_IDENTITIES, *pki.CALLER_IDENTITIES)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.pem"))}


def test_a_new_folder_gets_a_ca_a_certificate_per_identity_and_a_token_key(tmp_path: Path) -> None:
    assert pki.ensure_dev_pki(tmp_path)
    assert "ad-delivery" in pki.CALLER_IDENTITIES
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    for identity in IDENTITIES:
        cert = x509.load_pem_x509_certificate((tmp_path / f"{identity}.pem").read_bytes())
        name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert name == identity
        assert cert.issuer == ca.subject
    assert (tmp_path / "jwt" / f"{pki.DEV_KEY_ID}-key.pem").exists()
    assert not pki.ensure_dev_pki(tmp_path), "a complete folder is left as it is"


def test_identities_missing_from_an_older_folder_are_issued_and_the_others_kept(
    tmp_path: Path,
) -> None:
    pki.ensure_dev_pki(tmp_path)
    # A folder from before ad-delivery existed, and one whose gifting key went missing.
    (tmp_path / "ad-delivery.pem").unlink()
    (tmp_path / "ad-delivery-key.pem").unlink()
    (tmp_path / "gifting-key.pem").unlink()
    before = _files(tmp_path)

    assert pki.ensure_dev_pki(tmp_path)

    after = _files(tmp_path)
    assert set(after) - set(before) == {"ad-delivery.pem", "ad-delivery-key.pem", "gifting-key.pem"}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"gifting.pem"}, "only the identities missing something are issued anew"
    ca = x509.load_pem_x509_certificate(after["ca.pem"])
    for identity in ("ad-delivery", "gifting"):
        x509.load_pem_x509_certificate(after[f"{identity}.pem"]).verify_directly_issued_by(ca)
