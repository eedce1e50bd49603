"""sptun.proto: the registration messages, with real WireGuard keys."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from sptun import proto
from sptun.errors import ProtocolError, SptunError
from sptun.keys import generate_private_key, public_key
from sptun.proto import (
    CHALLENGE_LEN,
    MAX_MESSAGE,
    Assignment,
    Request,
    accept,
    hello,
    open_reply,
    open_request,
    parse_hello,
    reject,
    seal_request,
)

FUZZ = settings.get_profile("sptun")

SERVER_PRIV = generate_private_key()
SERVER_PUB = public_key(SERVER_PRIV)
CLIENT_PRIV = generate_private_key()
CLIENT_PUB = public_key(CLIENT_PRIV)
TOKEN = "tok-" + "S3cr3t" * 6
CHALLENGE = bytes(range(CHALLENGE_LEN))
ASSIGNMENT = Assignment("10.99.0.2", "10.99.0.1", SERVER_PUB, 16)
ZERO_KEY = base64.b64encode(bytes(32)).decode()  # a low-order point: no shared key can be made with it


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def request(op: str = "register", token: str = TOKEN, key: str = CLIENT_PUB) -> Request:
    return Request(op, "app.example.test", token, key)


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def sealed_line(inner: Any, client_priv: str = CLIENT_PRIV, key: str = CLIENT_PUB,
                server_pub: str = SERVER_PUB) -> bytes:
    """A request whose box holds `inner`, whatever it is, sealed with real keys."""
    box = Box(PrivateKey(base64.b64decode(client_priv)), PublicKey(base64.b64decode(server_pub)))
    nonce = os.urandom(Box.NONCE_SIZE)
    plain = inner if isinstance(inner, bytes) else json.dumps(inner).encode()
    return line({"key": key, "nonce": b64(nonce), "box": b64(box.encrypt(plain, nonce).ciphertext)})


def protocol_error(fn: Callable[..., Any], *args: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value


# --- the round trip -----------------------------------------------------------------------------


def test_register_round_trip() -> None:
    server_key, challenge = parse_hello(hello(SERVER_PUB, CHALLENGE))
    assert (server_key, challenge) == (SERVER_PUB, CHALLENGE)
    wire = seal_request(request(), CLIENT_PRIV, server_key, challenge)
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1 and len(wire) <= MAX_MESSAGE
    got = open_request(wire, SERVER_PRIV, CHALLENGE)
    assert (got.op, got.domain, got.client_key) == ("register", "app.example.test", CLIENT_PUB)
    assert got.proves(TOKEN, SERVER_PUB, CHALLENGE) and not got.proves(TOKEN + "x", SERVER_PUB, CHALLENGE)
    reply = accept(ASSIGNMENT, SERVER_PRIV, got.client_key, CHALLENGE, "register")
    assert open_reply(reply, CLIENT_PRIV, SERVER_PUB, CHALLENGE, "register") == ASSIGNMENT


def test_deregister_round_trip() -> None:
    got = open_request(seal_request(request("deregister"), CLIENT_PRIV, SERVER_PUB, CHALLENGE), SERVER_PRIV, CHALLENGE)
    assert got.op == "deregister" and got.proves(TOKEN, SERVER_PUB, CHALLENGE)
    assert open_reply(accept(None, SERVER_PRIV, got.client_key, CHALLENGE, "deregister"), CLIENT_PRIV, SERVER_PUB,
                      CHALLENGE, "deregister") is None


@pytest.mark.parametrize("seen", [True, False])
def test_seen_flag_round_trip(seen: bool) -> None:
    sent = Assignment("10.99.0.2", "10.99.0.1", SERVER_PUB, 16, seen=seen)
    got = open_reply(accept(sent, SERVER_PRIV, CLIENT_PUB, CHALLENGE, "register"), CLIENT_PRIV, SERVER_PUB, CHALLENGE,
                     "register")
    assert got is not None and got.seen is seen


def test_the_ipv6_overlay_round_trip() -> None:
    """A dual-stack server's assignment carries the IPv6 overlay too; an IPv4-only one, none."""
    dual = Assignment("10.99.0.2", "10.99.0.1", SERVER_PUB, 16, True, "fd99::2", "fd99::1", 64)
    for sent in (dual, ASSIGNMENT):
        got = open_reply(accept(sent, SERVER_PRIV, CLIENT_PUB, CHALLENGE, "register"), CLIENT_PRIV, SERVER_PUB, CHALLENGE,
                         "register")
        assert got == sent
    assert ASSIGNMENT.overlay_ip6 is None


