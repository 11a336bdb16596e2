"""Saving the prefix cache: every cached block (pool, host tier, disk tier) as a block file in a directory.

Incremental: a block whose file already exists is skipped (block files are named by their chain hash, and
equal hashes mean equal prefixes under one salt). Loading is lazy: the directory becomes a read-only disk
tier (KVTiers.add_dir), and blocks are read, verified and restored only when a prompt's prefix hits them.
"""
from __future__ import annotations

from pathlib import Path

from tierlm.kvcache.block_file import CorruptBlockError, StoredBlock, open_block_dir, read_block, write_block
from tierlm.kvcache.paged import PagedKV


def save_prefix_cache(kv: PagedKV, directory: Path) -> int:
    """Write the cached blocks of `kv` not yet in `directory`; returns how many were written."""
    tiers, man = kv.tiers, kv.manager
    open_block_dir(directory, man.salt, create=True)
    have = {bytes.fromhex(f.stem) for f in directory.glob("*.kvb")}
    written = 0
    for block, h in list(man.hash_of.items()):
        if h not in have:
            payload = kv.pool.read_block(block)
            write_block(directory, StoredBlock(h, man.parent_of[block], man.tokens_of[block], payload), tiers.storage,
                        tiers.codec)
            have.add(h)
            written += 1
    for h, item in tiers.all_blocks():
        if h in have:
            continue
        if isinstance(item, Path):
            try:
                item = read_block(item, tiers.storage)
            except CorruptBlockError:
                continue  # not worth saving; it will be recomputed when needed
        write_block(directory, item, tiers.storage, tiers.codec)
        have.add(h)
        written += 1
    return written
