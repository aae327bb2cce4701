"""Every example of the README and of each verb's `--help`, run in the order they are printed in
one fresh folder, offline, as a new user would paste them.

The examples run in this process through ``main`` (no torch import per command) under a small
shell: ``VAR=$(advcl ...)``, ``$VAR``, pipes, ``A=B advcl ...``, ``&&``, ``for x in ...; do ...;
done`` and ``ls GLOB``. An ``advcl.toml`` in the folder shortens every run (``limit``: the
examples themselves stay what the reader sees); ``shorten`` runs AutoAttack's every attack with
a few iterations (at its real 100 iterations and 5000 queries its example alone took over ten
minutes of a loaded 2-core machine) and caps the digits splits at 128 images (``--limit 1000``). An example that needs what an offline machine
lacks (CIFAR-10/100 or STL-10, which are not downloaded: ``ADVCL_DOWNLOAD=0``; the Hub: offline;
the authors' files; several GPUs) is marked by ``NEEDS`` and must fail cleanly (exit 1 or 2, one
``error:`` line, no traceback), as must an example that reads what such an example would have
made (its variable or its ``--out``). Every other example must succeed.
"""

import glob
import io
import re
import shlex
import sys
from pathlib import Path

from advcl_cli.cli.app import HELP, build_app

README = Path(__file__).resolve().parents[1] / "README.md"
# what an offline machine lacks: datasets that download, the Hub, the authors' files, GPUs; the
# README's plug-in method, which test_plugins installs and trains
NEEDS = re.compile(r"cifar|stl10|\.pkl\b|\.pt\b|\.ckpt\b|hf:|\badvcl (pull|push)\b|/data/|my-lab/|--zoo-entry|advcl-r18-|-m advcl_cli"
                   r"|--method advpair")
SKIP = re.compile(r"^(python3? |\. |pip |pytest|\.ci/|duplicates|torchrun|srun|sbatch|tensorboard |from |f = )")  # not advcl commands
# every verb that reads images: the first 128 of them (one batch of the demo's 128), at 16x16; attacks of one step
# a command line, not a listing such as `advcl pretrain --help`'s methods
COMMAND = re.compile(r"^([A-Z_]+=\S*\s+)?(\w+=\$\()?advcl (pretrain|pseudo-labels|import|lpaft|finetune|attack|eval|benchmark|pull|push|zoo)\b"
                     r"|^(for|ls) |^\w+=\S+$|-m advcl_cli")
TOML = 'limit = 128\nepochs = 2\neval_limit = 32\nimage_size = 16\npgd_steps = 1\nattack_steps = 1\n[eval]\nlimit = 16\n'


def shorten(monkeypatch):
    """What a flag in an example would set beyond ``TOML``: every AutoAttack component still runs,
    with 2 iterations (APGD, FAB) and 8 queries (Square); a digits split holds at most 128 images
    (an example's ``--limit 1000`` or ``--pgd-check 500`` reads them all)."""
    from advcl_cli.attacks import autoattack
    from advcl_cli.data import registry

    for name, value in (("APGD_ITERS", 2), ("FAB_ITERS", 2), ("SQUARE_QUERIES", 8)):
        monkeypatch.setattr(autoattack, name, value)
    digits = registry._load_digits
    monkeypatch.setattr(registry, "_load_digits", lambda split, size, limit=None: digits(split, size, min(limit or 128, 128)))


def help_pages() -> list[tuple[list[str], str]]:
    """(the verb's words, its help text) for the root help and each verb's help, in the order
    `build_app` registers the verbs (`advcl --help` lists them so); each verb's text is built as
    `advcl VERB --help` builds it (with the methods' panels for pretrain and finetune)."""
    pages = [([], HELP)]
    for verb in ("pretrain", "pseudo-labels", "import", "lpaft", "finetune", "attack", "eval", "benchmark", "pull",
                 "push", "zoo"):
        app = build_app(verb)
        commands = {info.name: info.callback.__doc__ for info in app.registered_commands}
        if verb in commands:
            pages.append(([verb], commands[verb]))
            continue
        group = next(g.typer_instance for g in app.registered_groups if g.name == verb)
        head = group.registered_callback.callback.__doc__ if group.registered_callback else group.info.help
        pages += [([verb], head)] + [([verb, c.name], c.callback.__doc__) for c in group.registered_commands]
    return pages


def example_block_lines(doc: str) -> list[str]:
    """The lines of a help text's examples: its ``\\b`` blocks, and lines that start with `advcl`."""
    lines, block = [], False
    for line in (doc or "").split("\n"):
        if line.strip() == "\b":
            block = True
        elif not line.strip():
            block = False
        elif block or line.startswith("  advcl "):
            lines.append(line.strip())
    return lines


