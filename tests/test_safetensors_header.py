"""The one safetensors header reader: the host's and the extension's copies are the same file; valid files read
as the safetensors library reads them; every malformed file the library refuses is refused, naming the file."""
from __future__ import annotations

import os

import lora_safetensors
import pytest
import safetensors
import safetensors.torch
import torch
from safetensors_raw import raw_safetensors

from modules import safetensors_header

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_and_extension_copies_are_the_same_file():
    with open(os.path.join(ROOT, "modules", "safetensors_header.py"), "rb") as a, \
            open(os.path.join(ROOT, "extensions-builtin", "Lora", "lora_safetensors.py"), "rb") as b:
        assert a.read() == b.read(), "modules/safetensors_header.py and lora_safetensors.py must stay identical"


def test_a_valid_file_reads_as_the_library_reads_it(tmp_path):
    path = str(tmp_path / "ok.safetensors")
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
               "c": torch.zeros(0, 5, dtype=torch.float16), "d": torch.tensor([1, 2], dtype=torch.int64)}
    lora_safetensors.save_file(tensors, path, metadata={"ss_output_name": "x"})
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []  # the temporary file was renamed
    header = safetensors_header.read_header_file(path)
    assert header.metadata == {"ss_output_name": "x"} and header.size == os.path.getsize(path)
    with safetensors.safe_open(path, "pt") as f, open(path, "rb") as raw:
        assert set(header.tensors) == set(f.keys())
        for key, entry in header.tensors.items():
            t = f.get_tensor(key)
            assert entry.torch_dtype == t.dtype and entry.shape == tuple(t.shape) and f.get_slice(key).get_dtype() \
                == entry.dtype
            raw.seek(entry.offset)
            assert raw.read(entry.nbytes) == t.contiguous().view(torch.uint8).numpy().tobytes()


def _ok_entry(n: int = 2, start: int = 0) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [start, start + 4 * n]}


MALFORMED = {
    "shorter than 8 bytes": b"\x01\x00",
    "header length out of range (past the end)": raw_safetensors({}, length=1000),
    "header length out of range (over the cap)": raw_safetensors({}, length=100 * 1024 * 1024 + 1),
    "header not JSON": b"\x05\x00\x00\x00\x00\x00\x00\x00{nope",
    "header not an object": raw_safetensors([1, 2]),  # type: ignore[arg-type]
    "unknown dtype": raw_safetensors({"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "shape and span disagree": raw_safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                               bytes(8)),
    "negative dimension": raw_safetensors({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
    "gap between tensors": raw_safetensors({"a": _ok_entry(2, 0), "b": _ok_entry(2, 12)}, bytes(20)),
    "overlapping tensors": raw_safetensors({"a": _ok_entry(2, 0), "b": _ok_entry(2, 4)}, bytes(12)),
    "data past the last tensor": raw_safetensors({"a": _ok_entry(2, 0)}, bytes(12)),
    "tensor past the end of the file": raw_safetensors({"a": _ok_entry(4, 0)}, bytes(8)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_are_refused_by_both_the_reader_and_the_library(tmp_path, case):
    path = str(tmp_path / "bad.safetensors")
    with open(path, "wb") as f:
        f.write(MALFORMED[case])
    with pytest.raises((safetensors.SafetensorError, ValueError, OSError)):
        safetensors.torch.load_file(path)  # the independent reference refuses it too
    with pytest.raises(safetensors_header.HeaderError, match="bad.safetensors"):
        safetensors_header.read_header_file(path)
    with pytest.raises(lora_safetensors.HeaderError, match="bad.safetensors"):
        lora_safetensors.read_header_file(path)


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "keep.safetensors")
    lora_safetensors.save_file({"a": torch.ones(2)}, path)
    before = open(path, "rb").read()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError):
        lora_safetensors.save_file({"a": torch.zeros(2)}, path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["keep.safetensors"]
