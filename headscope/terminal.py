"""What the command line shows while it works: a tqdm bar on stderr fed by a progress callback."""
from __future__ import annotations

import sys

from core.progress import Progress


def progress_bar(desc: str) -> tuple[object, Progress]:
    """(the bar, a `core.progress.Progress` callback that moves it); close the bar when done."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=desc, file=sys.stderr, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.set_postfix_str(message, refresh=True)

    return bar, update
