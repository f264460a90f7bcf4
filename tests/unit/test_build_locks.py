"""A torch extension build lock left by a killed build is removed before DeepSpeed compiles its CPU
op (otherwise every later ZeRO run on the machine waits on it forever); a lock a live build holds
(recent) is kept."""

import os
import time

from raytrain.recipes.zero import clear_stale_build_locks


def test_stale_lock_is_removed_and_a_recent_one_kept(tmp_path):
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    recent = tmp_path / "py311_cpu" / "other_op" / "lock"
    for p in (stale, recent):
        p.parent.mkdir(parents=True)
        p.write_text("")
    old = time.time() - 3 * 3600
    os.utime(stale, (old, old))
    so = stale.parent / "deepspeed_shm_comm.so"
    so.write_bytes(b"\0")
    os.utime(so, (old, old))

    removed = clear_stale_build_locks(str(tmp_path), max_age_s=1800)

    assert removed == [str(stale)]
    assert not stale.exists() and recent.exists() and so.exists()  # only the lock goes, never a build output
    assert clear_stale_build_locks(str(tmp_path), max_age_s=1800) == []
