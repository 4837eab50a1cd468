"""Streaming safetensors I/O for HF checkpoints: lazy reading, bounded-size sharded writing.

Reading opens each shard with ``safe_open`` and reads one tensor per request, so a
conversion never holds more than the tensors it is working on. Writing buffers tensors
up to ``max_shard_size`` bytes, flushes a shard, and at the end names the shards
``model-0000i-of-0000N.safetensors`` and writes ``model.safetensors.index.json``.
Several writers (one per pipeline stage) can write into the same directory; their
partial indices are merged by :func:`finalize_shards`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '10KiB' / 1234 -> bytes (GB = 10**9 as in HF, GiB = 2**30)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", size.lower())
    if not m:
        raise ValueError(f"cannot parse size {size!r}; write e.g. 5GB or 500MB")
    num, unit = float(m.group(1)), m.group(2).rstrip("b")
    powers = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
              "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}
    return int(num * powers[unit])


# ----------------------------------------------------------------------------- reading

class SafetensorsReader:
    """Lazy name -> tensor access over a directory of (possibly sharded) safetensors.

    ``rename`` maps a requested name to the name stored in the files (None: not there),
    which lets one reader present e.g. a plain Qwen2 checkpoint under Eagle's names.
    """

    def __init__(self, directory: str | Path, rename: Optional[Callable[[str], Optional[str]]] = None):
        self.dir = Path(directory)
        self.rename = rename or (lambda n: n)
        self._where: dict[str, str] = {}
        index = self.dir / INDEX_NAME
        if index.exists():
            self._where = dict(json.loads(index.read_text())["weight_map"])
        else:
            files = [self.dir / SINGLE_NAME] if (self.dir / SINGLE_NAME).exists() else \
                sorted(self.dir.glob("*.safetensors"))
            if not files:
                bins = sorted(p.name for p in self.dir.glob("*.bin"))
                hint = f" (found {bins}: re-save with safetensors)" if bins else ""
                raise FileNotFoundError(f"no safetensors weights in {self.dir}{hint}")
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self._where[k] = f.name
        self._handles: dict[str, object] = {}
        self.requested: set[str] = set()

    def stored_names(self) -> list[str]:
        return list(self._where)

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            h = safe_open(str(self.dir / fname), framework="pt")
            self._handles[fname] = h
        return h

    def has(self, name: str) -> bool:
        stored = self.rename(name)
        return stored is not None and stored in self._where

    def get(self, name: str) -> Optional[torch.Tensor]:
        stored = self.rename(name)
        if stored is None or stored not in self._where:
            return None
        self.requested.add(stored)
        return self._handle(self._where[stored]).get_tensor(stored)

    def close(self) -> None:
        self._handles.clear()


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} an HF model directory?")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- writing

class ShardedWriter:
    """Write tensors into shards of at most ``max_shard_size`` bytes (a single larger
    tensor gets a shard of its own), flushing as soon as a shard is full.

    Shards are first written as ``{tag}-{i}.safetensors.part``; :func:`finalize_shards`
    gives them their final names and writes the index once every writer has closed.
    """

    def __init__(self, out_dir: str | Path, max_shard_size: str | int = "5GB", tag: str = "w0",
                 dtype: Optional[torch.dtype] = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = parse_size(max_shard_size)
        self.tag, self.dtype = tag, dtype
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # (part file name, tensor names)
        self.total_bytes = 0
        self.peak_buffer_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach()
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        t = t.to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._buf and self._buf_bytes + nbytes > self.limit:
            self.flush()
        if name in self._buf or any(name in names for _, names in self.files):
            raise ValueError(f"tensor {name!r} written twice")
        self._buf[name] = t
        self._buf_bytes += nbytes
        self.total_bytes += nbytes
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._buf_bytes)

    def flush(self) -> None:
        if not self._buf:
            return
        fname = f"{self.tag}-{len(self.files):05d}.safetensors.part"
        save_file(self._buf, str(self.dir / fname), metadata={"format": "pt"})
        self.files.append((fname, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> dict:
        """Flush and return this writer's manifest (pass all manifests to finalize_shards)."""
        self.flush()
        return {"files": self.files, "total_bytes": self.total_bytes}


def finalize_shards(out_dir: str | Path, manifests: Iterable[dict]) -> dict:
    """Rename every writer's part files to ``model-XXXXX-of-YYYYY.safetensors`` (in the
    order given) and write ``model.safetensors.index.json``. Returns the index."""
    out = Path(out_dir)
    manifests = list(manifests)
    parts = [f for m in manifests for f in m["files"]]
    total = sum(m["total_bytes"] for m in manifests)
    weight_map: dict[str, str] = {}
    for i, (part, names) in enumerate(parts, start=1):
        final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        os.replace(out / part, out / final)
        os.chmod(out / final, 0o644)  # safetensors writes 0600; checkpoints are shared read-only
        for n in names:
            if n in weight_map:
                raise ValueError(f"tensor {n!r} written by two writers")
            weight_map[n] = final
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_tokenizer(tokenizer_dir: str | Path, out_dir: str | Path, prompt_format: str = "eagle2.5"):
    """Load a tokenizer dir (adding Eagle's special tokens / ChatML if missing) and save it next to
    the weights in a form transformers 4.51 (fast and slow) and 5.x all read. Returns the tokenizer.

    Under ``eagle2.5`` the chat template written is the one training renders (Eagle's system prompt,
    stripped turns); under ``frame-times`` training used the tokenizer's own template, which is kept."""
    from megatron_eagle.convert.hf_export.tokenizer_files import eagle25_chat_template, write_tokenizer
    from megatron_eagle.data.media.prompt import prompt_format as resolve_format
    from megatron_eagle.tokenizer import load_tokenizer, with_list_content

    tok = load_tokenizer(tokenizer_dir)
    fmt = resolve_format(prompt_format)
    if fmt.chat == "chatml":
        tok.chat_template = with_list_content(eagle25_chat_template(fmt.system_prompt))
    write_tokenizer(tok, out_dir)
    return tok


# ----------------------------------------------------------------------------- separate dirs

def siglip_reader(directory: str | Path) -> SafetensorsReader:
    """A ``SiglipVisionModel`` or full ``SiglipModel`` checkpoint (keys ``vision_model.*``, or
    unprefixed as transformers 5 may save a bare vision tower) under Eagle's
    ``vision_model.vision_model.*`` names."""
    eagle = "vision_model.vision_model."
    reader = SafetensorsReader(directory)
    nested = any(k.startswith("vision_model.") for k in reader.stored_names())
    stored = "vision_model." if nested else ""

    def rename(name: str) -> Optional[str]:
        return stored + name[len(eagle):] if name.startswith(eagle) else None
    reader.rename = rename
    return reader


def qwen2_reader(directory: str | Path) -> SafetensorsReader:
    """A ``Qwen2ForCausalLM`` checkpoint (``model.*``, ``lm_head.weight``) under Eagle's
    ``language_model.*`` names."""
    prefix = "language_model."

    def rename(name: str) -> Optional[str]:
        return name[len(prefix):] if name.startswith(prefix) else None
    return SafetensorsReader(directory, rename)


def siglip_vision_config(directory: str | Path) -> dict:
    """The vision config of a SigLIP dir (a ``SiglipModel`` config nests it)."""
    d = read_config(directory)
    return d["vision_config"] if "vision_config" in d else d
