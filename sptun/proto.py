"""The registration protocol between an agent and a server's `api` port (TCP).

One JSON object per line, each at most MAX_MESSAGE bytes:

    server -> agent  {"sptun": 2, "key": SERVER_PUB, "challenge": B64[, "attest": ASK]}
   [agent  -> server {"attest": B64, "key": CLIENT_PUB, "domain": D, "ask": ASK}
    server -> agent  {"evidence": EVIDENCE} | a refusal]
    agent  -> server {"key": CLIENT_PUB, "nonce": B64, "box": B64}
        box: {"op": OP, "domain": D, "challenge": B64, "proof": B64[, "evidence": EVIDENCE]}
    server -> agent  {"ok": true, "nonce": B64, "box": B64} | {"ok": false, "reason": R, "error": TEXT}
        box: {"op": OP, "challenge": B64, "assignment": {...} | null}

The box is a NaCl Box made with the two WireGuard key pairs themselves, so opening it
proves that the agent holds the private key of the public key it registers.

The token never crosses the wire. The proof is an HMAC keyed from the token over the
domain, the server's key, the client's key and the server's fresh challenge: a server
(impostor or not) that reads it learns nothing it can use with another server, key or
challenge, and a token of 128 random bits cannot be guessed from it offline. The reply
carries the same challenge and op, so an old reply (or a deregistration's) cannot be
replayed to an agent as the answer to a registration.

Attestation (sptun.attest), both optional: a server that verifies clients says what it
wants (ASK) in its hello, and the agent's box carries evidence over attest.nonce(challenge,
client key, server key, domain). An agent that verifies its server first sends its own
challenge (the bracketed exchange) and checks the server's evidence before it sends its
request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import functools
import hashlib
import hmac
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import nacl.exceptions
import nacl.utils
from nacl.public import Box, PrivateKey, PublicKey

from sptun import attest
from sptun.errors import ProtocolError, SptunError, printable
from sptun.keys import decode_key

VERSION = 2
MAX_MESSAGE = 16384  # room for attestation evidence (a TPM quote is about 2 KiB as sent)
CHALLENGE_LEN = 32
OPS = ("register", "deregister")


@dataclass(frozen=True)
class Request:
    """What an agent asks, with the token it proves knowledge of (and never sends)."""

    op: str  # "register" | "deregister"
    domain: str
    token: str
    client_key: str  # base64 WireGuard public key
    ipv6: bool = True  # its service listens on IPv6: a dual-stack server may send it IPv6 browsers

    def __repr__(self) -> str:  # never show the token
        return f"Request(op={self.op!r}, domain={self.domain!r}, client_key={self.client_key!r})"


@dataclass(frozen=True)
class Claim:
    """A request as the server receives it: the client's key is proven, its token not yet."""

    op: str
    domain: str
    client_key: str  # canonical base64
    proof: bytes
    ipv6: bool = True  # as Request's (an older agent does not say: as before, it gets IPv6)
    evidence: Any = field(default=None, compare=False)  # attestation evidence, unchecked (attest.Verifier)

    def proves(self, token: str, server_key: str, challenge: bytes) -> bool:
        expected = token_proof(token, self.op, self.domain, server_key, self.client_key, challenge)
        return hmac.compare_digest(self.proof, expected)


def token_proof(token: str, op: str, domain: str, server_key: str, client_key: str, challenge: bytes) -> bytes:
    """Proof of knowing the token, bound to everything that makes this exchange unique."""
    key = hashlib.sha256(b"sptun join token\0" + token.encode("utf-8", "surrogatepass")).digest()
    bound = json.dumps(["sptun-join", VERSION, op, domain, server_key, client_key, _b64(challenge)],
                       separators=(",", ":")).encode()
    return hmac.new(key, bound, hashlib.sha256).digest()


def canonical_key(text: str) -> str | None:
    """The one base64 spelling of a WireGuard key, or None if it is not one: the same key
    spelled four ways (the last character's spare bits) must be one client, not four."""
    raw = decode_key(text)
    return base64.b64encode(raw).decode() if raw is not None else None


@dataclass(frozen=True)
class Assignment:
    overlay_ip: str  # the client's address in the server's overlay
    server_ip: str  # the server's own overlay address
    server_key: str  # the server's WireGuard public key
    prefixlen: int  # of the overlay
    # Whether the server has a fresh handshake from this client. False on a tunnel that the
    # agent thinks is up means the server lost the session (its interface was recreated).
    seen: bool = field(default=True, compare=False)
    # With the server's IPv6 overlay (overlay6): the client's /128 and the server's address
    # there, and its prefix length. None from a server without one (or an older sptun).
    overlay_ip6: str | None = None
    server_ip6: str | None = None
    prefixlen6: int | None = None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * MAX_MESSAGE:
        raise ProtocolError(f"{what} is missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what} is not base64") from None


