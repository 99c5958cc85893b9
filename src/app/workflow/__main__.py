"""python -m app.workflow: the runner and the step commands (app.workflow.cli.main)."""
from app.workflow.cli import main

main()
