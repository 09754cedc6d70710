import pytest
import torch

from thanos.devices import cpu_name, device_description, resolve_device
from thanos.errors import InputError


def test_cpu_description_names_the_processor_and_threads():
    # results files compare only within one CPU model, so the description must carry it
    described = device_description(torch.device("cpu"))
    assert cpu_name() and cpu_name() in described
    assert f"{torch.get_num_threads()} threads" in described


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_cuda_asked_for_without_a_gpu_is_refused_by_name():
    with pytest.raises(InputError, match="--device cuda"):
        resolve_device("cuda")


def test_cpu_known_only_by_its_architecture_is_named_once(monkeypatch):
    # ARM Linux has no "model name" in /proc/cpuinfo, and platform often knows only the machine type
    monkeypatch.setattr("thanos.devices.cpu_name", lambda: "aarch64")
    monkeypatch.setattr("thanos.devices.platform.machine", lambda: "aarch64")
    assert device_description(torch.device("cpu")) == f"cpu (aarch64, {torch.get_num_threads()} threads)"
