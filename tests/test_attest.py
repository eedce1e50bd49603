"""Attested joins with a real TPM (swtpm) and tpm2-tools: evidence bound to one exchange
and one key, checked against enrolled keys and reference PCRs, at every registration."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from fakes import FakeKernel
from sptun import attest, proto
from sptun.attest import Tpm2Prover, Tpm2Verifier
from sptun.errors import ConfigError, ProtocolError, SptunError
from sptun.keys import generate_private_key, public_key
from sptun.config import load_agent, load_server
from sptun.discovery import ServerRecord
from sptun.server import Server
from sptun.server.health import Health
from sptun.snapshot import to_json
from sptun.status import render
from test_roles import DOMAIN, run, serving, token
from test_security import make_server, secret_of

ZERO = "00" * 32
REFERENCE = {0: ZERO, 16: ZERO}  # a fresh swtpm: nothing measured yet


@dataclass
class Tpm:
    """One software TPM, with sptun's AK made in it."""

    tcti: str
    prover: Tpm2Prover
    proc: subprocess.Popen[bytes]

    def extend(self, pcr: int) -> None:
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        subprocess.run(["tpm2_pcrextend", f"{pcr}:sha256={'ab' * 32}"], env=env, check=True, capture_output=True)

    def enrol(self, enrolled: Path, name: str) -> None:
        enrolled.mkdir(exist_ok=True)
        shutil.copy(self.prover.pem_path, enrolled / f"{name}.pem")


