"""The Yadage workflow (``workflow/yadage/``): its runner and the commands its steps run.

``python -m app.workflow run ...`` (``madminer-workflow run``, ``make yadage-run``) encodes the
parameters, runs the workflow with yadage (local processes, or every step in the image built from
``workflow/Dockerfile`` with ``--docker``) and reports where the outputs and the MLflow parent run are.
The steps (``workflow/yadage/steps.yml``) call the other sub-commands:

- ``setup``: check the overrides for every method, create the MLflow experiment and the workflow's
  parent run, make the toy file once, write ``workflow.json`` for the other steps;
- ``step sample|train|evaluate``: one ``python -m app stage=...`` with the user's overrides, the
  previous steps' outputs as inputs, its MLflow run nested under the parent run;
- ``compare``: the overlay of every method's 68 % CL contour and a CSV of their metrics, logged on
  the parent run.

One module per job: :mod:`.params` (parameters as inert data), :mod:`.secrets` (secrets into the environment),
:mod:`.compose` (the composed config), :mod:`.parent_run` (the MLflow parent run), :mod:`.steps` (the step
commands), :mod:`.runner` (yadage), :mod:`.docker` (what the containers need), :mod:`.cli`.

Parameters cross yadage's ``sh -c`` percent-encoded (:func:`.params.encode`): every character outside
``[A-Za-z0-9/._,=+:@-]`` becomes ``%XX``, so no value is ever read by a shell; the steps decode them
and pass them to ``python -m app`` as quoted Hydra values in an argument list.
A failing step ends its MLflow run FAILED, and the parent run FAILED with the step's name.

Secrets never enter yadage's inputs, state or step logs (:func:`.secrets.protect_secrets`): an override whose
key looks secret (token, password, ``*_key``, ...) or whose value holds ``user:password@``, and a
tracking URI with credentials, travel to the steps in environment variables
(``MADMINER_SWEEPER_SECRET_<n>``, passed into the containers with ``docker run -e NAME``); the steps
see ``${oc.env:NAME}`` in their place, which is also all that Hydra records in ``.hydra/``. A value
that is already ``${oc.env:VAR}`` passes through as that interpolation.
"""

from app.workflow.cli import main
from app.workflow.compose import compose
from app.workflow.params import decode, encode, expand, hydra_value
from app.workflow.secrets import SECRET_ENV, protect_secrets

__all__ = ["SECRET_ENV", "compose", "decode", "encode", "expand", "hydra_value", "main", "protect_secrets"]
