"""precision="auto" (float32 eigensolve where the accuracy bound allows, float64 otherwise) against float64 brute force.

The claim under test (entrotrain.functional.spectral_precision): for float32 / bf16 / fp16 rows, ``precision="auto"``
is within a relative 1e-5 of the float64 value of the same measure on every input, float32 where the spectrum is
well conditioned and float64 where it is not; ``precision="float64"`` is the exact float64 path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional import representation as R
from entrotrain.functional import spectral_precision as SP
from entrotrain.functional import spectrum as S
from entrotrain.functional.representation import effective_rank, matrix_entropy, matrix_erank, rankme, vendi_score
from tests.helpers import spectral_reference as ref

RTOL = SP.AUTO_RTOL

MEASURES = {
    "matrix_entropy": (matrix_entropy, ref.matrix_entropy),
    "matrix_erank": (matrix_erank, lambda a: math.exp(ref.matrix_entropy(a))),
    "vendi_cosine_q1": (vendi_score, lambda a: ref.vendi_score_k(ref.cosine_kernel(a), 1.0)),
    "rankme": (rankme, ref.rankme),
    "effective_rank": (effective_rank, ref.effective_rank),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    centres = torch.randn(10, d, generator=g, dtype=torch.float64) * 4.0
    return centres[torch.randint(0, 10, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=torch.float64)


def _lowrank(n: int, d: int, r: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, d, generator=g, dtype=torch.float64)


def _duplicated(n: int, d: int) -> torch.Tensor:
    x = torch.randn(n // 2, d, generator=_gen(3), dtype=torch.float64)
    return torch.cat([x, x])


#: name -> float64 rows; sizes above AUTO_MIN_WORK so that "auto" may choose float32.
INPUTS = {
    "random n>d": lambda: torch.randn(512, 64, generator=_gen(1), dtype=torch.float64),
    "random n<d": lambda: torch.randn(96, 256, generator=_gen(2), dtype=torch.float64),
    "blobs n>d": lambda: _blobs(512, 96),
    "blobs n<d": lambda: _blobs(128, 320, seed=4),
    "low rank 5": lambda: _lowrank(400, 80, 5),
    "rank 1": lambda: _lowrank(300, 64, 1),
    "duplicated rows": lambda: _duplicated(512, 64),
    "large scale 1e4": lambda: _blobs(512, 64, seed=5) * 1e4,
    "tiny scale 1e-30": lambda: _blobs(512, 64, seed=6) * 1e-30,
    "offset 1e4": lambda: _blobs(512, 64, seed=7) + 1e4,
    "decaying spectrum": lambda: torch.randn(512, 96, generator=_gen(8), dtype=torch.float64)
    * torch.logspace(0, -6, 96, dtype=torch.float64),
}

WELL_CONDITIONED = ("random n>d", "random n<d", "blobs n>d", "blobs n<d", "duplicated rows", "large scale 1e4",
                    "tiny scale 1e-30")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


class _Spy:
    """Records the dtypes of the eigensolves / SVDs the measures run."""

    def __init__(self, monkeypatch):
        self.dtypes: list[torch.dtype] = []
        gram, svdvals = R._gram_eigvalsh, torch.linalg.svdvals

        def spy_gram(z, *a, **k):
            self.dtypes.append(z.dtype)
            return gram(z, *a, **k)

        def spy_svd(x, *a, **k):
            self.dtypes.append(x.dtype)
            return svdvals(x, *a, **k)

        monkeypatch.setattr(R, "_gram_eigvalsh", spy_gram)
        monkeypatch.setattr(S, "_gram_eigvalsh", spy_gram)  # linear_kernel_spectrum's (the float64 Vendi route)
        monkeypatch.setattr(torch.linalg, "svdvals", spy_svd)


@pytest.mark.parametrize("data", sorted(INPUTS))
@pytest.mark.parametrize("name", sorted(MEASURES))
def test_auto_is_within_1e5_of_float64_brute_force(name, data, monkeypatch):
    fn, reference = MEASURES[name]
    x64 = INPUTS[data]()
    x = x64.float()
    want = reference(x.double().numpy())  # the reference sees exactly the float32 values
    spy = _Spy(monkeypatch)
    got = fn(x)
    assert got.dtype == torch.float64 and got.ndim == 0
    # rank 1 matrix entropy is 0 up to float64 round-off (1e-13): the absolute slack covers that, nothing more
    assert abs(float(got) - want) <= RTOL * abs(want) + 1e-10, (name, data, float(got), want, spy.dtypes)
    if data in WELL_CONDITIONED and name != "matrix_erank" or data == "offset 1e4" and name.startswith("matrix"):
        assert spy.dtypes[0] == torch.float32 and len(spy.dtypes) == 1, f"auto left float32 on {data}: {spy.dtypes}"
    if data in ("low rank 5", "rank 1"):  # float32 noise eigenvalues would cost > 1e-5: auto must fall back
        assert spy.dtypes[-1] == torch.float64, f"auto kept float32 on {data}"


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_matrix_erank_and_counts_use_float32_on_well_conditioned_rows(name, monkeypatch):
    spy = _Spy(monkeypatch)
    MEASURES[name][0](_blobs(1024, 64, seed=9).float())
    assert spy.dtypes == [torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(MEASURES))
def test_half_inputs_are_computed_in_float32_within_1e5(name, dtype, monkeypatch):
    fn, reference = MEASURES[name]
    x = _blobs(512, 64, seed=10).to(dtype)
    spy = _Spy(monkeypatch)
    got = float(fn(x))
    assert spy.dtypes[0] == torch.float32
    assert _rel(got, reference(x.double().numpy())) <= RTOL


@pytest.mark.parametrize("data", ["blobs n>d", "random n<d", "low rank 5", "offset 1e4"])
@pytest.mark.parametrize("name", sorted(MEASURES))
def test_float64_precision_is_the_exact_path(name, data, monkeypatch):
    fn, reference = MEASURES[name]
    x = INPUTS[data]().float()
    spy = _Spy(monkeypatch)
    got = fn(x, precision="float64")
    assert set(spy.dtypes) == {torch.float64}
    assert float(got) == float(fn(x.double()))  # the same float64 computation as float64 input
    assert _rel(float(got), reference(x.double().numpy())) <= 1e-10


def test_float64_input_stays_float64_under_auto(monkeypatch):
    spy = _Spy(monkeypatch)
    matrix_entropy(_blobs(512, 64))
    rankme(_blobs(512, 64))
    assert set(spy.dtypes) == {torch.float64}


def test_small_inputs_use_float64_under_auto(monkeypatch):
    spy = _Spy(monkeypatch)
    x = _blobs(64, 16).float()  # 64·16·16 < AUTO_MIN_WORK
    assert 64 * 16 * 16 < SP.AUTO_MIN_WORK
    matrix_entropy(x)
    vendi_score(x)
    assert set(spy.dtypes) == {torch.float64}


def test_other_vendi_kernels_and_orders_stay_float64(monkeypatch):
    spy = _Spy(monkeypatch)
    x = _blobs(512, 64).float()
    vendi_score(x, 0.5)
    vendi_score(x, kernel="linear")
    assert set(spy.dtypes) == {torch.float64}


def test_a_row_equal_to_the_mean_falls_back_to_float64_and_stays_zero(monkeypatch):
    x = _blobs(511, 64, seed=11).float()
    x = torch.cat([x, x.double().mean(0, keepdim=True).float()])  # float32 mean: its centred row is ~0, not 0
    spy = _Spy(monkeypatch)
    got = float(matrix_entropy(x))
    assert _rel(got, float(matrix_entropy(x, precision="float64"))) <= RTOL
    assert spy.dtypes[-1] == torch.float64 or _rel(got, ref.matrix_entropy(x.double().numpy())) <= RTOL


def test_non_finite_rows_are_refused_with_the_count_on_the_float32_route():
    x = _blobs(512, 64).float()
    x[3, 5] = float("nan")
    x[7, 1] = float("inf")
    for fn in (matrix_entropy, rankme, vendi_score, effective_rank):
        with pytest.raises(EntrotrainError, match="2 non-finite"):
            fn(x)


@pytest.mark.parametrize("bad", ["float32", "fp64", None, 64, True])
def test_precision_is_validated(bad):
    x = _blobs(16, 4).float()
    for fn in (matrix_entropy, rankme, vendi_score, effective_rank, matrix_erank):
        with pytest.raises(EntrotrainError, match="precision"):
            fn(x, precision=bad)


def test_the_bound_refuses_a_spectrum_at_the_float32_noise_floor():
    eps = torch.finfo(torch.float32).eps
    clean = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    noisy = torch.cat([clean, torch.full((500,), eps * 0.5, dtype=torch.float64)])
    noisy = noisy / noisy.sum()
    h = float(SP.shannon64(noisy))
    assert SP.float32_ok(clean, float(SP.shannon64(clean)), count=True, n_negative=0)
    assert not SP.float32_ok(noisy, h, count=True, n_negative=250)  # many negatives: zeros at the floor
    assert not SP.float32_ok(noisy, h, count=True)  # singular values: unresolved ones count in full


def test_registry_logs_and_takes_the_precision():
    x = _blobs(512, 64, seed=12).float()
    for name in ("matrix_entropy", "matrix_entropy_normalized", "matrix_erank", "effective_rank", "rankme", "vendi"):
        measure = R.get_measure(name)
        assert measure.params(x)["precision"] == "auto"
        exact = float(measure(x, precision="float64"))
        assert exact == float(measure(x.double()))
        assert _rel(float(measure(x)), exact) <= RTOL


def test_shannon64_accumulates_in_float64():
    lam = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float32)
    p = np.array([0.75, 0.25])
    assert float(SP.shannon64(lam)) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-15)
    assert SP.shannon64(lam).dtype == torch.float64


# ===================================================================================================== properties


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 300),
    d=st.integers(0, 72),
    kind=st.sampled_from(["random", "blobs", "lowrank", "dup"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    precision=st.sampled_from(["auto", "float64"]),
    name=st.sampled_from(sorted(MEASURES)),
    seed=st.integers(0, 2**16),
)
def test_every_shape_gives_an_error_or_the_float64_value(n, d, kind, dtype, precision, name, seed):
    """0-sized and 1-row inputs raise (documented: n >= 2 rows, d >= 1 feature); others match float64 within 1e-5."""
    g = _gen(seed)
    if kind == "blobs" and n and d:
        x = _blobs(n, d, seed)
    elif kind == "lowrank" and n and d:
        x = _lowrank(n, d, min(3, n, d), seed)
    else:
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        if kind == "dup" and n > 1:
            x[n // 2 :] = x[: n - n // 2].clone()
    x = x.to(dtype)
    fn, reference = MEASURES[name]
    if n < 2 or d < 1:
        with pytest.raises(EntrotrainError):
            fn(x, precision=precision)
        return
    try:
        want = reference(x.double().numpy())
    except (np.linalg.LinAlgError, ValueError, ZeroDivisionError):
        want = None
    try:
        got = float(fn(x, precision=precision))
    except EntrotrainError:  # documented degenerate inputs (all rows identical): the reference is undefined too
        assert want is None or not math.isfinite(want) or name.startswith("matrix")
        return
    if want is None or not math.isfinite(want):
        return
    tol = RTOL if precision == "auto" and dtype != torch.float64 else 1e-9
    assert abs(got - want) <= tol * abs(want) + 1e-9, (got, want)
