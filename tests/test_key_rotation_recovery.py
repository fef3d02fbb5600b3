"""A key rotation stopped at any of its durable steps is recovered by whatever opens the keys
next, and every stored instance still reads back byte-identical.

The steps (``app/crypto/keystore.py``): a KEK rotation writes the re-wrapped keyring to
``keyring.json.next`` (through ``keyring.json.next.tmp``), then, with the KEK in a key file,
the new KEK to ``kek.next`` (through ``kek.next.tmp``), renames it over ``kek`` (the commit
point) and renames the keyring into place. A trust's new data key rewrites ``keyring.json``
(through ``keyring.json.tmp``). Each test lays on disk exactly what a crash after one step
leaves, built from the files a real, complete rotation of a copy of the same data directory
wrote, then opens the keys as the next command or gateway start would.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from app.filelock import FileLock
from tests.helpers import IexServer, make_instance, multipart_related

AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass(frozen=True)
class Gateway:
    """A data directory with stored instances (two trusts, so two data keys), stopped."""

    data_dir: Path
    instances: dict[str, bytes]  # by SOP Instance UID
    env: dict[str, str]


def _iex(data_dir: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def _kek_id(data_dir: Path, env: dict[str, str]) -> str:
    status = _iex(data_dir, "keys", "status", env=env)
    assert status.returncode == 0, status.stderr
    first = status.stdout.splitlines()[0]
    assert first.startswith("key-encryption key: ")
    return first.split(": ")[1]


def _stored(root: Path, name: str, env: dict[str, str]) -> Gateway:
    srv = IexServer(root / name, env=env).start()
    try:
        srv.iex("trust", "add", "north")
        instances: dict[str, bytes] = {}
        for token in (srv.token, srv.issue_token("north", "uploader")):
            objects = [make_instance(), make_instance(frames=3, rows=64, columns=64)]
            body, ctype = multipart_related(objects)
            with srv.client(token) as c:
                r = c.post("/studies", content=body, headers={"Content-Type": ctype})
                assert r.status_code == 200, r.text
            instances |= {dcmread(io.BytesIO(o)).SOPInstanceUID: o for o in objects}
    finally:
        srv.stop()
    return Gateway(srv.data_dir, instances, env)


def _copy(gateway: Gateway, dest: Path) -> Gateway:
    shutil.copytree(gateway.data_dir, dest, symlinks=True)
    return Gateway(dest, gateway.instances, gateway.env)


def _assert_recovered(gateway: Gateway, kek_id: str, env: dict[str, str] | None = None) -> None:
    """The keys open on the expected KEK with nothing of the rotation left, a gateway serves
    every instance byte-identical (each trust's under the admin token's trust or its own),
    and the next rotation works."""
    env = env if env is not None else gateway.env
    assert _kek_id(gateway.data_dir, env) == kek_id
    keys = gateway.data_dir / "keys"
    assert not [p.name for p in keys.iterdir() if p.name.endswith((".next", ".tmp"))]
    srv = IexServer(gateway.data_dir, env=env).start()
    try:
        north = srv.issue_token("north", "reader")
        got: dict[str, bytes] = {}
        for token in (srv.token, north):
            with srv.client(token) as c:
                r = c.get("/instances")
                assert r.status_code == 200, r.text
                for found in r.json():
                    study = found["0020000D"]["Value"][0]
                    series = found["0020000E"]["Value"][0]
                    sop = found["00080018"]["Value"][0]
                    path = f"/studies/{study}/series/{series}/instances/{sop}"
                    r = c.get(path, headers={"Accept": AS_STORED})
                    assert r.status_code == 200, r.text
                    got[sop] = _only_part(r.content)
    finally:
        srv.stop()
    assert got == gateway.instances
    if "IEX_KEK" not in env:  # a rotation from the environment needs a new KEK given
        rotated = _iex(gateway.data_dir, "keys", "rotate", env=env)
        assert rotated.returncode == 0, rotated.stderr
        assert _kek_id(gateway.data_dir, env) != kek_id


def _only_part(body: bytes) -> bytes:
    """The one Part 10 object of a multipart/related retrieval (framing stripped)."""
    start = body.index(b"\r\n\r\n") + 4
    end = body.rindex(b"\r\n--")
    return body[start:end]


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# -- KEK rotation with the KEK in the key file --------------------------------------------


@dataclass(frozen=True)
class Rotation:
    before: Gateway
    old_kek: bytes
    old_ring: bytes
    new_kek: bytes
    new_ring: bytes
    old_id: str
    new_id: str


@pytest.fixture(scope="module")
def key_file_rotation(tmp_path_factory: pytest.TempPathFactory) -> Rotation:
    """A gateway with data, and what a complete ``iex keys rotate`` of a copy wrote."""
    root = tmp_path_factory.mktemp("rotation")
    before = _stored(root, "before", {})
    after = _copy(before, root / "after")
    rotated = _iex(after.data_dir, "keys", "rotate", env={})
    assert rotated.returncode == 0, rotated.stderr
    keys, new_keys = before.data_dir / "keys", after.data_dir / "keys"
    return Rotation(
        before,
        (keys / "kek").read_bytes(),
        (keys / "keyring.json").read_bytes(),
        (new_keys / "kek").read_bytes(),
        (new_keys / "keyring.json").read_bytes(),
        _id_of((keys / "kek").read_bytes()),
        _id_of((new_keys / "kek").read_bytes()),
    )


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


#: Per crash point: the files of ``keys/`` the rotation had written (name -> content from
#: the old or new files), and whether the new KEK is the one in force after recovery.
CrashState = Callable[[Rotation], dict[str, bytes]]
KEY_FILE_CRASHES: dict[str, tuple[CrashState, bool]] = {
    "writing the new keyring": (
        lambda r: {"keyring.json.next.tmp": _half(r.new_ring)},
        False,
    ),
    "new keyring written": (lambda r: {"keyring.json.next": r.new_ring}, False),
    "writing the new KEK": (
        lambda r: {"keyring.json.next": r.new_ring, "kek.next.tmp": _half(r.new_kek)},
        False,
    ),
    "new KEK written": (
        lambda r: {"keyring.json.next": r.new_ring, "kek.next": r.new_kek},
        False,
    ),
    "new KEK in place (the commit point)": (
        lambda r: {"keyring.json.next": r.new_ring, "kek": r.new_kek},
        True,
    ),
    "new keyring in place": (lambda r: {"kek": r.new_kek, "keyring.json": r.new_ring}, True),
}


@pytest.mark.parametrize("crash", KEY_FILE_CRASHES)
def test_kek_rotation_stopped_after_each_step(
    key_file_rotation: Rotation, crash: str, tmp_path: Path
) -> None:
    state, committed = KEY_FILE_CRASHES[crash]
    gateway = _copy(key_file_rotation.before, tmp_path / "data")
    for name, data in state(key_file_rotation).items():
        _write(gateway.data_dir / "keys" / name, data)
    expected = key_file_rotation.new_id if committed else key_file_rotation.old_id
    _assert_recovered(gateway, expected)


def test_a_gateway_start_recovers_without_a_command_first(
    key_file_rotation: Rotation, tmp_path: Path
) -> None:
    """At the commit point, with nothing run in between, the gateway itself finishes it."""
    gateway = _copy(key_file_rotation.before, tmp_path / "data")
    _write(gateway.data_dir / "keys" / "keyring.json.next", key_file_rotation.new_ring)
    _write(gateway.data_dir / "keys" / "kek", key_file_rotation.new_kek)
    IexServer(gateway.data_dir).start().stop()
    assert not (gateway.data_dir / "keys" / "keyring.json.next").exists()
    assert (gateway.data_dir / "keys" / "keyring.json").read_bytes() == key_file_rotation.new_ring
    _assert_recovered(gateway, key_file_rotation.new_id)


def test_a_rotation_in_progress_is_never_taken_for_a_crash(
    key_file_rotation: Rotation, tmp_path: Path
) -> None:
    """While a rotation holds the keys' lock, a command that opens the keys refuses and leaves
    its files alone: undoing them there would lose the keyring once the new KEK is in place."""
    gateway = _copy(key_file_rotation.before, tmp_path / "data")
    keys = gateway.data_dir / "keys"
    _write(keys / "keyring.json.next", key_file_rotation.new_ring)
    rotation = FileLock(keys / "lock")  # what `iex keys rotate` holds while it runs
    assert rotation.acquire()
    try:
        for command in (("keys", "status"), ("partner", "list"), ("trust", "list")):
            result = _iex(gateway.data_dir, *command, env={})
            assert result.returncode == 2, (command, result.stdout, result.stderr)
            assert "a key rotation is running" in result.stderr, result.stderr
        assert (keys / "keyring.json.next").read_bytes() == key_file_rotation.new_ring
    finally:
        rotation.release()
    # The rotation then goes on to its commit point and stops there: nothing was lost.
    _write(keys / "kek", key_file_rotation.new_kek)
    _assert_recovered(gateway, key_file_rotation.new_id)


# -- KEK rotation with the KEK in the environment (IEX_KEK, IEX_NEW_KEK) --------------------


def _generated_kek() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "generate-kek"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _id_of(kek: str | bytes) -> str:
    """The id a KEK (as ``iex keys generate-kek`` prints it, or a key file) carries."""
    kek_id: str = json.loads(kek)["id"]
    return kek_id


@pytest.mark.parametrize(
    ("half_written", "restart_with_new"),
    [(True, False), (False, False), (False, True)],
    ids=["writing-keyring", "keyring-written-old-kek-given", "keyring-written-new-kek-given"],
)
def test_environment_kek_rotation_stopped(
    tmp_path: Path, half_written: bool, restart_with_new: bool
) -> None:
    """From the environment there is no key file: the keyring's rename is the commit. Stopped
    before it, the gateway starts on the old KEK; an operator who already set IEX_KEK to the
    new one finds the rotation finished."""
    old, new = _generated_kek(), _generated_kek()
    before = _stored(tmp_path, "before", {"IEX_KEK": old})
    after = _copy(before, tmp_path / "after")
    rotated = _iex(after.data_dir, "keys", "rotate", env={"IEX_KEK": old, "IEX_NEW_KEK": new})
    assert rotated.returncode == 0, rotated.stderr
    new_ring = (after.data_dir / "keys" / "keyring.json").read_bytes()
    keys = before.data_dir / "keys"
    if half_written:
        _write(keys / "keyring.json.next.tmp", _half(new_ring))
    else:
        _write(keys / "keyring.json.next", new_ring)
    kek = new if restart_with_new else old
    _assert_recovered(before, _id_of(kek), {"IEX_KEK": kek})


# -- a trust's new data key (iex keys rotate --trust) ---------------------------------------


def _keys_of(data_dir: Path, trust: str) -> list[tuple[str, str, int]]:
    """(key id, state, objects sealed) of each of ``trust``'s data keys."""
    status = _iex(data_dir, "keys", "status", env={})
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines()[2:]]
    return sorted((r[0], r[-2], int(r[-1])) for r in rows if r[1] == trust)


