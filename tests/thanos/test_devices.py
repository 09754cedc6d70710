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


def test_tf32_reaches_the_search_and_refit_products_alone(monkeypatch):
    """plan --tf32 lets the mask search and refit (only) round fp32 products to TF32 on a GPU; without
    it they run in full fp32 even where the process allowed TF32 everywhere, the solve runs as the
    process set (full fp32 is torch's default), and the switch is restored on leaving. The flag is
    what CUDA matmuls read; on the CPU it is set all the same, so the routing is checked here."""
    import thanos.recipe
    import thanos.solvers.thanos as solver_module
    from thanos import prune_weight
    from thanos.devices import _tf32_switch, matmul_tf32, set_matmul_tf32, tf32_for_products

    seen = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, set()).add(matmul_tf32())
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(thanos.recipe, "admm_mask_search", spy("search", thanos.recipe.admm_mask_search))
    monkeypatch.setattr(thanos.recipe, "refit_on_support", spy("refit", thanos.recipe.refit_on_support))
    monkeypatch.setattr(thanos.recipe, "thanos_prune", spy("solve", solver_module.thanos_prune))
    matmul, field = torch.backends.cuda.matmul, _tf32_switch()[0]
    before = getattr(matmul, field)  # put back after the test (monkeypatch cannot: torch 2.6 answers by __getattr__)
    try:
        set_matmul_tf32(True)  # a process that allowed it everywhere
        torch.manual_seed(0)
        x = torch.randn(256, 64)
        weight, hessian = torch.randn(32, 64), x.T @ x / 256
        prune_weight(weight, hessian, "thanos", "2:4", 0.5)  # the default preset: search and refit included
        assert seen == {"solve": {True}, "search": {False}, "refit": {False}}
        seen.clear()
        with tf32_for_products():
            prune_weight(weight, hessian, "thanos", "2:4", 0.5)
        assert seen == {"solve": {True}, "search": {True}, "refit": {True}}
        assert matmul_tf32()  # as the process left it
    finally:
        setattr(matmul, field, before)
