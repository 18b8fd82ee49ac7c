"""What is wrong with a tracking store URI, said before MLflow is asked (and after, for a server that is not MLflow).

:func:`check_uri` refuses, with one line and exit code 3, what MLflow would misread or silently
lose: an unknown scheme (``ftp://``), a malformed URL (no host, a port that is not a number), an
in-memory sqlite store (``sqlite://``, ``sqlite:///:memory:``: it trains, then loses every run),
a sqlite path that is a folder or a file that is not a database, a file-store path that is a file.
:func:`not_mlflow` tells a server that answers, but not as MLflow, from one that is down.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from rcnn_lab.errors import RcnnLabError, cut

DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy stores (``postgresql+psycopg2://`` too)
SERVERS = ("http", "https")
OTHERS = ("file", "databricks", "databricks-uc", "uc")
EXAMPLES = "sqlite:///runs/mlflow.db, http://HOST:PORT (mlflow server), postgresql://..., or a folder path"
_SQLITE_MAGIC = b"SQLite format 3\x00"


class StoreURIError(RcnnLabError):
    """A tracking URI that cannot name a usable store. Exit code 3, like every store problem."""

    exit_code = 3


def _refuse(uri: str, why: str) -> StoreURIError:
    return StoreURIError(f"tracking store {cut(uri, 200)!r} {why}; set tracking.uri / MLFLOW_TRACKING_URI / --uri "
                         f"to a store such as {EXAMPLES}")


def check_uri(uri: str) -> str:
    """``uri`` unchanged when it can name a store; else :class:`StoreURIError` saying what is wrong with it."""
    if not isinstance(uri, str) or not uri.strip():
        raise _refuse(str(uri), "is empty")
    if "://" not in uri and not uri.startswith("file:"):
        if ":" in uri.split("/")[0] and not Path(uri).exists():  # scheme:path without slashes
            raise _refuse(uri, f"is not a URL (scheme {uri.split(':')[0]!r} without '://') nor a folder")
        return _file_store(uri, uri)
    try:
        parts = urlparse(uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise _refuse(uri, f"is a malformed URL ({exc})") from None
    scheme = parts.scheme.lower()
    base = scheme.split("+")[0]
    if base == "sqlite":
        return _sqlite(uri)
    if base in DATABASES:
        if not parts.hostname and not parts.path.strip("/"):
            raise _refuse(uri, "names no database host or name")
        return uri
    if scheme in SERVERS:
        if not parts.hostname:
            raise _refuse(uri, "names no host (write http://HOST:PORT)")
        return uri
    if scheme == "file":
        return _file_store(uri, parts.path)
    if scheme in OTHERS:
        return uri
    raise _refuse(uri, f"has scheme {scheme!r}, which is not a tracking store (stores: sqlite, postgresql, mysql, "
                       "mssql, http(s), file)")


def _sqlite(uri: str) -> str:
    if not uri.lower().startswith("sqlite:///"):
        raise _refuse(uri, "is an in-memory sqlite database (every run would be lost when the command ends)"
                      if uri.rstrip("/").lower() == "sqlite:" else
                      "is a malformed sqlite URL (write sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db)")
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if path in ("", ":memory:") or path.startswith("file::memory:"):
        raise _refuse(uri, "is an in-memory sqlite database (every run would be lost when the command ends)")
    db = Path(path)
    try:
        if db.is_dir():
            raise _refuse(uri, "names a folder, not a database file (add a file name, e.g. .../mlflow.db)")
        if db.is_file() and db.stat().st_size > 0:
            with open(db, "rb") as f:
                if f.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                    raise _refuse(uri, "names a file that is not a SQLite database (choose another file name)")
    except OSError as exc:
        raise _refuse(uri, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    return uri


def _file_store(uri: str, path: str) -> str:
    try:
        is_file = Path(path).is_file()
    except OSError:
        return uri  # MLflow reports it with its reason
    if is_file:
        raise _refuse(uri, "is a file, but a path store is a folder (for a sqlite database file write "
                           f"sqlite:///{cut(path, 100)})")
    return uri


def not_mlflow(uri: str, exc: BaseException) -> str | None:
    """Why a server that answered ``exc`` is not an MLflow tracking server, or None (down, or MLflow's own error)."""
    if not uri.lower().startswith(("http://", "https://")):
        return None
    text = str(exc)
    code = getattr(exc, "get_http_status_code", lambda: None)()
    html = "Response body: '<" in text or "<!DOCTYPE" in text or "<html" in text.lower()
    not_json = "JSONDecodeError" in text or "Expecting value" in text or "not valid JSON" in text
    if code in (404, 405, 501) or (html and code is not None and code < 500) or not_json:
        return (f"answers, but not as an MLflow tracking server (HTTP {code} for MLflow's API); check the host, "
                "port and path prefix, and that it is `mlflow server`")
    return None
