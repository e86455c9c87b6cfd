"""Audit trail: append/export/verify round trip, signing policy, keys, CLI, and tamper detection.

The property test applies >= 10,000 random mutations (edit, insert, delete, swap, truncate, head
edits, re-signing with an unpinned key) to in-memory chains and runs them through the same
`ChainVerifier` core that `verify_audit_file` uses; a smaller set is applied to real DuckDB files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import duckdb
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.respond.audit import (
    GENESIS_HASH,
    AuditChain,
    AuditChainError,
    AuditKeyError,
    connection_runner,
    entry_hash,
    export_public_key,
    load_audit_key,
    load_or_create_audit_key,
    load_public_key,
    make_entry,
    public_key_id,
    sign_head_record,
)
from console.respond.cli_audit import add_audit_parser, run_audit
from console.respond.verify import (
    MANUAL_CHAIN_SQL,
    MANUAL_HEADS_SQL,
    AuditFileError,
    Row,
    parse_expected_head,
    verify_audit_file,
    verify_rows,
)
from console.store.schema import ensure_schema
from console.store.writer import StoreWriter

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
PINNED = Ed25519PrivateKey.generate()
PINNED_2 = Ed25519PrivateKey.generate()  # a rotated key, also pinned
ATTACKER = Ed25519PrivateKey.generate()
TRUSTED = [PINNED.public_key(), PINNED_2.public_key()]
T0 = 1_760_000_000_000_000_000

Head = tuple[Any, Any, Any, Any, Any]


class FakeClock:
    """Wall clock (ns) and monotonic clock (s) that tests move by hand."""

    def __init__(self) -> None:
        self.ns = T0
        self.mono = 1000.0

    def wall(self) -> int:
        self.ns += 1_000_000  # 1 ms per reading: distinct, increasing timestamps
        return self.ns

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.ns += int(seconds * 1e9)


# --------------------------------------------------------------------------- in-memory chains


def row_of(e: Any) -> Row:
    return (e.seq, e.ts_ns, e.actor, e.action, e.target, e.payload, e.prev_hash, e.hash)


def head_of(h: Any) -> Head:
    return (h.seq, h.hash, h.signed_at_ns, h.key_id, h.signature)


def build_chain(
    n: int, head_every: int, rng: random.Random, keys: tuple[Ed25519PrivateKey, ...] = (PINNED,)
) -> tuple[list[Row], list[Head]]:
    """A valid chain of n rows, heads every `head_every` rows and at the end (keys rotate halfway)."""
    rows: list[Row] = []
    heads: list[Head] = []
    prev = GENESIS_HASH
    actions = ["operator.action", "command.issued", "command.receipt", "alert.ack", "rollback.decision"]
    for seq in range(1, n + 1):
        target = None if rng.random() < 0.2 else f"host-{rng.randrange(64)}"
        payload = {"i": seq, "note": rng.choice(["ok", "freeze", "résumé", ""]), "n": [rng.random(), None]}
        e = make_entry(prev, seq, T0 + seq * 1_000_000_000, rng.choice(["alice", "bob"]), rng.choice(actions),
                       target, payload)
        rows.append(row_of(e))
        prev = e.hash
        if seq % head_every == 0 or seq == n:
            key = keys[0] if seq <= n // 2 or len(keys) == 1 else keys[1]
            heads.append(head_of(sign_head_record(key, seq, e.hash, T0 + seq * 1_000_000_000 + 500)))
    return rows, heads


_RNG = random.Random(20240601)
BASE_CHAINS: list[tuple[list[Row], list[Head]]] = [
    build_chain(1, 1, _RNG),
    build_chain(2, 5, _RNG),
    build_chain(3, 1, _RNG),
    build_chain(9, 4, _RNG),
    build_chain(24, 7, _RNG, (PINNED, PINNED_2)),
    build_chain(40, 10, _RNG),
]


def rehash_from(rows: list[Row], start: int) -> None:
    """What a forger does: renumber and recompute every hash from index `start` on."""
    prev = rows[start - 1][7] if start > 0 else GENESIS_HASH
    for i in range(start, len(rows)):
        _, ts, actor, action, target, payload, _, _ = rows[i]
        h = entry_hash(i + 1, ts, actor, action, target, payload, prev)
        rows[i] = (i + 1, ts, actor, action, target, payload, prev, h)
        prev = h


def sort_like_db(rows: list[Row]) -> list[Row]:
    """ORDER BY seq NULLS LAST, as verify_audit_file reads the table."""
    return sorted(rows, key=lambda r: (not isinstance(r[0], int), r[0] if isinstance(r[0], int) else 0))


_ALPHABET = "abcxyz019 _-:/.é✓\u202e\x00\"'{}"


def _different_text(rng: random.Random, old: Any) -> str:
    new = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 8)))
    return new if new != old else f"{new}x"


def _flip_bit(rng: random.Random, blob: bytes) -> bytes:
    out = bytearray(blob)
    out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _nonzero(rng: random.Random, bound: int) -> int:
    return rng.choice([d for d in range(-bound, bound + 1) if d])


MUTATIONS = (
    "edit_field", "insert_random", "insert_linked", "insert_dup_seq", "insert_rehash_keep_heads",
    "insert_rehash_drop_heads", "insert_rehash_resign", "append_forged", "delete_row", "delete_renumber",
    "delete_rehash_drop_heads", "swap_rows", "swap_rehash", "truncate", "edit_head", "delete_last_heads",
    "resign_unpinned", "forge_head_unpinned", "replay_head", "edit_rehash_resign",
)
EXPECTED_HEAD_MUTATIONS = ("truncate_consistent",)
ALL_MUTATIONS = MUTATIONS + EXPECTED_HEAD_MUTATIONS


def _forged_row(rng: random.Random, seq: int, prev: bytes, linked: bool) -> Row:
    actor = rng.choice(["mallory", "alice", "root"])
    payload = json.dumps({"forged": rng.randint(0, 9)}, separators=(",", ":"))
    ts = T0 + rng.randrange(10**12) * 1000
    if linked:
        return (seq, ts, actor, "operator.action", None, payload, prev,
                entry_hash(seq, ts, actor, "operator.action", None, payload, prev))
    return (seq, ts, actor, "operator.action", None, payload, rng.randbytes(32), rng.randbytes(32))


def _attacker_heads(rows: list[Row], heads: list[Head], from_seq: int) -> list[Head]:
    """Drop heads at or after from_seq and re-sign the new end with the attacker's key."""
    kept = [h for h in heads if h[0] < from_seq]
    if rows:
        kept.append(head_of(sign_head_record(ATTACKER, len(rows), rows[-1][7], T0 + 10**15)))
    return kept


