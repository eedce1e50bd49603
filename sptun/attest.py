"""Attested joins: evidence of what runs behind a WireGuard key, bound to one registration.

A verifier (the server, or an agent that checks its servers) sends a fresh challenge; the
prover answers with evidence whose nonce is `nonce(challenge, prover_key, verifier_key,
domain)`. A quote made for one exchange therefore proves nothing in another, nor for
another key: replayed or moved evidence fails its nonce.

Provers and verifiers are named by `attestation` / `verify` in the config:

- "tpm2", built in: a TPM 2.0 quote (tpm2-tools) by an attestation key (AK) kept in the
  TPM at a persistent handle. The verifier checks it with `tpm2_checkquote` against an
  enrolled AK (one PEM file per key in the `enrolled` directory, put there by the
  operator), checks the quoted PCR selection itself, and compares the PCR values with the
  reference values of its config.
- a command (an absolute path, with arguments): the prover's gets `{"nonce": HEX, "ask":
  {...}}` on stdin and prints its evidence on one line; the verifier's gets `{"nonce": HEX,
  "evidence": ..., "key": ..., "domain": ...}` and answers with its exit code (0: valid)
  and one line (what it verified, or why not). This is how an Intel TDX, AMD SEV-SNP or SGX
  quote plugs in: the prover command asks the TEE for a report over the nonce (the
  nonce is the 32 bytes of report data), the verifier command checks it with the vendor's
  library and collateral.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import re
import shlex
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sptun.errors import CommandError, SptunError, printable
from sptun.run import run

log = logging.getLogger("sptun")

BUILTINS = ("tpm2",)
AK_HANDLE = "0x81010002"  # the persistent handle of sptun's AK (0x81010001 is the EK's by convention)
TIMEOUT = 10.0  # s for one quote or one check (a hardware TPM signs in tenths of a second; TDX's quoting service in about one)
PROVISION_TIMEOUT = 120.0  # s for each step of making the AK: an RSA key generation, slow on a TPM chip
# s a registration may take beyond its usual deadline when evidence is made or checked
# (both ends allow it: the agent's deadline, and the server's wait for the request).
EXCHANGE_GRACE = 15.0
# bytes of a command's evidence line: what a registration (proto.MAX_MESSAGE, base64 of a
# sealed box) has room for beside the rest. A TDX quote fits; its collateral is the verifier's to fetch.
MAX_EVIDENCE = 10 * 1024
MAX_ENROLLED = 10_000  # AK files read from an enrolled directory
CONCURRENT = 8  # quotes or checks at once; more wait (a flood of registrations must not fork a flood)


def nonce(challenge: bytes, prover_key: str, verifier_key: str, domain: str) -> bytes:
    """The 32 bytes a prover's evidence must cover in this exchange."""
    bound = json.dumps(["sptun-attest", base64.b64encode(challenge).decode(), prover_key, verifier_key, domain],
                       separators=(",", ":")).encode()
    return hashlib.sha256(bound).digest()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str  # one line: what was verified, or why not
    measurements: dict[str, str] = field(default_factory=dict)  # "sha256:16" -> hex, when verified


def _always() -> bool:
    return True


class Prover(Protocol):
    async def evidence(self, nonce: bytes, ask: dict[str, Any], wanted: Callable[[], bool] = _always) -> dict[str, Any]:
        """wanted: whether the verifier still waits (checked when the quote's turn comes)."""
        ...


class Verifier(Protocol):
    def ask(self) -> dict[str, Any]: ...

    async def verify(self, evidence: Any, nonce: bytes, key: str, domain: str) -> Verdict: ...


async def _run(argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None,
               wanted: Callable[[], bool] = _always) -> str:
    """run() on the event loop, as a child process rather than a thread (the daemon's
    threads apply its changes), at most CONCURRENT at once and each within TIMEOUT. Not
    once its turn comes if no one wants it any more: under a slow TPM, quotes for agents
    that gave up would make every later one wait past its agent's deadline too."""
    log.debug("[#] %s", shlex.join(argv))
    async with _slots():
        if not wanted():
            raise ConnectionAbortedError(f"{argv[0]}: the verifier hung up while it waited its turn")
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                        env=env)
        except FileNotFoundError:
            raise SptunError(f"{argv[0]} not found", hint=f"install the package that provides {argv[0]}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else b""), TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SptunError(f"{argv[0]} did not finish in {TIMEOUT:g} s") from None
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode or 0, err.decode(errors="replace"), out.decode(errors="replace"))
    return out.decode(errors="replace")


_semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def _slots() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    if loop not in _semaphores:
        _semaphores.clear()  # one daemon, one loop; tests start others
        _semaphores[loop] = asyncio.Semaphore(CONCURRENT)
    return _semaphores[loop]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _field(evidence: dict[str, Any], name: str, limit: int = 4096) -> bytes:
    value = evidence.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SptunError(f"evidence field {name} is missing or not base64") from None
    if len(raw) > limit:
        raise SptunError(f"evidence field {name} is too large")
    return raw


def fingerprint_pem(pem: str) -> str:
    """sha256 of a PEM public key's DER: the name of an AK in evidence and in `status`."""
    body = "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise SptunError("not a PEM public key") from None
    if not der:
        raise SptunError("not a PEM public key")
    return hashlib.sha256(der).hexdigest()


# --- TPM 2.0 -----------------------------------------------------------------------------

_SELECTION = re.compile(r"sha256:(\d{1,2})(,\d{1,2})*")


class Tpm2Prover:
    """Quotes with sptun's AK, made in the TPM on first use and kept at AK_HANDLE. The TPM is
    the one tpm2-tools finds (TPM2TOOLS_TCTI, else /dev/tpmrm0). Its public half is written to
    `state_dir/attestation-key.pem`: the file an operator enrols with servers."""

    def __init__(self, state_dir: Path, tcti: str | None = None) -> None:
        self.pem_path = state_dir / "attestation-key.pem"
        self.fingerprint = ""
        self.env = {**os.environ, "TPM2TOOLS_TCTI": tcti} if tcti else None  # None: the process's own
        # One quote at a time: a TPM runs one command at a time, and a TCTI with no resource
        # manager (swtpm's socket, /dev/tpm0) refuses a second client meanwhile. An agent
        # registers with all its servers at once.
        self.lock = asyncio.Lock()

    def _tpm(self, *argv: str) -> str:
        return run(list(argv), timeout=PROVISION_TIMEOUT, env=self.env)

    def provision(self) -> str:
        """The AK's fingerprint, after making the AK if the TPM has none. Blocking."""
        with tempfile.TemporaryDirectory(prefix="sptun-tpm-") as tmp:
            pem = Path(tmp) / "ak.pem"
            try:
                self._tpm("tpm2_readpublic", "-c", AK_HANDLE, "-f", "pem", "-o", str(pem))
            except CommandError:  # none yet: an AK under the endorsement key, made persistent
                ek, ak = str(Path(tmp) / "ek.ctx"), str(Path(tmp) / "ak.ctx")
                self._tpm("tpm2_createek", "-c", ek, "-G", "rsa", "-u", str(Path(tmp) / "ek.pub"))
                self._tpm("tpm2_createak", "-C", ek, "-c", ak, "-G", "rsa", "-g", "sha256", "-s", "rsassa",
                          "-u", str(Path(tmp) / "ak.pub"), "-f", "pem", "-n", str(Path(tmp) / "ak.name"))
                self._tpm("tpm2_flushcontext", "-t")  # a TPM has room for few loaded objects
                self._tpm("tpm2_evictcontrol", "-C", "o", "-c", ak, AK_HANDLE)
                self._tpm("tpm2_flushcontext", "-t")
                self._tpm("tpm2_readpublic", "-c", AK_HANDLE, "-f", "pem", "-o", str(pem))
                log.info("made a TPM attestation key at %s", AK_HANDLE)
            text = pem.read_text()
        old = self.pem_path.read_text() if self.pem_path.exists() else None
        if old != text:
            self.pem_path.write_text(text)
            self.pem_path.chmod(0o644)  # a public key, meant to be copied to the servers
        self.fingerprint = fingerprint_pem(text)
        if old is not None and old != text:
            log.warning("the TPM's attestation key changed: enrol %s (%s) with the servers again",
                        self.pem_path, self.fingerprint)
        return self.fingerprint

    async def evidence(self, nonce: bytes, ask: dict[str, Any], wanted: Callable[[], bool] = _always) -> dict[str, Any]:
        selection = ask.get("pcrs")
        if not isinstance(selection, str) or not _SELECTION.fullmatch(selection):
            raise SptunError(f"the verifier asks for a PCR selection sptun does not quote: {printable(selection, 60)}")
        with tempfile.TemporaryDirectory(prefix="sptun-quote-") as tmp:
            m, s, p = (str(Path(tmp) / n) for n in ("msg", "sig", "pcrs"))
            async with self.lock:
                if not self.fingerprint:  # the TPM was not there at start
                    await asyncio.to_thread(self.provision)
                await _run(["tpm2_quote", "-c", AK_HANDLE, "-l", selection, "-q", nonce.hex(),
                            "-m", m, "-s", s, "-o", p, "-g", "sha256"], env=self.env, wanted=wanted)
            return {"kind": "tpm2", "ak": self.fingerprint, "message": _b64(Path(m).read_bytes()),
                    "signature": _b64(Path(s).read_bytes()), "pcrs": _b64(Path(p).read_bytes())}


