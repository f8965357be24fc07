"""`python -m launcher VERB`: the verbs of launch.sh, each turned into its command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional

from launcher import LaunchError, log_to_stderr
from launcher.hosts import load_layout
from launcher.install import RUNTIME_PACKAGES, install_debian, run_tests, setup_hosts
from launcher.logs import follow_logs, print_logs
from launcher.start import restart, start
from launcher.status import status
from launcher.stop import stop_api, stop_ring
from launcher.supervisor import start_supervisor, stop_supervisor, supervise

log = logging.getLogger(__name__)

USAGE = """\
usage: ./launch.sh VERB [OPTIONS]

  setup [--all-hosts]  create .venv and install dependencies (idempotent; quick when up
                       to date); --all-hosts also runs it in REMOTE_DIR on every host
  test [PYTEST ARGS]   setup, then run the test suite
  start                start the ranks and the API, wait until they serve, print the URL;
                       leave the supervisor running (SUPERVISE), which restarts a ring
                       whose rank exited or hangs, and an API that exited
  stop                 stop the supervisor, the ranks (rank 0 finishes its token first)
                       and the API
  restart              stop the ranks and start again; a running API is kept when its
                       settings did not change, so queued requests wait and are served
  status               ranks (host, pid, layers, memory, alive) and API health;
                       exit status 0 only when everything is up
  logs [-f] [-n LINES] the last LINES (default 40) of each rank's and the API's log;
                       -f follows them

Settings come from the environment, then .env (or the file MLX_RING_ENV_FILE names),
then the defaults; .env.example documents them. `.venv/bin/python -m config` shows them.
"""


class Parser(argparse.ArgumentParser):
    """Reports a bad option as the verbs' other errors are reported."""

    def error(self, message: str):
        raise LaunchError(f"{self.prog.split()[-1]}: {message} (./launch.sh help lists the options)")


def line_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"needs a number of lines, such as -n 100; got {text!r}")
    return int(text)


def parser() -> Parser:
    verbs = Parser(prog="launch.sh", add_help=False)
    sub = verbs.add_subparsers(dest="verb", parser_class=Parser)
    setup = sub.add_parser("setup", add_help=False, allow_abbrev=False)
    setup.add_argument("--all-hosts", action="store_true")
    sub.add_parser("test", add_help=False)  # every argument goes to pytest
    for verb in ("start", "stop", "restart", "status", "supervise"):
        sub.add_parser(verb, add_help=False)
    logs = sub.add_parser("logs", add_help=False, allow_abbrev=False)
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=line_count, default=40)
    return verbs


def cmd_setup(args: argparse.Namespace) -> int:
    install_debian(RUNTIME_PACKAGES)
    if args.all_hosts:
        setup_hosts(load_layout())
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    install_debian(RUNTIME_PACKAGES)
    layout = load_layout()
    start(layout)
    if layout.settings.supervise:
        start_supervisor(layout)
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    install_debian(RUNTIME_PACKAGES)
    layout = load_layout()
    stop_supervisor(layout)
    restart(layout)
    if layout.settings.supervise:
        start_supervisor(layout)
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    """Not for people: start runs it in the background (launcher/supervisor.py)."""
    return supervise(load_layout())


def cmd_stop(args: argparse.Namespace) -> int:
    layout = load_layout()
    stop_supervisor(layout)
    stopped = stop_ring(layout)
    stop_api(layout)
    return 0 if stopped else 1


def cmd_status(args: argparse.Namespace) -> int:
    return status(load_layout())


def cmd_logs(args: argparse.Namespace) -> int:
    layout = load_layout()
    if args.follow:
        return follow_logs(layout, args.lines)
    print_logs(layout, args.lines)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "setup": cmd_setup, "start": cmd_start, "stop": cmd_stop, "restart": cmd_restart, "status": cmd_status,
    "logs": cmd_logs, "supervise": cmd_supervise,
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log_to_stderr()
    verb = argv[0] if argv else ""
    if verb in ("", "-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if verb else 1
    if verb != "test" and verb not in COMMANDS:
        log.info("unknown verb: %s", verb)
        print(USAGE, end="")
        return 2
    try:
        args, extra = parser().parse_known_args(argv)
        if verb == "test":
            run_tests(extra)
        if extra:
            raise LaunchError(f"{verb}: unknown option {extra[0]!r} (./launch.sh help lists the options)")
        return COMMANDS[verb](args)
    except LaunchError as err:
        log.error("error: %s", err)
        return 1
