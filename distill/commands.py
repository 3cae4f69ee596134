"""``clip-distill``: one command for every entry point of the project.

    clip-distill train --config configs/default.yaml optim.max_steps=200
    clip-distill evaluate --model outputs/default/final --data ../shared/data/cifar10 --split test
    clip-distill evaluate --help          # each subcommand's own flags
    clip-distill --help                   # the subcommands

Each subcommand hands the rest of the command line, unchanged, to the entry point of the module
named in its help (``clip-distill evaluate ...`` is ``python -m distill.evaluate ...``), so its
flags, output and exit status are the module's (distill/cli.py: 0 done, 1 a failed check or an
unexpected error, 2 bad input). A subcommand's module is imported only when it runs: the top-level
help does not load torch. ``accelerate launch distill/train.py`` stays the way to train on several
processes.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from distill.cli import EXIT_BAD_INPUT, EXIT_OK

PROG = "clip-distill"
GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@dataclass(frozen=True)
class Command:
    name: str
    entry: str  # "module:function"; the function takes the argv list and returns the exit status
    same_as: str  # the command it is equivalent to, shown in the help
    summary: str  # one line for ``clip-distill --help``

    def load(self) -> Callable[[list[str]], int]:
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)


def gpu_check(argv: Sequence[str]) -> int:
    """``python benchmarks/gpu_check.py``: benchmarks/ is a folder of scripts, not a package.

    The script is imported by name from its folder, which stays on ``sys.path``: its distributed
    check spawns worker processes that import it by that name too (they inherit ``sys.path``).
    The folder goes last so that its script names cannot shadow an installed module.
    """
    if not GPU_CHECK.is_file():
        print(f"error: gpu-check runs {GPU_CHECK}, which does not exist: it needs a source checkout "
              "installed with `pip install -e .`", file=sys.stderr)
        return EXIT_BAD_INPUT
    if str(GPU_CHECK.parent) not in sys.path:
        sys.path.append(str(GPU_CHECK.parent))
    return importlib.import_module(GPU_CHECK.stem).main(list(argv))


COMMANDS = {c.name: c for c in (
    Command("train", "distill.train:cli", "python distill/train.py",
            "distil a CLIP teacher into a student (or train one) from a YAML recipe and key=value overrides"),
    Command("text-student", "distill.text_student:cli", "python -m distill.text_student",
            "distil the teacher's text side into a small text encoder, on texts alone"),
    Command("pair", "distill.pair:cli", "python -m distill.pair",
            "pair a saved image model with a text student into one model directory"),
    Command("mean-share", "distill.mean_share:cli", "python -m distill.mean_share",
            "give an image-only student the teacher's share along its mean embedding (no training)"),
    Command("soup", "distill.soup:cli", "python -m distill.soup",
            "average the weights of image students trained from the same start into one student"),
    Command("evaluate", "distill.evaluate:cli", "python -m distill.evaluate",
            "zero-shot, retrieval or linear-probe scores of one model on one dataset"),
    Command("benchmark", "distill.benchmark:cli", "python -m distill.benchmark",
            "several models on every dataset of a suite, with retention against a reference"),
    Command("parity", "exports.parity.cli:main", "python -m exports.parity",
            "export a student and gate each exported variant against the torch student and the teacher"),
    Command("predict", "exports.predict:main", "python -m exports.predict",
            "classify images with an exported bundle (onnxruntime, numpy and pillow only)"),
    Command("precompute", "distill.precompute:cli", "python -m distill.precompute",
            "write the teacher's targets for a sharded corpus once, beside its shards"),
    Command("gpu-check", "distill.commands:gpu_check", "python benchmarks/gpu_check.py",
            "mixed precision, distributed loss, speed and export checks on a GPU machine"),
)}


def help_text() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()]
    lines += ["", f"`{PROG} COMMAND --help` shows a command's flags. Each command is the module entry point",
              "below, with the same flags, output and exit status (0 done, 1 a failed check or an",
              "unexpected error, 2 bad input):", ""]
    lines += [f"  {PROG} {c.name:<{width}} = {c.same_as}" for c in COMMANDS.values()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clip-distill COMMAND ARGS...``; returns the command's exit status.

    Not argparse subcommands: the command's arguments, ``--help`` included, must reach its own
    parser untouched, and an unknown command must be one ``error:`` line, not usage plus an error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(help_text())
        return EXIT_OK
    if not args:  # a usage mistake (e.g. an empty variable in a script), so not exit 0
        print(help_text(), file=sys.stderr)
        return EXIT_BAD_INPUT
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"error: unknown command {args[0]!r}; expected one of: {', '.join(COMMANDS)} "
              f"(see {PROG} --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return command.load()(args[1:])


if __name__ == "__main__":
    sys.exit(main())
