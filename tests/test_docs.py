"""The docs stay true: the README's shape, the generated configuration reference, local links, and
every shell command of the docs' ```bash blocks.

A command is checked without running its job (that takes minutes to hours): the script or module
it names exists, its ``--help`` works, its flags are accepted by its real argparse parser (the
parser runs in this process and the command stops right after it), the repository files it names
(``configs/``, ``suites/``, ``benchmarks/``, ``scripts/``, ``docs/``) exist, and for
``distill/train.py`` and ``distill.precompute`` the recipe and its ``key=value`` overrides load and
validate through ``distill.config.load_config``. ``accelerate launch`` and ``torchrun`` lines are
parsed by Accelerate's and torch's own launcher parsers first. Parsing needs no GPU, network or
data, so commands meant for a GPU or a connected machine are checked too.

A block whose commands cannot be checked this way (an interactive or system command) is preceded
by ``<!-- docs-check: skip REASON -->`` and reported as skipped with that reason. ``clip-distill``
lines are checked only when the console script is on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 250
README_COMMANDS = [
    "bash scripts/setup.sh && . .venv/bin/activate && accelerate launch distill/train.py",
    ". .venv/bin/activate && HF_HUB_OFFLINE=1 python -m pytest -q",
]
SKIP_MARK = re.compile(r"\s*<!--\s*docs-check:\s*skip\s+(.+?)\s*-->\s*")  # a line of its own
REPO_DIRS = ("configs/", "suites/", "benchmarks/", "scripts/", "docs/", "tests/")
# commands the check knows and leaves alone (environment set-up, shell built-ins)
IGNORED = {".", "source", "cd", "export", "pip", "apt-get", "git", "echo", "ls", "cat", "mkdir", "chromium"}
# the console script's subcommands and the entry points whose parsers they share
CONSOLE = {"train": "distill/train.py", "evaluate": "distill.evaluate", "benchmark": "distill.benchmark",
           "parity": "exports.parity", "predict": "exports.predict", "precompute": "distill.precompute",
           "gpu-check": "benchmarks/gpu_check.py"}
# entry points that hand their parsed arguments to distill.config.load_config
CONFIG_TARGETS = {"distill/train.py", "distill.precompute"}


@dataclass
class Snippet:
    doc: Path
    line: int
    command: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def bash_blocks(doc: Path):
    """(first line number, lines, skip reason) of each ```bash block of ``doc``."""
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("```bash", "```sh", "```shell"):
            skip = None
            for back in range(i - 1, max(i - 3, -1), -1):  # the marker sits just above the fence
                mark = SKIP_MARK.fullmatch(lines[back])
                if mark:
                    skip = mark.group(1)
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            yield i + 2, lines[i + 1 : j], skip
            i = j
        i += 1


def strip_comment(line: str) -> str:
    """Drop a shell comment (a '#' at the start of a word, outside quotes)."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip()
    return line


def snippets() -> list[Snippet]:
    out = []
    for doc in DOCS:
        if not doc.is_file():
            continue
        for first, lines, skip in bash_blocks(doc):
            command, start = "", None
            for k, raw in enumerate(lines):
                text = strip_comment(raw)
                if not text.strip() and not command:
                    continue
                start = first + k if start is None else start
                if text.endswith("\\"):
                    command += text[:-1] + " "
                    continue
                command += text
                if command.strip():
                    out.append(Snippet(doc, start, command.strip(), skip))
                command, start = "", None
    return out


def split_commands(command: str) -> list[list[str]]:
    """Simple commands of a shell line (split at &&, ||, ;, |), as words."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    parts, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    return [p for p in parts if p]


def strip_prefix(words: list[str]) -> list[str]:
    """Drop environment assignments and wrappers: ``A=1 nice -n 10 env B=2 time python ...``."""
    while words:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]) or words[0] in ("env", "time"):
            words = words[1:]
        elif words[0] == "nice":
            words = words[3:] if len(words) > 2 and words[1] == "-n" else words[1:]
        else:
            break
    return words


class _Parsed(BaseException):
    """Raised right after a command's arguments parsed, so that its job never starts (a BaseException:
    the entry points' ``except Exception`` error handlers must not turn it into an exit status)."""


def run_entry(target: str, argv: list[str]) -> None:
    """Run ``target`` (a script path or a module name) as ``__main__`` with ``argv``, stopping it right
    after its arguments are parsed (and, for CONFIG_TARGETS, after its config loaded and validated)."""
    from distill import config as config_mod

    real_parse, real_load = argparse.ArgumentParser.parse_args, config_mod.load_config

    def parse_args(self, args=None, namespace=None):
        ns = real_parse(self, args, namespace)
        if target not in CONFIG_TARGETS:
            raise _Parsed(ns)
        return ns

    def load_config(path=None, overrides=()):
        raise _Parsed(real_load(path, overrides))

    saved_argv, saved_path, imported = sys.argv[:], sys.path[:], set(sys.modules)
    sys.argv = [target, *argv]
    argparse.ArgumentParser.parse_args, config_mod.load_config = parse_args, load_config
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
            try:
                if target.endswith(".py"):
                    runpy.run_path(str(REPO / target), run_name="__main__")
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
            except _Parsed:
                return
            except SystemExit as exc:
                if exc.code not in (0, None) or "--help" not in argv:
                    raise AssertionError(f"{target} {' '.join(argv)}: exit {exc.code}: {err.getvalue()}") from None
                return
        raise AssertionError(f"{target} returned without parsing its arguments through argparse")
    finally:
        argparse.ArgumentParser.parse_args, config_mod.load_config = real_parse, real_load
        sys.argv[:], sys.path[:] = saved_argv, saved_path
        # a project module first imported under the patch holds the patched load_config (`from distill.config import
        # load_config`): forget it, so that a later test imports it afresh with the real one
        for name in set(sys.modules) - imported:
            if name.split(".")[0] in ("distill", "clipcore", "students", "exports", "benchmarks"):
                del sys.modules[name]


