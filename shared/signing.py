"""Self-validating tokens: session ids and 2026-07-28 `requestState` are signed with the cluster secret.

Format: `<version>.<base64url(payload)>.<base64url(HMAC-SHA256(key, version || payload)[:16])>`.
Any worker (and, with a shared secret, any host) verifies a token without asking anyone, which is what
lets a client's connections land on any worker. The version prefix is covered by the MAC, so a token
cannot be re-labelled; keys are derived per purpose so a session id is never accepted as request state.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

_VERSION = "m1"
_MAC_BYTES = 16


class Signer:
    def __init__(self, secret: bytes, purpose: str) -> None:
        if len(secret) < 16:
            raise ValueError("the signing secret must be at least 16 bytes")
        self._key = hmac.digest(secret, b"mcpherd/" + purpose.encode(), "sha256")

    def seal(self, payload: bytes) -> str:
        body = _b64(payload)
        return f"{_VERSION}.{body}.{_b64(self._mac(body))}"

    def unseal(self, token: str) -> bytes | None:
        """The payload, or None for anything this key did not mint unmodified."""
        version, _, rest = token.partition(".")
        body, _, mac = rest.partition(".")
        if version != _VERSION or not mac or not token.isascii():
            return None
        # Compare the MAC as text: decoding it first would accept other spellings of the same bytes
        # (spare low bits in the last character, stray non-alphabet characters), so one session could
        # go by several ids.
        if not hmac.compare_digest(_b64(self._mac(body)), mac):
            return None
        try:
            return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            return None

    def _mac(self, body: str) -> bytes:
        return hmac.digest(self._key, f"{_VERSION}.{body}".encode(), "sha256")[:_MAC_BYTES]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def credential_digest(authorization: str) -> bytes:
    """What binds a session to the credentials that created it (never the credential itself)."""
    return hashlib.sha256(authorization.encode("latin-1")).digest()[:8] if authorization else b""