# --- the token never crosses the wire ----------------------------------------------------------


def test_an_impostor_that_opens_the_request_finds_no_token() -> None:
    """An impostor server (listed in DNS without pk=) gets a box sealed to its own key: it
    opens it, and finds a proof bound to its key and challenge, not the token."""
    impostor_priv = generate_private_key()
    impostor_pub = public_key(impostor_priv)
    wire = seal_request(request(), CLIENT_PRIV, impostor_pub, CHALLENGE)
    box = Box(PrivateKey(base64.b64decode(impostor_priv)), PublicKey(base64.b64decode(CLIENT_PUB)))
    obj = json.loads(wire)
    plain = box.decrypt(base64.b64decode(obj["box"]), base64.b64decode(obj["nonce"]))
    assert TOKEN.encode() not in plain and b"token" not in plain
    claim = open_request(wire, impostor_priv, CHALLENGE)
    assert claim.proves(TOKEN, impostor_pub, CHALLENGE)
    # What it captured proves nothing to the real server, whatever challenge that one sends.
    assert not claim.proves(TOKEN, SERVER_PUB, CHALLENGE)
    # Nor does replaying the box itself: it is sealed to the impostor's key.
    assert protocol_error(open_request, wire, SERVER_PRIV, CHALLENGE).reason == "unproven-key"


@pytest.mark.parametrize("field", ["op", "domain", "server_key", "client_key", "challenge"])
def test_the_proof_is_bound_to_every_field(field: str) -> None:
    fields: dict[str, Any] = {"op": "register", "domain": "app.example.test", "server_key": SERVER_PUB,
                              "client_key": CLIENT_PUB, "challenge": CHALLENGE}
    good = proto.token_proof(TOKEN, **fields)
    other = {"op": "deregister", "domain": "other.example.test", "server_key": public_key(generate_private_key()),
             "client_key": public_key(generate_private_key()), "challenge": os.urandom(CHALLENGE_LEN)}
    assert proto.token_proof(TOKEN, **{**fields, field: other[field]}) != good


def test_a_reply_to_another_challenge_is_refused() -> None:
    """An old reply (recorded from an earlier registration) cannot answer a new one."""
    old = accept(ASSIGNMENT, SERVER_PRIV, CLIENT_PUB, os.urandom(CHALLENGE_LEN), "register")
    assert protocol_error(open_reply, old, CLIENT_PRIV, SERVER_PUB, CHALLENGE, "register").reason == "replay"


def test_a_deregister_reply_cannot_answer_a_register() -> None:
    reply = accept(None, SERVER_PRIV, CLIENT_PUB, CHALLENGE, "deregister")
    assert protocol_error(open_reply, reply, CLIENT_PRIV, SERVER_PUB, CHALLENGE, "register").reason == "replay"


