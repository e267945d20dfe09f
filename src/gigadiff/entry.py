"""The `gigadiff` command's entry point: Ctrl-C is handled before anything else is imported (gigadiff.interrupts),
so even an interrupt during the first imports ends with one line and exit code 130, never a traceback."""

from __future__ import annotations


def main() -> None:
    from gigadiff import interrupts

    interrupts.install()
    try:
        from gigadiff.cli import main as command_line
    except (interrupts.Interrupted, Exception):
        if not interrupts.requested():
            raise
        interrupts.report()
        raise SystemExit(interrupts.EXIT_CODE) from None
    command_line()
