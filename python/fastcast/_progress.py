"""Progress bars: tqdm in bytes on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


class ByteProgress:
    """A context manager yielding a callback ``update(bytes_done)``.

    ``enabled=None`` shows the bar only when stderr is a terminal.
    """

    def __init__(self, total: int, description: str, enabled: bool | None = None) -> None:
        show = sys.stderr.isatty() if enabled is None else enabled
        self._bar: tqdm[Any] | None = None
        if show:
            # Imported only to show a bar: importing tqdm took about 25 ms of a small
            # `convert --quiet`'s 180, and runs in scripts and pipelines show none.
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=description,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                dynamic_ncols=True,
                leave=False,
            )

    def __enter__(self) -> Callable[[int], None]:
        bar = self._bar
        if bar is None:
            return lambda done: None

        def update(done: int) -> None:
            bar.update(done - bar.n)

        return update

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()
