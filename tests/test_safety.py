"""vexport/safety.py at unit level: containment of the files a folder names (inside, check_entries,
containment_root and the hub-cache exception), integrity checks against a manifest entry (verify_file,
sha256_file) and is_weight_file. Real folders, files and symlinks under tmp_path; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import pytest

from tests.helpers import hub_snapshot
from vexport import safety
from vexport.errors import ManifestError, VexportError
from vexport.safety import (ContainmentError, check_entries, containment_root, inside, is_weight_file, sha256_file,
                            verify_file)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A model folder with one file and one subfolder, beside a secret file outside it."""
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "shard.safetensors").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("outside")
    return model


def test_containment_error_is_a_vexport_error():
    """The CLI maps every VexportError to one line and exit code 2: a ContainmentError must be one."""
    assert issubclass(ContainmentError, VexportError)


# ------------------------------------------------------------------------------------ containment_root
def test_containment_root_of_a_plain_folder_is_the_folder(folder):
    assert containment_root(folder) == folder
    assert containment_root(str(folder)) == folder


def test_containment_root_of_a_hub_snapshot_is_its_repo(tmp_path):
    repo, snapshot = hub_snapshot(tmp_path)
    assert containment_root(snapshot) == repo


@pytest.mark.parametrize("blobs", ["absent", "file"])
def test_a_snapshots_folder_without_a_blobs_folder_is_not_widened(tmp_path, blobs):
    """Only a real hub-cache layout (a blobs/ folder beside snapshots/) lets files leave the folder itself."""
    snapshot = tmp_path / "repo" / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    if blobs == "file":
        (tmp_path / "repo" / "blobs").write_text("not a folder")
    assert containment_root(snapshot) == snapshot


# ----------------------------------------------------------------------------------------------- inside
@pytest.mark.parametrize("name", ["config.json", "sub/shard.safetensors", "sub/./shard.safetensors", "not-there.bin",
                                  "sub/not-there.bin"])
def test_inside_returns_the_joined_path(folder, name):
    """A missing file is no containment problem: nothing is opened, the caller reports it missing."""
    assert inside(folder, name) == folder / name


def test_inside_accepts_a_str_folder(folder):
    assert inside(str(folder), "config.json") == folder / "config.json"


@pytest.mark.parametrize("name", ["../secret.txt", "sub/../../secret.txt", "sub/../config.json", "..",
                                  "..\\secret.txt", "sub\\..\\..\\secret.txt"])
def test_dot_dot_is_refused_even_where_it_would_stay_inside(folder, name):
    """'..' is refused by name, before anything is resolved (so 'sub/../config.json' is refused too)."""
    with pytest.raises(ContainmentError, match=rf"refusing {re.escape(repr(name))}: the path leads outside"):
        inside(folder, name)


@pytest.mark.parametrize("name", ["/etc/passwd", "C:\\Windows\\x", "C:x", "c:/x", "\\\\server\\share\\x", "//host/x"])
def test_absolute_and_drive_paths_are_refused(folder, name):
    with pytest.raises(ContainmentError, match="leads outside the folder"):
        inside(folder, name)


@pytest.mark.parametrize("name", ["", "a\0b"])
def test_empty_or_nul_names_are_refused(folder, name):
    with pytest.raises(ContainmentError, match="empty or invalid file name"):
        inside(folder, name)


def test_the_referring_file_is_named(folder):
    with pytest.raises(ContainmentError, match=r"\(named in model\.safetensors\.index\.json\)"):
        inside(folder, "../secret.txt", "model.safetensors.index.json")


def test_a_file_symlink_leading_out_is_refused_naming_its_target(folder):
    (folder / "link.json").symlink_to(folder.parent / "secret.txt")
    with pytest.raises(ContainmentError) as info:
        inside(folder, "link.json", "manifest.json")
    message = str(info.value)
    assert message.startswith(f"{folder / 'link.json'}: refusing it (named in manifest.json)")
    assert f"resolves to {folder.parent / 'secret.txt'}, outside {folder}" in message