def _line(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("message too large", reason="oversized")
    return data


def _parse(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_MESSAGE:
        raise ProtocolError(f"message larger than {MAX_MESSAGE} bytes", reason="oversized")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..." within 4 KiB
        raise ProtocolError("message is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a JSON object")
    return obj


def _public(value: Any, what: str) -> PublicKey:
    raw = decode_key(value) if isinstance(value, str) else None
    if raw is None:
        raise ProtocolError(f"{what} is not a base64 WireGuard key")
    if canonical_key(value) != value:
        raise ProtocolError(f"{what} is not in canonical base64", reason="bad-key")
    return PublicKey(raw)


def _private(private_key: str) -> PrivateKey:
    raw = decode_key(private_key)
    if raw is None:
        raise SptunError("the private key is not a base64 WireGuard key")
    return PrivateKey(raw)


@functools.lru_cache(maxsize=1024)
def _box(private_key: str, public_key: str, what: str) -> Box:
    """The Box of a key pair. Cached: making one is a Curve25519 multiplication, and a
    registration opens and seals with the same pair (an agent re-registers every 10 s)."""
    try:
        return Box(_private(private_key), _public(public_key, what))
    except nacl.exceptions.CryptoError:  # a low-order point (all zeros, ...): no shared key
        raise ProtocolError(f"{what} is not a usable WireGuard key") from None


def _seal(box: Box, obj: dict[str, Any]) -> dict[str, str]:
    nonce = nacl.utils.random(Box.NONCE_SIZE)
    sealed = box.encrypt(json.dumps(obj, separators=(",", ":")).encode(), nonce)
    return {"nonce": _b64(nonce), "box": _b64(sealed.ciphertext)}


def _open(box: Box, obj: dict[str, Any], reason: str) -> dict[str, Any]:
    nonce = _unb64(obj.get("nonce"), "nonce")
    ciphertext = _unb64(obj.get("box"), "box")
    if len(nonce) != Box.NONCE_SIZE:
        raise ProtocolError("nonce has the wrong length")
    try:
        plain = box.decrypt(ciphertext, nonce)
    except nacl.exceptions.CryptoError:
        raise ProtocolError("the box does not open: the sender does not hold its key", reason=reason) from None
    inner = _parse(plain)
    return inner


# --- server side -------------------------------------------------------------------------


def hello(server_key: str, challenge: bytes, ask: dict[str, Any] | None = None) -> bytes:
    """ask: what evidence this server wants of its clients (its verifier's), if it attests them."""
    return _line({"sptun": VERSION, "key": server_key, "challenge": _b64(challenge)} | ({"attest": ask} if ask is not None else {}))


@dataclass(frozen=True)
class EvidenceRequest:
    """An agent's request for the server's own evidence, before its registration."""

    challenge: bytes
    client_key: str
    domain: str
    ask: dict[str, Any]


def parse_evidence_request(line: bytes) -> EvidenceRequest | None:
    """The request, if this line is one (else it is the registration itself)."""
    obj = _parse(line)
    if "attest" not in obj:
        return None
    challenge = _unb64(obj["attest"], "attest")
    key, domain, ask = obj.get("key"), obj.get("domain"), obj.get("ask")
    if len(challenge) != CHALLENGE_LEN:
        raise ProtocolError("attest has the wrong length")
    if not isinstance(key, str) or canonical_key(key) != key:
        raise ProtocolError("key is not a base64 WireGuard key")
    if not isinstance(domain, str) or not 0 < len(domain) <= 253 or not isinstance(ask, dict):
        raise ProtocolError("domain or ask is missing")
    return EvidenceRequest(challenge, key, domain.lower().rstrip("."), ask)


def evidence_reply(evidence: dict[str, Any]) -> bytes:
    return _line({"evidence": evidence})


def open_request(line: bytes, server_private: str, challenge: bytes) -> Claim:
    """Check a request's form, its proof of key and its challenge. The proof of the token
    is checked by the caller, which knows the domains' tokens (Claim.proves)."""
    obj = _parse(line)
    key = obj.get("key")
    if not isinstance(key, str):  # (a list or a dict would not be a cache key)
        raise ProtocolError("key is not a base64 WireGuard key")
    inner = _open(_box(server_private, key, "key"), obj, reason="unproven-key")
    got = _unb64(inner.get("challenge"), "challenge")
    if not hmac.compare_digest(got, challenge):
        raise ProtocolError("the challenge does not match (a replayed registration?)", reason="replay")
    op, domain = inner.get("op"), inner.get("domain")
    if op not in OPS:
        raise ProtocolError(f"op must be one of {', '.join(OPS)}")
    if not isinstance(domain, str) or not 0 < len(domain) <= 253:
        raise ProtocolError("domain is missing")
    proof = _unb64(inner.get("proof"), "proof")
    if len(proof) != hashlib.sha256().digest_size:
        raise ProtocolError("proof has the wrong length")
    return Claim(op, domain.lower().rstrip("."), key, proof, inner.get("ipv6") is not False, inner.get("evidence"))


def accept(assignment: Assignment | None, server_private: str, client_key: str, challenge: bytes, op: str) -> bytes:
    """A sealed answer to this challenge and op: the assignment for a registration, none
    for a deregistration."""
    box = _box(server_private, client_key, "key")
    body: dict[str, Any] | None = None
    if assignment:
        body = {"overlay_ip": assignment.overlay_ip, "server_ip": assignment.server_ip,
                "server_key": assignment.server_key, "prefixlen": assignment.prefixlen, "seen": assignment.seen}
        if assignment.overlay_ip6:
            body |= {"overlay_ip6": assignment.overlay_ip6, "server_ip6": assignment.server_ip6,
                     "prefixlen6": assignment.prefixlen6}
    return _line({"ok": True, **_seal(box, {"op": op, "challenge": _b64(challenge), "assignment": body})})


def reject(reason: str, error: str) -> bytes:
    return _line({"ok": False, "reason": reason, "error": error})


# --- agent side --------------------------------------------------------------------------


def seal_request(request: Request, client_private: str, server_key: str, challenge: bytes,
                 evidence: dict[str, Any] | None = None) -> bytes:
    box = _box(client_private, server_key, "server key")
    proof = token_proof(request.token, request.op, request.domain, server_key, request.client_key, challenge)
    inner: dict[str, Any] = {"op": request.op, "domain": request.domain, "challenge": _b64(challenge), "proof": _b64(proof)}
    if not request.ipv6:  # said only when not, so that the common request stays as it was
        inner["ipv6"] = False
    if evidence is not None:
        inner["evidence"] = evidence
    return _line({"key": request.client_key, **_seal(box, inner)})


def parse_hello(line: bytes) -> tuple[str, bytes]:
    hello = read_hello(line)
    return hello.key, hello.challenge


@dataclass(frozen=True)
class Hello:
    key: str
    challenge: bytes
    ask: dict[str, Any] | None  # the evidence the server wants, if it attests its clients


def read_hello(line: bytes) -> Hello:
    obj = _parse(line)
    if obj.get("sptun") != VERSION:
        seen = obj.get("sptun")
        raise ProtocolError(f"the server speaks sptun protocol {seen}, not {VERSION}: upgrade the older side"
                            if isinstance(seen, int) else f"not an sptun {VERSION} server", reason="version")
    _public(obj.get("key"), "server key")
    challenge = _unb64(obj.get("challenge"), "challenge")
    if len(challenge) != CHALLENGE_LEN:
        raise ProtocolError("challenge has the wrong length")
    ask = obj.get("attest")
    if ask is not None and not isinstance(ask, dict):
        raise ProtocolError("attest is not an object")
    return Hello(obj["key"], challenge, ask)


def open_reply(line: bytes, client_private: str, server_key: str, challenge: bytes, op: str) -> Assignment | None:
    """The server's answer to this challenge and op; an old or another op's is refused."""
    obj = _parse(line)
    if obj.get("ok") is not True:
        reason, error = printable(obj.get("reason", "refused"), 64), printable(obj.get("error", "refused"), 200)
        raise ProtocolError(f"server refused: {error}", reason=reason)
    inner = _open(_box(client_private, server_key, "server key"), obj, reason="unproven-key")
    got = _unb64(inner.get("challenge"), "challenge")
    if not hmac.compare_digest(got, challenge) or inner.get("op") != op:
        raise ProtocolError("the reply answers another request (a replayed reply?)", reason="replay")
    body = inner.get("assignment")
    if op == "deregister" or body is None:
        return None
    if not isinstance(body, dict):
        raise ProtocolError("assignment is not an object")
    try:
        v6 = body.get("overlay_ip6") is not None
        return Assignment(str(body["overlay_ip"]), str(body["server_ip"]), str(body["server_key"]), int(body["prefixlen"]),
                          body.get("seen") is not False, str(body["overlay_ip6"]) if v6 else None,
                          str(body["server_ip6"]) if v6 else None, int(body["prefixlen6"]) if v6 else None)
    except (KeyError, ValueError, TypeError, OverflowError):  # OverflowError: int(Infinity)
        raise ProtocolError("assignment is incomplete") from None


@dataclass(frozen=True)
class Pin:
    """The key a server must present, and why (DNS's pk=, or the key it showed first)."""

    key: str
    why: str


def _check_pinned(host: str, server_key: str, pin: Pin | None) -> None:
    if pin is not None and canonical_key(pin.key) != server_key:
        raise ProtocolError(f"server {host} presents key {server_key}, but {pin.why}", reason="wrong-server-key")


def _unreachable(host: str, port: int, e: OSError | TimeoutError) -> SptunError:
    detail = getattr(e, "strerror", None) or str(e) or "timed out"
    if getattr(e, "errno", None) == errno.ENETUNREACH:  # no route of that family: an IPv6-only network, say
        family = "IPv6" if ":" in host else "IPv4"
        return SptunError(f"cannot reach {host}:{port}: this host has no {family} route there",
                          hint=f"this server is published by an {family} address only; give it a record "
                               "of this host's family in DNS, or give this host that family")
    return SptunError(f"cannot reach {host}:{port}: {detail}",
                      hint="is `sptun server run` up there, and the api port open?")


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(left)
        chunk = sock.recv(MAX_MESSAGE + 1 - len(buf))
        if not chunk:
            raise ProtocolError("connection closed mid-message")
        buf += chunk
        if len(buf) > MAX_MESSAGE:
            raise ProtocolError("reply too large", reason="oversized")
    return buf


def exchange(host: str, port: int, request: Request, client_private: str, pin: Pin | None = None,
             timeout: float = 5.0) -> tuple[str, Assignment | None]:
    """One registration round trip, all of it within `timeout` seconds (a server that
    accepts and then trickles or never answers costs no more). Returns the server's key and
    its assignment."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            server_key, challenge = parse_hello(_read_line(sock, deadline))
            _check_pinned(host, server_key, pin)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(seal_request(request, client_private, server_key, challenge))
            return server_key, open_reply(_read_line(sock, deadline), client_private, server_key, challenge, request.op)
    except OSError as e:
        raise _unreachable(host, port, e) from None


@dataclass(frozen=True)
class Attestation:
    """An agent's side of attestation in its exchanges."""

    prover: attest.Prover | None = None  # presents evidence to a server that asks for it
    verifier: attest.Verifier | None = None  # checks each server's evidence before registering
    require_server: bool = False  # False: a server that fails the check is logged, not refused
    verdicts: dict[str, attest.Verdict] = field(default_factory=dict, compare=False)  # host -> the last check


async def _check_server(host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server_key: str,
                        request: Request, attestation: Attestation) -> None:
    """Ask the server for its evidence over our own challenge, and check it, before anything of ours is sent."""
    assert attestation.verifier is not None
    mine = nacl.utils.random(CHALLENGE_LEN)
    ask = attestation.verifier.ask()
    writer.write(_line({"attest": _b64(mine), "key": request.client_key, "domain": request.domain, "ask": ask}))
    obj = _parse(await _read_line_async(reader))
    if obj.get("ok") is False:
        verdict = attest.Verdict(False, "it presents no evidence: " + printable(obj.get("error", "refused"), 200))
    else:
        nonce = attest.nonce(mine, server_key, request.client_key, request.domain)
        verdict = await attestation.verifier.verify(obj.get("evidence"), nonce, server_key, request.domain)
    attestation.verdicts[host] = verdict
    if not verdict.ok and attestation.require_server:
        raise ProtocolError(f"server {host} fails attestation: {verdict.detail}", reason="server-attestation")


async def exchange_async(host: str, port: int, request: Request, client_private: str, pin: Pin | None = None,
                         timeout: float = 5.0, attestation: Attestation | None = None) -> tuple[str, Assignment | None]:
    """exchange() on the event loop: no thread per registration, and the deadline covers
    the whole round trip, however slowly the server accepts, trickles or stays silent."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_MESSAGE + 1)
            hello = read_hello(await _read_line_async(reader))
            server_key, challenge = hello.key, hello.challenge
            _check_pinned(host, server_key, pin)
            evidence = None
            if attestation is not None and request.op == "register":
                if attestation.verifier is not None:
                    await _check_server(host, reader, writer, server_key, request, attestation)
                if attestation.prover is not None and hello.ask is not None:
                    nonce = attest.nonce(challenge, request.client_key, server_key, request.domain)
                    evidence = await attestation.prover.evidence(nonce, hello.ask)
            writer.write(seal_request(request, client_private, server_key, challenge, evidence))
            await writer.drain()
            return server_key, open_reply(await _read_line_async(reader), client_private, server_key, challenge, request.op)
    except (OSError, TimeoutError) as e:
        raise _unreachable(host, port, e) from None
    finally:
        if writer is not None:
            writer.close()


async def _read_line_async(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise ProtocolError("reply too large", reason="oversized") from None
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed mid-message") from None
    if len(line) > MAX_MESSAGE:
        raise ProtocolError("reply too large", reason="oversized")
    return line
