"""`python -m medstate.cli …` (as under torchrun) is the `medstate` command."""

from medstate.cli import app

app()
