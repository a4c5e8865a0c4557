"""Each distillation loss against a value computed by hand (plain Python math) on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from vishwamai.distill import attention_loss, kd_loss, representation_loss, uniform_layer_map


def _softmax(xs: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(x / t) for x in xs]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


STUDENT = [[[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]]  # (batch 1, seq 2, vocab 3)
TEACHER_A = [[[2.0, 0.5, 0.0], [0.0, 1.0, 3.0]]]
TEACHER_B = [[[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]]


def test_kd_loss_is_t_squared_times_the_mean_kl_of_softened_distributions():
    temperature = 2.0
    expected = temperature ** 2 * sum(
        _kl(_softmax(t, temperature), _softmax(s, temperature)) for s, t in zip(STUDENT[0], TEACHER_A[0])) / 2
    got = kd_loss(torch.tensor(STUDENT), [torch.tensor(TEACHER_A)], temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(torch.tensor(TEACHER_A), [torch.tensor(TEACHER_A)], temperature).item() == pytest.approx(0, abs=1e-6)


def test_kd_ensemble_mixes_the_teachers_probabilities_by_weight():
    temperature, weights = 1.5, (0.25, 0.75)
    expected = 0.0
    for s, ta, tb in zip(STUDENT[0], TEACHER_A[0], TEACHER_B[0]):
        mix = [weights[0] * a + weights[1] * b for a, b in zip(_softmax(ta, temperature), _softmax(tb, temperature))]
        expected += _kl(mix, _softmax(s, temperature))
    expected *= temperature ** 2 / 2
    got = kd_loss(torch.tensor(STUDENT), [torch.tensor(TEACHER_A), torch.tensor(TEACHER_B)], temperature, weights)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_chunked_kd_has_the_same_value_and_gradient_as_one_chunk():
    torch.manual_seed(0)
    student = torch.randn(2, 7, 11, requires_grad=True)
    teacher = torch.randn(2, 7, 11)
    whole = kd_loss(student, [teacher], 2.0, chunk_size=100)
    (grad_whole,) = torch.autograd.grad(whole, student)
    chunked = kd_loss(student, [teacher], 2.0, chunk_size=3)  # 3 + 3 + 1 positions, recomputed in backward
    (grad_chunked,) = torch.autograd.grad(chunked, student)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(grad_chunked, grad_whole)
    # d/ds of T^2 * KL = T * (softmax(s/T) - softmax(t/T)), averaged over the 14 positions.
    analytic = 2.0 * (torch.softmax(student / 2, -1) - torch.softmax(teacher / 2, -1)) / 14
    torch.testing.assert_close(grad_whole, analytic.detach())


def test_representation_losses_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    # MSE: squared differences 1, 1, 1, 1 over 4 elements.
    assert representation_loss(s, t, "mse").item() == pytest.approx(1.0)
    # Cosine: position 0 orthogonal (1 - 0), position 1 parallel (1 - 1): mean 0.5.
    assert representation_loss(s, t, "cosine").item() == pytest.approx(0.5)
    s2 = torch.tensor([[[3.0, 4.0]]])
    t2 = torch.tensor([[[4.0, 3.0]]])
    assert representation_loss(s2, t2, "cosine").item() == pytest.approx(1 - 24 / 25)
    assert representation_loss(s2, t2, "mse").item() == pytest.approx(1.0)


def _causal_map(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows).view(1, 1, 2, 2)


def test_attention_kl_and_mse_by_hand_with_causal_zeros():
    student = _causal_map([[1.0, 0.0], [0.25, 0.75]]).requires_grad_()
    teacher = _causal_map([[1.0, 0.0], [0.5, 0.5]])
    # Row 0 is identical (KL 0, the masked 0 contributes nothing); row 1: KL([.5,.5] || [.25,.75]).
    expected_kl = (0 + 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2
    loss = attention_loss(student, teacher, "kl")
    assert loss.item() == pytest.approx(expected_kl, rel=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert attention_loss(student, teacher, "mse").item() == pytest.approx((0.25 ** 2 * 2) / 4)


def test_attention_with_different_head_counts_compares_head_averages():
    s = torch.tensor([[[[1.0, 0.0], [0.2, 0.8]], [[1.0, 0.0], [0.6, 0.4]]]])  # 2 heads
    t = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]] * 4])  # 4 identical heads
    # Student head average: row 1 = [0.4, 0.6]; teacher: [0.5, 0.5].
    expected = (0 + 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)) / 2
    assert attention_loss(s, t, "kl").item() == pytest.approx(expected, rel=1e-5)
    assert attention_loss(s, t, "mse").item() == pytest.approx((0.1 ** 2 * 2) / 4)


@pytest.mark.parametrize("n_student,n_teacher,expected", [
    (2, 4, [1, 3]),
    (3, 12, [3, 7, 11]),
    (4, 4, [0, 1, 2, 3]),
    (4, 2, [0, 0, 1, 1]),
    (1, 6, [5]),
])
def test_uniform_layer_map(n_student, n_teacher, expected):
    assert [uniform_layer_map(i, n_student, n_teacher) for i in range(n_student)] == expected


def test_normalized_mse_compares_directions_not_scales():
    s = torch.tensor([[[3.0, 4.0]]])  # RMS = sqrt(12.5)
    t = torch.tensor([[[30.0, 40.0]]])  # same direction, 10x the scale
    assert representation_loss(s, t, "mse", normalize=True).item() == pytest.approx(0.0, abs=1e-6)
    assert representation_loss(s, t, "mse").item() == pytest.approx((27 ** 2 + 36 ** 2) / 2)
    # [1, 0] -> [sqrt(2), 0]; [0, 1] -> [0, sqrt(2)]: squared differences 2, 2 -> mean 2.
    s2, t2 = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 5.0]]])
    assert representation_loss(s2, t2, "mse", normalize=True).item() == pytest.approx(2.0, rel=1e-5)


def test_kd_softmaxes_never_span_more_than_one_chunk():
    """Memory-lean KD: every (log-)softmax, forward and recomputed in backward, covers one chunk."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SoftmaxShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "softmax" in func.__name__:
                self.shapes.append(tuple(out.shape))
            return out

    student = torch.randn(2, 10, 50, requires_grad=True)
    teacher = torch.randn(2, 10, 50)
    with SoftmaxShapes() as mode:
        kd_loss(student, [teacher], 2.0, chunk_size=4).backward()
    assert mode.shapes, "no softmax seen"
    assert max(shape[1] for shape in mode.shapes) == 4
    with SoftmaxShapes() as whole:
        kd_loss(student, [teacher], 2.0, chunk_size=10).backward()
    assert max(shape[1] for shape in whole.shapes) == 10  # the probe sees full-width softmaxes when unchunked