def help_examples() -> list[str]:
    """The example lines of the root help and of each verb's help, in the order they are shown."""
    lines = [line for _, doc in help_pages() for line in example_block_lines(doc)]
    return [line for line in join_continuations(lines) if COMMAND.search(line)]


def readme_examples() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        lines += [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    return join_continuations(lines)


def join_continuations(lines: list[str]) -> list[str]:
    out, cur = [], ""
    for line in lines:
        cur = f"{cur} {line}".strip() if cur else line
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip()
            continue
        out.append(re.sub(r"\s+#\s.*$", "", cur))
        cur = ""
    return out


class Shell:
    def __init__(self, monkeypatch):
        from advcl_cli.cli.app import main

        self.main, self.mp, self.vars, self.tainted = main, monkeypatch, {}, set()

    def run(self, argv: list[str], stdin: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with self.mp.context() as m:
            m.setattr(sys, "stdin", io.StringIO(stdin))
            m.setattr(sys, "stdout", out)
            m.setattr(sys, "stderr", err)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                key, _, value = argv.pop(0).partition("=")
                m.setenv(key, value)
            if argv[0] == "ls":
                return 0, "".join(f"{p}\n" for a in argv[1:] for p in sorted(glob.glob(a))), ""
            assert argv[0] == "advcl", argv
            code = self.main(argv[1:])
        return code, out.getvalue(), err.getvalue()

    def pipeline(self, text: str) -> tuple[int, str, str]:
        stdin, errs, code = "", "", 0
        for part in text.split(" | "):  # as bash with pipefail, the first failure is the pipeline's
            argv = shlex.split(re.sub(r"\$(\w+)", lambda m: self.vars.get(m.group(1), ""), part))
            code, stdin, err = self.run(argv, stdin)
            errs += err
            if code != 0:
                break
        return code, stdin, errs

    def example(self, line: str) -> list[tuple[str, int, str]]:
        """Run one example line; (the command, its exit code, its stderr) for each command."""
        loop = re.fullmatch(r"for (\w+) in (.+?); do (.+?); done", line)
        if loop:
            done = []
            for value in loop.group(2).split():
                self.vars[loop.group(1)] = value
                done += self.example(loop.group(3))
            return done
        done = []
        for command in line.split(" && "):
            if SKIP.match(command):
                continue
            plain = re.fullmatch(r"(\w+)=([^$\s]+)", command)
            if plain:  # enc=PATH
                self.vars[plain.group(1)] = plain.group(2)
                self.tainted.discard(f"${plain.group(1)}")
                continue
            assign = re.fullmatch(r"(\w+)=\$\((.+)\)", command)
            code, out, err = self.pipeline(assign.group(2) if assign else command)
            made = ([f"${assign.group(1)}"] if assign else []) + re.findall(r"--(?:out|manifest) ([^\s)]+)", command)
            if assign:
                self.vars[assign.group(1)] = out.strip() if code == 0 else ""
            # what a failed example would have made taints the examples that read it
            self.tainted = self.tainted | set(made) if code != 0 else self.tainted - set(made)
            done.append((command, code, err))
            if code != 0:
                break
        return done

    def expects_failure(self, line: str) -> bool:
        return bool(NEEDS.search(line)) or any(re.search(re.escape(t) + r"(/|\s|$)", line) for t in self.tainted)


def test_every_example_runs_in_order_in_a_fresh_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVCL_DOWNLOAD", "0")  # CIFAR and STL-10 are not on this machine
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "advcl.toml").write_text(TOML)
    shorten(monkeypatch)
    shell = Shell(monkeypatch)
    examples = [("README", line) for line in readme_examples()] + [("--help", line) for line in help_examples()]
    ran, problems = 0, []
    for where, line in examples:
        expected_failure = shell.expects_failure(line)
        for command, code, err in shell.example(line):
            ran += 1
            clean = code in (1, 2) and sum(e.startswith("error:") for e in err.splitlines()) == 1 \
                and "Traceback" not in err and "internal error" not in err
            if code != 0 and not (expected_failure and clean):
                problems.append(f"{where}: `{command}` exited {code}: {err.strip()[-300:]}")
    assert ran > 40
    assert not problems, "\n".join(problems)


def test_help_examples_do_not_wrap_at_80_columns(monkeypatch, capsys):
    """Every line of every help's examples and listings is shown whole in an 80-column terminal
    (a wrapped `... --out` / `runs/advcl` cannot be pasted)."""
    from advcl_cli.cli.app import main

    monkeypatch.setenv("COLUMNS", "80")
    wrapped = []
    for words, doc in help_pages():
        assert main([*words, "--help"]) == 0
        shown = {line.strip() for line in capsys.readouterr().out.splitlines()}
        assert max(map(len, shown)) <= 80
        wrapped += [f"advcl {' '.join(words)} --help: {line}" for line in example_block_lines(doc) if line not in shown]
    assert not wrapped, "\n".join(wrapped)
