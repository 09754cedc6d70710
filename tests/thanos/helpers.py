import torch


def realistic_inputs(tokens: int, cols: int, outliers: int = 4, scale: float = 20.0, seed: int = 0):
    """Calibration inputs (tokens x cols) with a few high-variance channels, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g)
    X[:, torch.randperm(cols, generator=g)[:outliers]] *= scale
    return X


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.shape[0]


def layer_problem(tokens: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, H): a random (rows x cols) weight and the Hessian of realistic inputs, both seeded."""
    H = hessian_of(realistic_inputs(tokens, cols, seed=seed))
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1)), H


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    return H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


def solve_tolerance(W: torch.Tensor, H: torch.Tensor, damp: float) -> float:
    """Largest entry-wise difference an fp32 solve of the damped system may show against an fp64 one.

    fp32 round-off of the k-term sums, amplified by the condition of the damped Hessian's Cholesky
    factor (the square root of the Hessian's), at the weights' scale.
    """
    eig = torch.linalg.eigvalsh(damped(H.double(), damp))
    k = H.shape[0]
    return k * torch.finfo(torch.float32).eps * float(eig[-1] / eig[0]) ** 0.5 * float(W.abs().max())


def assert_nm(weight: torch.Tensor, n: int, m: int):
    rows, cols = weight.shape
    nonzeros = (weight != 0).reshape(rows, cols // m, m).sum(-1)
    assert int(nonzeros.max()) <= m - n, f"a group of {m} has {int(nonzeros.max())} non-zeros"
