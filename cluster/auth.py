"""Ray's token authentication, on for every cluster rayfoundry starts.

Ray reads the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
~/.ray/auth_token; its clients (`ray job submit`, `serve deploy`, `ray.init`) send it only when
RAY_AUTH_MODE=token is set in their environment. rayfoundry's own commands find out whether the
cluster wants the token and send it themselves.
"""
from __future__ import annotations

import os
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path

MODE_VARIABLE = "RAY_AUTH_MODE"
HOW_TO_CONNECT = ("token authentication is on: Ray's clients (ray job submit, serve deploy, ray.init) need "
                  "`export RAY_AUTH_MODE=token` and read the token from {path}; the dashboard asks for it once")


def wanted() -> bool:
    """Token authentication unless the user turned it off (RAY_AUTH_MODE=disabled)."""
    return os.environ.get(MODE_VARIABLE, "token").lower() != "disabled"


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def token() -> str | None:
    """The token Ray would use here, or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = token_path()
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def ensure_token() -> Path:
    """The token file, created when there is none; readable by its owner only (Ray writes its own 0644)."""
    path = token_path()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return path
    if path.is_file():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    return path


def headers() -> dict[str, str]:
    value = token()
    return {"Authorization": f"Bearer {value}"} if value else {}


def required_by(dashboard_url: str, timeout: float = 3.0) -> bool:
    """Whether the dashboard at `dashboard_url` refuses a request without the token."""
    try:
        urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=timeout).close()
        return False
    except urllib.error.HTTPError as error:
        return error.code == 401
    except (urllib.error.URLError, OSError):
        return False


def use_for(dashboard_url: str) -> None:
    """Make Ray's clients in this process and its children send the token, where the cluster wants it."""
    if MODE_VARIABLE not in os.environ and required_by(dashboard_url):
        send_token()


def send_token() -> None:
    """RAY_AUTH_MODE=token for this process and its children."""
    set_process_mode("token")


def for_private_cluster() -> None:
    """A private Ray on loopback, gone with this process, runs without a token unless the user chose a mode."""
    if MODE_VARIABLE not in os.environ:
        set_process_mode("disabled")


def set_process_mode(mode: str | None) -> None:
    """RAY_AUTH_MODE for this process and its children (None: Ray's default). Ray reads its config once, when
    it is first imported, and keeps the first token it loads: both are read again, or a mode this process held
    before lingers (a later cluster's raylet, sent no token, is then refused by this process: tasks never run)."""
    if mode is None:
        os.environ.pop(MODE_VARIABLE, None)
    else:
        os.environ[MODE_VARIABLE] = mode
    raylet = sys.modules.get("ray._raylet")
    if raylet is not None:
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()


def api_keys_path() -> Path:
    """The Serve API keys a cluster's ingress accepts, one per line (RAYFOUNDRY_API_KEYS_FILE moves it)."""
    return Path(os.environ.get("RAYFOUNDRY_API_KEYS_FILE") or Path.home() / ".rayfoundry" / "api_keys")


def ensure_api_keys() -> Path:
    """The API keys file, created with one random key, owner-readable only, when there is none."""
    path = api_keys_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_hex(24) + "\n")
    return path


def api_keys() -> list[str]:
    path = api_keys_path()
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
