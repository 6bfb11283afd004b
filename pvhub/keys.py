"""CURVE key files: writing a key pair, and reading keys back with their files' safety checked.

A key pair is two files in ZeroMQ's certificate format (``zmq.auth.create_certificates`` and
``zmq.auth.load_certificate`` read and write the same): ``NAME.key`` holds the public key,
``NAME.key_secret`` the public and the secret key. The daemon knows each client by the NAME
of the public key file it was given (its identity in the access rules).

Rule 1: a secret key file is never readable by anyone but its owner, not even for a moment:
it is created with mode 0600 (``os.open``), under a temporary name, and linked to its own
name only when complete, so that a crash leaves no half-written key and an existing key is
never overwritten unless asked (``force``). Reading one refuses a file that group or others
may read or write, or that another user owns: whoever could read it could be this client.
The checks are made on the opened file (``fstat``), so the file checked is the file read.
A file in systemd's ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``) is taken as it is:
systemd made it readable by this service alone (root-owned 0440 with an ACL, on newer systemd).
Rule 2: a public key file is only a name and a key; a clients directory that others may
write to is refused as a whole, since anyone who can add a file there can let themselves in.
A file in it that does not parse is skipped and reported, never fatal: one bad file must
not lock every client out. Two names with one key are an error: the key would not say who.
Rule 3: a NAME is ``^[A-Za-z0-9_.-]{1,64}$`` (it becomes a file name and an identity in access
rules), checked where names come in: ``generate`` and the clients directory.
Rule 4: no sockets here; keys travel as the 40-character Z85 text ZeroMQ's socket options take.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils import z85

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DIRECTORY_MODE = 0o700
Z85_KEY_LENGTH = 40  # 32 bytes of key in Z85

_SECRET_BANNER = """#   ****  Generated on {now} by pvhub keys generate  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """#   ****  Generated on {now} by pvhub keys generate  ****
#   ZeroMQ CURVE Public Certificate
#   Give it to the pvhub daemon (its clients directory) or, for the daemon's own key,
#   to each client (PVHUB_SERVER_KEY).

