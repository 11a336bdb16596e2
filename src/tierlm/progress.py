"""Progress bars for long operations: shown on a TTY by default (progress=None), forced on/off otherwise."""
from __future__ import annotations

from tqdm import tqdm


def progress_bar(total: int, desc: str, progress: bool | None = None, unit: str = "it") -> tqdm:
    # tqdm's disable=None means "disable when not a TTY".
    disable = {None: None, True: False, False: True}[progress]
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True)
