"""The shared secret that guards an RNTP sampler server (`rntp serve`).

`rntp serve` runs vLLM's server with VLLM_SERVER_DEV_MODE=1 for its RL routes, which also opens
`/collective_rpc`, `/sleep`, `/wake_up`, `/reset_prefix_cache`, `/server_info` and the weight-transfer
routes at the root path. vLLM's `--api-key` guards only `/v1`, `/v2`, `/inference` and `/cohere`
(`vllm/entrypoints/serve/middleware/authenticate.py`), so we add our own ASGI middleware through
vLLM's `--middleware` option (`vllm/entrypoints/serve/middleware/register.py`: a class is added with
`app.add_middleware(cls)`, after vLLM's own, so it is the outermost and sees every request first).
It answers 401 to any request but `GET /health` that does not carry `Authorization: Bearer <secret>`,
compared in constant time.

Where the secret comes from (`load_secret`), the same on both sides:

1. `rollout.server.secret_file`, if set: a file only its owner can read or write (mode 600);
2. else the environment variable RNTP_SERVER_SECRET;
3. else `~/.cache/rntp/server-secret`, which `rntp serve` makes (random, mode 600) if it is missing.

`rntp serve` hands the secret to the vLLM process it becomes in RNTP_SERVER_SECRET (never on its
command line), where the middleware and the gloo weight-transfer workers read it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

SECRET_ENV = "RNTP_SERVER_SECRET"
DEFAULT_SECRET_FILE = "~/.cache/rntp/server-secret"
SETTING = "rollout.server.secret_file"
MIN_LENGTH = 16
OPEN_PATHS = frozenset({"/health"})  # what a load balancer or a start-up wait may poll without the secret
MIDDLEWARE = f"{__name__}.SecretMiddleware"  # the import path vLLM's --middleware takes


class SecretError(ValueError):
    """The shared secret is missing or unusable (a user error: one line, no traceback)."""


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


def matches(given: str | None, secret: str) -> bool:
    """Whether `given` is the secret, in time that does not depend on where they differ (the
    digests have one length whatever the inputs')."""
    return given is not None and hmac.compare_digest(_digest(given), _digest(secret))


def transfer_token(secret: str) -> str:
    """What a weight-transfer `init` carries to prove it comes from the secret's holder: derived from
    the secret, so the secret itself never sits in a request body a server may log."""
    return hmac.new(secret.encode("utf-8"), b"rntp weight transfer init", hashlib.sha256).hexdigest()


def authorization(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _checked(secret: str, where: str) -> str:
    secret = secret.strip()
    if len(secret) < MIN_LENGTH:
        raise SecretError(f"the shared secret from {where} is {'empty' if not secret else 'too short'} "
                          f"(at least {MIN_LENGTH} characters; e.g. `openssl rand -hex 32`)")
    return secret


def read_secret_file(path: Path, where: str) -> str:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SecretError(f"no shared secret: {where} does not exist (`rntp serve` makes it when it starts; "
                          f"start the servers first, or point {SETTING} at the file they use)") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"{where} is open to other users (mode {stat.filemode(mode)}): `chmod 600 {path}`, "
                          "and make a new secret if others may have read it")
    return _checked(path.read_text(), where)


def make_secret_file(path: Path) -> bool:
    """Write a new random secret to `path` with mode 600 unless it exists; whether it wrote one.
    The file appears whole or not at all (written aside, then hard-linked into place, which fails
    when a concurrent `rntp serve` got there first)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        return False
    aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        os.link(aside, path)
        return True
    except FileExistsError:
        return False
    finally:
        aside.unlink(missing_ok=True)


def secret_location(secret_file: str | None) -> tuple[Path | None, str]:
    """Where the secret is read from: (file or None for the environment, its description)."""
    if secret_file:
        path = Path(secret_file).expanduser()
        return path, f"{SETTING}={path}"
    if os.environ.get(SECRET_ENV):
        return None, SECRET_ENV
    path = Path(DEFAULT_SECRET_FILE).expanduser()
    return path, f"{path} (the default: {SETTING} unset and no {SECRET_ENV})"


def load_secret(secret_file: str | None, *, create: bool = False) -> tuple[str, str]:
    """The shared secret and where it came from (for messages; never the secret itself). `create`
    (`rntp serve`): make the file first if it is missing."""
    path, where = secret_location(secret_file)
    if path is None:
        return _checked(os.environ[SECRET_ENV], SECRET_ENV), where
    if create:
        make_secret_file(path)
    return read_secret_file(path, where), where


class SecretMiddleware:
    """Pure ASGI middleware: every HTTP or websocket request but `GET /health` needs
    `Authorization: Bearer <RNTP_SERVER_SECRET>`; others get 401 (a websocket, a policy-violation
    close) and reach nothing. With no secret in the environment it refuses to be built, so a server
    started without one serves nothing (fails closed)."""

    def __init__(self, app) -> None:
        self.app = app
        secret = os.environ.get(SECRET_ENV, "")
        if len(secret.strip()) < MIN_LENGTH:
            raise RuntimeError(f"{MIDDLEWARE} needs the shared secret in {SECRET_ENV} (start the server with "
                               "`rntp serve`, which sets it)")
        self.secret = secret.strip()

    def _allowed(self, scope) -> bool:
        if scope["type"] == "http" and scope.get("path") in OPEN_PATHS and scope.get("method") in ("GET", "HEAD"):
            return True
        from starlette.datastructures import Headers

        scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and matches(token.strip(), self.secret)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.responses import JSONResponse

        response = JSONResponse({"error": "Unauthorized: this RNTP sampler server needs its shared secret "
                                          f"(Authorization: Bearer ...; the trainer reads it from {SETTING})"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
