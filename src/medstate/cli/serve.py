"""`medstate serve`, `serve-rebuild` and `serve-token`: the per-patient prediction service (`medstate.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medstate.cli.common import console, counting, summary, table
from medstate.loading import parse_list
from medstate.serve.app import Limits, run_server
from medstate.serve.service import open_service
from medstate.serve.store import open_store

app = typer.Typer(no_args_is_help=True, add_completion=False)
token_app = typer.Typer(help="API tokens of `medstate serve`: create, revoke, list.", no_args_is_help=True)
app.add_typer(token_app, name="serve-token")

Database = Annotated[str, typer.Option(help="SQLite file (created if absent) or postgresql://user@host/db URL")]


@app.command("serve")
def serve(
    model_dir: Annotated[Path, typer.Argument(help="finetuned EhrMamba checkpoint (with its vocab, bins, tasks)")],
    db: Database,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    max_concurrent: Annotated[int, typer.Option(min=1, help="requests served at once (more: 503)")] = 32,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="largest request body (more: 413)")] = 4.0,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (with --ssl-certfile: HTTPS)")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate chain")] = None,
    reencode: Annotated[
        bool, typer.Option(help="keep no state: re-encode each patient's whole history at every ingest (comparison)")
    ] = False,
) -> None:
    """Serve per-patient predictions, updated event by event (docs at /docs; tokens: `medstate serve-token`)."""

    limits = Limits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_concurrent=max_concurrent)
    tls = [None if p is None else str(p) for p in (ssl_keyfile, ssl_certfile)]
    run_server(str(model_dir), db, host, port, limits, *tls, reencode=reencode)


@app.command("serve-rebuild")
def serve_rebuild(
    model_dir: Annotated[Path, typer.Argument(help="the new model's checkpoint")],
    db: Database,
) -> None:
    """Re-encode every patient's state from the event log with MODEL_DIR (after a model change)."""

    service = open_service(model_dir, db)
    with counting("patients") as progress:
        done = service.rebuild(progress)
    summary("rebuild", {"patients": done, "model_version": service.version})


@token_app.command("create")
def serve_token_create(
    name: Annotated[str, typer.Argument(help="who holds it (shown in the audit log)")],
    db: Database,
    scopes: Annotated[str, typer.Option(help="comma-separated: ingest, read, admin")] = "read",
) -> None:
    """Create a token; it is printed once (only its SHA-256 digest is stored)."""

    token = open_store(db).create_token(name, parse_list(scopes, str, "--scopes"))
    console.print(token, markup=False, highlight=False)


@token_app.command("revoke")
def serve_token_revoke(name: Annotated[str, typer.Argument()], db: Database) -> None:
    """Revoke a token: requests with it get 401 from then on."""

    open_store(db).revoke_token(name)
    summary("revoked", {"token": name})


@token_app.command("list")
def serve_token_list(db: Database) -> None:
    """Tokens: name, scopes, created, revoked."""

    rows = [
        [str(row[c] or "") for c in ("name", "scopes", "created_at", "revoked_at")]
        for row in open_store(db).list_tokens()
    ]
    table("tokens", ["name", "scopes", "created_at", "revoked_at"], rows, left=4)
