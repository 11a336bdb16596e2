"""The shared KV tier with kv_remote_secret (issue 23), on a real redis-server: a block is bound to its key and
deployment by an HMAC the replicas' shared secret makes, so anyone who can write to the Redis but lacks the
secret can cost recomputation, never change an answer. Forged values (another prompt's KV re-keyed, checksum
recomputed), values replayed under another key or namespace, and values of another secret are refused before
they are decoded, and nothing of them reaches a local tier; the good path still restores."""
from __future__ import annotations

import logging

import pytest
import redis

from helpers import assert_one_line_error, run_cli
from tierlm import LLM, SamplingParams
from tierlm.cli import build_parser
from tierlm.engine.args import SECRET_ENV, EngineArgs
from tierlm.errors import UsageError
from tierlm.kvcache.block_file import StoredBlock, decode_block, encode_block
from tierlm.kvcache.block_mac import HEADER, MAC_MAGIC, BlockSeal, ForgedBlockError
from tierlm.kvcache.blocks import ROOT_HASH, block_hash

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
P = list(range(10, 51))  # 41 tokens: 10 full blocks of 4 (the last token is always computed)
Q = list(range(300, 341))  # another prompt: the forger's source of well-formed KV
BLOCKS = 10
SECRET = "the replicas' shared secret"


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _engine(path, **kw) -> LLM:
    return LLM(path, progress=False, block_size=4, threads=1, **kw)


def _hashes(salt: bytes, prompt: list[int]) -> list[bytes]:
    out, parent = [], ROOT_HASH
    for i in range(BLOCKS):
        parent = block_hash(parent, tuple(prompt[4 * i:4 * i + 4]), salt)
        out.append(parent)
    return out


def _cached(e: LLM, hashes: list[bytes]) -> dict[bytes, bytes]:
    """The payloads the engine's pool holds for `hashes` (what it would serve from its local cache)."""
    want = set(hashes)
    return {h: e.kv.pool.read_block(b) for b, h in e.kv.manager.hash_of.items() if h in want}


def _forge(a: LLM, url: str, sign: BlockSeal | None) -> dict[bytes, bytes]:
    """The issue's attack by someone who can write to the Redis but lacks the secret: Q's blocks, decoded and
    re-encoded as P's blocks (P's hashes, parents and tokens; checksum and salt digest recomputed), stored under
    P's keys, unsigned or signed with a guessed secret. Returns the forged payloads by P's hash."""
    r, remote, salt = redis.Redis.from_url(url), a.kv.tiers.remote, a.kv.manager.salt
    qh, ph = _hashes(salt, Q), _hashes(salt, P)
    forged = {}
    for i in range(BLOCKS):
        stored = r.get(remote.key(qh[i]))
        value = stored[HEADER:] if stored.startswith(MAC_MAGIC) else stored  # the envelope's format is public
        q = decode_block(value, remote.storage, qh[i], salt)
        fake = StoredBlock(ph[i], ph[i - 1] if i else ROOT_HASH, tuple(P[4 * i:4 * i + 4]), q.payload)
        key = remote.key(ph[i])
        blob = encode_block(fake, remote.storage, "none", salt)
        r.set(key, blob if sign is None else sign.seal(key, blob))
        forged[ph[i]] = q.payload
    r.close()
    return forged


@pytest.mark.parametrize("forger", ["unsigned", "guessed secret"])
def test_forged_blocks_under_this_prompts_keys_are_refused(tiny_models, redis_url, isolated_cache, forger):
    src = tiny_models["qwen2"].path
    honest = _engine(src)
    want = honest.generate([P], GREEDY)[0].token_ids
    a = _engine(src, kv_remote=redis_url, kv_remote_secret=SECRET)
    a.generate([Q], GREEDY)
    a.kv.tiers.flush()
    forged = _forge(a, redis_url, None if forger == "unsigned" else BlockSeal("a guess"))
    b = _engine(src, kv_remote=redis_url, kv_remote_secret=SECRET)
    assert b.generate([P], GREEDY)[0].token_ids == want
    c = b.kv.tiers.remote.counters
    assert b.kv.restored_tokens == 0 and c.restores == 0 and c.forged == c.corrupt == BLOCKS
    # nothing poisoned stayed: the pool holds the honest KV under P's hashes, and serves it again
    held, truth = _cached(b, list(forged)), _cached(honest, list(forged))
    assert len(held) == BLOCKS and held == truth and all(held[h] != forged[h] for h in forged)
    assert b.generate([P], GREEDY)[0].token_ids == want and b.kv.tiers.remote.counters.restores == 0


def test_without_a_secret_the_tier_trusts_the_redis(tiny_models, redis_url, isolated_cache, caplog):
    """What the README says: no secret, no defence — the forged blocks of the test above are restored (so that
    test's refusal is the MAC's doing), and a warning at start says so."""
    src = tiny_models["qwen2"].path
    a = _engine(src, kv_remote=redis_url)
    a.generate([Q], GREEDY)
    a.kv.tiers.flush()
    forged = _forge(a, redis_url, None)
    with caplog.at_level(logging.WARNING, logger="tierlm.kv"):
        b = _engine(src, kv_remote=redis_url)
    assert any("trusts anyone who can write" in r.getMessage() for r in caplog.records)
    b.generate([P], GREEDY)
    assert b.kv.restored_tokens == 4 * BLOCKS and _cached(b, list(forged)) == forged  # poisoned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tierlm.kv"):
        _engine(src, kv_remote=redis_url, kv_remote_secret=SECRET)
    assert not any("trusts anyone" in r.getMessage() for r in caplog.records)


