"""What every regionkd command-line program shares: exit codes for expected errors, `--version`,
and the one progress policy.

Progress policy: library code never draws. It reports through `logging` and, where the work is
long, an optional `progress` callback (called with the number of items just finished). Only a
command turns that callback into something visible, with `progress_bar`: a tqdm bar when stderr
is a terminal, and otherwise (a log file, CI) one plain line every `every` items and at the end,
so a log holds lines instead of hundreds of carriage-return frames.
"""
from __future__ import annotations

import sys
import time

import click

from .errors import RegionKDError


def version_option(fn):
    """`--version` on every regionkd command: 'regionkd-segment, regionkd 0.1.0'."""
    from . import __version__

    return click.version_option(__version__, "--version", message="%(prog)s, regionkd %(version)s")(fn)


def run_cli(command: click.Command, argv=None) -> None:
    """Run a click command: a RegionKDError (or a missing/existing file) becomes one line
    'error: ...' on stderr and exit status 1; Ctrl-C exits 130; a non-zero int returned by the
    command (some of its work failed) becomes the exit status."""
    try:
        rc = command.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (RegionKDError, FileNotFoundError, FileExistsError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


class _LineProgress:
    """The non-terminal stand-in for a tqdm bar: 'desc: n/total unit (elapsed)' lines."""

    def __init__(self, total, desc, unit, every, initial=0, stream=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, max(1, int(every))
        self.n = self._last = int(initial)
        self.stream = stream or sys.stderr
        self._start = time.perf_counter()
        self.postfix = ""

    def _line(self) -> None:
        total = f"/{self.total}" if self.total else ""
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{total} {self.unit} ({time.perf_counter() - self._start:.0f} s){extra}",
              file=self.stream, flush=True)
        self._last = self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self._last >= self.every:
            self._line()

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def set_description_str(self, text: str, refresh: bool = False) -> None:
        """A step's name (e.g. of the PACS round trip): one line each."""
        self.desc = text
        self._line()

    def write(self, message: str, file=None) -> None:
        print(message, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if self.n != self._last:
            self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Silent(_LineProgress):
    def _line(self) -> None:
        self._last = self.n


def progress_bar(total=None, desc: str = "", unit: str = "it", quiet: bool = False, every: int | None = None,
                 initial: int = 0, stream=None):
    """The progress display of a command (see the module doc): nothing when `quiet`, a tqdm bar on a
    terminal, plain lines every `every` items (default: about every tenth of `total`) otherwise.
    The object has tqdm's `update(n)`, `write(msg, file=)`, `set_postfix_str` and `close()`, so a
    command passes `bar.update` to library code as its `progress` callback."""
    stream = stream or sys.stderr
    if quiet:
        return _Silent(total, desc, unit, 1, initial, stream)
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream)
    if every is None:
        every = max(1, (total or 10) // 10)
    return _LineProgress(total, desc, unit, every, initial, stream)


def echo(message: str, bar=None, err: bool = False) -> None:
    """A line that does not break a progress bar (tqdm.write on a terminal, print otherwise)."""
    stream = sys.stderr if err else sys.stdout
    if bar is not None and hasattr(bar, "write"):
        bar.write(message, file=stream)
    else:
        print(message, file=stream, flush=True)