async def provision(prover: Prover | None) -> None:
    """Make a TPM prover's key at start, so that the operator (and `status`) sees it at once."""
    if isinstance(prover, Tpm2Prover):
        try:
            fp = await asyncio.to_thread(prover.provision)
            log.info("attestation key %s (%s): enrol it where this host's evidence is verified", prover.pem_path, fp)
        except SptunError as e:
            log.error("attestation: %s", e)


def quote_info(message: bytes) -> tuple[bytes, list[tuple[int, set[int]]]]:
    """The nonce (extraData) and PCR selection a TPMS_ATTEST quote message states."""
    try:
        magic, kind = struct.unpack_from(">IH", message, 0)
        if magic != 0xFF544347 or kind != 0x8018:  # TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE
            raise SptunError("the evidence is not a TPM quote")
        at = 6
        (n,) = struct.unpack_from(">H", message, at)
        at += 2 + n  # qualifiedSigner
        (n,) = struct.unpack_from(">H", message, at)
        extra = message[at + 2:at + 2 + n]
        at += 2 + n + 17 + 8  # clockInfo, firmwareVersion
        (count,) = struct.unpack_from(">I", message, at)
        at += 4
        if count > 16:
            raise SptunError("the quote selects too many banks")
        selection = []
        for _ in range(count):
            alg, size = struct.unpack_from(">HB", message, at)
            bits = int.from_bytes(message[at + 3:at + 3 + size], "little")
            selection.append((alg, {i for i in range(8 * size) if bits >> i & 1}))
            at += 3 + size
    except struct.error:
        raise SptunError("the quote message is truncated") from None
    return extra, selection


_PCR_LINE = re.compile(r"\s+(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*")
_BANK_LINE = re.compile(r"  (\w+):\s*")
TPM_ALG_SHA256 = 0x000B


class Tpm2Verifier:
    """Checks a quote by an enrolled AK over exactly the reference PCRs (sha256 bank)."""

    def __init__(self, enrolled: Path, reference: dict[int, str]) -> None:
        self.enrolled = enrolled
        self.reference = {i: v.lower() for i, v in reference.items()}
        self._keys: dict[str, Path] = {}
        self._seen: tuple[int, int] | None = None  # the enrolled directory's (mtime, size) when read

    def ask(self) -> dict[str, Any]:
        return {"pcrs": "sha256:" + ",".join(str(i) for i in sorted(self.reference))}

    def enrolled_keys(self) -> dict[str, Path]:
        """fingerprint -> PEM file, read again when the directory changes."""
        try:
            st = self.enrolled.stat()
        except OSError:
            return {}
        if self._seen != (st.st_mtime_ns, st.st_size):
            keys: dict[str, Path] = {}
            for path in sorted(self.enrolled.glob("*.pem"))[:MAX_ENROLLED]:
                try:
                    keys[fingerprint_pem(path.read_text())] = path
                except (OSError, UnicodeDecodeError, SptunError) as e:
                    log.warning("attestation: %s is not a PEM public key; skipped (%s)", path, e)
            self._keys, self._seen = keys, (st.st_mtime_ns, st.st_size)
        return self._keys

    async def verify(self, evidence: Any, nonce: bytes, key: str, domain: str) -> Verdict:
        try:
            return await self._verify(evidence, nonce)
        except SptunError as e:
            return Verdict(False, e.message)

    async def _verify(self, evidence: Any, nonce: bytes) -> Verdict:
        if not isinstance(evidence, dict) or evidence.get("kind") != "tpm2":
            raise SptunError("no TPM quote was presented")
        fp = evidence.get("ak")
        pem = self.enrolled_keys().get(fp) if isinstance(fp, str) else None
        if pem is None:
            raise SptunError(f"attestation key {printable(fp, 64)} is not enrolled "
                             f"(copy its attestation-key.pem into {self.enrolled})")
        message, signature, pcrs = _field(evidence, "message"), _field(evidence, "signature"), _field(evidence, "pcrs")
        extra, selection = quote_info(message)
        if extra != nonce:
            raise SptunError("the quote is for another exchange (its nonce differs: replayed, or for another key)")
        if selection != [(TPM_ALG_SHA256, set(self.reference))]:
            raise SptunError(f"the quote covers other PCRs than the reference ({self.ask()['pcrs']})")
        with tempfile.TemporaryDirectory(prefix="sptun-check-") as tmp:
            m, s, p = (Path(tmp) / n for n in ("msg", "sig", "pcrs"))
            m.write_bytes(message), s.write_bytes(signature), p.write_bytes(pcrs)
            try:
                out = await _run(["tpm2_checkquote", "-u", str(pem), "-m", str(m), "-s", str(s), "-f", str(p),
                                  "-g", "sha256", "-q", nonce.hex()])
            except CommandError:
                raise SptunError(f"the quote's signature or PCR digest does not verify with {pem.name}") from None
        values = _quoted_values(out)
        for i, want in sorted(self.reference.items()):
            got = values.get(i)
            if got != want:
                raise SptunError(f"PCR sha256:{i} is {printable(got, 70) if got else 'not in the evidence'}, "
                                  f"not the reference {want[:16]}…")
        measured = {f"sha256:{i}": v for i, v in sorted(values.items())}
        return Verdict(True, f"tpm2 quote by {pem.name}: PCRs {self.ask()['pcrs']} match the reference", measured)


