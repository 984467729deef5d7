"""Fits the float32 polynomials of ELU's expm1 and log (src/abn_math.h) and prints their coefficients.

    python scripts/fit_polynomials.py      (needs numpy)

expm1(r) = r + r^2 P(r) on |r| <= ln(2) / 2, and log1p(m) = m - m^2 / 2 + m^3 Q(m) on
sqrt(1/2) - 1 <= m < sqrt(2) - 1, each fitted for the least largest relative error of the function
(Lawson's iteratively reweighted least squares on Chebyshev nodes, which converges to the minimax fit).
tests/test_cpu_kernels.py checks the kernels' results against float64 on a sweep of the whole range.
"""

from __future__ import annotations

import numpy as np


def minimax(f, lo: float, hi: float, degree: int, weight) -> tuple[np.ndarray, float]:
    """Coefficients (lowest first) minimizing max |weight * (poly - f)| on [lo, hi], and that maximum."""
    nodes = np.cos(np.pi * (np.arange(4000) + 0.5) / 4000)
    x = (lo + hi) / 2 + (hi - lo) / 2 * nodes
    basis = np.vander(x, degree + 1, increasing=True)
    target, scale = f(x), weight(x)
    lawson = np.ones_like(x)
    for _ in range(200):
        coeffs = np.linalg.lstsq(basis * (lawson * scale)[:, None], target * lawson * scale, rcond=None)[0]
        error = np.abs((basis @ coeffs - target) * scale)
        lawson *= np.sqrt(error / error.max() + 1e-30)
        lawson /= lawson.max()
    return coeffs, float(error.max())


def series_or(f, series, x: np.ndarray) -> np.ndarray:
    """f(x), or its Taylor series where |x| is too small for f's cancellation."""
    small = np.abs(x) < 1e-4
    return np.where(small, series(x), f(np.where(small, 1.0, x)))


def expm1_p(r: np.ndarray) -> np.ndarray:
    return series_or(lambda r: (np.expm1(r) - r) / r**2, lambda r: 1 / 2 + r / 6 + r**2 / 24, r)


def expm1_weight(r: np.ndarray) -> np.ndarray:
    """An error e in P is an error r^2 e in expm1(r): relative, r^2 e / |expm1(r)|."""
    return series_or(lambda r: r**2 / np.abs(np.expm1(r)), np.abs, r)


def log_q(m: np.ndarray) -> np.ndarray:
    return series_or(lambda m: (np.log1p(m) - m + m**2 / 2) / m**3, lambda m: 1 / 3 - m / 4 + m**2 / 5, m)


def log_weight(m: np.ndarray) -> np.ndarray:
    return series_or(lambda m: np.abs(m**3 / np.log1p(m)), lambda m: m**2, m)


def main() -> None:
    half_ln2 = np.log(2) / 2 * 1.0001
    fits = {
        "expm1 P": minimax(expm1_p, -half_ln2, half_ln2, 4, expm1_weight),
        "log Q": minimax(log_q, np.sqrt(0.5) - 1, np.sqrt(2) - 1, 6, log_weight),
    }
    for name, (coeffs, error) in fits.items():
        print(f"{name} (highest first; relative error {error:.2g} before float rounding):")
        print("  " + ", ".join(f"{np.float32(c):.9e}f" for c in coeffs[::-1]))


if __name__ == "__main__":
    main()