def test_a_relative_symlink_leading_out_is_refused(folder):
    (folder / "sub" / "link").symlink_to("../../secret.txt")
    with pytest.raises(ContainmentError, match="sub/link: refusing it"):
        inside(folder, "sub/link")


def test_a_folder_symlink_leading_out_is_refused_for_files_under_it(folder, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (folder / "shards").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ContainmentError, match="outside"):
        inside(folder, "shards/model.safetensors")


def test_a_dangling_symlink_leading_out_is_refused(folder):
    """The target need not exist: where it would resolve is enough to refuse it."""
    (folder / "weights.bin").symlink_to(folder.parent / "not-yet-there.bin")
    with pytest.raises(ContainmentError, match="weights.bin"):
        inside(folder, "weights.bin")


def test_a_chain_of_symlinks_is_followed_to_the_end(folder):
    (folder / "last").symlink_to(folder.parent / "secret.txt")
    (folder / "first").symlink_to("last")  # the first hop stays inside, the second leaves
    with pytest.raises(ContainmentError, match="first: refusing it"):
        inside(folder, "first")


def test_a_sibling_folder_sharing_the_name_prefix_is_outside(folder, tmp_path):
    """model-evil/ starts with the text 'model' but is not inside model/ (no string-prefix comparison)."""
    (tmp_path / "model-evil").mkdir()
    (tmp_path / "model-evil" / "x").write_text("x")
    (folder / "x").symlink_to(tmp_path / "model-evil" / "x")
    with pytest.raises(ContainmentError, match="model-evil"):
        inside(folder, "x")


def test_symlinks_that_stay_inside_are_allowed(folder):
    (folder / "alias.json").symlink_to("config.json")
    (folder / "sub" / "up").symlink_to("../config.json")
    assert inside(folder, "alias.json") == folder / "alias.json"
    assert inside(folder, "sub/up") == folder / "sub" / "up"


def test_a_folder_that_is_itself_a_symlink_is_its_own_root(folder, tmp_path):
    """/models/current -> /models/v3: the files inside v3 are inside 'current'."""
    (tmp_path / "current").symlink_to(folder)
    assert inside(tmp_path / "current", "config.json") == tmp_path / "current" / "config.json"


def test_an_explicit_root_widens_containment(folder):
    """A file in sub/ may link to its parent when the caller names the parent as the root."""
    (folder / "sub" / "cfg").symlink_to("../config.json")
    with pytest.raises(ContainmentError, match="outside"):
        inside(folder / "sub", "cfg")
    assert inside(folder / "sub", "cfg", root=folder) == folder / "sub" / "cfg"


def test_hub_snapshot_links_into_blobs_are_allowed_but_not_out_of_the_repo(tmp_path):
    repo, snapshot = hub_snapshot(tmp_path)
    assert inside(snapshot, "config.json") == snapshot / "config.json"
    (tmp_path / "secret.txt").write_text("outside")
    (snapshot / "model.safetensors").symlink_to("../../../secret.txt")
    with pytest.raises(ContainmentError, match=rf"outside {re.escape(str(repo))}$"):
        inside(snapshot, "model.safetensors")


# ------------------------------------------------------------------------------------------ check_entries
def test_check_entries_accepts_a_clean_folder(folder):
    (folder / "alias.json").symlink_to("config.json")
    check_entries(folder)  # raises nothing
    check_entries(folder, [])


def test_check_entries_refuses_an_entry_leading_out(folder):
    (folder / "tokenizer.json").symlink_to(folder.parent / "secret.txt")
    with pytest.raises(ContainmentError, match="tokenizer.json: refusing it"):
        check_entries(folder)


def test_check_entries_reports_the_first_bad_entry_by_name(folder):
    for name in ("z.json", "b.json"):
        (folder / name).symlink_to(folder.parent / "secret.txt")
    with pytest.raises(ContainmentError, match="/b.json: refusing it"):
        check_entries(folder)


