"""The server's in-place rotation changes, with the nft transaction as a fake edge: what the
daemon believes is in the kernel (and `status` reports as in_rotation) never runs ahead of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sptun import nft, server
from sptun.config import load_server
from sptun.errors import SptunError
from sptun.keys import generate_private_key, public_key
from sptun.server import Health, Server, forwards


class FakeWireGuard:
    kind = "fake"


def make_server(tmp_path: Path) -> Server:
    conf = tmp_path / "server.toml"
    conf.write_text(f'state_dir = "{tmp_path}/state"\n[[domains]]\nname = "app.example.test"\n'
                    f'listen = ["198.51.100.10"]\ntoken_file = "{tmp_path}/token"\n')
    cfg = load_server(conf)
    s = Server(cfg, links=object(), wg=FakeWireGuard())  # type: ignore[arg-type]
    s.daemon = True
    fwds = forwards(cfg)
    # As the first pass leaves it: the table loaded, nobody in rotation yet.
    s.table = nft.ServerTable(nft.server_comment(cfg.interface, fwds), {f.key: 1 for f in fwds}, [[] for _ in fwds])
    return s


def add_healthy_backend(s: Server) -> str:
    lease, _ = s.leases.acquire(public_key(generate_private_key()), "app.example.test")
    s.health[lease.public_key] = Health(up=True)
    return lease.overlay_ip


def test_the_rotation_is_believed_only_once_the_kernel_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_server(tmp_path)
    ip = add_healthy_backend(s)
    during: list[list[list[str]]] = []

    def transaction(lines: list[str]) -> None:  # what a status call in another thread sees meanwhile
        assert s.table is not None
        during.append([list(r) for r in s.table.rotations])

    monkeypatch.setattr(server.nft, "transaction", transaction)
    changes = s.sync_table()
    assert changes == [f"rotation app.example.test 198.51.100.10 tcp/443: 1 backends +{ip}"]
    assert during == [[[]]]  # not yet in rotation while the transaction runs
    assert s.table is not None and s.table.rotations == [[ip]]
    assert s.sync_table() == [] and len(during) == 1  # converged: no transaction at all


def test_a_failed_transaction_leaves_no_false_picture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_server(tmp_path)
    add_healthy_backend(s)

    def transaction(lines: list[str]) -> None:
        raise SptunError("nft: refused")

    monkeypatch.setattr(server.nft, "transaction", transaction)
    with pytest.raises(SptunError):
        s.sync_table()
    assert s.table is None  # read back from the kernel on the next pass