def _quoted_values(out: str) -> dict[int, str]:
    """The sha256 bank's values as `tpm2_checkquote` prints them (from the checked quote)."""
    values: dict[int, str] = {}
    bank = ""
    for line in out.splitlines():
        if m := _BANK_LINE.fullmatch(line):
            bank = m.group(1)
        elif (m := _PCR_LINE.fullmatch(line)) and bank == "sha256":
            values[int(m.group(1))] = m.group(2).lower()
    return values


# --- commands ----------------------------------------------------------------------------


def _one_line(out: str) -> str:
    lines = out.strip().splitlines()
    return lines[0] if lines else ""


class CommandProver:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    async def evidence(self, nonce: bytes, ask: dict[str, Any], wanted: Callable[[], bool] = _always) -> dict[str, Any]:
        out = _one_line(await _run(self.argv, json.dumps({"nonce": nonce.hex(), "ask": ask}) + "\n", wanted=wanted))
        if not out or len(out) > MAX_EVIDENCE:
            raise SptunError(f"{self.argv[0]} printed no evidence, or more than {MAX_EVIDENCE} bytes")
        return {"kind": "command", "data": out}


class CommandVerifier:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def ask(self) -> dict[str, Any]:
        return {}

    async def verify(self, evidence: Any, nonce: bytes, key: str, domain: str) -> Verdict:
        if not isinstance(evidence, dict) or evidence.get("kind") != "command":
            return Verdict(False, "no evidence was presented")
        stdin = json.dumps({"nonce": nonce.hex(), "evidence": evidence.get("data"), "key": key, "domain": domain})
        try:
            out = await _run(self.argv, stdin + "\n")
        except CommandError as e:
            return Verdict(False, printable(_one_line(e.stdout) or f"{self.argv[0]} exited {e.returncode}", 200))
        except SptunError as e:
            return Verdict(False, e.message)
        return Verdict(True, printable(_one_line(out) or "verified", 200))


# --- configuration -----------------------------------------------------------------------


def command_argv(value: str) -> list[str] | None:
    """A command's argv, if `value` names one (an absolute path, then arguments)."""
    try:
        argv = shlex.split(value)
    except ValueError:
        return None
    return argv if argv and argv[0].startswith("/") else None


def make_prover(name: str, state_dir: Path) -> Prover:
    if name == "tpm2":
        return Tpm2Prover(state_dir)
    argv = command_argv(name)
    assert argv is not None  # the config checked
    return CommandProver(argv)


@dataclass(frozen=True)
class AttestationConfig:
    """`[attestation]` (server) or `[server_attestation]` (agent): what to verify and how."""

    require: bool = False
    verify: str = "tpm2"
    enrolled: Path = Path("/etc/sptun/attestation")
    pcrs: tuple[tuple[int, str], ...] = ()  # the tpm2 reference: (index, hex) in the sha256 bank
    evidence: str | None = None  # server: what it presents to agents that ask
    # server, with require: a client whose last good evidence is older than this (it stopped
    # registering, and so stopped proving what it runs) leaves its rotation. Well above the
    # 10 s between registrations: an overloaded server whose checks time out must not drain
    # its good clients (in the emulated VM, 60 s did, all of them at once).
    max_age: float = 600.0

    def verifier(self) -> Verifier:
        if self.verify == "tpm2":
            return Tpm2Verifier(self.enrolled, dict(self.pcrs))
        argv = command_argv(self.verify)
        assert argv is not None
        return CommandVerifier(argv)
