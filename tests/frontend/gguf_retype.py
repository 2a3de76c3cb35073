"""Test helper: a copy of a GGUF file whose quantised tensors are re-quantised to another type
(the gguf package's own quantiser), metadata and tokenizer unchanged. Lets tests build from a
Q4_0 file when the offline model ships Q4_1."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def retype(src: Path, dst: Path, kind: str = "Q4_0") -> Path:
    import gguf
    from gguf import quants

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    target = gguf.GGMLQuantizationType[kind]
    for t in reader.tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
            continue
        values = quants.dequantize(np.asarray(t.data), t.tensor_type)  # [rows, K] float32
        writer.add_tensor(t.name, quants.quantize(values, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
