import pytest

from instar.errors import InstarError
from instar.kernels.dispatch import kernel_backend, triton_available


def test_reference_off_cuda_by_default():
    assert kernel_backend(on_cuda=False, env={}) == "reference"


def test_cuda_prefers_triton_when_installed():
    assert kernel_backend(on_cuda=True, env={}) == ("triton" if triton_available() else "reference")
    assert kernel_backend(on_cuda=True, env={"INSTAR_KERNELS": "reference"}) == "reference"


def test_bad_or_impossible_choices_are_errors():
    with pytest.raises(InstarError, match="use one of reference, triton"):
        kernel_backend(on_cuda=False, env={"INSTAR_KERNELS": "cuda"})
    with pytest.raises(InstarError, match="TRITON_INTERPRET=1|not installed"):
        kernel_backend(on_cuda=False, env={"INSTAR_KERNELS": "triton"})