@pytest.mark.parametrize("saved", [False, True], ids=["writing-keyring", "keyring-in-place"])
def test_trust_key_rotation_stopped(
    key_file_rotation: Rotation, tmp_path: Path, saved: bool
) -> None:
    """Stopped while writing the keyring, the trust keeps its data key; once the keyring is in
    place, the new key takes the next writes. Either way everything stored reads back."""
    gateway = _copy(key_file_rotation.before, tmp_path / "data")
    after = _copy(key_file_rotation.before, tmp_path / "after")
    rotated = _iex(after.data_dir, "keys", "rotate", "--trust", "north", env={})
    assert rotated.returncode == 0, rotated.stderr
    new_ring = (after.data_dir / "keys" / "keyring.json").read_bytes()
    if saved:
        _write(gateway.data_dir / "keys" / "keyring.json", new_ring)
    else:
        _write(gateway.data_dir / "keys" / "keyring.json.tmp", _half(new_ring))
    [(old_key, state, sealed)] = _keys_of(key_file_rotation.before.data_dir, "north")
    assert (state, sealed) == ("active", 2)
    srv = IexServer(gateway.data_dir).start()
    try:
        data = make_instance()
        body, ctype = multipart_related([data])
        with srv.client(srv.issue_token("north", "uploader")) as c:
            r = c.post("/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text
    finally:
        srv.stop()
    north = _keys_of(gateway.data_dir, "north")
    if saved:
        (new_key,) = {k for k, _, _ in north} - {old_key}
        assert north == sorted([(old_key, "retired", 2), (new_key, "active", 1)])
    else:
        assert north == [(old_key, "active", 3)]
    stored = Gateway(gateway.data_dir, {**gateway.instances}, {})
    stored.instances[dcmread(io.BytesIO(data)).SOPInstanceUID] = data
    _assert_recovered(stored, key_file_rotation.old_id)
