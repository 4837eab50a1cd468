"""The real tokenizer fixtures (``tests/fixtures/qwen*_tokenizer``) unpacked into HF tokenizer dirs."""

from __future__ import annotations

import hashlib
import lzma
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# fixture name -> ids in its tokenizer.json (added tokens included), before Eagle's tokens
REAL_TOKENIZERS = {"qwen3_tokenizer": 151669, "qwen2_5_tokenizer": 151665}


def unpack_tokenizer(name: str, out_dir: str | Path) -> Path:
    """Write ``tokenizer.json`` (checked against its sha256) and ``tokenizer_config.json`` to ``out_dir``."""
    src = FIXTURES / name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = lzma.decompress((src / "tokenizer.json.xz").read_bytes())
    want = (src / "tokenizer.json.sha256").read_text().strip()
    if hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"{src}/tokenizer.json.xz does not match tokenizer.json.sha256")
    (out / "tokenizer.json").write_bytes(data)
    shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")
    return out