def start_tpm(where: Path) -> Tpm:
    where.mkdir(parents=True)
    sock = where / "tpm.sock"
    proc = subprocess.Popen(["swtpm", "socket", "--tpmstate", f"dir={where}", "--tpm2",
                             "--server", f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={sock}.ctrl",
                             "--flags", "not-need-init,startup-clear"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not Path(f"{sock}.ctrl").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    prover = Tpm2Prover(where, tcti=f"swtpm:path={sock}")
    prover.provision()
    return Tpm(f"swtpm:path={sock}", prover, proc)


@pytest.fixture
def tpms(tmp_path: Path) -> Iterator[list[Tpm]]:
    """Three software TPMs: a client's, another client's, a server's."""
    started = []
    try:
        for name in ("c1", "c2", "s1"):
            started.append(start_tpm(tmp_path / f"tpm-{name}"))
        yield started
    finally:
        for t in started:
            t.proc.terminate()
            t.proc.wait(10)


def check(verifier: Tpm2Verifier, evidence: object, nonce: bytes) -> attest.Verdict:
    return asyncio.run(verifier.verify(evidence, nonce, "key", DOMAIN))


def tpm2_checkquote_alone(tpm: Tpm, evidence: dict[str, object], nonce: bytes) -> bool:
    files = {}
    for name in ("message", "signature", "pcrs"):
        files[name] = tpm.prover.pem_path.with_name(name)
        files[name].write_bytes(base64.b64decode(evidence[name]))  # type: ignore[arg-type]
    return subprocess.run(["tpm2_checkquote", "-u", str(tpm.prover.pem_path), "-m", str(files["message"]),
                           "-s", str(files["signature"]), "-f", str(files["pcrs"]), "-g", "sha256", "-q", nonce.hex()],
                          capture_output=True).returncode == 0


def quote(tpm: Tpm, nonce: bytes, pcrs: str = "sha256:0,16") -> dict[str, object]:
    return asyncio.run(tpm.prover.evidence(nonce, {"pcrs": pcrs}))


# --- the built-in tpm2 verifier ------------------------------------------------------------------


def test_a_quote_verifies_only_for_its_own_exchange_key_and_measurements(tmp_path: Path, tpms: list[Tpm]) -> None:
    c1, c2, _ = tpms
    enrolled = tmp_path / "enrolled"
    c1.enrol(enrolled, "c1")
    verifier = Tpm2Verifier(enrolled, REFERENCE)
    challenge = os.urandom(32)
    mine = attest.nonce(challenge, "client-key", "server-key", DOMAIN)
    evidence = quote(c1, mine)
    good = check(verifier, evidence, mine)
    assert good.ok, good
    assert good.measurements == {"sha256:0": ZERO, "sha256:16": ZERO}
    assert len(json.dumps(evidence)) < proto.MAX_MESSAGE // 4  # room in a registration

    # Replayed into another exchange (a new challenge), or moved to another key or domain.
    for other in (attest.nonce(os.urandom(32), "client-key", "server-key", DOMAIN),
                  attest.nonce(challenge, "another-key", "server-key", DOMAIN),
                  attest.nonce(challenge, "client-key", "another-server", DOMAIN),
                  attest.nonce(challenge, "client-key", "server-key", "other.example.test")):
        assert "another exchange" in check(verifier, evidence, other).detail

    # An AK that was never enrolled, however valid its quote.
    unknown = check(verifier, quote(c2, mine), mine)
    assert not unknown.ok and "is not enrolled" in unknown.detail and str(enrolled) in unknown.detail

    # A tampered signature, and a quote over other PCRs.
    forged = dict(evidence, signature=quote(c1, os.urandom(32))["signature"])
    assert "does not verify" in check(verifier, forged, mine).detail
    assert "other PCRs" in check(verifier, quote(c1, mine, "sha256:0,1"), mine).detail
    # PCR 16 measured something else; a quote over 0 and 1 (both as the reference) whose PCR
    # file claims 0 and 16. tpm2_checkquote passes it (the file's values match the quote's
    # digest, and it does not compare the selections): sptun compares the quote's own.
    c1.extend(16)
    forged = quote(c1, mine, "sha256:0,1")
    pcrs = bytearray(base64.b64decode(forged["pcrs"]))  # type: ignore[arg-type]
    assert pcrs[4:10] == bytes([0x0B, 0, 3, 0b11, 0, 0])  # one sha256 selection of 3 bytes: PCRs 0 and 1
    pcrs[7:10] = bytes([0b1, 0, 0b1])  # now "0 and 16"
    forged["pcrs"] = base64.b64encode(pcrs).decode()
    assert tpm2_checkquote_alone(c1, forged, mine) and "other PCRs" in check(verifier, forged, mine).detail

    # The measurements changed (PCR 16 extended above).
    changed = check(verifier, quote(c1, mine), mine)
    assert not changed.ok and "PCR sha256:16 is" in changed.detail
    assert check(verifier, evidence, mine).ok  # (the old quote is still a true statement of then)


def test_evidence_that_is_not_a_quote_is_refused_with_one_line(tmp_path: Path, tpms: list[Tpm]) -> None:
    c1 = tpms[0]
    c1.enrol(tmp_path / "enrolled", "c1")
    verifier = Tpm2Verifier(tmp_path / "enrolled", REFERENCE)
    n = os.urandom(32)
    good = quote(c1, n)
    for bad, says in [(None, "no TPM quote"), ("x", "no TPM quote"), ({"kind": "tpm2"}, "not enrolled"),
                      (dict(good, message="!!"), "not base64"), (dict(good, message="AAAA"), "truncated"),
                      (dict(good, message=good["signature"]), "not a TPM quote")]:
        verdict = check(verifier, bad, n)
        assert not verdict.ok and says in verdict.detail and "\n" not in verdict.detail


# --- command verifiers and provers ----------------------------------------------------------------


def script(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\nimport json, sys\n{body}\n")
    path.chmod(stat.S_IRWXU)
    return str(path)


def test_a_command_prover_and_verifier_see_the_nonce_and_answer_with_exit_code_and_a_line(tmp_path: Path) -> None:
    prover = attest.CommandProver([script(tmp_path / "prove", 'print(json.dumps({"report": json.load(sys.stdin)["nonce"]}))')])
    verifier = attest.CommandVerifier([script(tmp_path / "verify", """
req = json.load(sys.stdin)
ok = json.loads(req["evidence"])["report"] == req["nonce"]
print("report data matches" if ok else "report data is for another nonce")
sys.exit(0 if ok else 1)""")])
    n = os.urandom(32)
    evidence = asyncio.run(prover.evidence(n, verifier.ask()))
    assert asyncio.run(verifier.verify(evidence, n, "k", DOMAIN)) == attest.Verdict(True, "report data matches")
    assert asyncio.run(verifier.verify(evidence, os.urandom(32), "k", DOMAIN)) == \
        attest.Verdict(False, "report data is for another nonce")
    assert not asyncio.run(verifier.verify(None, n, "k", DOMAIN)).ok


def test_the_largest_evidence_a_command_may_print_fits_in_a_registration(tmp_path: Path) -> None:
    n = os.urandom(32)
    for size, fits in ((attest.MAX_EVIDENCE, True), (attest.MAX_EVIDENCE + 1, False)):
        prover = attest.CommandProver([script(tmp_path / f"prove{size}", f'print("A" * {size})')])
        if not fits:
            with pytest.raises(SptunError, match="more than"):
                asyncio.run(prover.evidence(n, {}))
            continue
        evidence = asyncio.run(prover.evidence(n, {}))
        key = generate_private_key()
        request = proto.Request("register", "x" * 253, "t" * 40, public_key(key))
        line = proto.seal_request(request, key, public_key(generate_private_key()), os.urandom(32), evidence)
        assert len(line) <= proto.MAX_MESSAGE


def test_a_quote_for_a_verifier_that_hung_up_while_it_waited_is_not_made(tmp_path: Path) -> None:
    """A slow TPM and agents that give up (their exchange's deadline): the quotes queued for
    them are skipped when their turn comes, so they do not push the agents still waiting past
    their own deadlines (seen in the VM tier: registrations timing out round after round)."""
    made = tmp_path / "made"
    prover = attest.CommandProver([script(tmp_path / "prove", f'import time\nopen("{made}", "a").write("q")\n'
                                                               'time.sleep(0.3)\nprint("E")')])

    async def scenario() -> list[object]:
        gone = False
        quotes = [asyncio.create_task(prover.evidence(os.urandom(32), {}, wanted=lambda: not gone))
                  for _ in range(attest.CONCURRENT + 3)]
        await asyncio.sleep(0.1)  # CONCURRENT quotes run; the rest wait their turn
        gone = True  # and their agents hang up
        return await asyncio.gather(*quotes, return_exceptions=True)

    results = asyncio.run(scenario())
    assert sum(isinstance(r, ConnectionAbortedError) for r in results) == 3
    assert sum(r == {"kind": "command", "data": "E"} for r in results) == attest.CONCURRENT
    assert made.read_text() == "q" * attest.CONCURRENT


# --- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("table, says", [
    ('verify = "tpm2"', "attestation.pcrs: is missing"),
    ('verify = "tmp2"\npcrs = { 0 = "' + ZERO + '" }', "attestation.verify: 'tmp2' is neither"),
    ('verify = "bin/check"', "attestation.verify: 'bin/check' is neither"),
    ('pcrs = { 24 = "' + ZERO + '" }', "not a PCR index"),
    ('pcrs = { 0 = "00" }', "not a sha256 value"),
    ('require = "yes"\npcrs = { 0 = "' + ZERO + '" }', "attestation.require"),
    ('pcrs = { 0 = "' + ZERO + '" }\nrequired = true', "attestation.required: unknown key"),
    ('pcrs = { 0 = "' + ZERO + '" }\nmax_age = "30s"', "attestation.max_age"),
])
def test_bad_attestation_config_is_one_clear_error(tmp_path: Path, table: str, says: str) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(f"[attestation]\n{table}\n")
    with pytest.raises(ConfigError, match=says):
        load_server(conf)


def test_attestation_config(tmp_path: Path) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(f'[attestation]\nrequire = true\npcrs = {{ 16 = "0x{"AB" * 32}", 0 = "{ZERO}" }}\n'
                    f'evidence = "/usr/local/bin/tdx-quote --v4"\n')
    a = load_server(conf).attestation
    assert a is not None and a.require and a.verify == "tpm2" and a.pcrs == ((0, ZERO), (16, "ab" * 32))
    assert a.evidence == "/usr/local/bin/tdx-quote --v4"
    agent = tmp_path / "agent.toml"
    agent.write_text(f'domain = "{DOMAIN}"\nattestation = "tpm2"\n[server_attestation]\nverify = "/bin/true"\n')
    cfg = load_agent(agent)
    assert cfg.attestation == "tpm2" and cfg.server_attestation is not None
    assert not cfg.server_attestation.require and isinstance(cfg.server_attestation.verifier(), attest.CommandVerifier)
    agent.write_text(f'domain = "{DOMAIN}"\nattestation = "sgx"\n')
    with pytest.raises(ConfigError, match="attestation: 'sgx' is neither"):
        load_agent(agent)


# --- registrations: whole roles over loopback, real TPMs ------------------------------------------


def attested_server(tmp_path: Path, kernel: FakeKernel, require: bool, enrolled: Path) -> Server:
    pcrs = ", ".join(f'{i} = "{v}"' for i, v in REFERENCE.items())
    return make_server(tmp_path, kernel, extra=f'[attestation]\nrequire = {str(require).lower()}\n'
                                               f'enrolled = "{enrolled}"\npcrs = {{ {pcrs} }}\n')


async def register_attested(record: ServerRecord, key: str, prover: attest.Prover | None,
                            verifier: attest.Verifier | None = None) -> proto.Assignment | None:
    request = proto.Request("register", DOMAIN, secret_of(token(record_dir[0])), public_key(key))
    attestation = proto.Attestation(prover, verifier, require_server=verifier is not None)
    _, assignment = await proto.exchange_async(record.ip, record.api, request, key, timeout=5, attestation=attestation)
    return assignment


record_dir: list[Path] = []  # the test's tmp_path, where its token is


@pytest.fixture(autouse=True)
def _token_dir(tmp_path: Path) -> Iterator[None]:
    record_dir[:] = [tmp_path]
    yield
    record_dir.clear()


async def in_rotation(server: Server, kernel: FakeKernel, key: str) -> bool:
    """After a pass, with the client's health up (the fake kernel has no tunnel to probe)."""
    lease = server.leases.by_key.get(public_key(key))
    if lease is not None:
        server.health.by_key[lease.public_key] = Health(up=True)
    await server.run_pass()
    return lease is not None and lease.overlay_ip in kernel.maps.get("rr0", [])


def test_a_client_whose_measurements_change_is_refused_and_leaves_the_rotation(tmp_path: Path, tpms: list[Tpm]) -> None:
    c1, c2, _ = tpms
    enrolled = tmp_path / "enrolled"
    c1.enrol(enrolled, "c1")
    k = FakeKernel()
    server = attested_server(tmp_path, k, True, enrolled)

    async def scenario() -> None:
        async with serving(server) as record:
            key, other = generate_private_key(), generate_private_key()
            assert await register_attested(record, key, c1.prover) is not None
            assert await in_rotation(server, k, key)
            shown = server.attestation_of(public_key(key))
            assert shown["attested"] and shown["measurements"] == {"sha256:0": ZERO, "sha256:16": ZERO}
            assert await register_attested(record, key, c1.prover) is not None  # checked again, and again good

            # No evidence, and an unenrolled TPM's: refused before any lease.
            for prover, says in ((None, "no TPM quote"), (c2.prover, "is not enrolled")):
                with pytest.raises(ProtocolError, match=says) as info:
                    await register_attested(record, other, prover)
                assert info.value.reason == "attestation"
            assert public_key(other) not in server.leases.by_key

            # c1's measurements change: its next registration is refused, and it is out of the
            # rotation at once; its peer stays while its connections finish (a drain).
            c1.extend(16)
            with pytest.raises(ProtocolError, match="PCR sha256:16"):
                await register_attested(record, key, c1.prover)
            assert public_key(key) in server.draining and not await in_rotation(server, k, key)
            assert public_key(key) in k.devices["sptun0"].peers
            (backend,) = [b for b in (await server.status()).domains[0].backends if b.public_key == public_key(key)]
            assert backend.reason == "draining (attestation failed)" and backend.attested is False
            assert "PCR sha256:16" in (backend.attestation or "")
            with pytest.raises(ProtocolError, match="PCR sha256:16"):  # and again: still out
                await register_attested(record, key, c1.prover)
            assert not await in_rotation(server, k, key)
            server.draining[public_key(key)] = 0.0  # the drain is over: lease and peer go
            await server.run_pass()
            assert public_key(key) not in server.leases.by_key and public_key(key) not in k.devices["sptun0"].peers
            assert public_key(key) not in server.api.verdicts
            status = server.attestation()
            assert status is not None and (status.verified, status.refused, status.admitted) == (2, 4, 0)
            assert status.refusals[-1].public_key == public_key(key) and "PCR sha256:16" in status.refusals[-1].reason
            assert server.api.limiter.failures == {}  # a valid token, a changed machine: no penalty

    run(scenario)


def test_require_false_admits_and_counts(tmp_path: Path, tpms: list[Tpm], caplog: pytest.LogCaptureFixture) -> None:
    c1, c2, _ = tpms
    c1.enrol(tmp_path / "enrolled", "c1")
    k = FakeKernel()
    server = attested_server(tmp_path, k, False, tmp_path / "enrolled")

    async def scenario() -> None:
        async with serving(server) as record:
            good, bare, unknown = generate_private_key(), generate_private_key(), generate_private_key()
            assert await register_attested(record, good, c1.prover) is not None
            assert await register_attested(record, bare, None) is not None
            assert await register_attested(record, unknown, c2.prover) is not None
            for key in (good, bare, unknown):
                assert await in_rotation(server, k, key)
            status = server.attestation()
            assert status is not None and (status.verified, status.refused, status.admitted) == (1, 0, 2)
            assert server.attestation_of(public_key(bare))["attested"] is False
            assert "is not enrolled" in server.attestation_of(public_key(unknown))["attestation"]
            # What `sptun status` shows of it.
            shown = to_json(await server.status())
            by_key = {b["public_key"]: b for b in shown["domains"][0]["backends"]}
            assert by_key[public_key(good)]["measurements"] == {"sha256:0": ZERO, "sha256:16": ZERO}
            out = Console(file=io.StringIO(), width=300)
            render(shown, out)
            text = out.file.getvalue()  # type: ignore[attr-defined]
            assert "attestation (tpm2, not required): 1 verified, 0 refused, 2 admitted unverified" in text
            assert "no: attestation key" in text and "is not enrolled" in text

    with caplog.at_level("WARNING", logger="sptun"):
        run(scenario)
    assert sum("admitted as require = false" in r.getMessage() for r in caplog.records) == 2


def test_an_agent_checks_the_servers_evidence_before_it_sends_its_request(tmp_path: Path, tpms: list[Tpm]) -> None:
    _, _, s1 = tpms
    servers = tmp_path / "servers"
    s1.enrol(servers, "s1")
    k = FakeKernel()
    server = make_server(tmp_path, k)
    verifier = Tpm2Verifier(servers, REFERENCE)

    async def scenario() -> None:
        async with serving(server) as record:
            key = generate_private_key()
            # This server presents nothing: a requiring agent stops there.
            with pytest.raises(ProtocolError, match="presents no evidence") as info:
                await register_attested(record, key, None, verifier)
            assert info.value.reason == "server-attestation"
            server.api.prover = s1.prover
            assert await register_attested(record, key, None, verifier) is not None
            # Its measurements change: the agent refuses it, and never sends its request.
            s1.extend(16)
            accepted = server.api.accepted
            with pytest.raises(ProtocolError, match="PCR sha256:16") as info:
                await register_attested(record, generate_private_key(), None, verifier)
            assert info.value.reason == "server-attestation" and server.api.accepted == accepted
            assert len(server.leases.by_key) == 1

    run(scenario)


def test_a_client_that_stops_proving_itself_leaves_after_max_age(tmp_path: Path, tpms: list[Tpm]) -> None:
    """A changed client could simply stop registering: with require, evidence older than
    max_age takes it out of its rotation as a refusal does."""
    c1 = tpms[0]
    c1.enrol(tmp_path / "enrolled", "c1")
    k = FakeKernel()
    server = attested_server(tmp_path, k, True, tmp_path / "enrolled")

    async def scenario() -> None:
        async with serving(server) as record:
            key, quiet = generate_private_key(), generate_private_key()
            for client in (key, quiet):
                assert await register_attested(record, client, c1.prover) is not None
                assert await in_rotation(server, k, client)
            server.api.verified_at[public_key(quiet)] -= 601  # its last evidence, 601 s ago (max_age 10 min)
            server.last_expiry = 0.0
            assert not await in_rotation(server, k, quiet) and await in_rotation(server, k, key)
            assert public_key(quiet) in server.draining
            shown = server.attestation_of(public_key(quiet))
            assert shown["attested"] is False and "no fresh evidence for 601 s" in shown["attestation"]
            # It proves itself again: back in the rotation (once its checks pass, as any rejoining client).
            assert await register_attested(record, quiet, c1.prover) is not None
            assert public_key(quiet) not in server.draining

    run(scenario)
