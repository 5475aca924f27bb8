"""Named-tensor checkpoints on disk (SPEC §7): lazy readers and a streaming safetensors writer.

A checkpoint is a mapping *name → tensor*; names play the role of key paths (SPEC §1).
Readers open a checkpoint without reading tensor data and hand out one tensor at a time:

- safetensors (a single file, or a folder with ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``): the header is parsed once and each tensor is read
  with one positioned read (``os.preadv``) of exactly its bytes, so memory holds only the
  tensors being merged (no memory map whose touched pages would stay resident);
- PyTorch ``.bin`` / ``.pt`` (and ``pytorch_model.bin.index.json``): ``torch.load`` with
  ``mmap=True, weights_only=True`` (lazy where the file is a zip archive);
- ``.npz``: one member at a time;
- Flax ``.msgpack`` (``flax_model.msgpack``) and orbax folders: restored whole (these
  formats have no per-tensor index); names are the '/'-joined key paths.

Hub names (``org/model``) are fetched with ``huggingface_hub.snapshot_download`` when no
local path exists. The writer (:class:`ShardedSafetensorsWriter`) streams tensors into
planned shards: each shard's header is written first, then the tensors' bytes in order,
and the shard is renamed to its final name only when complete.
"""
from __future__ import annotations

import abc
import json
import mmap
import os
import struct
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np

from bcjax.errors import CheckpointError
from bcjax.host_memory import aligned_empty

__all__ = ["Checkpoint", "open_checkpoint", "load_state_dict", "save_safetensors", "plan_shards",
           "ShardedSafetensorsWriter", "WEIGHT_FILE_PATTERNS", "parse_size"]

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
#: File names that hold weights (never copied from the base folder into the output).
WEIGHT_FILE_PATTERNS = (".safetensors", ".bin", ".msgpack", ".h5", ".pt", ".pth", ".ckpt", ".npz",
                        ".safetensors.index.json", ".bin.index.json", ".msgpack.index.json")


