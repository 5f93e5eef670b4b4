import pytest
import torch
from refnet.cli import main
from refnet.device import resolve_device


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("request_", "match"), [("tpu", "not valid"), ("cuda:x", "not valid")])
def test_bad_requests(request_, match):
    with pytest.raises(ValueError, match=match):
        resolve_device(request_)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("request_", ["cuda", "gpu", "cuda:0"])
def test_explicit_cuda_without_a_gpu_is_an_error_not_a_silent_cpu_run(request_):
    with pytest.raises(ValueError, match="no CUDA GPU is available.*--device auto"):
        resolve_device(request_)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_says_so_without_a_traceback(tmp_path, capsys):
    code = main(["phantoms", "--out", str(tmp_path / "p"), "--train", "1", "--test", "1", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA GPU" in err and "Traceback" not in err
