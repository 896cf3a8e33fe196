"""What every launch script shares: log lines with time and source (without orbax's chatter), and
the user's mistakes reported as one line instead of a traceback.

    if __name__ == "__main__":
        cli.run(main)          # instead of absl.app.run(main)

A known error (KNOWN_ERRORS: a bad config value, data source, checkpoint, mesh...) and a bad
command line (an unknown flag, a bad value, a misspelt `--config.<section>.<field>` override)
print `error: <message>` on stderr and exit with status USER_ERROR_EXIT_CODE; anything else keeps
its traceback. To make a new error class read as one line, add it to KNOWN_ERRORS.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags

from t5g2.configlib import ConfigError
from t5g2.convert.checkpoint_files import CheckpointError, DirectoryNotEmptyError
from t5g2.data.denoisers import DenoiserError
from t5g2.data.pipeline import PipelineConfigError
from t5g2.data.sources import SourceError
from t5g2.data.vocab import VocabularyError
from t5g2.sharding import ShardingError
from t5g2.train.divergence import DivergenceError

# Errors whose message says all a user needs (the value, the file or step, the way out): printed
# as one line. Register a new class by importing it here and adding it to the tuple.
KNOWN_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, CheckpointError, DirectoryNotEmptyError, PipelineConfigError, SourceError,
    VocabularyError, DenoiserError, ShardingError, DivergenceError)

USER_ERROR_EXIT_CODE = 2  # as argparse and absl's own usage errors
# An exiting process first waits for the others at jax.distributed's shutdown barrier (atexit);
# one whose error the others did not share would wait there for minutes, and they for it in
# their next collective. Past this it exits anyway, and its peers' collectives fail.
EXIT_GRACE_S = 10.0


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it opens


def run(main: Callable[[list[str]], Any]) -> None:
    """absl's `app.run(main)`, with known errors and command-line mistakes as one line."""
    def reporting_main(argv):
        try:
            return main(argv)
        except KNOWN_ERRORS as e:
            fail(str(e))

    app.run(reporting_main, flags_parser=parse_flags)


def fail(message: str) -> NoReturn:
    """Prints `error: <message>` as one line on stderr and exits with USER_ERROR_EXIT_CODE."""
    sys.stdout.flush()
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    # A normal exit (atexit handlers), bounded in a multi-process job: see EXIT_GRACE_S.
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(USER_ERROR_EXIT_CODE,))
        timer.daemon = True
        timer.start()
    sys.exit(USER_ERROR_EXIT_CODE)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing; its errors, and a config override naming no field, as one line."""
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as e:  # unknown flag, unparsable value, missing required flag
        fail(str(e))
    except (AttributeError, KeyError):  # ml_collections: an override of a missing field
        problem = misspelt_override(argv)
        if problem is None:
            raise
        fail(problem)


def misspelt_override(argv: Sequence[str]) -> str | None:
    """What is wrong with the first `--<config flag>.<path>` in argv whose path names no field
    of the config, with the valid fields at that level; None if every override names one."""
    for name in [n for n in flags.FLAGS if _is_config_file_flag(flags.FLAGS[n])]:
        overrides = [m.group(1) for arg in argv
                     if (m := re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg))]
        path = flag_value(argv, name)
        if not overrides or path is None:
            continue
        config = flags.FLAGS[name].parser.parse(path)  # the file as written, before overrides
        for override in overrides:
            node, where = config, name
            for part in override.split("."):
                if not hasattr(node, "keys"):
                    return (f"--{name}.{override}: {where} is a value ({type(node).__name__}),"
                            " not a section")
                if part not in node:
                    return (f"--{name}.{override}: {where} has no field {part!r}; valid: "
                            f"{', '.join(sorted(node.keys()))}")
                node, where = node[part], f"{where}.{part}"
    return None


def _is_config_file_flag(flag) -> bool:
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser, is_config_flag

    return is_config_flag(flag) and isinstance(flag.parser, ConfigFileFlagParser)


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The last value argv gives `--name` (`--name=value` or `--name value`)."""
    value = None
    for i, arg in enumerate(argv):
        m = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg)
        if m:
            value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return value
