"""Pure codecs of the request path: JSON-RPC body decoding, header value decoding, Host/Origin lists."""

from __future__ import annotations

import base64

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcpherd.worker import jsonrpc as rpc
from mcpherd.worker.modern import decode_header_value
from mcpherd.worker.security import AllowList, default_hosts, loopback_origins


# -- jsonrpc.decode_body / check_message ---------------------------------------------------------------
def test_decode_body_messages_and_batches() -> None:
    message = rpc.decode_body(b'{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x"}}')
    assert isinstance(message, rpc.Message) and message.is_request and not message.is_response
    assert (message.id, message.method, bytes(message.params)) == ("a", "tools/call", b'{"name":"x"}')
    batch = rpc.decode_body(b' \n [{"jsonrpc":"2.0","method":"n"},{"jsonrpc":"2.0","id":1,"result":{}}]')
    assert isinstance(batch, list) and batch[0].is_notification and batch[1].is_response


@pytest.mark.parametrize(("body", "code", "message"), [
    (b"", rpc.PARSE_ERROR, "Parse error: Input data was truncated"),
    (b"{", rpc.PARSE_ERROR, "Parse error: Input data was truncated"),
    (b"{'a': 1}", rpc.PARSE_ERROR, "Parse error: JSON is malformed: object keys must be strings (byte 1)"),
    (b'{"id":1}  x', rpc.PARSE_ERROR, "Parse error: JSON is malformed: trailing characters (byte 11)"),
    (b"\xff", rpc.PARSE_ERROR, "Parse error: JSON is malformed: invalid character (byte 0)"),
    (b"7", rpc.INVALID_REQUEST, "Invalid request: Expected `object`, got `int`"),
    (b'"x"', rpc.INVALID_REQUEST, "Invalid request: Expected `object`, got `str`"),
    (b'{"id":1.5}', rpc.INVALID_REQUEST, "Invalid request: Expected `int | str | null`, got `float` - at `$.id`"),
    (b'{"method":["x"]}', rpc.INVALID_REQUEST, "Invalid request: Expected `str`, got `array` - at `$.method`"),
    (b'{"error":{"code":"x","message":"m"}}', rpc.INVALID_REQUEST,
     "Invalid request: Expected `int`, got `str` - at `$.error.code`"),
    (b"[1]", rpc.INVALID_REQUEST, "Invalid request: Expected `object`, got `int` - at `$[0]`"),
])
def test_decode_body_errors(body: bytes, code: int, message: str) -> None:
    with pytest.raises(rpc.RpcError) as error:
        rpc.decode_body(body)
    assert (error.value.code, error.value.message, error.value.http_status) == (code, message, 400)


@given(st.binary(max_size=200))
def test_decode_body_never_raises_anything_but_rpc_errors(body: bytes) -> None:
    try:
        rpc.decode_body(body)
    except rpc.RpcError as error:
        assert error.code in (rpc.PARSE_ERROR, rpc.INVALID_REQUEST)


def test_check_message_envelope_rules() -> None:
    for body, message in ((b'{"id":1,"method":"m"}', 'Invalid request: "jsonrpc" must be "2.0"'),
                          (b'{"jsonrpc":"2.0","id":null,"method":"m"}',
                           "Invalid request: MCP request ids must be a string or an integer"),
                          (b'{"jsonrpc":"2.0","id":1}', 'Invalid request: expected "method", or "result"/"error"')):
        decoded = rpc.decode_body(body)
        assert isinstance(decoded, rpc.Message)
        with pytest.raises(rpc.RpcError) as error:
            rpc.check_message(decoded)
        assert (error.value.code, error.value.message) == (rpc.INVALID_REQUEST, message)
    for body in (b'{"jsonrpc":"2.0","method":"n"}', b'{"jsonrpc":"2.0","id":0,"error":{"code":1,"message":"m"}}'):
        decoded = rpc.decode_body(body)
        assert isinstance(decoded, rpc.Message)
        rpc.check_message(decoded)