"""


class KeyFileError(ValueError):
    """A key file or directory that cannot be used: missing, malformed, or not safe."""


@dataclass
class ClientKeys:
    """A clients directory read: ``keys`` maps each Z85 public key to its NAME; ``skipped``
    lists the files that could not be used, with why."""

    keys: dict[bytes, str] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def check_name(name: str) -> str:
    """``name`` if it can name a key pair (Rule 3), else ``KeyFileError``."""
    if not NAME_PATTERN.match(name):
        raise KeyFileError(
            f"{name!r} cannot name a key: use 1 to 64 letters, digits, '_', '.' or '-' "
            "(it becomes a file name and an identity in access rules)"
        )
    return name


def generate(name: str, directory: str | os.PathLike[str] = ".", *, force: bool = False) -> tuple[Path, Path]:
    """Write a new key pair ``NAME.key`` and ``NAME.key_secret`` in ``directory`` (created
    0700 if missing); return (public path, secret path). Existing files are kept, and
    ``KeyFileError`` raised, unless ``force``."""
    check_name(name)
    directory = Path(directory)
    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    secret_path = directory / f"{name}{SECRET_SUFFIX}"
    if not force:
        existing = [str(path) for path in (public_path, secret_path) if os.path.lexists(path)]
        if existing:
            verb = "exists" if len(existing) == 1 else "exist"
            raise KeyFileError(f"{' and '.join(existing)} already {verb}; use --force to replace the key pair")
    public_key, secret_key = zmq.curve_keypair()
    now = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    # The secret first: a public key without its secret is useless, the reverse is harmless.
    _write(secret_path, _SECRET_BANNER.format(now=now) + _body(public_key, secret_key), SECRET_MODE, force)
    _write(public_path, _PUBLIC_BANNER.format(now=now) + _body(public_key, None), PUBLIC_MODE, force)
    return public_path, secret_path


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a ``NAME.key_secret`` file, refused if it is not safe
    (Rule 1) or holds no secret key."""
    path = Path(path)
    text, st = _read(path, "secret key file")
    if _systemd_credential(path):
        pass  # systemd made it, for this service alone (root-owned, read by an ACL on newer systemd)
    elif st.st_uid != os.geteuid():
        raise KeyFileError(f"secret key file {path} is owned by uid {st.st_uid}, not by this user "
                           f"(uid {os.geteuid()}); it must be this user's own")
    elif st.st_mode & 0o077:
        raise KeyFileError(f"secret key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others "
                           f"may read or write it; it must be {SECRET_MODE:04o} (chmod 600 {path})")
    public, secret = _parse(text, path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key (a public key file? the secret one is NAME{SECRET_SUFFIX})")
    return public, secret


def _systemd_credential(path: Path) -> bool:
    """Whether ``path`` is in the credentials directory systemd gave this service
    (``LoadCredential=``): a private, read-only copy only this service can read."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return False
    try:
        return path.resolve().parent == Path(directory).resolve()
    except OSError:
        return False


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key of a key file (``NAME.key``, or a secret file's public half)."""
    path = Path(path)
    text, _ = _read(path, "public key file")
    return _parse(text, path)[0]


def load_client_keys(directory: str | os.PathLike[str]) -> ClientKeys:
    """Every ``NAME.key`` in a clients directory, by key (Rule 2)."""
    directory = Path(directory)
    try:
        st = directory.stat()
    except OSError as exc:
        raise KeyFileError(f"clients directory {directory}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"clients directory {directory} is not a directory")
    if st.st_mode & 0o022:
        raise KeyFileError(f"clients directory {directory} has mode {stat.S_IMODE(st.st_mode):04o}: group or "
                           f"others may add keys to it (and so let themselves in); chmod go-w {directory}")
    found = ClientKeys()
    for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
        name = path.name[: -len(PUBLIC_SUFFIX)]
        try:
            check_name(name)
            text, _ = _read(path, "public key file")
            public, secret = _parse(text, path)
        except KeyFileError as exc:
            found.skipped.append((path, str(exc)))
            continue
        if secret is not None:
            # Someone copied NAME.key_secret here: refuse it, so that the mistake is seen.
            found.skipped.append((path, f"{path} holds a secret key: give the daemon NAME{PUBLIC_SUFFIX} only, "
                                        "and make a new key pair (this secret is no longer secret)"))
            continue
        other = found.keys.get(public)
        if other is not None:
            raise KeyFileError(f"{directory}: {other}{PUBLIC_SUFFIX} and {name}{PUBLIC_SUFFIX} hold the same key; "
                               "a key must name one client")
        found.keys[public] = name
    return found


# --- files ------------------------------------------------------------------------------------


def _body(public_key: bytes, secret_key: bytes | None) -> str:
    lines = ["metadata", "curve", f'    public-key = "{public_key.decode("ascii")}"']
    if secret_key is not None:
        lines.append(f'    secret-key = "{secret_key.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int, force: bool) -> None:
    """Write ``path`` with ``mode`` from its creation (Rule 1): a temporary file, then a link
    (which refuses an existing name) or, with ``force``, a rename over it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits from a public file; never adds to 0600
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise KeyFileError(f"{path} already exists; use --force to replace the key pair") from None
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def _read(path: Path, what: str) -> tuple[str, os.stat_result]:
    """The text of ``path`` and the status of the very file read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{what} {path} is not a regular file")
        if st.st_size > 64 * 1024:
            raise KeyFileError(f"{what} {path} is {st.st_size} bytes: not a key file")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read()
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8"), st
    except UnicodeDecodeError:
        raise KeyFileError(f"{what} {path} is not text: not a key file") from None


def _parse(text: str, path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a certificate, as ``zmq.auth.load_certificate`` reads it,
    with each key checked to be 32 bytes of Z85."""
    keys: dict[str, bytes] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        for label in ("public-key", "secret-key"):
            if line.startswith(label) and "=" in line and label not in keys:
                keys[label] = line.split("=", 1)[1].strip(" \t'\"").encode("ascii", "replace")
    public = keys.get("public-key")
    if public is None:
        raise KeyFileError(f"{path} holds no public key: not a ZeroMQ certificate")
    _check_key(public, "public", path)
    secret = keys.get("secret-key")
    if secret is not None:
        _check_key(secret, "secret", path)
    return public, secret


def _check_key(key: bytes, which: str, path: Path) -> None:
    if len(key) != Z85_KEY_LENGTH:
        raise KeyFileError(f"{path}: the {which} key is {len(key)} characters, not {Z85_KEY_LENGTH} (Z85)")
    try:
        z85.decode(key)
    except (ValueError, KeyError, IndexError, TypeError):
        raise KeyFileError(f"{path}: the {which} key is not Z85 text") from None