def uses_argparse(target: str) -> bool:
    if target.endswith(".py"):
        return "ArgumentParser" in (REPO / target).read_text()
    spec = importlib.util.find_spec(target)
    sources = [Path(spec.origin)]
    if spec.submodule_search_locations:  # a package run as __main__: its __main__ and its cli
        sources = list(Path(spec.origin).parent.glob("*.py"))
    return any("ArgumentParser" in p.read_text() for p in sources)


def check_repo_paths(words: list[str]) -> None:
    for word in words:
        for value in (word, word.partition("=")[2]):
            if value.startswith(REPO_DIRS):
                path = value.split("#")[0].rstrip(",;:")
                assert (REPO / path).exists(), f"{path} does not exist"


def check_target(target: str, argv: list[str], helped: set[str]) -> None:
    if target.endswith(".py"):
        assert (REPO / target).is_file(), f"script {target} does not exist"
    else:
        assert importlib.util.find_spec(target) is not None, f"module {target} does not exist"
    if not uses_argparse(target):
        return  # a script reading sys.argv itself (a few benchmarks): its existence is all we can check cheaply
    if target not in helped:
        run_entry(target, ["--help"])
        helped.add(target)
    run_entry(target, argv)


def check_command(words: list[str], helped: set[str]) -> None:
    words = strip_prefix(words)
    if not words or words[0] in IGNORED:
        return
    check_repo_paths(words)
    head, rest = words[0], words[1:]
    if head in ("python", "python3"):
        if rest[:1] == ["-m"]:
            module, argv = rest[1], rest[2:]
            if module == "pytest":
                for arg in argv:
                    if arg.startswith("tests/"):
                        assert (REPO / arg.split("::")[0]).exists(), f"{arg} does not exist"
                return
            check_target(module, argv, helped)
        else:
            check_target(rest[0], rest[1:], helped)
    elif head == "accelerate":
        if rest[:1] == ["config"]:
            return  # interactive; `accelerate` itself is a dependency
        assert rest[:1] == ["launch"], f"unknown accelerate subcommand {rest[:1]}"
        from accelerate.commands.launch import launch_command_parser

        args = launch_command_parser().parse_args(rest[1:])
        check_target(args.training_script, list(args.training_script_args), helped)
    elif head == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(rest)
        check_target(args.training_script, list(args.training_script_args), helped)
    elif head == "bash":
        assert (REPO / rest[0]).is_file(), f"{rest[0]} does not exist"
    elif head == "clip-distill":
        if shutil.which("clip-distill") is None:
            pytest.skip("the clip-distill console script is not installed here (pip install -e .)")
        assert rest and rest[0] in CONSOLE, f"clip-distill: unknown subcommand {rest[:1]}; expected {list(CONSOLE)}"
        subprocess.run(["clip-distill", rest[0], "--help"], check=True, capture_output=True, timeout=300)
        check_target(CONSOLE[rest[0]], rest[1:], helped)
    else:
        raise AssertionError(f"command {head!r} is unknown to tests/test_docs.py: mark its block with "
                             "<!-- docs-check: skip REASON --> or teach the test to check it")


SNIPPETS = snippets()
_HELPED: set[str] = set()


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_doc_command(snippet: Snippet):
    if snippet.skip:
        pytest.skip(snippet.skip)
    for words in split_commands(snippet.command):
        try:
            check_command(words, _HELPED)
        except AssertionError as exc:
            raise AssertionError(f"{snippet.id}: {snippet.command}\n{exc}") from None


def test_docs_have_commands():
    """Every task page shows at least one checked command (a page of prose only would not be tested)."""
    pages = {s.doc.name for s in SNIPPETS}
    for name in ("README.md", "training.md", "general-student.md", "export.md", "parity.md", "evaluation.md",
                 "teachers.md", "development.md", "sharded-data.md", "benchmarks.md"):
        assert name in pages, f"no ```bash command found in {name}"


def test_readme_shape():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_LIMIT, f"README.md has {len(lines)} lines; keep it <= {README_LIMIT} (move detail to docs/)"
    assert lines[0].startswith("# ")
    first_block = next(block for _, block, _ in bash_blocks(REPO / "README.md"))
    assert first_block[:2] == README_COMMANDS, "the README's first block must be its two commands, verbatim"
    ci = (REPO / ".ci" / "run").read_text()
    assert README_COMMANDS[1] in ci, "CI must run exactly the README's test command"


def test_configuration_reference_is_current():
    module = load_script("scripts/config_reference.py")
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == module.render(), "docs/configuration.md is out of date: run python scripts/config_reference.py"


def github_slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = github_slug(line.lstrip("#"))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_local_links():
    """Every relative link of the docs points at a file that exists, and at a heading that exists."""
    broken = []
    for doc in DOCS:
        if not doc.is_file():
            continue
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
