"""Output locations: unwritable ones fail before any work with one line; a full disk names the file and leaves
no partial file; abort() never hides the error that stopped a write. Tests may run as root, which ignores
permission bits: those cases use what root cannot override (a path under a file, /dev/full) or a simulated
file-system error."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf.constants import GGMLQuantizationType

from quantkit.cli import main
from quantkit.errors import OutputError
from quantkit.formats.gguf import file as gguf_file
from quantkit.formats.gguf.file import GGUFWriter, TensorEntry
from quantkit.output import check_writable


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result, *words):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.strip().endswith(errors[0]), result.output
    assert all(w in errors[0] for w in words), errors[0]
    assert "Traceback" not in result.output


def test_missing_folders_are_fine_and_nothing_is_left(tmp_path):
    check_writable(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []


def test_path_under_a_file_fails_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "out")
    _one_error_line(_cli("imatrix", "tiny-qwen2", "-o", tmp_path / "file" / "m.imatrix.gguf"), "is a file")
    _one_error_line(_cli("convert", "tiny-qwen2", "--to", "gguf:Q8_0", "-o", tmp_path / "file" / "q.gguf"),
                    "is a file")


def test_read_only_folder_fails_before_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes (test_read_only_mount covers it)")
        _one_error_line(_cli("convert", "tiny-qwen2", "--to", "gguf:Q8_0", "-o", folder), "Permission denied")
    finally:
        folder.chmod(0o755)


def _fail_under(folder: Path, code: int, monkeypatch):
    """Every os.open of a path inside `folder` fails with `code`, as on a read-only mount or a full disk."""
    real_open = os.open

    def fake_open(path, *args, **kwargs):
        if Path(os.fsdecode(path)).is_relative_to(folder):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_read_only_mount_fails_before_work(tmp_path, monkeypatch):
    _fail_under(tmp_path, errno.EROFS, monkeypatch)
    _one_error_line(_cli("convert", "tiny-qwen2", "--to", "gguf:Q8_0", "-o", tmp_path / "gguf"),
                    str(tmp_path / "gguf"), "Read-only file system")
    _one_error_line(_cli("imatrix", "tiny-qwen2", "-o", tmp_path / "m.imatrix.gguf"), "Read-only file system")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_before_work(tmp_path, monkeypatch):
    _fail_under(tmp_path, errno.ENOSPC, monkeypatch)
    _one_error_line(_cli("imatrix", "tiny-qwen2", "-o", tmp_path / "m.imatrix.gguf"), "the disk is full")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_while_writing_names_the_file_and_removes_the_part(tmp_path):
    """/dev/full fails every write with ENOSPC, as a full disk does; the .part is made a link to it."""
    out = tmp_path / "tiny-qwen2-Q8_0.gguf"
    part = tmp_path / "tiny-qwen2-Q8_0.gguf.part"
    part.symlink_to("/dev/full")
    _one_error_line(_cli("convert", "tiny-qwen2", "--to", "gguf:Q8_0", "-o", out), str(out), "the disk is full")
    assert list(tmp_path.iterdir()) == []


def test_abort_never_raises_a_second_error(tmp_path, monkeypatch, caplog):
    """Opening fails, and removing the partial file fails too: the first error is the one reported."""
    writer = GGUFWriter(tmp_path / "x.gguf", {}, [TensorEntry("t", (1, 32), GGMLQuantizationType.F32)])

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(gguf_file, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OutputError, match="Read-only file system") as info, writer:
        writer.write("t", np.zeros((1, 32), dtype=np.float32))
    assert isinstance(info.value.__cause__, OSError) and info.value.__context__ is info.value.__cause__
    assert "could not remove" in caplog.text
