"""``madminer-workflow`` / ``python -m app.workflow``: the runner (``run``, ``spec``) and the step commands."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from app.errors import UserError, error_line, first_line
from app.workflow import runner, steps


def parser() -> argparse.ArgumentParser:
    description = "The Yadage workflow (workflow/yadage/): its runner and the commands its steps run."
    p = argparse.ArgumentParser(prog="madminer-workflow", description=description)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the workflow (make yadage-run)")
    r.add_argument("overrides", nargs="*", help="Hydra overrides for every step, e.g. +experiment=seed_workflow")
    r.add_argument("--data", default="toy", help="MadMiner event file (default: the embedded toy)")
    r.add_argument("--methods", default=runner.DEFAULT_METHODS,
                   help=f"comma-separated (default {runner.DEFAULT_METHODS})")
    r.add_argument("--tracking-uri", help="MLflow URI, or 'none' (default: tracking.* of the overrides)")
    r.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment_name)")
    r.add_argument("--run-name", help="name of the workflow's parent run (default: workflow-<dir name>)")
    r.add_argument("--workdir", help="where the steps write (default workflow-runs/DATE/TIME)")
    r.add_argument("--jobs", type=int, default=2, help="steps run in parallel (default 2)")
    r.add_argument("--docker", action="store_true", help="run every step in the image (make image)")
    r.add_argument("--image", default=runner.DEFAULT_IMAGE, help=f"the step image (default {runner.DEFAULT_IMAGE})")

    w = sub.add_parser("spec", help="write the resolved workflow, e.g. docker-encapsulated for REANA")
    w.add_argument("--docker", action="store_true")
    w.add_argument("--image")
    w.add_argument("-o", "--output", help="file to write (default: stdout)")

    s = sub.add_parser("setup", help="(step) check, create the parent run, write workflow.json")
    for name in ("workdir", "data", "methods", "tracking-uri", "experiment", "run-name"):
        s.add_argument(f"--{name}", required=True)
    s.add_argument("--overrides", nargs="*", default=[])

    st = sub.add_parser("step", help="(step) python -m app stage=STAGE with the workflow's inputs")
    st.add_argument("stage", choices=list(steps.STAGES))
    for name in ("spec", "workdir", "data"):
        st.add_argument(f"--{name}", required=True)
    st.add_argument("--kind")
    st.add_argument("--method")
    st.add_argument("--inputs", nargs="*", default=[])

    c = sub.add_parser("compare", help="(step) the methods' overlay and metrics CSV on the parent run")
    c.add_argument("--spec", required=True)
    c.add_argument("--workdir", required=True)
    c.add_argument("--inputs", nargs="*", default=[])
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        if args.command == "run":
            raise SystemExit(runner.run(args))
        if args.command == "spec":
            return runner.write_spec(args)
        try:
            {"setup": steps.setup, "step": steps.step, "compare": steps.compare}[args.command](args)
        except Exception as err:  # noqa: BLE001 - a failing step names itself, on the parent run too
            workdir = Path(args.workdir)
            if isinstance(err, UserError) and (workdir / steps.ERROR_FILE).exists():
                raise  # already recorded by steps.fail_step
            if not isinstance(err, UserError):
                traceback.print_exc()
            label = steps.STAGES[args.stage] if args.command == "step" else args.command
            spec = steps.read_or_empty(Path(args.spec)) if getattr(args, "spec", None) else {}
            error = first_line(err) if isinstance(err, UserError) else error_line(err)
            raise UserError(steps.record_failure(spec, workdir, label, error)) from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