def apply_mutation(
    rng: random.Random, kind: str, rows: list[Row], heads: list[Head]
) -> tuple[list[Row], list[Head], int | None, bool]:
    """Apply one mutation.

    Returns (rows as the DB would return them, heads, the edited seq or None, whether the result
    is a consistent truncation that only an earlier exported head can reveal).
    """
    rows, heads = list(rows), list(heads)
    n = len(rows)
    edited: int | None = None
    truncation = kind in EXPECTED_HEAD_MUTATIONS
    if kind == "edit_field":
        i = rng.randrange(n)
        f = rng.randrange(8)
        r = list(rows[i])
        old = r[f]
        if f in (0, 1):
            r[f] = old + _nonzero(rng, 5) * (1 if f == 0 else rng.choice([1, 1000, 10**6]))
        elif f in (2, 3):
            r[f] = _different_text(rng, old)
        elif f == 4:
            r[f] = rng.choice([v for v in (None, "", "host-x", f"{old}!") if v != old])
        elif f == 5:
            r[f] = rng.choice([old + " ", old.replace("1", "2") + "0", "{}", old[:-1] + ',"x":1}'])
        else:
            r[f] = _flip_bit(rng, old)
        rows[i] = tuple(r)  # type: ignore[assignment]
        # The seq of the damaged row must be named (a seq edit is named at the seq expected there).
        edited = rows[i][0] if f != 0 else None
    elif kind == "insert_random":
        k = rng.randint(0, n)
        rows.insert(k, _forged_row(rng, k + 1, GENESIS_HASH, linked=False))
        rows[k + 1:] = [(r[0] + 1, *r[1:]) for r in rows[k + 1:]]  # type: ignore[misc]
    elif kind == "insert_linked":
        k = rng.randrange(n)
        prev = rows[k - 1][7] if k else GENESIS_HASH
        rows.insert(k, _forged_row(rng, k + 1, prev, linked=True))
        rows[k + 1:] = [(r[0] + 1, *r[1:]) for r in rows[k + 1:]]  # type: ignore[misc]
    elif kind == "insert_dup_seq":
        k = rng.randrange(n)
        prev = rows[k - 1][7] if k else GENESIS_HASH
        rows.insert(k, _forged_row(rng, k + 1, prev, linked=True))
    elif kind in ("insert_rehash_keep_heads", "insert_rehash_drop_heads", "insert_rehash_resign"):
        k = rng.randrange(n)
        rows.insert(k, _forged_row(rng, k + 1, GENESIS_HASH, linked=False))
        rehash_from(rows, k)
        if kind == "insert_rehash_drop_heads":
            heads = [h for h in heads if h[0] <= k]
        elif kind == "insert_rehash_resign":
            heads = _attacker_heads(rows, heads, k + 1)
    elif kind == "append_forged":
        rows.append(_forged_row(rng, n + 1, rows[-1][7], linked=True))
    elif kind == "delete_row":
        del rows[rng.randrange(n)]
    elif kind == "delete_renumber":
        i = rng.randrange(n)
        del rows[i]
        rows[i:] = [(r[0] - 1, *r[1:]) for r in rows[i:]]  # type: ignore[misc]
    elif kind == "delete_rehash_drop_heads":
        i = rng.randrange(n)
        del rows[i]
        rehash_from(rows, i)
        heads = [h for h in heads if h[0] <= i]
        truncation = i == n - 1 and n > 1  # deleting the last row this way IS a tail truncation
    elif kind in ("swap_rows", "swap_rehash"):
        i, j = rng.sample(range(n), 2)
        ri, rj = rows[i], rows[j]
        rows[i], rows[j] = (ri[0], *rj[1:]), (rj[0], *ri[1:])  # type: ignore[assignment]
        if kind == "swap_rehash":
            rehash_from(rows, min(i, j))
    elif kind == "truncate":
        rows = rows[: n - rng.randint(1, n)]
    elif kind == "truncate_consistent":
        keep = n - rng.randint(1, n)
        rows = rows[:keep]
        heads = [h for h in heads if h[0] <= keep]
    elif kind == "edit_head":
        i = rng.randrange(len(heads))
        h = list(heads[i])
        f = rng.randrange(5)
        if f in (0, 2):
            h[f] = h[f] + _nonzero(rng, 3) * (1 if f == 0 else 1000)
        elif f == 3:
            h[f] = rng.choice([v for v in (public_key_id(ATTACKER.public_key()), h[3][:-1] + "0", h[3].upper(), "")
                               if v != h[3]])
        else:
            h[f] = _flip_bit(rng, h[f])
        heads[i] = tuple(h)  # type: ignore[assignment]
    elif kind == "delete_last_heads":
        top = max(h[0] for h in heads)
        heads = [h for h in heads if h[0] != top]
    elif kind == "resign_unpinned":
        i = rng.randrange(len(heads))
        seq, hh, at, kid, _ = heads[i]
        forged = sign_head_record(ATTACKER, seq, hh, at)
        heads[i] = (seq, hh, at, kid, forged.signature) if rng.random() < 0.5 else head_of(forged)
    elif kind == "forge_head_unpinned":
        i = rng.randrange(n)
        heads.append(head_of(sign_head_record(ATTACKER, rows[i][0], rows[i][7], T0)))
    elif kind == "replay_head":
        _, other_heads = rng.choice([c for c in BASE_CHAINS if c[0] != rows])
        heads.append(rng.choice(other_heads))
    elif kind == "edit_rehash_resign":
        i = rng.randrange(n)
        row = rows[i]
        rows[i] = (row[0], row[1], "mallory" if row[2] != "mallory" else "eve", *row[3:])
        rehash_from(rows, i)
        heads = _attacker_heads(rows, heads, i + 1)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return sort_like_db(rows), heads, edited, truncation


