"""Loss-landscape diagnostics against closed forms on quadratics, and a smoke run on a tiny GPT-2.

The quadratic is L_b(theta) = w_b * 1/2 (theta - c)^T A (theta - c) with per-batch weights w_b = 1 and 3, so the
mean loss over the two batches is 2 * 1/2 (theta - c)^T A (theta - c) and its Hessian is exactly 2A. That also checks
that every diagnostic averages over all the batches rather than using the first one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sema_hf.landscape import (
    Flatness,
    LossProfile,
    _filter_dims,
    _filter_normalized_direction,
    _hessian_vector_product,
    _twice_differentiable_attention,
    fixed_batches,
    flatness,
    loss_profile,
    mean_loss,
    plot_loss_profile,
    top_hessian_eigenvalue,
)

BATCHES = [{"weight": torch.tensor(1.0)}, {"weight": torch.tensor(3.0)}]
MEAN_WEIGHT = 2.0


class Quadratic(nn.Module):
    """loss = weight * 1/2 (theta - c)^T A (theta - c), theta = the parameter flattened; A and c are buffers."""

    def __init__(self, a: torch.Tensor, theta: torch.Tensor, center: torch.Tensor | None = None) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())
        self.register_buffer("a", a.clone())
        self.register_buffer("center", (theta if center is None else center).clone())

    def forward(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (self.theta - self.center).reshape(-1)
        return {"loss": weight * 0.5 * (x @ self.a @ x)}


def rotated(spectrum: list[float], seed: int = 0) -> torch.Tensor:
    """A = Q diag(spectrum) Q^T for a random orthogonal Q: symmetric, dense, known eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=g, dtype=torch.float64))
    return (q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T).float()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


# --- sharpness -------------------------------------------------------------------------------------------------------


def test_power_iteration_finds_largest_eigenvalue_of_known_diagonal_quadratic():
    torch.manual_seed(0)
    model = Quadratic(torch.diag(torch.tensor([5.0, 2.0, 0.5])), torch.randn(3))
    eigenvalue = top_hessian_eigenvalue(model, BATCHES, max_iterations=100, tol=1e-7)
    assert eigenvalue == pytest.approx(MEAN_WEIGHT * 5.0, rel=1e-3)


