"""The `medstate` command. Sub-commands mirror the packages (`medstate ehr …` ↔ `medstate.ehr`), one module each
here: data, ehr, text, vision, ssm and serve (`serve`, `serve-rebuild`, `serve-token`). A module only parses
options, calls one library function per command and prints its summary (`common` holds the shared console,
tables and progress bars); whatever a command computes, the Python API can do too.

A sub-command's module (and the library it imports) is loaded only when that sub-command runs, so `medstate data
convert` never imports torch and `medstate --help` is quick. Errors a user can cause (bad path, malformed file)
print one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperCommand, TyperGroup

from medstate import __version__
from medstate.errors import MedstateError

# name → (module, the help `medstate --help` lists), in the order listed
SUB_COMMANDS = {
    "serve": ("medstate.cli.serve", "Serve per-patient predictions, updated event by event (docs at /docs; tokens: "
              "`medstate serve-token`)."),
    "serve-rebuild": ("medstate.cli.serve", "Re-encode every patient's state from the event log with MODEL_DIR "
                      "(after a model change)."),
    "ssm": ("medstate.cli.ssm", "The state-space engine: checkpoints, generation, a demo."),
    "data": ("medstate.cli.data", "Clinical event data: MIMIC-IV CSV, FHIR R4 and MEDS in; validated MEDS out."),
    "ehr": ("medstate.cli.ehr", "EhrMamba: patient sequences, tasks, models, evaluation."),
    "text": ("medstate.cli.text", "Language models over medical text: tokenizers, continued pretraining, evaluation."),
    "vision": ("medstate.cli.vision",
               "Images and volumes: Vision Mamba classification, U-Mamba segmentation, baselines."),
    "serve-token": ("medstate.cli.serve", "API tokens of `medstate serve`: create, revoke, list."),
}  # fmt: skip


class _Root(TyperGroup):
    """Loads a sub-command's module when it is asked for, and turns a MedstateError raised anywhere below into one
    line on stderr and exit code 2."""

    _listing = False  # while the root's help is drawn: names and help only, no module imported

    def list_commands(self, ctx) -> list[str]:
        return [*super().list_commands(ctx), *SUB_COMMANDS]

    def get_command(self, ctx, name: str):
        if name not in SUB_COMMANDS:
            return super().get_command(ctx, name)
        module, text = SUB_COMMANDS[name]
        if self._listing:
            return TyperCommand(name, help=text)
        command = typer.main.get_command(importlib.import_module(module).app)
        if isinstance(command, TyperGroup) and name in command.commands:  # serve's module holds three
            return command.commands[name]
        command.name, command.help = name, text
        return command

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MedstateError as err:
            typer.echo(f"medstate: error: {err}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_Root, help="Mamba (selective state-space) foundation models for medicine.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    # the sub-commands are loaded lazily: without a callback, Typer would take its one eager command for the app
    pass


@app.command()
def version() -> None:
    """Print the medstate version."""
    typer.echo(__version__)
