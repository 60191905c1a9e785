"""Handshake-era sessions: self-validating tokens, credential binding, revocation and expiry."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from mcpherd.shared.signing import Signer, credential_digest
from mcpherd.worker.sessions import (
    _TOKEN,
    HANDSHAKE_VERSIONS,
    SessionError,
    SessionStore,
    StreamLog,
    capabilities_from_bits,
    capability_bits,
)
from mcpherd.worker.sse import EventStream

SECRET = b"k" * 32


def test_capability_bits_round_trip_what_a_server_needs() -> None:
    declared = {"sampling": {"tools": {}}, "elicitation": {"form": {}, "url": {}}, "roots": {"listChanged": True}}
    bits = capability_bits(declared)
    assert bits == 0b10111111  # every bit but sampling.context
    assert capabilities_from_bits(bits) == {"sampling": {"tools": {}}, "elicitation": {"form": {}, "url": {}},
                                            "roots": {"listChanged": {}}}
    assert capability_bits({}) == 0 and capabilities_from_bits(0) == {}
    assert capability_bits({"sampling": None, "elicitation": "yes", "experimental": {}}) == 0b10
    assert capabilities_from_bits(capability_bits({"elicitation": {}})) == {"elicitation": {}}


@pytest.mark.parametrize("version", HANDSHAKE_VERSIONS)
def test_any_worker_with_the_secret_rebuilds_a_session_from_its_token(version: str) -> None:
    issuer = SessionStore(SECRET, "w0")
    session = issuer.create(version, {"sampling": {}}, "Bearer a", {"name": "c"})
    assert issuer.lookup(session.token, "Bearer a") is session
    other_worker = SessionStore(SECRET, "w1")
    rebuilt = other_worker.lookup(session.token, "Bearer a")
    assert (rebuilt.token, rebuilt.protocol_version, rebuilt.capabilities) == (session.token, version, {"sampling": {}})
    assert other_worker.lookup(session.token, "Bearer a") is rebuilt
    with pytest.raises(SessionError) as refused:
        SessionStore(b"z" * 32, "w2").lookup(session.token, "Bearer a")
    assert (refused.value.status, refused.value.message) == (404, "Session not found")


def test_a_session_answers_only_the_credential_that_created_it() -> None:
    store = SessionStore(SECRET, "w0")
    session = store.create("2025-11-25", {}, "Bearer a", {})
    for credential in ("Bearer b", "", "bearer a"):
        with pytest.raises(SessionError):
            store.lookup(session.token, credential)
        with pytest.raises(SessionError):
            SessionStore(SECRET, "w1").lookup(session.token, credential)
    anonymous = store.create("2025-11-25", {}, "", {})
    assert store.lookup(anonymous.token, "") is anonymous


def test_terminated_sessions_are_refused_everywhere_the_revocation_is_known() -> None:
    store = SessionStore(SECRET, "w0")
    session = store.create("2025-11-25", {}, "", {})
    store.terminate(session)
    assert session.token not in store.sessions and len(store.revoked) == 1
    with pytest.raises(SessionError):
        store.lookup(session.token, "")
    assert store.expire() == 0 and len(store.revoked) == 1  # kept while the token could still be used


def test_revocations_are_forgotten_once_the_token_expired_anyway() -> None:
    store = SessionStore(SECRET, "w0", max_age=0.0)
    session = store.create("2025-11-25", {}, "", {})
    store.terminate(session)
    store.expire()
    assert store.revoked == {}
    with pytest.raises(SessionError):
        store.lookup(session.token, "")


def test_tokens_older_than_max_age_or_malformed_are_refused() -> None:
    signer = Signer(SECRET, "session")
    old = signer.seal(_TOKEN.pack(os.urandom(16), int(time.time()) - 86_401, 2, 0) + credential_digest(""))
    fresh = signer.seal(_TOKEN.pack(os.urandom(16), int(time.time()), 2, 0) + credential_digest(""))
    bad_version = signer.seal(_TOKEN.pack(os.urandom(16), int(time.time()), 9, 0))
    store = SessionStore(SECRET, "w0")
    assert store.lookup(fresh, "").protocol_version == "2025-11-25"
    for token in (old, bad_version, signer.seal(b"short"), Signer(SECRET, "request-state").seal(b"x" * 30), "x"):
        with pytest.raises(SessionError):
            store.lookup(token, "")


def test_idle_sessions_free_their_local_state_unless_something_is_in_flight() -> None:
    store = SessionStore(SECRET, "w0", idle_timeout=0.05)
    idle = store.create("2025-11-25", {"roots": {}}, "", {})
    waiting = store.create("2025-11-25", {}, "", {})
    loop = asyncio.new_event_loop()
    waiting.pending["r1"] = loop.create_future()  # an unanswered request to the client
    loop.close()
    streaming = store.create("2025-11-25", {}, "", {})
    store.open_stream(streaming).live = EventStream([])
    busy = store.create("2025-11-25", {}, "", {})
    time.sleep(0.06)
    store.lookup(busy.token, "")  # seen just now
    assert store.expire() == 1
    assert set(store.sessions) == {waiting.token, streaming.token, busy.token}
    # Idle here is not ended: the client may be busy on another worker, so the token still works and
    # the session is rebuilt from it.
    rebuilt = store.lookup(idle.token, "")
    assert rebuilt is not idle and (rebuilt.protocol_version, rebuilt.capabilities) == ("2025-11-25", {"roots": {}})


def test_ids_name_their_worker() -> None:
    store = SessionStore(SECRET, "w3")
    ids = [store.next_id("s"), store.next_id("r"), store.next_id("g")]
    assert len(set(ids)) == 3 and all(i.startswith("w3") for i in ids)
    assert [i.rstrip("0123456789")[-1] for i in ids] == ["s", "r", "g"]


def test_stream_log_replays_what_follows_an_event_id() -> None:
    log = StreamLog("w0s1")
    assert [log.append(b"a"), log.append(b"b"), log.append(b"c")] == ["w0s1.1", "w0s1.2", "w0s1.3"]
    assert log.replay_after(1) == [("w0s1.2", b"b"), ("w0s1.3", b"c")]
    assert log.replay_after(3) == [] and len(log.replay_after(0)) == 3
    for i in range(2000):
        log.append(b"%d" % i)
    assert len(log.events) == 1024 and log.replay_after(0)[0][0] == "w0s1.980"


def test_finished_streams_are_evicted_even_behind_a_live_get_stream() -> None:
    store = SessionStore(SECRET, "w0", max_streams=3)
    session = store.create("2025-11-25", {}, "", {})
    get_stream = store.open_stream(session, "g")
    get_stream.live = EventStream([])  # a GET stream lives as long as the session
    opened = []
    for _ in range(10):  # tool calls that streamed, each finished before the next
        log = store.open_stream(session)
        log.done = True
        opened.append(log.stream_id)
    assert list(session.streams) == [get_stream.stream_id, *opened[-2:]]
