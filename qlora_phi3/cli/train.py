"""``qlora-phi3 train``: fine-tune with a recipe, or continue a run with ``--resume``."""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.cli.common import add_recipe_args, recipe_and_overrides
from qlora_phi3.errors import UserError
from qlora_phi3.run.record import RECIPE_FILE

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with a recipe (no recipe: the tiny offline demo)",
                       description="Fine-tune Phi-3 with QLoRA. `qlora-phi3 train --resume RUN_DIR` continues a run "
                                   "from its last checkpoint with the recipe it was started with.")
    add_recipe_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue a run from its last checkpoint: `train --resume RUN_DIR`, or the run in the "
                        "recipe's train.output_dir. Its own recipe.yaml is used; overrides that would change the run "
                        "are refused (more steps and other logging are fine)")
    p.add_argument("--force", action="store_true", help="delete the run already in train.output_dir and start over")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from qlora_phi3.config import load_recipe

    run_dir = Path(args.recipe).expanduser() if args.recipe else None
    if run_dir is not None and run_dir.is_dir():
        if not args.resume:
            raise UserError(f"{args.recipe} is a directory, not a recipe; to continue the run in it add --resume "
                            f"(`qlora-phi3 train --resume {args.recipe}`).")
        if not (run_dir / RECIPE_FILE).is_file():
            raise UserError(f"--resume {args.recipe}: not a qlora-phi3 run directory (no {RECIPE_FILE}).")
        # The run's own recipe, with the overrides on top; output_dir is where the run is now.
        recipe = load_recipe(run_dir / RECIPE_FILE, [*args.overrides, f"train.output_dir={run_dir}"])
    else:
        recipe = load_recipe(*recipe_and_overrides(args))
    from qlora_phi3.run.preflight import preflight

    checked = preflight(recipe, resume=args.resume, force=args.force)  # files, directories, records: before torch
    # train.eval_tasks: the tasks and their data are checked now, not after hours of training.
    evaluation = _end_of_train_eval(recipe) if recipe.train.eval_tasks else None
    from qlora_phi3.run.train import train  # heavy: only once the recipe, files and directory are known to be good

    result = train(recipe, resume=args.resume, force=args.force, checked=checked)
    from qlora_phi3.ranks import world_size

    if evaluation is not None and result.adapter_dir is not None and world_size() == 1:
        from qlora_phi3.cli.eval import print_summary
        from qlora_phi3.evaluate.compare import evaluate_after_training

        plan, tasks = evaluation
        print_summary(evaluate_after_training(result, recipe, plan, tasks))
    return 0


def _end_of_train_eval(recipe):
    """The plan and checked tasks of ``train.eval_tasks`` (base vs fine-tune once training ends)."""
    from qlora_phi3.evaluate.compare import EvalPlan
    from qlora_phi3.evaluate.tasks import prepare_tasks

    paths = [Path(recipe.train.eval_include_path)] if recipe.train.eval_include_path else []
    plan = EvalPlan(tasks=list(recipe.train.eval_tasks), include_paths=paths, limit=recipe.train.eval_limit)
    return plan, prepare_tasks(plan.tasks, plan.include_paths)
