"""Making reference models offline: dequantize a GGUF to F16, quantize an F16 GGUF to a ladder of types.

Dequantizing uses gguf-py (``gguf.quants.dequantize`` and ``gguf.GGUFWriter``) and keeps every metadata
key; quantizing uses llama.cpp's own ``llama_model_quantize``. Outputs are written to a temporary name
and renamed, so an interrupted run never leaves a broken model behind.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from ..engine.errors import BadInputError, ModelError
from ..engine.model import check_gguf_file

Progress = Callable[[int, int], None]

LADDER = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")
_KEEP_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, overrides: dict[str, object]) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("split.") or key == "general.architecture":
            continue  # the writer adds these itself
        value = overrides.get(key, field.contents())
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, main, sub_type=sub)


def rewrite_gguf(
    src: Path,
    dst: Path,
    to_f16: bool = False,
    split_max_tensors: int = 0,
    progress: Progress | None = None,
) -> list[Path]:
    """Copy ``src`` to ``dst`` with all metadata; ``to_f16`` dequantizes quantized tensors to F16,
    ``split_max_tensors`` writes a split model (``dst`` stem + ``-00001-of-0000N.gguf``). Returns the files."""
    check_gguf_file(src)
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    overrides = {"general.file_type": int(gguf.LlamaFileType.MOSTLY_F16)} if to_f16 else {}
    tmp = dst.with_name(dst.stem + ".partial.gguf")
    writer = gguf.GGUFWriter(tmp, arch, split_max_tensors=split_max_tensors)
    _copy_metadata(reader, writer, overrides)
    total = len(reader.tensors)
    for i, tensor in enumerate(reader.tensors):
        if to_f16 and tensor.tensor_type not in _KEEP_TYPES:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float16)
            writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.F16)
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        if progress:
            progress(i + 1, total)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return _publish(tmp, dst, split=split_max_tensors > 0)


def _publish(tmp: Path, dst: Path, split: bool) -> list[Path]:
    """Rename the finished temporary file(s) into place."""
    if not split:
        os.replace(tmp, dst)
        return [dst]
    parts = sorted(tmp.parent.glob(tmp.stem + "-*-of-*.gguf"))
    if not parts:  # the writer found too few tensors to split
        os.replace(tmp, dst)
        return [dst]
    final = []
    for part in parts:
        suffix = part.name[len(tmp.stem) :]  # -00001-of-00002.gguf
        target = dst.with_name(dst.stem + suffix)
        os.replace(part, target)
        final.append(target)
    return final


def quantize(src: Path, dst: Path, qtype: str, threads: int = 0) -> Path:
    """Quantize an F16/F32 GGUF to ``qtype`` (a llama.cpp file type name such as Q4_K_M)."""
    import llama_cpp

    from ..engine.model import _init_backend

    check_gguf_file(src)
    name = qtype.upper()
    try:
        ftype = int(gguf.LlamaFileType[f"MOSTLY_{name}"])
    except KeyError:
        raise BadInputError(
            "unknown quantization {qtype!r}; for example: {examples}",
            param="types",
            qtype=qtype,
            examples=", ".join(LADDER),
        ) from None
    _init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    tmp = dst.with_name(dst.stem + ".partial.gguf")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise ModelError("llama.cpp could not quantize {src} to {name} (code {rc})", src=src.name, name=name, rc=rc)
    os.replace(tmp, dst)
    return dst
