"""Handshake-era sessions: self-validating tokens, credential binding, revocation and expiry."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from mcpherd.shared.revocations import Revocations
from mcpherd.shared.signing import Signer, credential_digest
from mcpherd.worker.sessions import (
    _TOKEN,
    EVENT_OVERHEAD_BYTES,
    HANDSHAKE_VERSIONS,
    Session,
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
    assert len(store.revoked) == 0
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
    assert log.missing_after(0) == 0
    for i in range(2000):
        log.append(b"%d" % i)
    assert len(log.events) == 1024 and log.replay_after(0)[0][0] == "w0s1.980"
    # A replay from before the window is known to lack events: 979 follow event 0 and are gone.
    assert (log.missing_after(0), log.missing_after(979), log.missing_after(1500)) == (979, 0, 0)
    assert log.size == sum(len(data) + EVENT_OVERHEAD_BYTES for _, data in log.events)


EVENT = b"x" * (1024 - EVENT_OVERHEAD_BYTES)  # an event that costs exactly 1 KiB


def held_by_logs(store: SessionStore) -> int:
    logs = {id(log): log for s in store.sessions.values() for log in [*s.streams.values(), s.get_stream] if log}
    return sum(log.size for log in logs.values())


def test_resumption_logs_of_all_sessions_share_one_byte_budget_the_longest_quiet_give_way_first() -> None:
    store = SessionStore(SECRET, "w0", resume_buffer_bytes=64 * 1024)
    quiet, busy = store.create("2025-11-25", {}, "", {}), store.create("2025-11-25", {}, "", {})
    quiet_get = store.open_stream(quiet, "g")
    for _ in range(8):
        quiet_get.append(EVENT)
    finished = store.open_stream(busy)
    for _ in range(20):
        finished.append(EVENT)
    finished.done = True
    busy_get = store.open_stream(busy, "g")
    for _ in range(30):
        busy_get.append(EVENT)
    assert store.replay.held == held_by_logs(store) == 58 * 1024  # under the budget: nothing let go
    for _ in range(10):
        busy_get.append(EVENT)
    # 68 KiB wanted, 64 held: the quiet session's GET stream (appended to longest ago) gave its 4 oldest.
    assert store.replay.held == held_by_logs(store) == 64 * 1024
    assert (len(quiet_get.events), quiet_get.missing_after(0), len(finished.events)) == (4, 4, 20)
    for _ in range(20):
        busy_get.append(EVENT)
    # The quiet stream is empty, then the finished call's oldest events go; its result (last) stays.
    assert store.replay.held == held_by_logs(store) == 64 * 1024
    assert (len(quiet_get.events), len(finished.events), len(busy_get.events)) == (0, 4, 60)
    assert finished.replay_after(0)[-1][0] == f"{finished.stream_id}.20" and finished.missing_after(0) == 16


def test_a_single_stream_past_the_budget_keeps_its_newest_events() -> None:
    store = SessionStore(SECRET, "w0", resume_buffer_bytes=16 * 1024)
    log = store.open_stream(store.create("2025-11-25", {}, "", {}))
    for _ in range(100):
        log.append(EVENT)
    assert store.replay.held == log.size == 16 * 1024
    assert [event_id for event_id, _ in log.replay_after(0)] == [f"{log.stream_id}.{n}" for n in range(85, 101)]


def test_every_way_a_worker_lets_go_of_a_session_or_stream_frees_its_events() -> None:
    """Ended (DELETE), forgotten as idle, forgotten past `max_sessions`, a stream past `max_streams`:
    the budget then counts exactly what the sessions still held can resume."""
    store = SessionStore(SECRET, "w0", idle_timeout=0.05, max_sessions=3, max_streams=2)

    def session_with_events() -> tuple[Session, StreamLog]:
        session = store.create("2025-11-25", {}, "", {})
        log = store.open_stream(session)
        for _ in range(3):
            log.append(EVENT)
        log.done = True
        return session, log

    ended, _ = session_with_events()
    store.terminate(ended)
    assert store.replay.held == held_by_logs(store) == 0
    idle, _ = session_with_events()
    time.sleep(0.06)
    assert store.expire() == 1 and store.replay.held == held_by_logs(store) == 0
    kept = [session_with_events() for _ in range(5)]  # past max_sessions: the two oldest are forgotten
    assert len(store.sessions) == 3 and store.replay.held == held_by_logs(store) == 3 * 3 * 1024
    session, first = kept[-1]
    get_stream = session.get_stream = store.open_stream(session, "g")
    get_stream.append(EVENT)
    store.open_stream(session)  # a third stream: past max_streams, the oldest goes
    assert first.stream_id not in session.streams and session.get_stream is get_stream
    assert store.replay.held == held_by_logs(store) == (2 * 3 + 1) * 1024
    store.open_stream(session)  # and now the unconnected GET stream goes: the next GET opens a new one
    assert session.get_stream is None and store.replay.held == held_by_logs(store) == 2 * 3 * 1024


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


def test_past_max_sessions_the_oldest_idle_ones_are_forgotten_and_rebuilt_on_their_next_request() -> None:
    store = SessionStore(SECRET, "w0", max_sessions=3)
    old = [store.create("2025-11-25", {"sampling": {}}, "", {}) for _ in range(3)]
    loop = asyncio.new_event_loop()
    old[0].pending["r1"] = loop.create_future()  # the oldest awaits a client's answer: it stays
    loop.close()
    new = [store.create("2025-11-25", {}, "", {}) for _ in range(2)]
    assert set(store.sessions) == {old[0].token, new[0].token, new[1].token}
    rebuilt = store.lookup(old[1].token, "")  # forgotten here, not ended: its token still works
    assert rebuilt is not old[1] and rebuilt.capabilities == {"sampling": {}}
    assert set(store.sessions) == {old[0].token, new[1].token, old[1].token}  # the oldest idle one made room


def test_sessions_with_a_live_stream_are_kept_even_past_max_sessions() -> None:
    store = SessionStore(SECRET, "w0", max_sessions=3)
    streaming = []
    for _ in range(3):
        streaming.append(store.create("2025-11-25", {}, "", {}))
        store.open_stream(streaming[-1]).live = EventStream([])
    flood = [store.create("2025-11-25", {}, "", {}) for _ in range(50)]
    assert set(store.sessions) == {s.token for s in streaming}  # what a rebuild cannot restore stays
    assert all(store.lookup(s.token, "") is not s for s in flood[:3])  # the flood's are rebuilt on demand


def test_a_session_gets_a_cluster_table_entry_only_once_it_subscribes() -> None:
    store = SessionStore(SECRET, "w0")
    quiet = [store.create("2025-11-25", {}, "", {}) for _ in range(100)]
    assert store.subscriptions == {}  # no empty set per session, kept until the token expires (a day)
    store.set_subscription(quiet[0].token, "test://a", True)
    assert store.subscriptions == {quiet[0].token: {"test://a"}} and quiet[0].subscriptions == {"test://a"}
    store.sessions.clear()  # forgotten here (idle, or to make room)
    assert store.lookup(quiet[0].token, "").subscriptions == {"test://a"}


def test_idle_sessions_are_looked_for_every_ten_seconds_not_on_every_sweep() -> None:
    store = SessionStore(SECRET, "w0", idle_timeout=0.05)
    store.create("2025-11-25", {}, "", {})
    time.sleep(0.06)
    assert store.expire() == 1  # the first look
    store.create("2025-11-25", {}, "", {})
    time.sleep(0.06)
    assert store.expire() == 0 and len(store.sessions) == 1  # idle too, but the next look is 10 s away
    store._next_expire = 0.0  # ... and comes
    assert store.expire() == 1 and store.sessions == {}


def test_revocations_past_their_bound_become_a_watermark_that_refuses_every_older_token() -> None:
    revoked = Revocations(max_age=100.0, limit=10)
    for n in range(10):
        assert revoked.add(b"%016d" % n, 1000.0 + n) is False
    assert revoked.add(b"%016d" % 10, 1010.0) is True  # the oldest tenth (one) gives way to the watermark
    assert (len(revoked), revoked.before) == (10, 900.0)  # issued = expires - max_age
    assert revoked.refuses(b"%016d" % 0, 900.0) and revoked.refuses(b"x" * 16, 899.0)  # gone, yet refused
    assert not revoked.refuses(b"x" * 16, 901.0) and revoked.refuses(b"%016d" % 5, 905.0)
    assert revoked.raise_before(850.0) is False and revoked.before == 900.0  # it never goes back


def token_issued(seconds_ago: int) -> str:
    payload = _TOKEN.pack(os.urandom(16), int(time.time()) - seconds_ago, 2, 0) + credential_digest("")
    return Signer(SECRET, "session").seal(payload)


def test_a_worker_ends_the_sessions_it_holds_that_the_watermark_now_refuses() -> None:
    store = SessionStore(SECRET, "w0")
    store.revoked.limit = 3
    oldest, newer = store.lookup(token_issued(2000), ""), store.lookup(token_issued(10), "")
    loop = asyncio.new_event_loop()
    waiting = oldest.pending["r1"] = loop.create_future()
    for _ in range(4):  # four sessions issued 1,000 s ago end: one more than remembered one by one
        store.terminate(store.lookup(token_issued(1000), ""))
    assert oldest.token not in store.sessions and isinstance(waiting.exception(), ConnectionResetError)
    loop.close()
    with pytest.raises(SessionError):
        store.lookup(oldest.token, "")  # ended with them, though never DELETEd
    assert store.lookup(newer.token, "") is newer  # issued after the watermark: untouched
    follower = SessionStore(SECRET, "w1")  # a worker started later gets the watermark in its snapshot
    follower.load_tables({}, {}, [], store.revoked.before)
    with pytest.raises(SessionError):
        follower.lookup(oldest.token, "")
    assert follower.lookup(newer.token, "").token == newer.token
