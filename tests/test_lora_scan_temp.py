"""Issue 13 item 7 (the Lora folders' part): `.tmp-*` files left by an interrupted atomic save are removed by the
next folder scan once they are older than STALE_TEMP_SECONDS; a fresh one (a save in flight) is left alone."""
import os
import time

import lora_discovery
import networks


def test_scan_removes_stale_temp_files_but_not_a_save_in_flight(lora_dir):
    sub = lora_dir / "chars"
    sub.mkdir()
    stale = [lora_dir / ".tmp-k3j4h2", sub / ".tmp-preview9x"]
    fresh = sub / ".tmp-inflight"
    keep = lora_dir / "notes.tmp-old.txt"  # only the atomic writer's prefix counts
    old = time.time() - lora_discovery.STALE_TEMP_SECONDS - 60
    for path in (*stale, fresh, keep):
        path.write_bytes(b"partial")
    for path in (*stale, keep):
        os.utime(path, (old, old))

    networks.list_available_networks()

    assert not any(p.exists() for p in stale)
    assert fresh.exists() and keep.exists()
    assert lora_discovery.dir_listing(str(sub)) is not None and ".tmp-preview9x" not in lora_discovery.dir_listing(
        str(sub))
