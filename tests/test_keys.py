"""CURVE key files (pvhub.keys) and ``pvhub keys generate``: files in tmp_path, no sockets."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from pvhub import keys
from pvhub.keys import KeyFileError

pytestmark = pytest.mark.timeout(30)

PVHUB = Path(sys.executable).with_name("pvhub")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_writes_a_pair_zeromq_reads_with_safe_modes(tmp_path):
    directory = tmp_path / "new" / "keys"
    public, secret = keys.generate("beamline-1.user_x", directory)
    assert (public, secret) == (directory / "beamline-1.user_x.key", directory / "beamline-1.user_x.key_secret")
    assert mode(directory) == 0o700
    assert mode(secret) == 0o600
    assert mode(public) == 0o644
    assert [path.name for path in directory.iterdir() if path.name.startswith(".")] == []  # no temporary left
    # The certificate format of zmq.auth, both ways.
    public_key, secret_key = zmq.auth.load_certificate(secret)
    assert keys.load_secret(secret) == (public_key, secret_key)
    assert zmq.auth.load_certificate(public) == (public_key, None)
    assert keys.load_public(public) == public_key
    assert zmq.curve_public(secret_key) == public_key  # a real pair
    made_public, made_secret = zmq.auth.create_certificates(tmp_path, "made_by_zmq")
    os.chmod(made_secret, 0o600)
    assert keys.load_secret(made_secret) == zmq.auth.load_certificate(made_secret)
    assert keys.load_public(made_public) == zmq.auth.load_certificate(made_public)[0]


def test_the_secret_file_is_0600_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        _, secret = keys.generate("loose", tmp_path)
    finally:
        os.umask(old)
    assert mode(secret) == 0o600


def test_generate_refuses_to_overwrite_unless_forced(tmp_path):
    public, secret = keys.generate("alice", tmp_path)
    first = keys.load_secret(secret)
    with pytest.raises(KeyFileError, match="already exist.*--force"):
        keys.generate("alice", tmp_path)
    assert keys.load_secret(secret) == first
    secret.unlink()  # one file of the pair is enough to refuse
    with pytest.raises(KeyFileError, match="alice.key already exists"):
        keys.generate("alice", tmp_path)
    assert not secret.exists()
    public2, secret2 = keys.generate("alice", tmp_path, force=True)
    assert (public2, secret2) == (public, secret)
    assert keys.load_secret(secret)[0] == keys.load_public(public) != first[0]
    assert mode(secret) == 0o600 and mode(public) == 0o644


@pytest.mark.parametrize("name", ["", "a b", "../escape", "x/y", "é", "n" * 65, "semi;colon"])
def test_generate_refuses_names_that_cannot_be_identities(tmp_path, name):
    with pytest.raises(KeyFileError, match="cannot name a key"):
        keys.generate(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_load_secret_refuses_a_file_others_may_read_or_write(tmp_path, bad_mode):
    _, secret = keys.generate("bob", tmp_path)
    os.chmod(secret, bad_mode)
    with pytest.raises(KeyFileError, match=f"mode {bad_mode:04o}.*chmod 600"):
        keys.load_secret(secret)


def test_load_secret_refuses_missing_public_only_and_junk_files(tmp_path):
    public, _ = keys.generate("carol", tmp_path)
    with pytest.raises(KeyFileError, match="does not exist"):
        keys.load_secret(tmp_path / "nobody.key_secret")
    # A public file at mode 0600 is safe but holds no secret.
    copy = tmp_path / "copy.key_secret"
    copy.write_text(public.read_text())
    copy.chmod(0o600)
    with pytest.raises(KeyFileError, match="holds no secret key"):
        keys.load_secret(copy)
    junk = tmp_path / "junk.key_secret"
    junk.write_text("curve\n    public-key = \"short\"\n")
    junk.chmod(0o600)
    with pytest.raises(KeyFileError, match="not 40"):
        keys.load_secret(junk)
    with pytest.raises(KeyFileError, match="not a regular file"):
        keys.load_public(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_load_secret_refuses_a_file_another_user_owns(tmp_path):
    _, secret = keys.generate("dave", tmp_path)
    os.chown(secret, 65534, -1)
    with pytest.raises(KeyFileError, match="owned by uid 65534"):
        keys.load_secret(secret)


def test_load_client_keys_maps_keys_to_names_and_skips_what_it_cannot_use(tmp_path):
    clients = tmp_path / "clients"
    clients.mkdir(mode=0o755)
    clients.chmod(0o755)
    alice, _ = keys.generate("alice", tmp_path / "alice_home")
    bob, bob_secret = keys.generate("bob", tmp_path / "bob_home")
    (clients / "alice.key").write_text(alice.read_text())
    (clients / "bob.key").write_text(bob.read_text())
    (clients / "junk.key").write_text("not a certificate\n")
    (clients / "bad name.key").write_text(alice.read_text().replace("alice", "x"))
    (clients / "leaked.key").write_text(bob_secret.read_text())
    (clients / "notes.txt").write_text("ignored: not *.key")
    found = keys.load_client_keys(clients)
    assert found.keys == {keys.load_public(alice): "alice", keys.load_public(bob): "bob"}
    skipped = {path.name: reason for path, reason in found.skipped}
    assert set(skipped) == {"junk.key", "bad name.key", "leaked.key"}
    assert "no public key" in skipped["junk.key"]
    assert "cannot name a key" in skipped["bad name.key"]
    assert "holds a secret key" in skipped["leaked.key"]


def test_load_client_keys_refuses_one_key_under_two_names(tmp_path):
    clients = tmp_path / "clients"
    clients.mkdir(mode=0o700)
    public, _ = keys.generate("alice", tmp_path / "home")
    (clients / "alice.key").write_text(public.read_text())
    (clients / "mallory.key").write_text(public.read_text())
    with pytest.raises(KeyFileError, match="alice.key and mallory.key hold the same key"):
        keys.load_client_keys(clients)


@pytest.mark.parametrize("bad_mode", [0o777, 0o775, 0o757])
def test_load_client_keys_refuses_a_directory_others_may_write(tmp_path, bad_mode):
    clients = tmp_path / "clients"
    clients.mkdir()
    clients.chmod(bad_mode)
    with pytest.raises(KeyFileError, match="may add keys"):
        keys.load_client_keys(clients)
    with pytest.raises(KeyFileError, match="does not exist|No such file"):
        keys.load_client_keys(tmp_path / "missing")


def test_cli_generates_a_pair_and_says_where_each_file_goes(tmp_path):
    directory = tmp_path / "server_keys"
    result = subprocess.run([str(PVHUB), "keys", "generate", "server", "--dir", str(directory)],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    public, secret = directory / "server.key", directory / "server.key_secret"
    assert f"public key: {public}" in result.stdout
    assert f"secret key: {secret}" in result.stdout
    assert "server.key_secret stays on this machine" in result.stdout
    assert "clients directory" in result.stdout and "PVHUB_SERVER_KEY" in result.stdout
    assert mode(secret) == 0o600 and mode(public) == 0o644
    first = keys.load_secret(secret)

    again = subprocess.run([str(PVHUB), "keys", "generate", "server", "--dir", str(directory)],
                           capture_output=True, text=True, timeout=20)
    assert again.returncode == 2
    assert "already exist" in again.stderr and again.stdout == ""
    assert keys.load_secret(secret) == first

    forced = subprocess.run([str(PVHUB), "keys", "generate", "server", "--dir", str(directory), "--force"],
                            capture_output=True, text=True, timeout=20)
    assert forced.returncode == 0, forced.stderr
    assert keys.load_secret(secret) != first

    bad = subprocess.run([str(PVHUB), "keys", "generate", "no/slash"], capture_output=True, text=True,
                         timeout=20, cwd=tmp_path)
    assert bad.returncode == 2 and "cannot name a key" in bad.stderr


def test_cli_writes_to_the_current_directory_by_default(tmp_path):
    result = subprocess.run([str(PVHUB), "keys", "generate", "here"], capture_output=True, text=True,
                            timeout=20, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "here.key").is_file() and mode(tmp_path / "here.key_secret") == 0o600


def test_a_systemd_credential_is_taken_whatever_its_owner_and_mode(tmp_path, monkeypatch):
    """systemd's LoadCredential= copy: on newer systemd root-owned 0440, read through an ACL."""
    from pvhub.keys import generate, load_secret

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    _, secret = generate("server", tmp_path / "keys")
    copy = credentials / "server.key_secret"
    copy.write_bytes(secret.read_bytes())
    copy.chmod(0o440)
    with pytest.raises(KeyFileError, match="0440"):
        load_secret(copy)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert load_secret(copy) == load_secret(secret)
    copy_elsewhere = tmp_path / "server.key_secret"
    copy_elsewhere.write_bytes(secret.read_bytes())
    copy_elsewhere.chmod(0o440)
    with pytest.raises(KeyFileError):
        load_secret(copy_elsewhere)