def test_check_entries_checks_only_the_names_given(folder):
    (folder / "bad.json").symlink_to(folder.parent / "secret.txt")
    check_entries(folder, ["config.json", "sub"])
    with pytest.raises(ContainmentError, match="leads outside"):
        check_entries(folder, ["config.json", "../secret.txt"])


# -------------------------------------------------------------------------------------------- sha256_file
@pytest.mark.parametrize("size", [0, 1, 5000])
def test_sha256_file_matches_hashlib(tmp_path, size):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(size))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_file_reports_progress_per_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(safety, "HASH_CHUNK", 1000)
    path = tmp_path / "blob"
    data = os.urandom(2500)
    path.write_bytes(data)
    seen: list[int] = []
    assert sha256_file(path, seen.append) == hashlib.sha256(data).hexdigest()
    assert seen == [1000, 1000, 500]


def test_hashing_a_large_file_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(safety, "HASH_LOG_BYTES", 100)
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"x" * 99)
    large.write_bytes(b"x" * 100)
    with caplog.at_level(logging.INFO, logger="vexport.safety"):
        sha256_file(small)
        sha256_file(large)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and str(large) in messages[0] and "--no-verify-hashes" in messages[0]


def test_sha256_file_of_a_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "absent")


# -------------------------------------------------------------------------------------------- verify_file
@pytest.fixture
def weights(tmp_path) -> tuple[Path, dict]:
    path = tmp_path / "model.onnx.data"
    path.write_bytes(b"0123456789")
    return path, {"size": 10, "sha256": hashlib.sha256(b"0123456789").hexdigest(), "role": "weights"}


def test_verify_file_accepts_the_recorded_file(weights):
    path, entry = weights
    seen: list[int] = []
    verify_file(path, entry, progress=seen.append)
    assert sum(seen) == 10


@pytest.mark.parametrize("kind", ["absent", "folder"])
def test_verify_file_refuses_a_missing_file(weights, kind):
    path, entry = weights
    path.unlink()
    if kind == "folder":
        path.mkdir()
    with pytest.raises(ManifestError, match=rf"{re.escape(str(path))} is listed in manifest.json but missing"):
        verify_file(path, entry)


@pytest.mark.parametrize("data", [b"012345678", b"01234567890"], ids=["truncated", "grown"])
def test_verify_file_refuses_a_file_of_another_size(weights, data):
    path, entry = weights
    path.write_bytes(data)
    with pytest.raises(ManifestError, match=rf"model.onnx.data has {len(data)} bytes, manifest.json says 10"):
        verify_file(path, entry, verify_hash=False)  # the size is checked even when hashes are skipped


def test_verify_file_refuses_an_entry_without_a_size(weights):
    path, entry = weights
    with pytest.raises(ManifestError, match="manifest.json says None"):
        verify_file(path, {"sha256": entry["sha256"]})


def test_verify_file_refuses_a_changed_byte_unless_hashes_are_skipped(weights):
    path, entry = weights
    path.write_bytes(b"0123456789"[::-1])  # same size
    with pytest.raises(ManifestError, match="model.onnx.data does not match the sha256 in manifest.json"):
        verify_file(path, entry)
    verify_file(path, entry, verify_hash=False)


def test_verify_file_skips_the_hash_of_an_entry_that_records_none(weights):
    path, entry = weights
    path.write_bytes(b"9876543210")
    seen: list[int] = []
    verify_file(path, {**entry, "sha256": None}, progress=seen.append)
    assert seen == []  # nothing was hashed


# ----------------------------------------------------------------------------------------- is_weight_file
@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00002.safetensors", "model.onnx",
                                  "model.onnx.data", "pytorch_model.bin", "w.pt", "w.pth", "w.ckpt", "model.engine",
                                  "model.plan", "sub/model.safetensors"])
def test_weight_files(name):
    assert is_weight_file(name)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
                                  "manifest.json", "chat_template.jinja", "README.md", "model.safetensors.txt", ""])
def test_not_weight_files(name):
    assert not is_weight_file(name)
