"""The installed commands (pyproject.toml's [project.scripts]): `t5g2-<name>` is
`python -m launch.<name>`, the same program with the same flags, --help and exit status.

Each command runs its module as `__main__` rather than calling a function of it, so what a module
does only as a program still happens: `launch.aot` sets the JAX platform and device count before
it imports JAX, `launch.make_gemma3` defines its flags there. This module imports nothing else.
"""

from __future__ import annotations

import runpy
from typing import Callable


def _command(module: str) -> Callable[[], None]:
    def command() -> None:
        runpy.run_module(module, run_name="__main__", alter_sys=True)

    command.__doc__ = f"`python -m {module}` with this process's arguments."
    return command


train = _command("launch.train")
eval = _command("launch.eval")  # shadows the builtin here only, where it is not used
export = _command("launch.export")
generate = _command("launch.generate")
sweep = _command("launch.sweep")
make_gemma3 = _command("launch.make_gemma3")
make_shapes = _command("launch.make_shapes")
aot = _command("launch.aot")
gke = _command("launch.gke")
lm_eval = _command("launch.lm_eval")
