"""``wandb://entity/project[?group=NAME]``: every run of a W&B project through ``wandb.Api()``.

The server is probed first, so an unreachable one fails in seconds rather than after
``wandb.Api()``'s minutes of retries; each run is mapped onto the run-folder columns.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import parse_qs, urlsplit

from ncsweep.report.rows import Loaded, ReportError, from_wandb_record

CONNECT_TIMEOUT_S = 3.0
API_TIMEOUT_S = 15


def parse_wandb_url(url: str) -> tuple[str, str, str | None]:
    """(entity, project, group) of ``wandb://entity/project?group=NAME``."""
    parts = urlsplit(url)
    project = parts.path.strip("/")
    if not parts.netloc or not project or "/" in project:
        raise ReportError(f"bad W&B source {url!r}: expected wandb://entity/project[?group=NAME]")
    group = parse_qs(parts.query).get("group", [None])[0]
    return parts.netloc, project, group


def base_url() -> str:
    """The server ``wandb.Api()`` would use: WANDB_BASE_URL, else wandb's configured default."""
    from wandb import env
    from wandb.sdk import wandb_setup

    return str(env.get_base_url(wandb_setup.singleton().settings.base_url)).rstrip("/")


def check_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ReportError unless a TCP connection to ``url``'s host opens within ``timeout``.

    ``wandb.Api()`` retries an unreachable server for minutes; this probe fails in seconds (the
    thread also bounds a slow DNS lookup, which the socket timeout does not cover).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    error = outcome[0] if outcome else TimeoutError(f"no answer in {timeout:.0f} s")
    if error is not None:
        raise ReportError(f"W&B server {url} is not reachable ({type(error).__name__}: "
                          f"{error}); read the run folders or the offline runs instead")


def load_wandb_project(url: str) -> Loaded:
    """Every run of a W&B project (optionally one group), mapped onto the run-folder columns."""
    entity, project, group = parse_wandb_url(url)
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    server = base_url()
    check_reachable(server)
    try:
        return _query_wandb(entity, project, group)
    except ReportError:
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ReportError(f"W&B query {url} on {server} failed: {type(err).__name__}: "
                          f"{first}") from None


def _query_wandb(entity: str, project: str, group: str | None) -> Loaded:
    import wandb

    api = wandb.Api(timeout=API_TIMEOUT_S)
    runs = list(api.runs(f"{entity}/{project}", filters={"group": group} if group else None))
    if not runs:
        raise ReportError(f"no runs in wandb://{entity}/{project}"
                          + (f"?group={group}" if group else ""))
    loaded = Loaded()
    for run in runs:
        record = {"config": dict(run.config), "summary": dict(run.summary.items()),
                  "history": list(run.scan_history())}
        loaded.extend(from_wandb_record(record, run.url, "wandb_api",
                                        unfinished=f"W&B run state: {run.state}",
                                        state=run.state))
    return loaded
