"""Signed tokens (session ids, requestState): what one key mints, only that key accepts, unmodified."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcpherd.shared.signing import Signer, credential_digest

SECRET = b"s" * 32
TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=!"


@given(st.binary(max_size=300))
def test_every_payload_round_trips(payload: bytes) -> None:
    signer = Signer(SECRET, "session")
    token = signer.seal(payload)
    assert token.isascii() and token.count(".") == 2
    assert signer.unseal(token) == payload


@given(st.binary(min_size=1, max_size=64), st.data())
def test_any_changed_character_is_refused(payload: bytes, data: st.DataObject) -> None:
    signer = Signer(SECRET, "session")
    token = signer.seal(payload)
    position = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.sampled_from(TOKEN_CHARS).filter(lambda c: c != token[position]))
    tampered = token[:position] + replacement + token[position + 1:]
    assert signer.unseal(tampered) is None


@given(st.binary(min_size=1, max_size=64), st.text(TOKEN_CHARS, min_size=1, max_size=4))
def test_appended_characters_are_refused(payload: bytes, suffix: str) -> None:
    signer = Signer(SECRET, "session")
    assert signer.unseal(signer.seal(payload) + suffix) is None


def test_keys_are_per_purpose_and_per_secret() -> None:
    token = Signer(SECRET, "session").seal(b"payload")
    assert Signer(SECRET, "request-state").unseal(token) is None
    assert Signer(b"t" * 32, "session").unseal(token) is None
    assert Signer(SECRET, "session").unseal(token) == b"payload"


def test_malformed_tokens_are_refused_without_raising() -> None:
    signer = Signer(SECRET, "session")
    version, body, mac = signer.seal(b"payload").split(".")
    for token in ("", ".", "..", "m1", f"m2.{body}.{mac}", f"{version}.{body}", f"{version}..{mac}",
                  f"{version}.{body}.", f"{version}.{body}.{mac}é", f"{version}.{body}.{mac[:-1]}",
                  f"{version}.{mac}.{body}", "m1.%%%.%%%"):
        assert signer.unseal(token) is None, token


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Signer(b"short", "session")
    assert Signer(b"x" * 16, "session").unseal(Signer(b"x" * 16, "session").seal(b"ok")) == b"ok"


def test_credential_digest() -> None:
    assert credential_digest("") == b""
    alice = credential_digest("Bearer alice")
    assert len(alice) == 8 and alice == credential_digest("Bearer alice")
    assert alice != credential_digest("Bearer bob") and alice != credential_digest("bearer alice")