def test_power_iteration_finds_largest_eigenvalue_of_rotated_quadratic_split_over_two_parameters():
    # dense A with a negative eigenvalue and a close second (ratio 0.75): convergence is slow but must get there
    a = rotated([4.0, -1.0, 0.5, 3.0])

    class TwoParams(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Parameter(torch.tensor([0.3, -0.2]))
            self.second = nn.Parameter(torch.tensor([[1.0], [0.5]]))

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([model.first, model.second.reshape(-1)])
        return batch["weight"] * 0.5 * (x @ a @ x)

    eigenvalue = top_hessian_eigenvalue(TwoParams(), BATCHES, loss_fn=loss_fn, max_iterations=200, tol=1e-8)
    assert eigenvalue == pytest.approx(MEAN_WEIGHT * 4.0, rel=1e-3)


def test_power_iteration_returns_history_and_stops_at_relative_tolerance():
    model = Quadratic(rotated([5.0, 4.5, 1.0]), torch.ones(3))
    value, history = top_hessian_eigenvalue(model, BATCHES, max_iterations=50, tol=1e-2, return_history=True)
    assert value == history[-1]
    assert 2 <= len(history) < 50
    assert abs(history[-1] - history[-2]) <= 1e-2 * abs(history[-1])
    # Rayleigh quotients of a PSD matrix rise monotonically towards lambda_max
    assert all(b >= a - 1e-5 for a, b in zip(history, history[1:], strict=False))
    _, full = top_hessian_eigenvalue(model, BATCHES, max_iterations=7, tol=0.0, return_history=True)
    assert len(full) == 7


def test_power_iteration_is_deterministic_given_seed():
    model = Quadratic(rotated([3.0, 2.9, 1.0]), torch.ones(3))
    kwargs = dict(max_iterations=3, tol=0.0, return_history=True)
    assert top_hessian_eigenvalue(model, BATCHES, seed=1, **kwargs) == top_hessian_eigenvalue(
        model, BATCHES, seed=1, **kwargs
    )
    assert top_hessian_eigenvalue(model, BATCHES, seed=1, **kwargs) != top_hessian_eigenvalue(
        model, BATCHES, seed=2, **kwargs
    )


def test_power_iteration_of_a_loss_linear_in_the_weights_is_zero():
    model = nn.Linear(3, 1)

    def loss_fn(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch).sum()

    assert top_hessian_eigenvalue(model, [torch.ones(2, 3)], loss_fn=loss_fn) == 0.0


# --- flatness --------------------------------------------------------------------------------------------------------


def test_flatness_is_exact_for_one_element_filters_at_minimum_of_diagonal_quadratic():
    # filters of one element: each direction entry is +-|w_j|, so d^T A d = sum_j a_j w_j^2 for every sample
    diag = torch.tensor([5.0, 2.0, 0.5, 1.0])
    theta = torch.tensor([[0.7], [-1.2], [2.0], [0.1]])
    radius = 0.1
    result = flatness(Quadratic(torch.diag(diag), theta), BATCHES, radius=radius, num_samples=5)
    expected = MEAN_WEIGHT * 0.5 * radius**2 * float((diag * theta.reshape(-1) ** 2).sum())
    assert isinstance(result, Flatness)
    assert result.base_loss == 0.0
    assert result.mean == pytest.approx(expected, rel=1e-4)
    assert result.std < 1e-4 * expected
    assert len(result.increases) == 5


def test_flatness_matches_analytic_expectation_for_multi_element_filters_of_dense_quadratic():
    # theta of shape (3, 4): 3 filters of 4 entries. Each filter's direction is uniform on a sphere of radius
    # |W_i|, so E[d_j d_k] = |W_i|^2 / 4 on the diagonal within a filter and 0 elsewhere:
    #     E[increase] = mean_w * r^2 / 2 * sum_i |W_i|^2 / 4 * sum_{j in filter i} A_jj   (at the minimum).
    torch.manual_seed(0)
    a = rotated([float(k) for k in range(1, 13)], seed=3)
    theta = torch.randn(3, 4) * torch.tensor([[0.5], [1.0], [2.0]])
    radius, samples = 0.05, 1500
    result = flatness(Quadratic(a, theta), BATCHES, radius=radius, num_samples=samples, seed=0)
    filter_sq = theta.pow(2).sum(dim=1) / 4
    diag_per_filter = torch.diagonal(a).reshape(3, 4).sum(dim=1)
    expected = MEAN_WEIGHT * 0.5 * radius**2 * float((filter_sq * diag_per_filter).sum())
    standard_error = result.std / math.sqrt(samples)
    assert standard_error < 0.05 * expected  # the comparison below has power
    assert abs(result.mean - expected) < 4 * standard_error


def test_flatness_is_zero_at_radius_zero_and_grows_as_radius_squared_at_a_minimum():
    model = Quadratic(rotated([3.0, 1.0, 0.2, 2.0]), torch.tensor([[1.0, -2.0], [0.5, 0.3]]))
    zero = flatness(model, BATCHES, radius=0.0, num_samples=4)
    assert zero.mean == 0.0 and zero.std == 0.0
    # same seed, same directions: at the minimum the increase is exactly quadratic in the radius
    means = [flatness(model, BATCHES, radius=r, num_samples=4, seed=7).mean for r in (0.01, 0.02, 0.05, 0.1)]
    assert all(b > a > 0 for a, b in zip(means, means[1:], strict=False))
    assert means[1] == pytest.approx(4 * means[0], rel=1e-4)
    assert means[3] == pytest.approx(4 * means[2], rel=1e-4)


def test_flatness_restores_weights_bit_for_bit_and_is_deterministic_given_seed():
    torch.manual_seed(0)
    model = Quadratic(rotated([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), torch.randn(2, 3), center=torch.zeros(2, 3))
    before = snapshot(model)
    first = flatness(model, BATCHES, radius=0.37, num_samples=3, seed=11)
    assert_unchanged(model, before)
    assert first == flatness(model, BATCHES, radius=0.37, num_samples=3, seed=11)
    assert first.increases != flatness(model, BATCHES, radius=0.37, num_samples=3, seed=12).increases


def test_flatness_one_dim_zero_leaves_one_dim_parameters_unperturbed_and_scale_perturbs_them():
    model = Quadratic(torch.diag(torch.tensor([5.0, 2.0, 0.5])), torch.tensor([1.0, -1.0, 2.0]))
    assert flatness(model, BATCHES, radius=0.1, num_samples=3, one_dim="zero").mean == 0.0
    assert flatness(model, BATCHES, radius=0.1, num_samples=3, one_dim="scale").mean > 0.0
    with pytest.raises(ValueError, match="one_dim"):
        flatness(model, BATCHES, one_dim="keep")


def test_filter_normalized_direction_gives_each_filter_the_norm_of_the_weights_filter():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])
    rows = _filter_normalized_direction(w, g, filter_dim=0, one_dim="zero")
    assert torch.allclose(rows.norm(dim=1), w.norm(dim=1))  # a zero filter gets a zero direction
    cols = _filter_normalized_direction(w, g, filter_dim=1, one_dim="zero")  # transformers' Conv1D is (in, out)
    assert torch.allclose(cols.norm(dim=0), w.norm(dim=0))
    bias = torch.tensor([3.0, 4.0])
    assert torch.equal(_filter_normalized_direction(bias, g, 0, "zero"), torch.zeros(2))
    assert _filter_normalized_direction(bias, g, 0, "scale").norm() == pytest.approx(5.0)