def test_a_value_copied_verbatim_to_another_key_is_refused(tiny_models, redis_url, isolated_cache):
    """A replay: the MAC covers the key, so a genuine value is good under its own key only — another block's
    key, or the same block's key in another deployment's namespace (which the block format alone accepts)."""
    src = tiny_models["llama_gqa_tied"].path
    want = _engine(src).generate([P], GREEDY)[0].token_ids
    r = redis.Redis.from_url(redis_url)
    for secret, refused in ((SECRET, True), (None, False)):
        r.flushall()
        a = _engine(src, kv_remote=redis_url, kv_remote_secret=secret)
        a.generate([Q], GREEDY)
        a.generate([P], GREEDY)
        a.kv.tiers.flush()
        remote, salt = a.kv.tiers.remote, a.kv.manager.salt
        qh, ph = _hashes(salt, Q), _hashes(salt, P)
        other = _engine(src, kv_remote=redis_url, kv_remote_secret=secret, kv_remote_namespace="other")
        for h in ph:  # the same block's genuine value, under another namespace's key
            r.set(other.kv.tiers.remote.key(h), r.get(remote.key(h)))
        assert other.generate([P], GREEDY)[0].token_ids == want
        assert other.kv.restored_tokens == (0 if refused else 4 * BLOCKS)
        assert other.kv.tiers.remote.counters.forged == (BLOCKS if refused else 0)
        if secret is None:
            continue
        for q, p in zip(qh, ph):  # another block's genuine value, under this block's key
            r.set(remote.key(p), r.get(remote.key(q)))
        b = _engine(src, kv_remote=redis_url, kv_remote_secret=secret)
        assert b.generate([P], GREEDY)[0].token_ids == want
        assert b.kv.restored_tokens == 0 and b.kv.tiers.remote.counters.forged == BLOCKS  # the MAC, first
    r.close()


def test_replicas_with_different_secrets_do_not_share(tiny_models, redis_url, isolated_cache, caplog):
    """Each refuses the other's blocks (and recomputes), logged once, not once per block."""
    src = tiny_models["llama_gqa_tied"].path
    want = _engine(src).generate([P], GREEDY)[0].token_ids
    a = _engine(src, kv_remote=redis_url, kv_remote_secret="secret one")
    assert a.generate([P], GREEDY)[0].token_ids == want
    a.kv.tiers.flush()
    b = _engine(src, kv_remote=redis_url, kv_remote_secret="secret two")
    with caplog.at_level(logging.WARNING, logger="tierlm.kv"):
        assert b.generate([P], GREEDY)[0].token_ids == want
    assert b.kv.restored_tokens == 0 and b.kv.tiers.remote.counters.forged == BLOCKS
    assert sum("bad MAC" in r.getMessage() for r in caplog.records) == 1
    b.kv.tiers.flush()  # b wrote its own blocks over a's
    a2 = _engine(src, kv_remote=redis_url, kv_remote_secret="secret one")
    assert a2.generate([P], GREEDY)[0].token_ids == want
    assert a2.kv.restored_tokens == 0 and a2.kv.tiers.remote.counters.forged == BLOCKS
    plain = _engine(src, kv_remote=redis_url)  # no secret: a sealed value cannot be checked, so it is refused
    assert plain.generate([P], GREEDY)[0].token_ids == want
    assert plain.kv.restored_tokens == 0 and plain.kv.tiers.remote.counters.forged == BLOCKS


def test_a_seal_is_broken_by_any_change():
    seal, key, value = BlockSeal(SECRET), b"tierlm:00:ab", b"TLKVBLK1" + bytes(range(256)) * 4
    sealed = seal.seal(key, value)
    assert sealed.startswith(MAC_MAGIC) and seal.open(key, sealed) == value
    for i in (len(MAC_MAGIC), HEADER - 1, HEADER, len(sealed) - 1):  # the tag, the value
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(ForgedBlockError):
            seal.open(key, bytes(bad))
    for bad in (sealed[:HEADER - 1], sealed[:-1], sealed + b"\0", value):
        with pytest.raises(ForgedBlockError):
            seal.open(key, bad)
    with pytest.raises(ForgedBlockError):
        seal.open(b"tierlm:00:ac", sealed)
    assert BlockSeal(None).seal(key, value) == value and BlockSeal(None).open(key, value) == value


def test_an_empty_secret_is_refused_and_the_env_is_the_default(monkeypatch, capsys):
    for empty in ("", "  "):
        with pytest.raises(UsageError, match="kv_remote_secret is empty"):
            EngineArgs(kv_remote="redis://127.0.0.1:1/0", kv_remote_secret=empty).check()
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--kv-remote-secret", "")
    assert_one_line_error(code, err, "kv_remote_secret is empty")
    monkeypatch.setenv(SECRET_ENV, "")
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi")
    assert_one_line_error(code, err, "kv_remote_secret is empty")
    monkeypatch.setenv(SECRET_ENV, "from the env")
    parse = build_parser().parse_args
    assert EngineArgs.from_cli(parse(["serve"])).kv_remote_secret == "from the env"
    assert EngineArgs.from_cli(parse(["serve", "--kv-remote-secret", "flag"])).kv_remote_secret == "flag"
    monkeypatch.delenv(SECRET_ENV)
    assert EngineArgs.from_cli(parse(["serve"])).kv_remote_secret is None
    assert "from the env" not in repr(EngineArgs(kv_remote_secret="from the env"))
    assert SECRET_ENV in build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
