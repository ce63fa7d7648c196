"""adp: rewrite tensor-parallel Qwen3 graphs into attention-data-parallel form.

verify checks parity on real ranks, rewrite shows one rank's rewrite, run serves requests on
attention-DP ranks, serve speaks the OpenAI API over them; plan predicts every mapping's decode
step and picks one, calibrate measures the machine's constants for it; quantize writes an FP8
checkpoint. Inputs are checked before any expensive work; errors are a few lines that name the
problem and the fix (exit 2: fix the command line, 1: a failure; --debug: traceback).

Each command is a module of adp_pass/commands/ with ``add_parser`` (its flags) and ``run``;
this module assembles them and turns every error into its message.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from contextlib import contextmanager

# Nothing imported here loads torch or transformers: `adp --help` and every input error must
# answer at once. The commands import them after validation.
from adp_pass.commands import (calibrate, plan, quantize, rewrite, run, serve,  # noqa: F401
                               verify)
from adp_pass.commands.flags import Parser
from adp_pass.errors import AdpError, UsageError
from adp_pass.mapping import MappingError
from adp_pass.quick_exit import exit_without_teardown

MAX_MESSAGE_LINES = 3  # of one error's message; the rest is in the rank log / --debug
# The order of `adp --help`; bench-serve's parser comes with serve's.
COMMANDS = (verify, rewrite, run, plan, calibrate, serve, quantize)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    common = Parser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite `adp --debug CMD`.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, also print the traceback")
    parser = Parser(prog="adp", description=__doc__.rsplit("\n\n", 1)[0], formatter_class=fmt)
    parser.add_argument("--debug", action="store_true", help="on an error, also print the traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub, common, fmt)
    return parser


def _commands() -> dict:
    """Command name -> its run(args, stage)."""
    table = {module.__name__.rsplit(".", 1)[1]: module.run for module in COMMANDS}
    table["bench-serve"] = serve.run_bench
    return table


# ----------------------------------------------------------------------------- progress
class _Stages:
    """Each stage's start and time, on stderr (stdout keeps the results)."""

    def __init__(self, command: str) -> None:
        self.command = command

    @contextmanager
    def __call__(self, what: str):
        print(f"adp {self.command}: {what} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        print(f"adp {self.command}: {what}: done in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the error path
# Errors of modules another change owns (no AdpError base there): caught by class, by stage.
def explain(err: BaseException) -> tuple[int, str, str | None]:
    """(exit code, message, fix) for any error that reaches the command line."""
    if isinstance(err, AdpError):
        message, hint = str(err), err.hint
        if err.flag and err.flag not in message and not isinstance(err, MappingError):
            message = f"{err.flag}: {message}"
        elif isinstance(err, MappingError):
            message = f"bad {err.flag or 'mapping'}: {message}"
        return err.exit_code, message, hint
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted", None
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return 1, f"out of memory: {err}".rstrip(": "), ("use a smaller --preset, --num-blocks "
                                                         "or --world-size")
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return 1, f"{err.strerror or err}{where}", None
    return 1, f"unexpected {type(err).__name__}: {err}", (
        "this is a bug in adp-pass: rerun with --debug and report the traceback")


def _report(err: BaseException, command: str | None, debug: bool) -> int:
    code, message, hint = explain(err)
    lines = [line for line in message.strip().splitlines() if line.strip()] or [message]
    if len(lines) > MAX_MESSAGE_LINES:
        lines = lines[: MAX_MESSAGE_LINES - 1] + [f"... ({len(lines) - MAX_MESSAGE_LINES + 1} "
                                                  "more lines; --debug shows them)"]
    out = [f"adp{' ' + command if command else ''}: error: {lines[0]}", *lines[1:]]
    if hint:
        out.append(f"  fix: {hint}")
    if getattr(err, "log", None):
        out.append(f"  rank logs: {err.log}")
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    print("\n".join(out), file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the adp command itself, not a call from Python
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    commands = _commands()
    command = next((a for a in argv if a in commands), None)  # for the error prefix only
    try:
        args = parser.parse_args(argv)
        code = commands[args.command](args, _Stages(args.command))
    except SystemExit:  # --help
        raise
    except BaseException as err:  # noqa: BLE001 - the one place errors become messages
        if command and isinstance(err, UsageError) and err.hint == "see 'adp --help'":
            err.hint = f"see 'adp {command} --help'"  # argparse reports leftovers at the top
        code = _report(err, command, "--debug" in argv)
    if as_program:
        exit_without_teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