# --- loss profile ----------------------------------------------------------------------------------------------------


def test_loss_profile_equals_closed_form_on_quadratic_at_each_alpha():
    a = rotated([4.0, 1.0, 0.25])
    center = torch.tensor([0.5, -0.5, 1.0])
    raw, ema = torch.tensor([2.0, 1.0, -1.0]), torch.tensor([0.8, -0.2, 0.6])
    model = Quadratic(a, raw, center=center)
    before = snapshot(model)
    alphas = [-0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    profile = loss_profile(model, BATCHES, {"theta": ema}, alphas)
    assert isinstance(profile, LossProfile)
    assert profile.alphas == tuple(alphas)
    for alpha, loss in zip(alphas, profile.losses, strict=True):
        x = (raw + alpha * (ema - raw) - center).double()
        assert loss == pytest.approx(MEAN_WEIGHT * 0.5 * float(x @ a.double() @ x), rel=1e-5)
    assert profile.as_dict()[0.0] == pytest.approx(mean_loss(model, BATCHES))
    assert_unchanged(model, before)


def test_loss_profile_rejects_ema_state_that_does_not_match_the_parameters():
    model = Quadratic(torch.eye(2), torch.ones(2))
    with pytest.raises(ValueError, match="lacks trainable parameters"):
        loss_profile(model, BATCHES, {})
    with pytest.raises(ValueError, match="not parameters"):
        loss_profile(model, BATCHES, {"theta": torch.zeros(2), "a": torch.eye(2)})
    with pytest.raises(ValueError, match="shape"):
        loss_profile(model, BATCHES, {"theta": torch.zeros(3)})


def test_plot_loss_profile_writes_a_png(tmp_path):
    profile = LossProfile(alphas=(0.0, 1.0, 2.0), losses=(1.0, 0.5, 0.8))
    path = plot_loss_profile({"seed 0": profile, "seed 1": profile}, tmp_path / "plots" / "profile.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_loss_profile({0.0: 1.0, 1.0: 0.5}, tmp_path / "dict.png").stat().st_size > 0


# --- batches ---------------------------------------------------------------------------------------------------------


def test_fixed_batches_takes_the_first_n_of_an_iterable_and_requires_n_for_one():
    loader = ({"weight": torch.tensor(float(i))} for i in range(100))
    assert [float(b["weight"]) for b in fixed_batches(loader, 3)] == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="num_batches is required"):
        fixed_batches(iter(BATCHES))
    assert fixed_batches(BATCHES, 1) == BATCHES[:1]
    with pytest.raises(ValueError, match="empty"):
        fixed_batches([])


# --- a real transformers model ---------------------------------------------------------------------------------------


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 16), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    return GPT2LMHeadModel(config), batches, g


