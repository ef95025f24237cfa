"""The shared secret of server mode (rollout.auth): where both sides read it, the middleware that
guards every route of `rntp serve` but /health, and `rntp serve`'s default bind (a dry run)."""

import stat

import pytest

from rollout import auth

pytestmark = pytest.mark.unit
SECRET = "a" * 40


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    return tmp_path


def write(path, text, mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_secret_comes_from_the_setting_then_the_environment_then_the_default_file(home, monkeypatch):
    default = home / ".cache" / "rntp" / "server-secret"
    with pytest.raises(auth.SecretError, match="does not exist"):
        auth.load_secret(None)
    made, where = auth.load_secret(None, create=True)  # what `rntp serve` does
    assert str(default) in where and default.read_text().strip() == made and len(made) == 64
    assert stat.S_IMODE(default.stat().st_mode) == 0o600 and stat.S_IMODE(default.parent.stat().st_mode) == 0o700
    assert auth.load_secret(None, create=True)[0] == made  # made once, then reused
    monkeypatch.setenv(auth.SECRET_ENV, "e" * 32)
    assert auth.load_secret(None) == ("e" * 32, auth.SECRET_ENV)
    explicit = write(home / "job-secret", SECRET + "\n")
    assert auth.load_secret(str(explicit)) == (SECRET, f"rollout.server.secret_file={explicit}")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_secret_file_others_can_touch_is_refused(home, mode):
    path = write(home / "s", SECRET, mode)
    with pytest.raises(auth.SecretError, match=f"open to other users .*chmod 600 {path}"):
        auth.load_secret(str(path))


def test_a_missing_or_short_secret_is_one_line_naming_the_setting(home, monkeypatch):
    with pytest.raises(auth.SecretError, match="rollout.server.secret_file=.*missing.*does not exist"):
        auth.load_secret(str(home / "missing"))
    with pytest.raises(auth.SecretError, match="too short"):
        auth.load_secret(str(write(home / "s", "short")))
    monkeypatch.setenv(auth.SECRET_ENV, "   ")
    with pytest.raises(auth.SecretError, match="empty"):  # set but blank: not silently the default file
        auth.load_secret(None)


def test_a_secret_file_appears_whole_and_is_never_replaced(home):
    path = home / "d" / "secret"
    assert auth.make_secret_file(path) and not auth.make_secret_file(path)
    first = path.read_text()
    assert not auth.make_secret_file(path) and path.read_text() == first
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # nothing left aside


def test_tokens_compare_by_value():
    assert auth.matches(SECRET, SECRET) and not auth.matches(SECRET[:-1], SECRET)
    assert not auth.matches(None, SECRET) and not auth.matches("", SECRET)
    assert auth.transfer_token(SECRET) != SECRET and auth.transfer_token(SECRET) == auth.transfer_token(SECRET)
    assert auth.transfer_token(SECRET) != auth.transfer_token(SECRET + "b")


def guarded_app(monkeypatch):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    def ok(request):
        return PlainTextResponse("reached")

    routes = [Route(p, ok, methods=["GET", "POST"]) for p in ("/health", "/sleep", "/collective_rpc", "/v1/models")]
    monkeypatch.setenv(auth.SECRET_ENV, SECRET)
    from starlette.testclient import TestClient

    app = Starlette(routes=routes)
    app.add_middleware(auth.SecretMiddleware)  # as vLLM adds a --middleware class
    return TestClient(app)


def test_the_middleware_lets_through_only_the_secret_and_health(monkeypatch):
    client = guarded_app(monkeypatch)
    assert client.get("/health").text == "reached"
    for path in ("/sleep", "/collective_rpc", "/v1/models", "/nowhere"):
        for headers in ({}, {"Authorization": f"Bearer {SECRET}x"}, {"Authorization": SECRET},
                        {"Authorization": f"Basic {SECRET}"}):
            answer = client.post(path, headers=headers)
            assert answer.status_code == 401 and "rollout.server.secret_file" in answer.json()["error"], path
            assert answer.headers["www-authenticate"] == "Bearer"
        assert client.post(path, headers={"Authorization": f"bearer {SECRET}"}).status_code in (200, 404)
    assert client.post("/health").status_code == 401  # only GET /health is open
    assert client.options("/sleep").status_code == 401  # no CORS preflight slips through either


def test_a_server_without_a_secret_serves_nothing(monkeypatch):
    from starlette.applications import Starlette

    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    with pytest.raises(RuntimeError, match="RNTP_SERVER_SECRET"):
        auth.SecretMiddleware(Starlette())


def test_serve_listens_on_loopback_unless_told_and_says_it_is_guarded(tmp_path, capsys):
    """A dry run of `rntp serve`: the command binds 127.0.0.1 by default, the start-up line says where it
    listens and what guards it, no secret is printed and no file is made."""
    from rollout.vllm_utils import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed")
    from rntp.cli import main

    secret_file = write(tmp_path / "job-secret", SECRET)
    args = ["serve", "--dry-run", "rollout.server.weight_transfer=gloo", f"rollout.server.secret_file={secret_file}"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "--host 127.0.0.1 --port 8000" in out and "--middleware rollout.auth.SecretMiddleware" in out
    assert "listening on http://127.0.0.1:8000, loopback only" in err
    assert f"needs the shared secret (Authorization: Bearer) from rollout.server.secret_file={secret_file}" in err
    assert SECRET not in out + err
    assert main([*args, "--host", "0.0.0.0"]) == 0
    out, err = capsys.readouterr()
    assert "--host 0.0.0.0" in out and "every interface" in err
    missing = tmp_path / "none" / "secret"
    assert main(["serve", "--dry-run", f"rollout.server.secret_file={missing}"]) == 0
    assert "made at start-up" in capsys.readouterr().err and not missing.parent.exists()
    write(secret_file, SECRET, 0o644)
    assert main(args) == 2 and "open to other users" in capsys.readouterr().err  # one line, before anything loads
