"""A stand-in for an NDIF model actor, run as a subprocess by tests/test_remote_requests.py.

It does with a request what the real server does (ndif 0.1.2, read from its actor code): rebuild
the tracer from the client's payload against this process's own model and its persistent objects,
run the block inside a trace scope, keep the values that were ``nnsight.save()``d *and* are bound
in the block's frame, ``torch.save`` them. The model is loaded like the server loads it (float32
here, ``requires_grad=False``). pie_lib cannot be imported in this process, as on the server: it
runs under ``python -I`` (no PYTHONPATH, no working directory on the path) and refuses the import.

Protocol (stdin -> stdout, binary): each request is a 4-byte big-endian header length, a JSON
header ``{"model_key", "compress"}``, a 4-byte payload length and the payload; each answer is one
status byte (0 ok, 1 error), a 4-byte length and the result blob (or an error message).
"""

import importlib.abc
import io
import json
import linecache
import struct
import sys
import traceback


class _NoPieLib(importlib.abc.MetaPathFinder):
    """The server does not have pie_lib: importing it fails as it would there."""

    def find_spec(self, name, path, target=None):
        if name == "pie_lib" or name.startswith("pie_lib."):
            raise ModuleNotFoundError(f"No module named {name!r} (the server cannot import pie_lib)")
        return None


sys.meta_path.insert(0, _NoPieLib())

import torch  # noqa: E402
from nnsight.modeling.huggingface import HuggingFaceModel  # noqa: E402
from nnsight.schema.request import RequestModel  # noqa: E402
from nnsight.tracing.globals import BLOCKS, SOURCES  # noqa: E402
from nnsight.tracing.tracer import _saves, dec, inc  # noqa: E402

_MODELS = {}


def _model(key):
    if key not in _MODELS:
        m = HuggingFaceModel.from_model_key(key, dispatch=True, dtype="float32")
        m._module.requires_grad_(False)  # as the server's actor does
        _MODELS[key] = m
    return _MODELS[key]


def _run(header, payload):
    model = _model(header["model_key"])
    lines, sources, blocks = dict(linecache.cache), dict(SOURCES), dict(BLOCKS)
    try:
        tracer = RequestModel.deserialize(payload, model._remoteable_persistent_objects(), compress=header["compress"])
        inc()
        try:
            tracer.execute(tracer.info.code)
            marked = _saves()
            saved = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in marked}
        finally:
            dec()
    finally:  # a long-lived server confines each request's source caches to that request
        linecache.cache.clear(), linecache.cache.update(lines)
        SOURCES.clear(), SOURCES.update(sources)
        BLOCKS.clear(), BLOCKS.update(blocks)
    buf = io.BytesIO()
    torch.save(saved, buf)
    data = buf.getvalue()
    if header["compress"]:
        import zstandard

        data = zstandard.ZstdCompressor(level=6).compress(data)
    return data


def _read(stream, n):
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return data


def main():
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything the block prints must not corrupt the protocol
    while True:
        try:
            header = json.loads(_read(inp, struct.unpack(">I", _read(inp, 4))[0]))
            payload = _read(inp, struct.unpack(">I", _read(inp, 4))[0])
        except EOFError:
            return
        try:
            status, data = 0, _run(header, payload)
        except BaseException as exc:  # noqa: BLE001 - reported to the client like the server does
            status, data = 1, (f"{type(exc).__name__}: {exc}\n" + traceback.format_exc()).encode()
        out.write(bytes([status]) + struct.pack(">I", len(data)) + data)
        out.flush()


if __name__ == "__main__":
    main()