def test_a_key_has_one_spelling() -> None:
    """The last base64 character of a key has two spare bits: four spellings, one key."""
    raw = base64.b64decode(CLIENT_PUB)
    last = CLIENT_PUB[-2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    other = CLIENT_PUB[:-2] + alphabet[alphabet.index(last) ^ 1] + "="
    assert other != CLIENT_PUB and base64.b64decode(other) == raw
    assert proto.canonical_key(other) == CLIENT_PUB
    wire = seal_request(request(key=other), CLIENT_PRIV, SERVER_PUB, CHALLENGE)
    assert protocol_error(open_request, wire, SERVER_PRIV, CHALLENGE).reason == "bad-key"


def test_domain_is_normalised() -> None:
    wire = seal_request(Request("register", "App.Example.TEST.", TOKEN, CLIENT_PUB), CLIENT_PRIV, SERVER_PUB, CHALLENGE)
    claim = open_request(wire, SERVER_PRIV, CHALLENGE)
    assert claim.domain == "app.example.test" and not claim.proves(TOKEN, SERVER_PUB, CHALLENGE)  # bound as sent


# --- proof of key, replay, tampering ------------------------------------------------------------


def test_box_from_another_key_is_unproven() -> None:
    """The agent announces CLIENT_PUB but does not hold its private key."""
    impostor = generate_private_key()
    wire = seal_request(request(key=CLIENT_PUB), impostor, SERVER_PUB, CHALLENGE)
    e = protocol_error(open_request, wire, SERVER_PRIV, CHALLENGE)
    assert e.reason == "unproven-key"


def test_box_for_another_server_is_unproven() -> None:
    other_server = public_key(generate_private_key())
    e = protocol_error(open_request, seal_request(request(), CLIENT_PRIV, other_server, CHALLENGE), SERVER_PRIV, CHALLENGE)
    assert e.reason == "unproven-key"


def test_replayed_request_is_refused() -> None:
    old = seal_request(request(), CLIENT_PRIV, SERVER_PUB, os.urandom(CHALLENGE_LEN))
    e = protocol_error(open_request, old, SERVER_PRIV, CHALLENGE)
    assert e.reason == "replay"


@pytest.mark.parametrize("field, mutate", [
    ("box", lambda raw: raw[:-1] + bytes([raw[-1] ^ 1])),
    ("box", lambda raw: bytes([raw[0] ^ 0x80]) + raw[1:]),
    ("box", lambda raw: raw[:-16]),
    ("box", lambda raw: b""),
    ("nonce", lambda raw: raw[:-1] + bytes([raw[-1] ^ 1])),
], ids=["last-bit", "first-bit", "truncated", "empty", "nonce-bit"])
def test_tampered_request_is_refused(field: str, mutate: Callable[[bytes], bytes]) -> None:
    obj = json.loads(seal_request(request(), CLIENT_PRIV, SERVER_PUB, CHALLENGE))
    obj[field] = b64(mutate(base64.b64decode(obj[field])))
    e = protocol_error(open_request, line(obj), SERVER_PRIV, CHALLENGE)
    assert e.reason == "unproven-key"


def test_tampered_reply_is_refused() -> None:
    obj = json.loads(accept(ASSIGNMENT, SERVER_PRIV, CLIENT_PUB, CHALLENGE, "register"))
    raw = base64.b64decode(obj["box"])
    obj["box"] = b64(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert protocol_error(open_reply, line(obj), CLIENT_PRIV, SERVER_PUB, CHALLENGE, "register").reason == "unproven-key"


def test_reply_from_another_server_is_refused() -> None:
    impostor = generate_private_key()
    reply = accept(ASSIGNMENT, impostor, CLIENT_PUB, CHALLENGE, "register")
    assert protocol_error(open_reply, reply, CLIENT_PRIV, SERVER_PUB, CHALLENGE, "register").reason == "unproven-key"


@pytest.mark.parametrize("fn, args", [
    (open_request, lambda: (line({"key": ZERO_KEY, "nonce": b64(bytes(24)), "box": b64(bytes(40))}), SERVER_PRIV, CHALLENGE)),
    (seal_request, lambda: (request(), CLIENT_PRIV, ZERO_KEY, CHALLENGE)),
    (open_reply, lambda: (line({"ok": True, "nonce": b64(bytes(24)), "box": b64(bytes(40))}), CLIENT_PRIV, ZERO_KEY,
                          CHALLENGE, "register")),
], ids=["server-gets-zero-client-key", "agent-seals-for-zero-server-key", "agent-opens-from-zero-server-key"])
def test_low_order_key_is_a_protocol_error(fn: Callable[..., Any], args: Callable[[], tuple[Any, ...]]) -> None:
    """A key with which no shared secret can be made (all zeros) is refused, not a crash."""
    protocol_error(fn, *args())


# --- malformed messages -------------------------------------------------------------------------

VALID = json.loads(seal_request(request(), CLIENT_PRIV, SERVER_PUB, CHALLENGE))

MALFORMED = [
    ("garbage", b"\x00\xff\xfe garbage\n", "not JSON"),
    ("not-json", b"register app.example.test\n", "not JSON"),
    ("empty", b"\n", "not JSON"),
    ("json-list", b'["key"]\n', "not a JSON object"),
    ("json-string", b'"key"\n', "not a JSON object"),
    ("json-null", b"null\n", "not a JSON object"),
    ("deep-nesting", b"[" * 3000 + b"\n", "not JSON"),
    ("oversized", b'{"key":"' + b"A" * MAX_MESSAGE + b'"}\n', "larger than"),
    ("no-key", line({k: v for k, v in VALID.items() if k != "key"}), "key"),
    ("key-int", line({**VALID, "key": 5}), "key"),
    ("key-short", line({**VALID, "key": b64(bytes(31))}), "key"),
    ("key-not-b64", line({**VALID, "key": "*" * 44}), "key"),
    ("no-nonce", line({k: v for k, v in VALID.items() if k != "nonce"}), "nonce"),
    ("nonce-list", line({**VALID, "nonce": [1]}), "nonce"),
    ("nonce-not-b64", line({**VALID, "nonce": "%%%"}), "nonce"),
    ("nonce-short", line({**VALID, "nonce": b64(bytes(23))}), "nonce"),
    ("nonce-unicode", line({**VALID, "nonce": "\u00e9" * 32}), "nonce"),
    ("no-box", line({k: v for k, v in VALID.items() if k != "box"}), "box"),
    ("box-null", line({**VALID, "box": None}), "box"),
]


@pytest.mark.parametrize("wire, what", [(w, m) for _, w, m in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_malformed_request(wire: bytes, what: str) -> None:
    e = protocol_error(open_request, wire, SERVER_PRIV, CHALLENGE)
    assert what in e.message
    assert e.reason in ("malformed", "oversized")


CHALLENGE_B64 = b64(CHALLENGE)
PROOF_B64 = b64(proto.token_proof(TOKEN, "register", "app.example.test", SERVER_PUB, CLIENT_PUB, CHALLENGE))
INNER = {"op": "register", "domain": "app.example.test", "proof": PROOF_B64, "challenge": CHALLENGE_B64}
BAD_INNER = [
    ("not-json", b"op=register", "not JSON", "malformed"),
    ("list", ["register"], "not a JSON object", "malformed"),
    ("no-challenge", {k: v for k, v in INNER.items() if k != "challenge"}, "challenge", "malformed"),
    ("challenge-int", {**INNER, "challenge": 7}, "challenge", "malformed"),
    ("challenge-short", {**INNER, "challenge": b64(CHALLENGE[:-1])}, "challenge", "replay"),
    ("no-op", {k: v for k, v in INNER.items() if k != "op"}, "op", "malformed"),
    ("op-unknown", {**INNER, "op": "delete-everything"}, "op", "malformed"),
    ("op-list", {**INNER, "op": ["register"]}, "op", "malformed"),
    ("op-dict", {**INNER, "op": {"register": 1}}, "op", "malformed"),
    ("no-domain", {k: v for k, v in INNER.items() if k != "domain"}, "domain", "malformed"),
    ("domain-empty", {**INNER, "domain": ""}, "domain", "malformed"),
    ("domain-int", {**INNER, "domain": 1}, "domain", "malformed"),
    ("domain-long", {**INNER, "domain": "a" * 254}, "domain", "malformed"),
    ("no-proof", {k: v for k, v in INNER.items() if k != "proof"}, "proof", "malformed"),
    ("proof-empty", {**INNER, "proof": ""}, "proof", "malformed"),
    ("proof-int", {**INNER, "proof": 12345}, "proof", "malformed"),
    ("proof-long", {**INNER, "proof": b64(bytes(33))}, "proof", "malformed"),
]


@pytest.mark.parametrize("inner, what, reason", [b[1:] for b in BAD_INNER], ids=[b[0] for b in BAD_INNER])
def test_malformed_sealed_request(inner: Any, what: str, reason: str) -> None:
    e = protocol_error(open_request, sealed_line(inner), SERVER_PRIV, CHALLENGE)
    assert what in e.message and e.reason == reason


def test_sealed_inner_with_valid_fields_opens() -> None:
    """The helper above builds real requests: the malformed cases fail for their own reason."""
    claim = open_request(sealed_line(INNER), SERVER_PRIV, CHALLENGE)
    assert claim.proves(TOKEN, SERVER_PUB, CHALLENGE) and claim.client_key == CLIENT_PUB


@pytest.mark.parametrize("wire, what", [
    (b"hello\n", "not JSON"),
    (line({"sptun": 1, "key": SERVER_PUB, "challenge": CHALLENGE_B64}), "speaks sptun protocol 1, not 2"),
    (line({"sptun": "2", "key": SERVER_PUB, "challenge": CHALLENGE_B64}), "not an sptun 2 server"),
    (line({"sptun": 2, "key": "nope", "challenge": CHALLENGE_B64}), "server key"),
    (line({"sptun": 2, "key": SERVER_PUB}), "challenge"),
    (line({"sptun": 2, "key": SERVER_PUB, "challenge": b64(bytes(16))}), "challenge has the wrong length"),
])
def test_malformed_hello(wire: bytes, what: str) -> None:
    assert what in protocol_error(parse_hello, wire).message


@pytest.mark.parametrize("inner, what", [
    ({"overlay_ip": "10.99.0.2"}, "incomplete"),
    ({**ASSIGNMENT.__dict__, "prefixlen": "sixteen"}, "incomplete"),
    ({**ASSIGNMENT.__dict__, "prefixlen": None}, "incomplete"),
    ({**ASSIGNMENT.__dict__, "prefixlen": 1e400}, "incomplete"),  # json: Infinity
])
def test_incomplete_assignment(inner: dict[str, Any], what: str) -> None:
    box = Box(PrivateKey(base64.b64decode(SERVER_PRIV)), PublicKey(base64.b64decode(CLIENT_PUB)))
    nonce = os.urandom(Box.NONCE_SIZE)
    body = {"op": "register", "challenge": CHALLENGE_B64, "assignment": inner}
    wire = line({"ok": True, "nonce": b64(nonce), "box": b64(box.encrypt(json.dumps(body).encode(), nonce).ciphertext)})
    assert what in protocol_error(open_reply, wire, CLIENT_PRIV, SERVER_PUB, CHALLENGE, "register").message


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reason, error", [("bad-token", "wrong token for app.example.test"),
                                           ("rate-limited", "too many bad attempts; try again later"),
                                           ("unknown-domain", "this server does not serve x.test")])
def test_reject_is_parsed_into_the_reason(reason: str, error: str) -> None:
    e = protocol_error(open_reply, reject(reason, error), CLIENT_PRIV, SERVER_PUB, CHALLENGE, "register")
    assert e.reason == reason and error in e.message and e.message.startswith("server refused")


@pytest.mark.parametrize("wire", [line({"ok": False}), line({"ok": "true"}), line({}),
                                  line({"ok": False, "reason": "x" * 1000, "error": "y" * 1000})])
def test_odd_refusals_are_bounded(wire: bytes) -> None:
    e = protocol_error(open_reply, wire, CLIENT_PRIV, SERVER_PUB, CHALLENGE, "register")
    assert len(e.reason) <= 64 and len(e.message) <= 300


def test_messages_fit_the_limit() -> None:
    with pytest.raises(ProtocolError) as info:
        reject("error", "x" * MAX_MESSAGE)
    assert info.value.reason == "oversized"
    huge = Request("register", "x" * MAX_MESSAGE, TOKEN, CLIENT_PUB)
    with pytest.raises(ProtocolError):
        seal_request(huge, CLIENT_PRIV, SERVER_PUB, CHALLENGE)


# --- the token stays secret ---------------------------------------------------------------------


def test_token_not_in_repr() -> None:
    r = request()
    assert TOKEN not in repr(r) and TOKEN not in str(r) and TOKEN not in f"{r!r} {r}"
    assert "app.example.test" in repr(r)


def test_token_not_on_the_wire() -> None:
    wire = seal_request(request(), CLIENT_PRIV, SERVER_PUB, CHALLENGE)
    assert TOKEN.encode() not in wire
    assert b64(TOKEN.encode()).encode()[:20] not in wire
    assert b"token" not in wire


@pytest.mark.parametrize("make", [
    lambda: open_request(seal_request(request(), generate_private_key(), SERVER_PUB, CHALLENGE), SERVER_PRIV, CHALLENGE),
    lambda: open_request(seal_request(request(), CLIENT_PRIV, SERVER_PUB, bytes(32)), SERVER_PRIV, CHALLENGE),
    lambda: open_request(sealed_line({**INNER, "op": "nope"}), SERVER_PRIV, CHALLENGE),
    lambda: open_request(sealed_line({**INNER, "domain": 5}), SERVER_PRIV, CHALLENGE),
    lambda: open_request(sealed_line({**INNER, "proof": TOKEN * 10}), SERVER_PRIV, CHALLENGE),
    lambda: seal_request(Request("register", "x" * MAX_MESSAGE, TOKEN, CLIENT_PUB), CLIENT_PRIV, SERVER_PUB, CHALLENGE),
], ids=["unproven", "replay", "bad-op", "bad-domain", "token-as-proof", "oversized"])
def test_token_not_in_errors(make: Callable[[], Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        make()
    e = info.value
    assert TOKEN not in str(e) and TOKEN not in e.message and TOKEN not in repr(e) and TOKEN not in e.reason


# --- fuzz: open_request only ever raises ProtocolError -----------------------------------------


def must_refuse(wire: bytes, may_accept: bool = False) -> None:
    try:
        got = open_request(wire, SERVER_PRIV, CHALLENGE)
    except ProtocolError as e:
        assert e.message and e.reason
        assert TOKEN not in str(e)
    else:
        assert may_accept, "a forged request was accepted"
        assert got.op in proto.OPS and got.domain and len(got.proof) == 32 and got.client_key == CLIENT_PUB


@settings(FUZZ, max_examples=max(10_000, FUZZ.max_examples))  # the server's first line of defence: 10k at least
@given(st.binary(max_size=MAX_MESSAGE + 64))
def test_fuzz_open_request_bytes(data: bytes) -> None:
    must_refuse(data)


json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                | st.sampled_from([CLIENT_PUB, SERVER_PUB, ZERO_KEY, CHALLENGE_B64, b64(bytes(24)), "register",
                                   "deregister"]))
json_values = json_scalars | st.lists(json_scalars, max_size=3) | st.dictionaries(st.text(max_size=4), json_scalars,
                                                                                  max_size=2)
request_keys = st.sampled_from(["key", "nonce", "box", "op", "domain", "proof", "challenge", "sptun", "ok"])


@settings(FUZZ, max_examples=FUZZ.max_examples // 4)  # costly to draw
@given(st.dictionaries(request_keys | st.text(max_size=6), json_values, max_size=5))
def test_fuzz_open_request_json_objects(obj: dict[str, Any]) -> None:
    must_refuse(json.dumps(obj).encode() + b"\n")


@settings(FUZZ, max_examples=FUZZ.max_examples // 4)  # costly to draw, and sealed with real keys
@given(st.dictionaries(request_keys | st.text(max_size=6), json_values, max_size=5) | json_values)
def test_fuzz_open_request_sealed_inner(inner: Any) -> None:
    """Past the proof of key: whatever the box holds, a clear refusal or a well-formed request."""
    must_refuse(sealed_line(inner), may_accept=True)


def test_module_constants() -> None:
    assert proto.OPS == ("register", "deregister") and MAX_MESSAGE == 16384 and CHALLENGE_LEN == 32


# --- the whole round trip has one deadline -----------------------------------------------------


def trickling_server() -> tuple[socket.socket, threading.Event]:
    """Accepts, then sends a byte of its hello every 0.3 s: no single read ever times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while not stop.wait(0.3):
                try:
                    conn.send(b"{")
                except OSError:
                    return

    threading.Thread(target=serve, daemon=True).start()
    return listener, stop


@pytest.mark.parametrize("mode", ["thread", "asyncio"])
def test_a_trickling_server_costs_no_more_than_the_deadline(mode: str) -> None:
    listener, stop = trickling_server()
    key = generate_private_key()
    request = proto.Request("register", "app.example.test", "t" * 32, public_key(key))
    port = listener.getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(SptunError, match="cannot reach 127.0.0.1.*timed out"):
            if mode == "thread":
                proto.exchange("127.0.0.1", port, request, key, timeout=1.0)
            else:
                asyncio.run(proto.exchange_async("127.0.0.1", port, request, key, timeout=1.0))
    finally:
        stop.set()
        listener.close()
    assert time.monotonic() - started < 1.5
