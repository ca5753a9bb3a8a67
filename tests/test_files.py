"""Output-path checks and the clean-up of temporary files left by killed atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, remove_stale_temps, require_output_dir, require_output_file


def _refusal(check, path: Path) -> str:
    with pytest.raises(CxrsamError) as info:
        check(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_output_dir_accepts_a_folder_or_a_creatable_path_without_creating_it(tmp_path):
    assert require_output_dir(tmp_path) == tmp_path
    assert require_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()


def test_output_dir_refuses_a_file_a_file_parent_and_unwritable_folders(tmp_path, deny_write):
    existing = tmp_path / "results.csv"
    existing.write_text("x\n")
    assert "exists and is not a folder" in _refusal(require_output_dir, existing)
    assert f"{existing} is not a folder" in _refusal(require_output_dir, existing / "out")
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_write(locked)
    assert "not writable" in _refusal(require_output_dir, locked)
    assert f"no permission to write in {locked}" in _refusal(require_output_dir, locked / "new" / "out")


def test_output_file_accepts_new_or_existing_files_and_refuses_folders_and_unwritable_parents(tmp_path, deny_write):
    existing = tmp_path / "results.csv"
    existing.write_text("x\n")
    assert require_output_file(existing) == existing
    assert require_output_file(tmp_path / "new" / "r.csv") == tmp_path / "new" / "r.csv"
    assert "is a folder" in _refusal(require_output_file, tmp_path)
    assert f"{existing} is not a folder" in _refusal(require_output_file, existing / "r.csv")
    deny_write(tmp_path)
    assert f"no permission to write in {tmp_path}" in _refusal(require_output_file, existing)
    assert f"no permission to write in {tmp_path}" in _refusal(require_output_file, tmp_path / "new" / "r.csv")


def test_stale_temps_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "last.pt") as tmp:
        raise RuntimeError("killed")  # atomic_path removes its temp here; a SIGKILL would leave it:
    stale = tmp_path / tmp.name
    stale.write_bytes(b"half a checkpoint")
    nifti = tmp_path / ".x_mask.nii.gz.k3j_9zq1.tmp.gz"
    nifti.write_bytes(b"half")
    keep = [tmp_path / name for name in (".hidden", "last.pt", ".notes.txt.tmp", ".x_mask.nii.gz.abcdefgh.tmp.png")]
    for path in keep:
        path.write_text("keep")
    assert remove_stale_temps(tmp_path) == sorted([nifti, stale])
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temps(tmp_path / "absent") == []


def test_large_files_hashes_are_remembered_by_stat_and_any_rewrite_is_hashed_again(tmp_path, monkeypatch):
    import hashlib
    import json
    import os

    from cxrsam import files

    monkeypatch.setenv("CXRSAM_CACHE", str(tmp_path / "cache"))
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(os.urandom(files.HASH_MEMO_MIN_BYTES))
    small.write_bytes(b"x" * 100)
    assert files.sha256_file(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    assert files.sha256_file(small) == hashlib.sha256(b"x" * 100).hexdigest()
    memo = json.loads((tmp_path / "cache" / files.HASH_MEMO).read_text())
    assert list(memo) == [str(big.resolve())]  # small files are not remembered
    reads = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: reads.append(self) or real_open(self, *a, **k))
    assert files.sha256_file(big) == memo[str(big.resolve())]["sha256"] and big not in reads  # not read again
    stat = big.stat()
    data = bytearray(big.read_bytes())
    data[0] ^= 0xFF
    with real_open(big, "r+b") as handle:  # same size, same inode, modification time set back: the bytes differ
        handle.write(bytes(data[:1]))
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    reads.clear()
    assert files.sha256_file(big) == hashlib.sha256(bytes(data)).hexdigest() and big in reads
    (tmp_path / "cache" / files.HASH_MEMO).write_text("{not json")  # a damaged memo is ignored and rewritten
    assert files.sha256_file(big) == hashlib.sha256(bytes(data)).hexdigest()
    assert str(big.resolve()) in json.loads((tmp_path / "cache" / files.HASH_MEMO).read_text())


def test_an_unwritable_hash_memo_costs_only_the_hash(tmp_path, monkeypatch):
    import hashlib
    import os

    from cxrsam import files

    monkeypatch.setenv("CXRSAM_CACHE", str(tmp_path / "cache-is-a-file"))
    (tmp_path / "cache-is-a-file").write_text("")  # the memo's folder cannot be created
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(files.HASH_MEMO_MIN_BYTES))
    assert files.sha256_file(big) == hashlib.sha256(big.read_bytes()).hexdigest()