def parse_size(text) -> int:
    """``"5GB"`` → 5·10⁹ bytes (also KB, MB, GiB, MiB, plain integers)."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for u, f in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * f)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise CheckpointError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)") from None


# --------------------------------------------------------------------------- readers
class Checkpoint(abc.ABC):
    """Lazy mapping name → tensor. ``names`` in file order; ``info(name)`` = (shape,
    numpy dtype, source file) without reading data; ``read(name)`` returns a NumPy array
    (bfloat16 as ``ml_dtypes.bfloat16``)."""

    #: ``read`` returns a new buffer each call, which nothing else keeps (memory is freed
    #: when the caller drops it); False for readers that hand out arrays they hold.
    reads_fresh_buffers = False
    #: ``read_flat`` reads only the entries asked for (not the whole tensor).
    ranged_reads = False

    def __init__(self, location: str):
        self.location = location
        self._info: dict[str, tuple[tuple, np.dtype, str]] = {}

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def info(self, name: str) -> tuple[tuple, np.dtype, str]:
        return self._info[name]

    def nbytes(self, name: str) -> int:
        shape, dtype, _ = self._info[name]
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    @abc.abstractmethod
    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a NumPy array in its stored dtype."""

    def read_flat(self, name: str, start: int, stop: int, pad_to: int | None = None) -> np.ndarray:
        """Entries ``start:stop`` of the tensor ``name`` flattened in C order, as a fresh
        64-byte-aligned 1-D array, zero-padded to ``pad_to`` entries when that is longer."""
        out = _padded_flat(name, self._info[name], start, stop, pad_to)
        out[:stop - start] = self.read(name).reshape(-1)[start:stop]
        return out

    def map(self, name: str) -> np.ndarray:
        """The tensor ``name`` read-only and, where the format allows, memory-mapped (no
        copy: kernels that read NumPy memory in place read the page cache). The mapping lives
        as long as the array; this default reads the tensor."""
        return self.read(name)

    def read_blocks(self, name: str, starts, length: int) -> np.ndarray:
        """Entries ``[s, s + length)`` of the flattened tensor for each s in ``starts``,
        concatenated (1-D, stored dtype): TIES's threshold sample. This default reads the
        tensor whole; file formats with random access read only the blocks."""
        from bcjax.merging import gather_blocks

        return gather_blocks(self.read(name), starts, length)

    def files(self) -> list[str]:
        return sorted({f for _, _, f in self._info.values()})

    def close(self) -> None:
        """Release open files; readers that hold none (memory maps, loaded arrays) keep this default."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsCheckpoint(Checkpoint):
    """One or several ``.safetensors`` files; a tensor (or a range of its entries) is read
    with one ``preadv``."""

    reads_fresh_buffers = True
    ranged_reads = True

    def __init__(self, location: str, files: Sequence[str]):
        super().__init__(location)
        self._where: dict[str, tuple[str, int, int]] = {}
        self._fds: dict[str, int] = {}
        for f in files:
            for name, (shape, dtype, start, end) in read_safetensors_header(f).items():
                if name in self._info:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {self._info[name][2]}")
                self._info[name] = (shape, dtype, f)
                self._where[name] = (f, start, end)

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        return fd

    def read(self, name: str) -> np.ndarray:
        shape, dtype, _ = self._info[name]
        out = aligned_empty(shape, dtype)
        self._pread(name, out.reshape(-1), 0)
        return out

    def read_flat(self, name: str, start: int, stop: int, pad_to: int | None = None) -> np.ndarray:
        out = _padded_flat(name, self._info[name], start, stop, pad_to)
        self._pread(name, out[:stop - start], start)
        return out

    def _pread(self, name: str, dest: np.ndarray, first: int) -> None:
        """Fill the 1-D ``dest`` with the tensor's entries from ``first`` on (positioned reads)."""
        path, start, end = self._where[name]
        view = memoryview(dest.view(np.uint8)) if dest.size else memoryview(b"")
        offset = start + first * dest.itemsize
        got = 0
        while got < len(view):
            n = os.preadv(self._fd(path), [view[got:]], offset + got)
            if n <= 0:
                raise CheckpointError(f"{path}: tensor {name!r}: file ends {end - offset - got} bytes early")
            got += n

    def map(self, name: str) -> np.ndarray:
        shape, dtype, _ = self._info[name]
        path, start, end = self._where[name]
        if end <= start:
            return np.empty(shape, dtype)
        fd = self._fd(path)
        if os.fstat(fd).st_size < end:  # a shorter file would fault (SIGBUS) when read
            raise CheckpointError(f"{path}: tensor {name!r}: file ends before byte {end}")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        # populated at once (Linux): every page is read anyway, and one call maps them cheaper than faults
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        m = mmap.mmap(fd, end - base, flags=flags, prot=mmap.PROT_READ, offset=base)
        return np.frombuffer(m, dtype, count=(end - start) // dtype.itemsize, offset=start - base).reshape(shape)

    def read_blocks(self, name: str, starts, length: int) -> np.ndarray:
        shape, dtype, _ = self._info[name]
        path, start, end = self._where[name]
        out = np.empty(len(starts) * length, dtype)
        view = memoryview(out.view(np.uint8))
        step = length * dtype.itemsize
        fd = self._fd(path)
        for j, s in enumerate(starts):
            at = start + int(s) * dtype.itemsize
            if at + step > end or os.preadv(fd, [view[j * step:(j + 1) * step]], at) != step:
                raise CheckpointError(f"{path}: tensor {name!r}: cannot read entries {int(s)}..{int(s) + length}")
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _padded_flat(name: str, info, start: int, stop: int, pad_to: int | None) -> np.ndarray:
    """An aligned 1-D buffer for entries ``start:stop`` of a tensor of ``info`` = (shape, dtype,
    file), zeros from ``stop - start`` to ``pad_to``."""
    shape, dtype, path = info
    if not 0 <= start <= stop <= int(np.prod(shape, dtype=np.int64)):
        raise CheckpointError(f"{path}: tensor {name!r} of shape {shape}: invalid entry range {start}:{stop}")
    out = aligned_empty((max(stop - start, pad_to or 0),), dtype)
    out[stop - start:] = 0
    return out


def read_safetensors_header(path: str) -> dict[str, tuple[tuple, np.dtype, int, int]]:
    """name → (shape, dtype, absolute start, absolute end) from a safetensors file's header,
    with the checks safetensors makes (sizes agree with shapes, data inside the file)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    out = {}
    base = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            start, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r}: unsupported or malformed header entry {meta}") from None
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or base + end > size:
            raise CheckpointError(f"{path}: tensor {name!r}: byte range {start}..{end} does not match shape "
                                  f"{shape} {dtype.name} or lies beyond the end of the file ({size} bytes)")
        out[name] = (shape, dtype, base + start, base + end)
    return out


class TorchCheckpoint(Checkpoint):
    """PyTorch ``.bin``/``.pt`` state dicts (one file or an index), loaded with mmap."""

    reads_fresh_buffers = True  # copies out of the mapped storage

    def __init__(self, location: str, files: Sequence[str]):
        super().__init__(location)
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{location}: reading PyTorch checkpoints needs torch (pip install 'bcjax[torch]')") \
                from None
        self._torch = torch
        self._tensors = {}
        for f in files:
            try:
                sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True)
                except Exception:  # noqa: BLE001
                    raise CheckpointError(f"{f}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: expected a state dict (name → tensor), got {type(sd).__name__}")
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{f}: entry {name!r} is not a tensor ({type(t).__name__})")
                self._tensors[name] = t
                self._info[name] = (tuple(t.shape), _torch_to_numpy_dtype(t.dtype, f, name), f)

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[name].contiguous()
        _, dtype, _ = self._info[name]
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(dtype).copy()
        return t.numpy().copy()


def _torch_to_numpy_dtype(tdtype, path, name) -> np.dtype:
    import torch

    table = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
             torch.bfloat16: ml_dtypes.bfloat16, torch.int64: np.int64, torch.int32: np.int32,
             torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}
    if tdtype not in table:
        raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype {tdtype}")
    return np.dtype(table[tdtype])


class InMemoryCheckpoint(Checkpoint):
    """Formats without a per-tensor index (npz members are read one at a time; Flax
    msgpack and orbax are restored whole): name → array."""

    def __init__(self, location: str, arrays: dict, source: str, npz=None):
        super().__init__(location)
        self._arrays = arrays
        self._npz = npz
        for name, a in arrays.items():
            shape, dtype = (a.shape, a.dtype) if npz is None else _npz_member_info(npz, name, source)
            self._info[name] = (tuple(shape), np.dtype(dtype), source)

    def read(self, name: str) -> np.ndarray:
        if self._npz is not None:
            return np.asarray(self._npz[name])
        return np.asarray(self._arrays[name])

    def close(self) -> None:
        if self._npz is not None:
            self._npz.close()


def _npz_member_info(npz, name, source):
    import zipfile

    with npz.zip.open(name + ".npy") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
        except (ValueError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{source}: member {name!r}: unreadable ({e})") from None
    return shape, dtype


def _flatten_nested(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten_nested(v, path))
        else:
            out[path] = np.asarray(v)
    return out


def _hub_snapshot(name: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name!r} is not a local path and huggingface_hub is not installed") from None
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"])
    except Exception as e:  # noqa: BLE001 - offline, 404, auth...
        raise CheckpointError(f"{name!r} is not a local path, and fetching it from the hub failed "
                              f"({type(e).__name__}: {e})") from None


def open_checkpoint(location: str) -> Checkpoint:
    """Open a checkpoint (file, Hugging Face folder, orbax folder, or hub name) lazily."""
    loc = os.path.expanduser(os.fspath(location))
    if not os.path.exists(loc):
        if loc.count("/") == 1 and not loc.startswith((".", "/")):
            loc = _hub_snapshot(loc)
        else:
            raise CheckpointError(f"checkpoint not found: {location}")
    if os.path.isdir(loc):
        return _open_folder(loc)
    return _open_file(loc, loc)


def _open_file(path: str, location: str) -> Checkpoint:
    low = path.lower()
    if low.endswith(".safetensors"):
        return SafetensorsCheckpoint(location, [path])
    if low.endswith(".index.json"):
        return _open_index(path, location)
    if low.endswith((".bin", ".pt", ".pth")):
        return TorchCheckpoint(location, [path])
    if low.endswith(".npz"):
        try:
            npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read .npz ({e})") from None
        return InMemoryCheckpoint(location, {k: None for k in npz.files}, path, npz=npz)
    if low.endswith(".msgpack"):
        from flax import serialization

        try:
            with open(path, "rb") as f:
                tree = serialization.msgpack_restore(f.read())
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot read Flax msgpack ({type(e).__name__}: {e})") from None
        return InMemoryCheckpoint(location, _flatten_nested(tree), path)
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, .bin, .npz, .msgpack, "
                          "a Hugging Face folder or an orbax folder)")


def _open_index(index_path: str, location: str) -> Checkpoint:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: unreadable shard index ({e})") from None
    folder = os.path.dirname(index_path)
    files = sorted({os.path.join(folder, v) for v in weight_map.values()})
    for f in files:
        if not os.path.isfile(f):
            raise CheckpointError(f"{index_path}: shard {os.path.basename(f)} is missing")
    ckpt = (SafetensorsCheckpoint if index_path.endswith(".safetensors.index.json") else TorchCheckpoint)(location, files)
    missing = sorted(set(weight_map) - set(ckpt.names))
    if missing:
        raise CheckpointError(f"{index_path}: tensor {missing[0]!r} is listed in the index but not in its shard "
                              f"{weight_map[missing[0]]}")
    return ckpt


def _open_folder(folder: str) -> Checkpoint:
    for fname in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                  "pytorch_model.bin", "flax_model.msgpack"):
        p = os.path.join(folder, fname)
        if os.path.isfile(p):
            return _open_file(p, folder)
    st = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if st:
        return SafetensorsCheckpoint(folder, [os.path.join(folder, f) for f in st])
    if os.path.exists(os.path.join(folder, "_METADATA")) or os.path.exists(os.path.join(folder, "_CHECKPOINT_METADATA")) \
            or os.path.isdir(os.path.join(folder, "default")):
        import orbax.checkpoint as ocp

        try:
            tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(folder))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{folder}: cannot restore orbax checkpoint ({type(e).__name__}: {e})") from None
        return InMemoryCheckpoint(folder, _flatten_nested(tree), folder)
    raise CheckpointError(f"{folder}: no weights found (model.safetensors[.index.json], pytorch_model.bin, "
                          "flax_model.msgpack or an orbax checkpoint)")


def load_state_dict(location: str) -> dict[str, np.ndarray]:
    """The whole checkpoint as a flat dict name → NumPy array (small models, tests)."""
    with open_checkpoint(location) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names}


# --------------------------------------------------------------------------- writer
def _header_bytes(entries: Sequence[tuple[str, tuple, np.dtype]], metadata: dict | None) -> bytes:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, shape, dtype in entries:
        if np.dtype(dtype) not in _ST_CODES:
            raise CheckpointError(f"tensor {name!r}: dtype {np.dtype(dtype).name} cannot be stored in safetensors")
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, like safetensors
    return struct.pack("<Q", len(raw)) + raw


def save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write ``tensors`` (NumPy arrays, bfloat16 as ml_dtypes) to one safetensors file."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with open(path, "wb") as f:
        f.write(_header_bytes([(k, v.shape, v.dtype) for k, v in arrays.items()], metadata or {"format": "pt"}))
        for v in arrays.values():
            f.write(memoryview(v.reshape(-1).view(np.uint8)))


def plan_shards(entries: Sequence[tuple[str, tuple, np.dtype]], max_shard_size: int) -> list[list[int]]:
    """Greedy split of ``entries`` (in order) into shards of at most ``max_shard_size`` bytes
    (a tensor larger than the limit gets a shard of its own)."""
    shards, cur, size = [], [], 0
    for i, (_, shape, dtype) in enumerate(entries):
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if cur and size + n > max_shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


class ShardedSafetensorsWriter:
    """Streams tensors, in the planned order, into ``folder``'s shards. A shard is written
    as ``NAME.partial`` and renamed to ``NAME`` when its last tensor is in, so finished
    shards can be skipped on resume (:meth:`finished`)."""

    def __init__(self, folder: str, entries: Sequence[tuple[str, tuple, np.dtype]], max_shard_size: int,
                 metadata: dict | None = None):
        self.folder = folder
        self.entries = list(entries)
        self.shards = plan_shards(self.entries, max_shard_size)
        self.files = shard_file_names(len(self.shards))
        self.metadata = metadata or {"format": "pt"}
        self._shard_of = {i: s for s, idx in enumerate(self.shards) for i in idx}
        self._file = None
        self._pending: list[int] = []
        self.bytes_written = 0

    def finished(self, shard: int) -> bool:
        return os.path.isfile(os.path.join(self.folder, self.files[shard]))

    def write(self, index: int, array: np.ndarray) -> None:
        """Append entry ``index`` (must come in planned order within its shard)."""
        name, shape, dtype = self.entries[index]
        if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
            raise CheckpointError(f"tensor {name!r}: produced {array.shape} {array.dtype}, planned {shape} {dtype}")
        s = self._shard_of[index]
        if self._file is None:
            self._pending = list(self.shards[s])
            self._file = open(os.path.join(self.folder, self.files[s] + ".partial"), "wb")
            self._file.write(_header_bytes([self.entries[i] for i in self._pending], self.metadata))
        if not self._pending or self._pending[0] != index:
            raise CheckpointError(f"tensor {name!r} written out of the planned order")
        self._pending.pop(0)
        a = np.ascontiguousarray(array)
        if a.size:
            self._file.write(memoryview(a.reshape(-1).view(np.uint8)))
        self.bytes_written += a.nbytes
        if not self._pending:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(os.path.join(self.folder, self.files[s] + ".partial"), os.path.join(self.folder, self.files[s]))

    def write_index(self) -> None:
        if len(self.files) == 1:
            return
        total = sum(int(np.prod(sh, dtype=np.int64)) * np.dtype(dt).itemsize for _, sh, dt in self.entries)
        index = {"metadata": {"total_size": total},
                 "weight_map": {self.entries[i][0]: self.files[s] for s, idx in enumerate(self.shards) for i in idx}}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def iter_names_sorted(names: Iterable[str]) -> list[str]:
    """Names in the order ``jax.tree.leaves`` visits a flat dict of them (sorted keys): the
    leaf index of a name, which random methods fold into their keys (SPEC §3)."""
    return sorted(names)
