"""The root ``advcl`` command. ``main()`` holds the one error handler."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from typing import Annotated, Optional

import typer

from ..version import __version__
from ..errors import AdvclError, AdvclWarning, os_error
from . import attack, benchmark, evaluate, finetune, imports, lpaft, pretrain, pseudo_labels, pull, push, zoo
from .options import documented
from .output import Output
from .training import bare_resume

# Typer may vendor click; take its exception classes from Typer itself.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

HELP = (
    "Adversarial contrastive pretraining (AdvCL and its family), robust finetuning, attacks and a model zoo.\n\n"
    "stdout carries data (a path, a table, or JSON with --json); logs and progress go to stderr.\n\n"
    "Example, offline on the bundled digits data:\n\n"
    "\b\n"
    "  ckpt=$(advcl pretrain --dataset digits --arch resnet18-tiny --epochs 2 \\\n"
    "    --batch-size 64 --out runs/example)\n"
    "  advcl finetune $ckpt --scheme slf --epochs 2 | advcl eval --attack pgd20"
)


def _version(value: bool) -> None:
    if value:
        print(f"advcl {__version__}")
        raise typer.Exit()


def root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    pass


def build_app(verb: str | None = None) -> typer.Typer:
    """The `advcl` command. The methods' options of `advcl pretrain` (and their finetuning
    protocols in `advcl finetune --help`) are built only when ``verb`` is that command: they
    import every method (and torch), which the other verbs and the command list do not need."""
    app = typer.Typer(
        name="advcl",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(root)
    app.command("pretrain")(pretrain.command(full=verb == "pretrain"))
    app.add_typer(pseudo_labels.app, name="pseudo-labels")
    app.command("import")(imports.import_checkpoint)
    app.command("lpaft")(lpaft.lpaft)
    app.command("finetune")(finetune.command(full=verb == "finetune"))
    app.command("attack")(attack.attack)
    app.command("eval")(evaluate.evaluate)
    app.command("benchmark")(benchmark.benchmark)
    app.command("pull")(pull.pull)
    app.command("push")(push.push)
    app.add_typer(zoo.app, name="zoo")
    _reflow_help(app)
    return app


def _reflow_help(app: typer.Typer) -> None:
    """Every command's docstring as rich help wants it (``options.reflow``)."""
    for info in app.registered_commands:
        documented(info.callback)
    for group in app.registered_groups:
        if group.typer_instance.registered_callback is not None:
            documented(group.typer_instance.registered_callback.callback)
        _reflow_help(group.typer_instance)


@contextlib.contextmanager
def _show_warnings(out: Output):
    """Inside: advcl's own warnings (``AdvclWarning``) as one ``warning:`` line on stderr;
    others as Python shows them."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, AdvclWarning):
                out.warn(str(message))
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        yield


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every error ends here as one or two lines on stderr and an exit code."""
    out = Output()
    args = bare_resume(sys.argv[1:] if argv is None else list(argv))
    with _show_warnings(out):
        code = _run(args, out, os.environ.get("ADVCL_DEBUG") == "1")
    return _exit(code, argv)


def _run(args: list[str], out: Output, debug: bool) -> int:
    verb = next((a for a in args if not a.startswith("-")), None)
    try:
        rv = build_app(verb)(args=args, prog_name="advcl", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == 130:  # Typer turns a KeyboardInterrupt into a silent exit 130 (training raises Interrupted instead)
            out.error("interrupted")
    except AdvclError as e:
        if debug:  # the traceback, and still the exit code of the error (2 for bad input)
            traceback.print_exc()
        out.error(e.message, e.hint)
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        out.error("aborted")
        code = 130
    except ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: show its help
            out.log(e.format_message())
            return 2
        cmd = e.ctx.command_path if getattr(e, "ctx", None) else "advcl"
        out.error(e.format_message(), f"see `{cmd} --help`")
        code = e.exit_code
    except KeyboardInterrupt:  # outside a command
        out.error("interrupted")
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as e:  # a bug: say so in one line, the traceback only on request
        if debug:
            raise
        if isinstance(e, OSError) and e.filename:  # the disk, not a bug: the path and the cause
            err = os_error(e, e.filename, "use")
            out.error(err.message, err.hint)
            return err.exit_code
        out.error(f"internal error: {type(e).__name__}: {e}", "rerun with ADVCL_DEBUG=1 for the traceback and report it")
        code = 1
    return code


def _exit(code: int, argv: list[str] | None) -> int:
    sys.stdout.flush()
    if argv is None:
        sys.exit(code)
    return code
