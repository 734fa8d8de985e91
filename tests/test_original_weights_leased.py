"""The host's original weights (modules/original_weights) read through a leased map of the checkpoint: the same bits
as the file, a truncate by another process waits while a read or a row reader holds the lease, a file someone has
open for writing is read with pread instead, and the extension ships the same leased-map module."""
import os
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file

from modules import leased_map
from modules.original_weights import MappedRowReader, OriginalWeights, RowReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_extension_ships_the_same_leased_map_module():
    """One implementation in two places: the extension must run in A1111 without our host's modules."""
    with open(os.path.join(ROOT, "modules", "leased_map.py"), encoding="utf8") as a, \
            open(os.path.join(ROOT, "extensions-builtin", "Lora", "lora_leased_map.py"), encoding="utf8") as b:
        assert a.read() == b.read()


def _source(path: str, tensors: dict, live: dict) -> OriginalWeights:
    save_file(tensors, path)
    return OriginalWeights({("c", k): (path, k, None) for k in tensors}, {("c", k): live[k] for k in tensors})


def _truncate_later(path: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({path!r}, 8)"])
    time.sleep(0.5)
    return child


def test_reads_and_rows_come_from_the_leased_map_and_a_truncate_waits(tmp_path):
    assert leased_map.available()  # Linux: the CI machine has leases
    path = str(tmp_path / "m.safetensors")
    same, cast = torch.randn(64, 48).bfloat16(), torch.randn(40, 30).half()
    source = _source(path, {"same": same, "cast": cast}, {"same": torch.bfloat16, "cast": torch.float32})
    out = torch.zeros(64, 48, dtype=torch.bfloat16)
    assert source.read_into("c", "same", out) and torch.equal(out.view(torch.int16), same.view(torch.int16))
    out32 = torch.zeros(40, 30)
    assert source.read_into("c", "cast", out32) and torch.equal(out32, cast.float())
    assert isinstance(source._maps[path], leased_map.LeasedMap)

    reader = source.open_rows("c", "same", out)
    assert isinstance(reader, MappedRowReader)
    rows = torch.zeros(5, 48, dtype=torch.bfloat16)
    reader.read(10, 15, rows)
    assert torch.equal(rows.view(torch.int16), same[10:15].view(torch.int16))
    child = _truncate_later(path)
    assert child.poll() is None  # the open row reader's lease holds the truncate back
    assert reader.close()
    assert child.wait(timeout=60) == 0 and os.path.getsize(path) == 8
    assert source.read_into("c", "same", out) is False and source.open_rows("c", "same", out) is None


def test_many_reads_share_one_lease_and_say_which_were_written(tmp_path, monkeypatch):
    path = str(tmp_path / "m.safetensors")
    same, cast = torch.randn(64, 48).bfloat16(), torch.randn(40, 30).half()
    source = _source(path, {"same": same, "cast": cast}, {"same": torch.bfloat16, "cast": torch.float32})
    leases = []
    acquire = leased_map.LeasedMap._acquire
    monkeypatch.setattr(leased_map.LeasedMap, "_acquire", lambda self: leases.append(1) or acquire(self))
    out, out32, wrong, unknown = torch.zeros(64, 48, dtype=torch.bfloat16), torch.zeros(40, 30), torch.zeros(3), \
        torch.zeros(2)
    done = source.read_many_into([("c", "same", out), ("c", "cast", out32), ("c", "same", wrong),
                                  ("c", "nope", unknown)])
    assert done == [True, True, False, False] and len(leases) == 1
    assert torch.equal(out.view(torch.int16), same.view(torch.int16)) and torch.equal(out32, cast.float())
    assert not wrong.any() and not unknown.any()  # nothing written where nothing was read

    leased = source._maps[path]
    fstat = leased.fstat
    monkeypatch.setattr(leased, "fstat", lambda: (os.utime(path, ns=(1, 1)), fstat())[1])  # touched meanwhile
    assert source.read_many_into([("c", "same", out), ("c", "nope", unknown)]) == [None, False]


def test_a_file_touched_while_rows_are_read_is_not_trusted(tmp_path):
    path = str(tmp_path / "m.safetensors")
    w = torch.randn(16, 16)
    source = _source(path, {"w": w}, {"w": torch.float32})
    reader = source.open_rows("c", "w", w)
    assert isinstance(reader, MappedRowReader)
    os.utime(path, ns=(1, 1))  # times need no write access: the lease does not stop this
    assert reader.close() is False


def test_a_file_open_for_writing_is_read_with_pread(tmp_path):
    path = str(tmp_path / "m.safetensors")
    w = torch.randn(32, 8)
    source = _source(path, {"w": w}, {"w": torch.float32})
    with open(path, "r+b"):  # a writer: no lease is granted
        out = torch.zeros(32, 8)
        assert source.read_into("c", "w", out) and torch.equal(out, w)
        reader = source.open_rows("c", "w", out)
        assert isinstance(reader, RowReader)
        rows = torch.zeros(4, 8)
        reader.read(4, 8, rows)
        assert torch.equal(rows, w[4:8]) and reader.close()
