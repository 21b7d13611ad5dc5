"""The bridge between array libraries (sru_cupy/interop.py): DLPack views that relabel bfloat16 and
pass the right stream, and CuPy's view of a PyTorch stream. Checked without a GPU: stand-ins record
what the producer and CuPy are asked."""

import warnings

import numpy as np
import pytest

from sru_cupy import interop


def test_dlpack_view_forwards_the_consumers_stream():
    """CuPy's from_dlpack passes its current stream so the producer can order its work before the
    read: the relabelling wrapper must hand it on (checked here without a GPU)."""
    calls = []

    class Recording:
        def __init__(self, array):
            self.array = array

        def __dlpack__(self, stream=None, max_version=None):
            calls.append((stream, max_version))
            return self.array.__dlpack__()

        def __dlpack_device__(self):
            return (2, 0)

    view = interop.DLPackView(Recording(np.zeros(3)))
    view.__dlpack__(stream=7, max_version=(1, 0))
    view.__dlpack__()
    assert calls == [(7, (1, 0)), (None, None)]
    assert view.__dlpack_device__() == (2, 0) and not view.bfloat16


def test_dlpack_view_with_an_export_stream_replaces_the_consumers():
    """The PyTorch ops export with stream=-1 (no synchronisation asked), whatever stream the
    consumer names; a torch CPU tensor accepts it and is read without a copy."""
    calls = []

    class Recording:
        def __dlpack__(self, stream=None, max_version=None):
            calls.append(stream)
            return np.zeros(3).__dlpack__()

        def __dlpack_device__(self):
            return (1, 0)

    view = interop.DLPackView(Recording(), export_stream=-1)
    view.__dlpack__(stream=7, max_version=(1, 0))
    view.__dlpack__()
    assert calls == [-1, -1]
    torch = pytest.importorskip("torch")
    t = torch.arange(4.0)
    array = np.from_dlpack(interop.DLPackView(t, export_stream=-1))
    assert array.ctypes.data == t.data_ptr()



class _FakeStreams:
    """``cupy.cuda`` with Stream.from_external (CuPy 14) or only ExternalStream (CuPy 13); the
    latter warns DeprecationWarning as CuPy 14 does."""

    def __init__(self, has_from_external):
        made = self.made = []

        class ExternalStream:
            def __init__(self, ptr, device_id=-1):
                if has_from_external:
                    warnings.warn("ExternalStream is deprecated", DeprecationWarning)
                made.append(("ExternalStream", ptr, device_id))

        class Stream:
            pass
        if has_from_external:
            def from_external(obj):
                version, handle = obj.__cuda_stream__()
                made.append(("from_external", handle, version))
                return object()
            Stream.from_external = staticmethod(from_external)
        self.ExternalStream, self.Stream = ExternalStream, Stream


@pytest.mark.parametrize("has_from_external", [True, False], ids=["cupy14", "cupy13"])
@pytest.mark.parametrize("handle", [0, 0x7F00], ids=["default_stream", "side_stream"])
def test_cupy_stream_of_a_torch_stream(has_from_external, handle):
    import types
    cuda = _FakeStreams(has_from_external)
    torch_stream = types.SimpleNamespace(cuda_stream=handle)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        interop.cupy_stream(types.SimpleNamespace(cuda=cuda), torch_stream, 3)
    real = handle or 1  # the default stream as cudaStreamLegacy, never CuPy's "0"
    if has_from_external:
        assert cuda.made == [("from_external", real, 0)]
    else:
        assert cuda.made == [("ExternalStream", real, 3)]
