"""Key-encryption keys, wrapped data keys and rotation."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.crypto.errors import KeyUnavailable
from app.crypto.keys import Keyring, encode_kek, load_kek, new_kek, write_key_file


def test_first_start_creates_a_private_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "kek"
    kek = load_kek(path, None, may_create=True)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_kek(path, None, may_create=False) == kek
    assert kek.key.hex() not in repr(kek)


def test_missing_key_file_beside_data_refuses(tmp_path: Path) -> None:
    with pytest.raises(KeyUnavailable, match="missing but encrypted data exists"):
        load_kek(tmp_path / "kek", None, may_create=False)


def test_key_file_readable_by_others_refuses(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    write_key_file(path, new_kek())
    path.chmod(0o644)
    with pytest.raises(KeyUnavailable, match="readable by others"):
        load_kek(path, None, may_create=False)


def test_environment_kek_wins_and_is_validated(tmp_path: Path) -> None:
    kek = new_kek()
    assert load_kek(tmp_path / "absent", encode_kek(kek), may_create=False) == kek
    with pytest.raises(KeyUnavailable, match="IEX_KEK"):
        load_kek(tmp_path / "absent", "not json", may_create=False)


def test_wrong_kek_does_not_open_the_keyring() -> None:
    ring = Keyring(new_kek(), [])
    ring.new_key("local")
    impostor = new_kek()
    with pytest.raises(KeyUnavailable, match="wrong key"):
        Keyring(impostor, ring.wrapped_keys)
    same_id_other_bytes = type(impostor)(ring.kek.id, impostor.key)
    with pytest.raises(KeyUnavailable, match="does not open"):
        Keyring(same_id_other_bytes, ring.wrapped_keys)


def test_trust_rotation_keeps_old_keys_readable() -> None:
    ring = Keyring(new_kek(), [])
    first = ring.new_key("royal-free")
    first_key = ring.key(first.id)
    second = ring.new_key("royal-free")
    other = ring.new_key("barts")
    assert ring.active("royal-free") == (second.id, ring.key(second.id))
    assert ring.active("barts") == (other.id, ring.key(other.id))
    reloaded = Keyring(ring.kek, ring.wrapped_keys)
    assert reloaded.key(first.id) == first_key
    assert [w.active for w in reloaded.wrapped_keys if w.trust == "royal-free"] == [False, True]


def test_kek_rotation_rewraps_without_changing_data_keys() -> None:
    ring = Keyring(new_kek(), [])
    ids = [ring.new_key(t).id for t in ("a", "b", "c")]
    keys = {i: ring.key(i) for i in ids}
    new = new_kek()
    rewrapped = ring.rewrapped(new)
    assert {w.kek_id for w in rewrapped} == {new.id}
    reopened = Keyring(new, rewrapped)
    assert {i: reopened.key(i) for i in ids} == keys
    with pytest.raises(KeyUnavailable):
        Keyring(ring.kek, rewrapped)
