"""bnfold_gpu._atomic: whole-or-nothing writes, temporary names a later run recognises, and what a
stale-file sweep may remove (only ours, only of dead processes)."""
import os
import stat
import subprocess
import sys

import pytest

from bnfold_gpu import _atomic


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_write_that_raises_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "t.json"
    target.write_text("before")
    with pytest.raises(RuntimeError):
        with _atomic.AtomicFile(str(target)) as f:
            f.file.write(b"half")
            raise RuntimeError("stop")
    assert target.read_text() == "before" and os.listdir(tmp_path) == ["t.json"]


def test_temporary_name_beside_the_target(tmp_path):
    with _atomic.AtomicFile(str(tmp_path / "model.nnp"), suffix=".nnp") as f:
        name = os.path.basename(f.path)
        assert os.path.dirname(f.path) == str(tmp_path)
        assert name.startswith(_atomic.prefix()) and name.endswith("-model.nnp.tmp.nnp")
        assert _atomic.prefix().startswith(f".bnfold-{os.getpid()}@")
        assert _atomic._STALE_NAME.match(name)
        assert stat.S_IMODE(os.stat(f.path).st_mode) == 0o600   # private until finished
    assert os.listdir(tmp_path) == []


def test_commit_flushes_to_disk_and_syncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real(fd)))
    _atomic.write_bytes(str(tmp_path / "t.json"), b"{}")
    assert len(synced) == 2 and ".bnfold-" in synced[0] and synced[1] == str(tmp_path)
    assert (tmp_path / "t.json").read_bytes() == b"{}"


def test_commit_writes_through_a_symlink(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("before")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    _atomic.write_bytes(str(link), b"after")
    assert os.path.islink(link) and real.read_text() == "after"


def test_a_new_file_gets_the_umask_mode(tmp_path):
    umask = os.umask(0o027)
    try:
        _atomic.write_bytes(str(tmp_path / "t.json"), b"{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "t.json").st_mode) == 0o640


def test_the_umask_is_read_without_being_changed(tmp_path, monkeypatch):
    # setting it, even for a moment, would apply to the files other threads create meanwhile
    set_to = []
    real = os.umask
    umask = real(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: set_to.append(mask) or real(mask))
        assert _atomic._default_mode() == 0o640
        _atomic.write_bytes(str(tmp_path / "t.json"), b"{}")
    finally:
        monkeypatch.undo()
        real(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "t.json").st_mode) == 0o640
    assert set_to == []


def test_without_proc_the_umask_is_still_found(monkeypatch):
    monkeypatch.setattr(_atomic, "_read_umask", lambda: None)
    umask = os.umask(0o077)
    try:
        assert _atomic._default_mode() == 0o600
        assert os.umask(0o077) == 0o077   # put back
    finally:
        os.umask(umask)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_check_target_refuses_what_is_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "x"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(_atomic.TargetError, match="FIFO|directory"):
        _atomic.check_target(str(path))


def test_check_target_says_a_symlink_loop_in_words(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(_atomic.TargetError, match="a loop of symbolic links"):
        _atomic.check_target(str(a))


def test_remove_stale_takes_only_its_own_kind(tmp_path):
    dead = _atomic.prefix(_dead_pid())
    mine = [f"{dead}abc-o.nnp.tmp.nnp", f"{dead}abc.tmp"]
    (tmp_path / mine[0]).write_text("x")
    (tmp_path / mine[1]).mkdir()
    (tmp_path / mine[1] / "parameter.h5").write_text("x")
    others = [f"{_atomic.prefix()}abc.tmp", f"{dead}abc.txt", "notes.tmp", f"{dead[1:]}abc.tmp",
              f"{dead.replace('@', '@elsewhere.')}abc.tmp", ".bnfold-99999999999999999999@x-a.tmp"]
    for name in others:
        (tmp_path / name).write_text("x")
    (tmp_path / f"{dead}link.tmp").symlink_to(tmp_path / "notes.tmp")
    others.append(f"{dead}link.tmp")
    removed = _atomic.remove_stale(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(mine)
    assert sorted(os.listdir(tmp_path)) == sorted(others)


def test_remove_stale_leaves_other_users_files(tmp_path, monkeypatch):
    name = f"{_atomic.prefix(_dead_pid())}abc.tmp"
    (tmp_path / name).write_text("x")
    owner = os.stat(tmp_path / name).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    assert _atomic.remove_stale(str(tmp_path)) == [] and os.listdir(tmp_path) == [name]


def test_remove_stale_keeps_the_files_it_is_told_to(tmp_path):
    # an input named like a killed run's temporary file (one a failed run left, copied): the run
    # reading it must not remove it first
    name = f"{_atomic.prefix(_dead_pid())}abc-m.nnp.tmp.nnp"
    (tmp_path / name).write_text("x")
    os.link(tmp_path / name, tmp_path / "alias.nnp")
    assert _atomic.remove_stale(str(tmp_path), keep=[str(tmp_path / "alias.nnp")]) == []
    assert sorted(os.listdir(tmp_path)) == sorted([name, "alias.nnp"])


def test_another_pid_namespace_files_are_not_judged_here(tmp_path):
    # a container sharing the folder and the host's name: its process ids mean nothing here
    if not os.path.exists("/proc/self/ns/pid"):
        pytest.skip("no process-id namespaces on this system")
    here = _atomic.host()
    assert here.endswith(f".pidns{os.stat('/proc/self/ns/pid').st_ino}")
    elsewhere = _atomic.prefix(_dead_pid()).replace(here, here.rsplit(".pidns", 1)[0] + ".pidns1")
    (tmp_path / f"{elsewhere}abc.tmp").write_text("x")
    assert _atomic.remove_stale(str(tmp_path)) == []


def test_files_named_before_the_namespace_was_are_still_removed(tmp_path):
    old = _atomic._unnamespaced_prefix(_dead_pid())
    assert old != _atomic.prefix(_dead_pid()) or "pidns" not in _atomic.host()
    (tmp_path / f"{old}abc-o.nnp.tmp.nnp").write_text("x")
    assert len(_atomic.remove_stale(str(tmp_path))) == 1 and os.listdir(tmp_path) == []


def test_discard_never_replaces_the_error_being_raised(tmp_path, monkeypatch):
    # the folder made read-only as the write fails: the temporary cannot go, the error stays the
    # write's, and the file stays registered for a later removal
    def refuse(path):
        raise PermissionError(13, "Permission denied", path)
    with pytest.raises(RuntimeError, match="the write's"):
        with _atomic.AtomicFile(str(tmp_path / "o.nnp")) as f:
            monkeypatch.setattr(os, "unlink", refuse)
            raise RuntimeError("the write's")
    monkeypatch.undo()
    assert f.path in _atomic._live
    _atomic.remove(f.path)
    assert os.listdir(tmp_path) == []


def test_remove_live_removes_every_temporary_of_the_process(tmp_path):
    folder = _atomic.scratch_dir(str(tmp_path))
    (tmp_path / "keep").write_text("x")
    f = _atomic.AtomicFile(str(tmp_path / "t.json"))
    _atomic.remove_live()
    assert os.listdir(tmp_path) == ["keep"] and not os.path.exists(folder)
    f.discard()


def test_check_room_counts_the_margin(tmp_path, monkeypatch):
    free = _atomic.free_bytes(str(tmp_path))
    _atomic.check_room("t", str(tmp_path), 0, str)
    with pytest.raises(_atomic.TargetError, match="not enough free space"):
        _atomic.check_room("t", str(tmp_path), free, str)