def test_encoders() -> None:
    assert rpc.response(1, {}) == b'{"jsonrpc":"2.0","id":1,"result":{}}'
    assert rpc.error(None, -32700, "Parse error") == b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}'
    assert rpc.error("a", 1, "m", {"k": 0}) == b'{"jsonrpc":"2.0","id":"a","error":{"code":1,"message":"m","data":{"k":0}}}'
    assert rpc.notification("n") == b'{"jsonrpc":"2.0","method":"n"}'
    with pytest.raises(rpc.RpcError) as error:
        rpc.decode_params(msgspec.Raw(b"[1]"), msgspec.json.Decoder(dict[str, int]))
    assert error.value.code == rpc.INVALID_PARAMS


# -- modern.decode_header_value ------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "decoded"), [
    (None, None),
    ("plain value", "plain value"),
    ("=?base64?SGVsbG8=?=", "Hello"),
    ("=?base64??=", ""),
    ("=?base64?" + base64.b64encode("Grüße, 世界".encode()).decode() + "?=", "Grüße, 世界"),
    ("=?base64?SGVsbG8?=", None),  # missing padding: not canonical
    ("=?base64?SGVs!!!bG8=?=", None),  # not base64
    ("=?base64?SGVsbG9=?=", None),  # non-zero spare bits: another spelling of "Hello"
    ("=?base64?" + base64.b64encode(b"\xff\xfe").decode() + "?=", None),  # not UTF-8
    ("=?base64?SGVsbG8=", "=?base64?SGVsbG8="),  # no suffix: a literal
    ("SGVsbG8=", "SGVsbG8="),  # no prefix: a literal
    ("=?BASE64?SGVsbG8=?=", "=?BASE64?SGVsbG8=?="),  # the sentinel is case-sensitive
])
def test_decode_header_value(raw: str | None, decoded: str | None) -> None:
    assert decode_header_value(raw) == decoded


@given(st.text(max_size=50))
def test_header_values_round_trip_through_the_sentinel(value: str) -> None:
    assert decode_header_value("=?base64?" + base64.b64encode(value.encode()).decode() + "?=") == value


# -- security.AllowList --------------------------------------------------------------------------------
def test_allow_list_entries() -> None:
    hosts = AllowList(["Example.COM", "api.example.com:8443", "localhost:*", "[::1]:*"])
    for allowed in ("example.com", "EXAMPLE.com", "api.example.com:8443", "localhost:1", "LOCALHOST:65535",
                    "[::1]:8080"):
        assert hosts.allows(allowed), allowed
    for refused in ("example.com:80", "api.example.com", "api.example.com:8444", "localhost", "localhost:",
                    "localhost:x", "localhost:80:80", "evil.localhost:80", "[::1]", "::1:80", ""):
        assert not hosts.allows(refused), refused
    assert AllowList(["*"]).allows("anything:at.all") and not AllowList([]).allows("localhost")


def test_default_hosts_and_origins() -> None:
    loopback = AllowList(default_hosts(["127.0.0.1"]))
    assert all(loopback.allows(h) for h in ("127.0.0.1:9", "localhost:9", "[::1]:9", "localhost"))
    assert not loopback.allows("10.0.0.5:9")
    lan = AllowList(default_hosts(["10.0.0.5", "fe80::1"]))
    assert lan.allows("10.0.0.5:8000") and lan.allows("10.0.0.5") and lan.allows("[fe80::1]:8000")
    wildcard = AllowList(default_hosts(["0.0.0.0", "::"]))
    assert not wildcard.allows("0.0.0.0:80") and not wildcard.allows("192.168.1.1:80")
    origins = AllowList(loopback_origins())
    for origin in ("http://localhost:6274", "https://127.0.0.1", "http://[::1]:3000"):
        assert origins.allows(origin), origin
    for origin in ("http://evil.example", "null", "http://localhost.evil.example:80", "file://localhost"):
        assert not origins.allows(origin), origin


def test_invalid_utf8_inside_params_is_invalid_params_not_a_crash() -> None:
    import msgspec as _msgspec

    from mcpherd.worker import jsonrpc as _rpc
    from mcpherd.worker.methods import RequestParams

    message = _rpc.decode_body(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\xff\xfe","_meta":{}}}')
    assert isinstance(message, _rpc.Message)
    try:
        _rpc.decode_params(message.params, _msgspec.json.Decoder(RequestParams))
    except _rpc.RpcError as exc:
        assert exc.code == _rpc.INVALID_PARAMS
        assert exc.message.startswith("Invalid params:")
    else:
        raise AssertionError("invalid UTF-8 in params was accepted")