def test_hessian_vector_product_through_gpt2_attention_matches_finite_difference_of_gradients():
    # H v ~ (grad L(theta + eps v) - grad L(theta - eps v)) / (2 eps). float64 weights; transformers computes the
    # loss in fp32, so eps cannot go much below 1e-3 before cancellation noise dominates (truncation is O(eps^2)).
    model, batches, g = tiny_gpt2()
    model.double().eval()
    params = list(model.parameters())
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    norm = sum((d**2).sum() for d in v).sqrt()
    v = [d / norm for d in v]  # unit step direction, so eps is the step length
    eps = 1e-3
    with _twice_differentiable_attention():
        hv = _hessian_vector_product(model, params, v, batches, None)
        base = [p.detach().clone() for p in params]

        def grad_at(sign: float) -> list[torch.Tensor]:
            with torch.no_grad():
                for p, b, d in zip(params, base, v, strict=True):
                    p.copy_(b + sign * eps * d)
            loss = sum(model(**b).loss for b in batches) / len(batches)
            return torch.autograd.grad(loss, params)

        finite_difference = [(a - b) / (2 * eps) for a, b in zip(grad_at(1.0), grad_at(-1.0), strict=True)]
    error = sum(((a - b) ** 2).sum() for a, b in zip(hv, finite_difference, strict=True)).sqrt()
    scale = sum((b**2).sum() for b in finite_difference).sqrt()
    assert float(error / scale) < 1e-3


def test_gpt2_conv1d_weights_are_normalized_per_output_column_and_embeddings_per_row():
    from transformers.pytorch_utils import Conv1D

    model, _, _ = tiny_gpt2()
    dims = _filter_dims(model)
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
    assert len(conv_weights) == 4  # c_attn, attn c_proj, c_fc, mlp c_proj
    assert all(dims[i] == 1 for i in conv_weights)
    assert id(model.transformer.wte.weight) not in dims and id(model.transformer.wpe.weight) not in dims


def test_all_diagnostics_run_on_tiny_gpt2_with_finite_results_and_model_left_as_found():
    model, batches, g = tiny_gpt2()
    model.train()
    model.transformer.drop.eval()  # a submodule in its own mode must keep it
    before = snapshot(model)
    modes = {name: m.training for name, m in model.named_modules()}

    # an EMA state keyed like state_dict: the tied embedding/output weight under both of its names, same tensor
    params = dict(model.named_parameters(remove_duplicate=False))
    noise = {id(p): 0.02 * torch.randn(p.shape, generator=g) for p in params.values()}
    ema_state = {k: v + noise[id(params[k])] for k, v in model.state_dict().items() if k in params}
    assert "lm_head.weight" in ema_state and "transformer.wte.weight" in ema_state

    sharpness = top_hessian_eigenvalue(model, iter(batches), num_batches=2, max_iterations=3)
    flat = flatness(model, batches, radius=0.05, num_samples=2)
    profile = loss_profile(model, batches, ema_state, alphas=(0.0, 1.0, 2.0))
    base = mean_loss(model, batches)

    assert math.isfinite(sharpness)  # at random init H is indefinite: the dominant eigenvalue may be negative
    assert math.isfinite(flat.mean) and math.isfinite(flat.std)
    assert flat.base_loss == base
    assert all(math.isfinite(x) for x in profile.losses)
    assert profile.losses[0] == base  # alpha = 0 is the raw model
    assert profile.losses[1] != base  # alpha = 1 really evaluated the EMA weights
    assert_unchanged(model, before)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())

    ema_state["lm_head.weight"] = ema_state["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="tied"):
        loss_profile(model, batches, ema_state)
