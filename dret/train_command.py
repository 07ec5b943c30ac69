"""What `python -m dret.train` does once its flags are parsed: a dry run, or the distributed set-up and the
training run with the evaluators its config asks for (the fuzz tests call it in-process)."""

from __future__ import annotations

from dret import distributed
from dret.eval import hooks
from dret.build import check_run
from dret.trainer import train_and_evaluate


def train_command(config, coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    if config.dry_run:
        print(check_run(config))
        return
    distributed.initialize(coordinator_address, num_processes, process_id)
    export_dir = train_and_evaluate(config, hooks.from_config(config))
    if export_dir:
        print(f"export: {export_dir}")
    else:
        print(f"stopped by SIGTERM: a checkpoint is saved in {config.output_dir}; rerun the same command to resume")
