"""Run a sweep (configs/sweeps/*.py): every member on this machine one after another, or one
cluster job per member.

    python -m launch.sweep --sweep configs/sweeps/ablations.py --workdir workdir/ablations
    python -m launch.sweep --sweep configs/sweeps/ablations.py --workdir workdir/ablations --dry_run
    python -m launch.sweep ... --only baseline,tie_embeddings-false
    python -m launch.sweep ... --launcher slurm --launcher_option nodes=2 [--submit]
    python -m launch.sweep ... --collect     # results from the members' workdirs, run nothing

The whole sweep is validated first (every member's overrides against the base config). Members
that finished are skipped, interrupted ones resume from their checkpoints: run the same command
again. Results (results.md/.csv/.json, heldout_loss.png, loss_vs_params.png) are written into
the workdir after each member; `tensorboard --logdir <workdir>` overlays the members' runs.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags

from launch import cli

_SWEEP = flags.DEFINE_string("sweep", None, "sweep file (configs/sweeps/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep directory: one subdirectory per member")
_ONLY = flags.DEFINE_list("only", [], "run only these members (names as --dry_run lists them)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "list the members, their overrides and status; "
                             "run nothing")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "slurm", "gke", "tpu_vm"],
                              "local: run here one after another; else write one job per member")
_SUBMIT = flags.DEFINE_bool("submit", False, "with a cluster --launcher: also submit the jobs")
_LAUNCHER_OPTION = flags.DEFINE_multi_string(
    "launcher_option", [], "KEY=VALUE for the cluster launcher (t5g2/sweep/launchers.py)")
_COLLECT = flags.DEFINE_bool("collect", False, "only write the results from the members' "
                             "workdirs (after cluster jobs); run nothing")
_JOBS_DIR = flags.DEFINE_string("jobs_dir", None, "where cluster job files go (default: "
                                "<workdir>/jobs)")
flags.mark_flags_as_required(["sweep", "workdir"])


def main(argv):
    del argv
    cli.setup_logging()
    from t5g2.sweep import results, runner, spec

    sweep = spec.load_sweep(_SWEEP.value)  # validated: nothing runs on a bad sweep
    members = runner.select(sweep, _ONLY.value)
    workdir = os.path.abspath(_WORKDIR.value)
    if _DRY_RUN.value:
        print(runner.describe(sweep, workdir, members))
        return
    if _LAUNCHER.value != "local" and not _COLLECT.value:
        from t5g2.sweep import launchers

        subset = dataclasses.replace(sweep, members=tuple(members))
        launchers.write_jobs(subset, workdir, _LAUNCHER.value,
                             _JOBS_DIR.value or os.path.join(workdir, "jobs"),
                             submit=_SUBMIT.value,
                             options=launchers.parse_options(_LAUNCHER_OPTION.value))
        return

    from t5g2.model import ModelConfig
    from t5g2.model.params import count_params

    configs = spec.validate(sweep)
    params = {name: count_params(ModelConfig.from_config_dict(c.model))
              for name, c in configs.items()}
    steps = {name: int(c.train.steps) for name, c in configs.items()}

    def collect():
        paths = results.write(sweep, workdir, params, steps)
        print(f"[sweep] results: {', '.join(paths)}", flush=True)

    if _COLLECT.value:
        collect()
        return

    code = runner.LocalRunner(sweep, workdir, steps, collect=collect).run(members)
    print(runner.describe(sweep, workdir, members), flush=True)
    sys.exit(code)


if __name__ == "__main__":
    cli.run(main)
