"""``manage.py crown_sync status|dismiss [NAME] [--json] [--oracle URL]``.

The ``crown-sync status`` and ``dismiss`` commands themselves (:mod:`crown_sync.cli`), with NAME and
the oracle taken from ``settings.CROWN_SYNC`` when not given: the same output and exit codes, 0
when there was a leader, 1 when there was none, 3 when the oracle could not be asked, 2 for a bad
name or URL. Reads the oracle only; never contends.
"""

import contextlib
import io
import sys

import click
from django.core.management.base import BaseCommand, CommandError

from crown_sync import cli

from ...conf import config


class Command(BaseCommand):
    help = "Who leads the app's election (status), or make its leader step down (dismiss)."
    # Works with explicit NAME and --oracle even while settings.CROWN_SYNC has a problem.
    requires_system_checks = []

    def add_arguments(self, parser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="{status,dismiss}")
        actions.required = True
        helps = {"status": "Print the current leader (exit 0 leader, 1 none, 3 oracle unreachable).",
                 "dismiss": "Make the current leader step down (exit 0 dismissed, 1 none, 3 oracle unreachable)."}
        for action, text in helps.items():
            sub = actions.add_parser(action, help=text, description=text,
                                     called_from_command_line=getattr(parser, "called_from_command_line", None))
            sub.add_argument("name", nargs="?", metavar="NAME", help='default: CROWN_SYNC["NAME"]')
            sub.add_argument("--json", action="store_true", dest="as_json", help="Print a JSON object.")
            sub.add_argument("--oracle", metavar="URL", help='default: CROWN_SYNC["ORACLE"], else $CROWN_SYNC_ORACLE')

    def handle(self, *args, action, name=None, as_json=False, oracle=None, **options):
        if name is None or oracle is None:
            try:
                settings = config()
            except Exception as exc:
                raise CommandError(f"{exc} (or give NAME and --oracle)") from None
            name = settings.name if name is None else name
            oracle = settings.oracle if oracle is None else oracle
        argv = [action, name] + (["--oracle", oracle] if oracle else []) + (["--json"] if as_json else [])
        code = self._run_cli(argv)
        if code:
            sys.exit(code)  # as Django's own makemigrations --check does for its status

    def _run_cli(self, argv) -> int:
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output):
                cli.main.main(args=argv, prog_name="manage.py crown_sync", standalone_mode=False)
            return 0
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except click.ClickException as exc:
            raise CommandError(exc.format_message(), returncode=exc.exit_code) from None
        finally:
            self.stdout.write(output.getvalue(), ending="")