def test_base_chains_are_valid() -> None:
    for rows, heads in BASE_CHAINS:
        report = verify_rows(rows, heads, TRUSTED)
        assert report.ok, report.render()
        assert report.unsigned_tail == 0
        assert report.signed_seq == len(rows)


def test_property_every_mutation_is_detected() -> None:
    """>= 10,000 random single mutations of exported chains; zero may verify (goals 6 and 7).

    Hypothesis supplies one seed per example; the seed drives ten mutations (chain, kind, row,
    field, new value). Per-draw Hypothesis overhead would otherwise dominate the 10,000 cases.
    """
    counts: Counter[str] = Counter()
    per_example = 10

    @settings(max_examples=1010, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(0, 2**64 - 1))
    def run(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(per_example):
            kind = rng.choice(ALL_MUTATIONS)
            chain_index = rng.randrange(len(BASE_CHAINS))
            if kind in ("swap_rows", "swap_rehash") and len(BASE_CHAINS[chain_index][0]) < 2:
                chain_index = len(BASE_CHAINS) - 1
            rows, heads = BASE_CHAINS[chain_index]
            new_rows, new_heads, edited, truncation = apply_mutation(rng, kind, rows, heads)
            assert (new_rows, new_heads) != (rows, heads), f"{kind} was a no-op"
            expected = (rows[-1][0], rows[-1][7]) if truncation else None
            report = verify_rows(new_rows, new_heads, TRUSTED, expected)
            assert not report.ok, f"undetected {kind} (chain {chain_index}, seed {seed}): {report.render()}"
            assert report.problems
            if edited is not None:
                assert any(p.seq == edited for p in report.problems), report.render()
            counts[kind] += 1

    run()
    total = sum(counts.values())
    assert total >= 10_000, counts
    assert set(counts) == set(ALL_MUTATIONS), counts
    print(f"\naudit property test: {total} mutations, all detected: {dict(sorted(counts.items()))}")


def test_truncation_needs_expected_head() -> None:
    """Dropping the tail together with its heads verifies alone; an earlier exported head catches it."""
    rows, heads = BASE_CHAINS[-1]
    keep = 30
    cut_rows, cut_heads = rows[:keep], [h for h in heads if h[0] <= keep]
    assert verify_rows(cut_rows, cut_heads, TRUSTED).ok  # indistinguishable from an older export
    report = verify_rows(cut_rows, cut_heads, TRUSTED, (len(rows), rows[-1][7]))
    assert not report.ok
    assert [p.kind for p in report.problems] == ["expected_head"]
    assert report.problems[0].seq == len(rows)
    assert verify_rows(rows, heads, TRUSTED, (keep, rows[keep - 1][7])).ok  # a later export extends it
    wrong = verify_rows(rows, heads, TRUSTED, (keep, rows[keep][7]))
    assert [p.kind for p in wrong.problems] == ["expected_head"]


def test_unsigned_tail_is_reported() -> None:
    rows, heads = BASE_CHAINS[-1]
    tail_heads = [h for h in heads if h[0] <= 30]
    strict = verify_rows(rows, tail_heads, TRUSTED)
    assert not strict.ok
    assert strict.unsigned_tail == 10
    assert [(p.kind, p.seq) for p in strict.problems] == [("unsigned_tail", 31)]
    lenient = verify_rows(rows, tail_heads, TRUSTED, allow_unsigned_tail=True)
    assert lenient.ok and lenient.unsigned_tail == 10 and lenient.warnings


def test_reasons_are_precise() -> None:
    rows, heads = BASE_CHAINS[-1]
    r = list(rows)
    r[11] = (r[11][0], r[11][1], "mallory", *r[11][3:])
    report = verify_rows(r, heads, TRUSTED)
    assert [(p.kind, p.seq) for p in report.problems] == [("hash", 12)]
    r = list(rows)
    del r[4]
    report = verify_rows(r, heads, TRUSTED)
    assert ("seq", 5) in [(p.kind, p.seq) for p in report.problems]
    assert ("prev_hash", 6) in [(p.kind, p.seq) for p in report.problems]


def test_payload_check_is_opt_in() -> None:
    """A correctly hashed but non-canonical payload is a producer bug: flagged only on request."""
    text = '{"b": 1, "a": 2}'
    h = entry_hash(1, T0, "alice", "operator.action", None, text, GENESIS_HASH)
    rows: list[Row] = [(1, T0, "alice", "operator.action", None, text, GENESIS_HASH, h)]
    heads = [head_of(sign_head_record(PINNED, 1, h, T0))]
    assert verify_rows(rows, heads, TRUSTED).ok
    strict = verify_rows(rows, heads, TRUSTED, check_payload=True)
    assert [(p.kind, p.seq) for p in strict.problems] == [("payload", 1)]
    rows_ok, heads_ok = BASE_CHAINS[-1]
    assert verify_rows(rows_ok, heads_ok, TRUSTED, check_payload=True).ok


def test_no_keys_and_empty_chain_fail() -> None:
    rows, heads = BASE_CHAINS[3]
    assert "no_pinned_key" in {p.kind for p in verify_rows(rows, heads, []).problems}
    assert {"empty", "no_signed_head"} <= {p.kind for p in verify_rows([], [], TRUSTED).problems}
    other = verify_rows(rows, heads, [ATTACKER.public_key()])
    assert not other.ok and {"head_key", "no_signed_head"} <= {p.kind for p in other.problems}


def test_encoding_is_stable() -> None:
    """Golden vector: changing the encoding silently would orphan every exported trail."""
    h = entry_hash(1, 1_700_000_000_123_456_000, "alice", "alert.ack", "alert-1", '{"x":1}', GENESIS_HASH)
    assert h.hex() == GOLDEN_HASH
    assert entry_hash(1, 1_700_000_000_123_456_000, "alice", "alert.ack", None, '{"x":1}', GENESIS_HASH) != h
    assert entry_hash(1, 1_700_000_000_123_456_000, "alice", "alert.ack", "", '{"x":1}', GENESIS_HASH) != h
    # Field boundaries are length-prefixed: moving a character between fields changes the hash.
    moved = entry_hash(1, 0, "a", "bc", None, "{}", GENESIS_HASH)
    assert entry_hash(1, 0, "ab", "c", None, "{}", GENESIS_HASH) != moved


GOLDEN_HASH = "e9ed576905734d5146f7206bc1ca9f33f5d0629032c335a0367f752adb8680af"


# --------------------------------------------------------------------------- DuckDB round trip


def _open_store(path: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(path))
    con.execute("SET TimeZone = 'UTC'")
    ensure_schema(con)
    return con


@pytest.fixture()
def keyfiles(tmp_path: Path) -> tuple[Path, Path, Path]:
    key_path = tmp_path / "keys" / "audit.key"
    key = load_or_create_audit_key(key_path)
    pub = tmp_path / "keys" / "audit.pub"
    export_public_key(key, pub)
    other = tmp_path / "keys" / "other.pub"
    export_public_key(Ed25519PrivateKey.generate(), other)
    return key_path, pub, other


def _populate(con: duckdb.DuckDBPyConnection, key: Ed25519PrivateKey, n: int = 30,
              clock: FakeClock | None = None) -> AuditChain:
    clock = clock or FakeClock()
    chain = AuditChain(connection_runner(con), signing_key=key, sign_every_rows=10,
                       clock_ns=clock.wall, monotonic=clock.monotonic)
    kinds = ["operator.action", "command.issued", "command.receipt", "alert.ack", "rollback.decision"]
    for i in range(n):
        chain.append("alice@ops" if i % 2 else "bob@ops", kinds[i % 5], None if i % 7 == 0 else f"host-{i}",
                     {"i": i, "why": "résumé ✓", "nested": {"b": [1, 2.5, None], "a": True}})
    return chain


def test_append_export_verify_round_trip(tmp_path: Path, keyfiles: tuple[Path, Path, Path]) -> None:
    key_path, pub, other = keyfiles
    key = load_or_create_audit_key(key_path)
    con = _open_store(tmp_path / "live.duckdb")
    chain = _populate(con, key)
    assert chain.head[0] == 30 and chain.signed_seq == 30 and chain.unsigned_rows == 0
    entries = chain.append_many([("alice", "command.issued", "job-7", {"cmd": "freeze"}),
                                 ("agent:h1", "command.receipt", "job-7", {"ok": True})])
    assert [e.seq for e in entries] == [31, 32] and chain.unsigned_rows == 2
    summary = chain.export_signed(tmp_path / "export.duckdb", actor="alice@ops", source_path="live.duckdb")
    con.close()
    seq_s, hash_s = summary["audit_head"].split(":")
    assert int(seq_s) == 33 and summary["rows"]["audit_log"] == 33

    report = verify_audit_file(tmp_path / "export.duckdb", [pub], (int(seq_s), hash_s))
    assert report.ok, report.render()
    assert (report.rows, report.last_seq, report.unsigned_tail, report.signed_seq) == (33, 33, 0, 33)
    assert report.head_hash == hash_s and report.heads_verified == report.heads_total == 4
    assert report.file_sha256 and len(report.file_sha256) == 64

    bad = verify_audit_file(tmp_path / "export.duckdb", [other])
    assert not bad.ok and {"head_key", "no_signed_head", "unsigned_tail"} <= {p.kind for p in bad.problems}


def test_chain_resumes_after_restart(tmp_path: Path, keyfiles: tuple[Path, Path, Path]) -> None:
    key_path, pub, _ = keyfiles
    key = load_or_create_audit_key(key_path)
    db = tmp_path / "live.duckdb"
    con = _open_store(db)
    chain = AuditChain(connection_runner(con))  # no key: cannot sign
    for i in range(3):
        chain.append("alice", "operator.action", None, {"i": i})
    assert chain.unsigned_rows == 3 and chain.sign_if_due() is None
    with pytest.raises(AuditChainError):
        chain.sign_head()
    con.close()
    con = _open_store(db)
    chain = AuditChain(connection_runner(con), signing_key=key)
    assert chain.head[0] == 3 and chain.signed_seq == 3  # the unsigned tail was signed at start
    chain.append("bob", "alert.ack", "a-1", {})
    chain.export_signed(tmp_path / "e.duckdb", actor="bob", source_path=str(db))
    con.close()
    report = verify_audit_file(tmp_path / "e.duckdb", [pub])
    assert report.ok, report.render()
    assert report.rows == 5


def test_sign_policy_rows_and_seconds(tmp_path: Path) -> None:
    clock = FakeClock()
    con = _open_store(tmp_path / "live.duckdb")
    chain = AuditChain(connection_runner(con), signing_key=PINNED, sign_every_rows=5, sign_every_s=10.0,
                       clock_ns=clock.wall, monotonic=clock.monotonic)
    for i in range(12):
        chain.append("alice", "operator.action", None, {"i": i})
    assert [r[0] for r in con.execute("SELECT seq FROM audit_heads ORDER BY seq").fetchall()] == [5, 10]
    assert chain.unsigned_rows == 2
    clock.advance(9.0)
    assert chain.sign_if_due() is None
    clock.advance(1.5)
    head = chain.sign_if_due()
    assert head is not None and head.seq == 12 and chain.unsigned_rows == 0
    assert chain.sign_if_due() is None
    chain.append("alice", "operator.action")
    clock.advance(11.0)
    chain.append("alice", "operator.action")  # the oldest unsigned row is 11 s old: signed with this one
    assert chain.signed_seq == 14
    assert chain.sign_head(PINNED_2) is not None  # a second key may cosign; own state is unchanged
    assert chain.signed_seq == 14 and chain.last_signed_head is not None
    con.close()


def test_append_rejects_bad_input_and_keeps_state(tmp_path: Path) -> None:
    con = _open_store(tmp_path / "live.duckdb")
    chain = AuditChain(connection_runner(con), signing_key=PINNED)
    chain.append("alice", "operator.action")
    before = chain.head
    for bad in [("", "a", None, {}), ("alice", "", None, {}), ("alice", "a", None, {"x": float("nan")}),
                ("alice", "a", None, {"x": object()})]:
        with pytest.raises((ValueError, TypeError)):
            chain.append(*bad)
    assert chain.head == before
    # A row appended behind the chain's back makes the next append fail, then resync.
    e = make_entry(before[1], 2, 0, "rogue", "x", None, {})
    con.execute("INSERT INTO audit_log VALUES (2, to_timestamp(0), 'rogue', 'x', NULL, '{}', ?, ?)",
                [e.prev_hash, e.hash])
    with pytest.raises(duckdb.ConstraintException):
        chain.append("alice", "operator.action")
    assert chain.head[0] == 2
    con.close()


class _WriterRunner:
    """Runs on the StoreWriter thread: its public hook if present, else the request queue it wraps."""

    def __init__(self, writer: StoreWriter) -> None:
        self._writer = writer

    def __call__(self, fn: Callable[[duckdb.DuckDBPyConnection], T], /) -> T:
        hook = getattr(self._writer, "run_on_writer", None)
        if hook is not None:
            return cast(T, hook(fn))
        return self._writer._call(fn, 30.0)


def test_chain_on_the_store_writer_thread(tmp_path: Path) -> None:
    """The console wiring: appends from several threads, export, all on the single writer connection."""
    writer = StoreWriter(tmp_path / "live.duckdb", flush_interval_s=0.05)
    writer.start()
    try:
        chain = AuditChain(_WriterRunner(writer), signing_key=PINNED, sign_every_rows=7)

        def work(who: str) -> None:
            for i in range(20):
                chain.append(who, "operator.action", f"host-{i}", {"i": i})

        threads = [threading.Thread(target=work, args=(f"op{n}",)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        summary = chain.export_signed(tmp_path / "export.duckdb", actor="op0", source_path="live.duckdb")
    finally:
        writer.stop()
    assert summary["audit_head"].startswith("61:")
    report = verify_audit_file(tmp_path / "export.duckdb", [PINNED.public_key()], parse_expected_head(
        summary["audit_head"]))
    assert report.ok, report.render()
    assert report.rows == 61


def test_open_refuses_broken_live_chain(tmp_path: Path) -> None:
    con = _open_store(tmp_path / "live.duckdb")
    chain = AuditChain(connection_runner(con), signing_key=PINNED)
    for _ in range(3):
        chain.append("alice", "operator.action")
    con.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 3")
    with pytest.raises(AuditChainError, match="head row seq 3"):
        AuditChain(connection_runner(con), signing_key=PINNED)
    con.execute("DELETE FROM audit_log WHERE seq = 2")
    with pytest.raises(AuditChainError, match="broken"):
        AuditChain(connection_runner(con), signing_key=PINNED)
    con.close()


# --------------------------------------------------------------------------- keys


def test_audit_key_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "k" / "audit.key"
    key = load_or_create_audit_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_audit_key(path)
    assert public_key_id(again.public_key()) == public_key_id(key.public_key())
    assert public_key_id(load_audit_key(path).public_key()) == public_key_id(key.public_key())
    pub = tmp_path / "audit.pub"
    kid = export_public_key(key, pub)
    assert kid == public_key_id(load_public_key(pub))
    assert b"PRIVATE" not in pub.read_bytes()
    os.chmod(path, 0o640)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        load_or_create_audit_key(path)
    with pytest.raises(AuditKeyError):
        load_public_key(path)  # a private key is not a pinnable public key
    rsa_like = tmp_path / "garbage.pem"
    rsa_like.write_text("not a key")
    os.chmod(rsa_like, 0o600)
    with pytest.raises(AuditKeyError):
        load_audit_key(rsa_like)
    enc = load_or_create_audit_key(tmp_path / "enc.key", password=b"pw")
    assert public_key_id(load_audit_key(tmp_path / "enc.key", b"pw").public_key()) == public_key_id(enc.public_key())


# --------------------------------------------------------------------------- real DuckDB files


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    d = tmp_path_factory.mktemp("audit_export")
    con = _open_store(d / "live.duckdb")
    chain = _populate(con, PINNED, n=29)
    summary = chain.export_signed(d / "export.duckdb", actor="alice", source_path="live.duckdb")
    con.close()
    pub = d / "pinned.pub"
    export_public_key(PINNED, pub)
    yield d / "export.duckdb", pub, summary["audit_head"]


def _rows_from(con: duckdb.DuckDBPyConnection) -> list[Row]:
    return [(r[0], r[1] * 1000, *r[2:]) for r in con.execute(
        "SELECT seq, epoch_us(ts), actor, action, target, payload, prev_hash, hash FROM audit_log ORDER BY seq"
    ).fetchall()]


def _rewrite(con: duckdb.DuckDBPyConnection, rows: list[Row]) -> None:
    con.execute("DELETE FROM audit_log")
    t = pa.table({
        "seq": pa.array([r[0] for r in rows], pa.int64()),
        "ts": pa.array([r[1] // 1000 for r in rows], pa.timestamp("us", tz="UTC")),
        "actor": [r[2] for r in rows], "action": [r[3] for r in rows], "target": [r[4] for r in rows],
        "payload": [r[5] for r in rows],
        "prev_hash": pa.array([r[6] for r in rows], pa.binary()), "hash": pa.array([r[7] for r in rows], pa.binary()),
    })
    con.register("forged", t)
    con.execute("INSERT INTO audit_log SELECT * FROM forged")
    con.unregister("forged")


def _insert_linked_forgery(con: duckdb.DuckDBPyConnection) -> None:
    rows = _rows_from(con)
    prev = rows[9][7]
    forged = make_entry(prev, 11, rows[9][1] + 1000, "mallory", "operator.action", None, {"hide": True})
    rows.insert(10, (forged.seq, forged.ts_ns, forged.actor, forged.action, None, forged.payload, prev, forged.hash))
    rows[11:] = [(r[0] + 1, *r[1:]) for r in rows[11:]]  # type: ignore[misc]
    _rewrite(con, rows)


def _rewrite_and_resign(con: duckdb.DuckDBPyConnection) -> None:
    rows = _rows_from(con)
    rows[4] = (rows[4][0], rows[4][1], "mallory", *rows[4][3:])
    rehash_from(rows, 4)
    _rewrite(con, rows)
    con.execute("DELETE FROM audit_heads")
    h = sign_head_record(ATTACKER, len(rows), rows[-1][7], T0)
    con.execute("INSERT INTO audit_heads VALUES (?, ?, to_timestamp(?), ?, ?)",
                [h.seq, h.hash, h.signed_at_ns / 1e9, h.key_id, h.signature])


def _swap_5_6(con: duckdb.DuckDBPyConnection) -> None:
    rows = _rows_from(con)
    rows[4], rows[5] = (5, *rows[5][1:]), (6, *rows[4][1:])
    _rewrite(con, rows)


def _drop_pk_and_duplicate(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE TABLE t2 AS SELECT * FROM audit_log")
    con.execute("DROP TABLE audit_log")
    con.execute("ALTER TABLE t2 RENAME TO audit_log")
    con.execute("INSERT INTO audit_log SELECT * FROM audit_log WHERE seq = 7")


FILE_MUTATIONS: dict[str, tuple[Callable[[duckdb.DuckDBPyConnection], None] | str, str]] = {
    "edit actor": ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 5", "hash"),
    "edit payload": ("UPDATE audit_log SET payload = '{\"i\":6}' WHERE seq = 7", "hash"),
    "edit ts": ("UPDATE audit_log SET ts = ts + INTERVAL 1 SECOND WHERE seq = 3", "hash"),
    "null target": ("UPDATE audit_log SET target = NULL WHERE seq = 4", "hash"),
    "edit hash": ("UPDATE audit_log SET hash = prev_hash WHERE seq = 12", "hash"),
    "delete row": ("DELETE FROM audit_log WHERE seq = 10", "seq"),
    "truncate rows": ("DELETE FROM audit_log WHERE seq > 20", "head_beyond_end"),
    "append forged": ("INSERT INTO audit_log SELECT 31, ts, 'mallory', action, NULL, '{}', hash, hash "
                      "FROM audit_log WHERE seq = 30", "unsigned_tail"),
    "insert linked forgery": (_insert_linked_forgery, "prev_hash"),
    "swap rows": (_swap_5_6, "hash"),
    "duplicate seq": (_drop_pk_and_duplicate, "seq"),
    "edit head hash": ("UPDATE audit_heads SET hash = (SELECT hash FROM audit_log WHERE seq = 1) "
                       "WHERE seq = (SELECT max(seq) FROM audit_heads)", "head_signature"),
    "edit head time": ("UPDATE audit_heads SET signed_at = signed_at - INTERVAL 1 DAY", "head_signature"),
    "delete heads": ("DELETE FROM audit_heads", "no_signed_head"),
    "rewrite and re-sign": (_rewrite_and_resign, "head_key"),
    "view instead of table": ("CREATE TABLE real_log AS SELECT * FROM audit_log; DROP TABLE audit_log; "
                              "CREATE VIEW audit_log AS SELECT * FROM real_log", "schema"),
    "retyped column": ("ALTER TABLE audit_heads ALTER signature TYPE VARCHAR", "schema"),
}


@pytest.mark.parametrize("name", list(FILE_MUTATIONS))
def test_tampered_file_is_detected(name: str, exported: tuple[Path, Path, str], tmp_path: Path) -> None:
    src, pub, head = exported
    assert verify_audit_file(src, [pub]).ok
    target = tmp_path / "tampered.duckdb"
    shutil.copy(src, target)
    mutation, kind = FILE_MUTATIONS[name]
    con = duckdb.connect(str(target))
    con.execute("SET TimeZone = 'UTC'")
    if isinstance(mutation, str):
        con.execute(mutation)
    else:
        mutation(con)
    con.close()
    report = verify_audit_file(target, [pub])
    assert not report.ok
    assert kind in {p.kind for p in report.problems}, report.render()
    seq, digest = head.split(":")
    assert not verify_audit_file(target, [pub], (int(seq), digest)).ok


def test_file_truncation_detected_with_expected_head(exported: tuple[Path, Path, str], tmp_path: Path) -> None:
    src, pub, head = exported
    target = tmp_path / "cut.duckdb"
    shutil.copy(src, target)
    con = duckdb.connect(str(target))
    con.execute("DELETE FROM audit_log WHERE seq > 20; DELETE FROM audit_heads WHERE seq > 20")
    con.close()
    assert verify_audit_file(target, [pub]).ok  # alone, it looks like an older export
    seq, digest = head.split(":")
    report = verify_audit_file(target, [pub], (int(seq), digest))
    assert not report.ok and [p.kind for p in report.problems] == ["expected_head"]


def test_macros_in_the_file_cannot_shadow_builtins(exported: tuple[Path, Path, str], tmp_path: Path) -> None:
    src, pub, _ = exported
    target = tmp_path / "macro.duckdb"
    shutil.copy(src, target)
    con = duckdb.connect(str(target))
    con.execute("UPDATE audit_log SET ts = ts + INTERVAL 1 SECOND WHERE seq = 3")
    con.execute("CREATE MACRO epoch_us(x) AS 0")  # would hide the edit if it shadowed the built-in
    con.close()
    report = verify_audit_file(target, [pub])
    assert [(p.kind, p.seq) for p in report.problems] == [("hash", 3)]


def test_manual_sql_in_docs(exported: tuple[Path, Path, str], tmp_path: Path) -> None:
    """The DuckDB CLI recipe in docs/audit.md gives the same verdict as the verifier."""
    doc = (ROOT / "docs" / "audit.md").read_text()
    assert MANUAL_CHAIN_SQL in doc and MANUAL_HEADS_SQL in doc
    src, pub, _ = exported
    con = duckdb.connect()
    con.execute(f"ATTACH '{src}' AS audit (READ_ONLY)")
    rows = con.execute(MANUAL_CHAIN_SQL).fetchall()
    assert len(rows) == 30 and all(r[1] and r[2] and r[3] for r in rows)
    key = load_public_key(pub)
    assert isinstance(key, Ed25519PublicKey)
    for _seq, _hash, _at, _kid, msg_hex, sig_hex in con.execute(MANUAL_HEADS_SQL).fetchall():
        key.verify(bytes.fromhex(sig_hex), bytes.fromhex(msg_hex))
    con.close()
    target = tmp_path / "t.duckdb"
    shutil.copy(src, target)
    rw = duckdb.connect(str(target))
    rw.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 5")
    rw.close()
    con = duckdb.connect()
    con.execute(f"ATTACH '{target}' AS audit (READ_ONLY)")
    bad = [r[0] for r in con.execute(MANUAL_CHAIN_SQL).fetchall() if not r[1]]
    con.close()
    assert bad == [5]


# --------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpusoc-console")
    add_audit_parser(parser.add_subparsers(dest="cmd"))
    return run_audit(parser.parse_args(argv))


def test_cli_exit_codes(exported: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, pub, head = exported
    assert _cli(["audit", "verify", str(src), "--trust", str(pub), "--expect-head", head]) == 0
    assert "VALID" in capsys.readouterr().out
    assert _cli(["audit", "verify", str(src), "--trust", str(pub), "--json", "--check-payload"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["rows"] == 30 and out["problems"] == []

    other = tmp_path / "other.pub"
    export_public_key(ATTACKER, other)
    assert _cli(["audit", "verify", str(src), "--trust", str(other)]) == 1
    assert "INVALID" in capsys.readouterr().out
    # Pinning both keys is fine (key rotation): the valid one vouches.
    assert _cli(["audit", "verify", str(src), "--trust", str(other), str(pub)]) == 0
    capsys.readouterr()

    seq = int(head.split(":")[0])
    assert _cli(["audit", "verify", str(src), "--trust", str(pub), "--expect-head", f"{seq + 5}:{'00' * 32}"]) == 1
    assert "truncated" in capsys.readouterr().out

    assert _cli(["audit", "verify", str(tmp_path / "missing.duckdb"), "--trust", str(pub)]) == 2
    assert _cli(["audit", "verify", str(src), "--trust", str(pub), "--expect-head", "12"]) == 2
    assert _cli(["audit", "verify", str(src), "--trust", str(tmp_path / "nokey.pem")]) == 2
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"this is not a duckdb file" * 100)
    assert _cli(["audit", "verify", str(junk), "--trust", str(pub)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4
    with pytest.raises(SystemExit) as exc:
        _cli(["audit", "verify", str(src)])  # --trust is required
    assert exc.value.code == 2


def test_cli_pubkey(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_path = tmp_path / "audit.key"
    key = load_or_create_audit_key(key_path)
    assert _cli(["audit", "pubkey", str(key_path)]) == 0
    assert capsys.readouterr().out.startswith("-----BEGIN PUBLIC KEY-----")
    out = tmp_path / "pub.pem"
    assert _cli(["audit", "pubkey", str(key_path), "--out", str(out)]) == 0
    assert public_key_id(load_public_key(out)) == public_key_id(key.public_key())
    assert _cli(["audit", "pubkey", str(tmp_path / "none.key")]) == 2


def test_verify_file_errors(tmp_path: Path) -> None:
    with pytest.raises(AuditFileError):
        verify_audit_file(tmp_path / "nope.duckdb", [PINNED.public_key()])
    con = duckdb.connect(str(tmp_path / "other.duckdb"))
    con.execute("CREATE TABLE x (a INT)")
    con.close()
    report = verify_audit_file(tmp_path / "other.duckdb", [PINNED.public_key()])
    assert not report.ok and {p.kind for p in report.problems} == {"schema"}
