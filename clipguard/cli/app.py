"""The ``clipguard`` command: registers the commands, nothing more. Importing this module must not import
torch (``--help`` stays fast); each command imports its library call when it runs."""

from __future__ import annotations

import sys
import time

import typer
from typer.exceptions import TyperException

from clipguard.cli import cache as cache_cli
from clipguard.cli import uap as uap_cli
from clipguard.cli.attack import attack_command
from clipguard.cli.certify import certify_command
from clipguard.cli.compare import compare_command
from clipguard.cli.datasets import datasets_command
from clipguard.cli.eval import eval_command
from clipguard.cli.finetune import finetune_command
from clipguard.cli.options import Command
from clipguard.cli.prepare import prepare_command
from clipguard.cli.report import bench_app, gate_command, report_command

app = typer.Typer(name="clipguard", no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure and improve the adversarial robustness of CLIP zero-shot classifiers. "
                       "eps values are in [0, 1] pixel units; 8/255 is accepted.")
app.command("eval", cls=Command)(eval_command)
app.command("attack", cls=Command)(attack_command)
app.command("certify", cls=Command)(certify_command)
app.command("finetune", cls=Command)(finetune_command)
app.command("prepare", cls=Command)(prepare_command)
app.add_typer(uap_cli.app, name="uap")
app.add_typer(bench_app, name="bench")
app.command("report", cls=Command)(report_command)
app.command("gate", cls=Command)(gate_command)
app.command("compare", cls=Command)(compare_command)
app.add_typer(cache_cli.app, name="cache")
app.command("datasets", cls=Command)(datasets_command)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code; user errors print one line to stderr (code 2).

    Under torchrun every rank runs this. An error found before the ranks start working on their own images
    (every option check) is the same on every rank and printed once, by rank 0. One a single rank meets later is
    printed by that rank, naming it, and left in the process group's store: a rank whose next collective breaks
    because of it ends with the same line (unless torchrun has stopped it first)."""
    from clipguard import distributed
    from clipguard.errors import ClipguardError
    from clipguard.fsutil import holding_write_failures

    distributed.bind_device()
    try:
        with holding_write_failures():  # a product that fails to be written after the work waits for the record
            code = app(args=argv, prog_name="clipguard", standalone_mode=False)  # usage errors come back here
        if isinstance(code, int) and code:  # typer.Exit(1) (a failed gate), --help's Exit(0)
            return code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except TyperException as e:  # a usage error (no such option, a missing value): one line like every other error
        if hasattr(e, "format_message"):
            ctx = getattr(e, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"Error: {e.format_message()}{where}", err=True)
        else:
            typer.echo("Aborted.", err=True)
        return getattr(e, "exit_code", 1)
    except (ClipguardError, OSError) as e:
        if isinstance(e, OSError):  # a file no check could foresee (disk full mid-run, a folder gone): one line too
            from clipguard.fsutil import describe_os_error

            e = ClipguardError(describe_os_error(e))
        if distributed.started():  # this rank alone may have met it: say which, and tell the others
            line = f"Error (rank {distributed.rank()} of {distributed.world_size()}): {e}"
            distributed.report_error(line)
            typer.echo(line, err=True)
        elif distributed.is_main():
            typer.echo(f"Error: {e}", err=True)
        else:  # every rank met the same error; rank 0 says it: give it the time before torchrun stops the run
            time.sleep(5)
        return e.exit_code
    except KeyboardInterrupt:
        typer.echo("Aborted.", err=True)
        return 130
    except RuntimeError:  # a collective broke because another rank stopped: end with its line, if it left one
        line = distributed.peer_error() if distributed.started() else None
        if line is None:
            raise
        typer.echo(line, err=True)
        return 2
    finally:
        distributed.shutdown()
    return 0


def main() -> None:
    """Console entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
