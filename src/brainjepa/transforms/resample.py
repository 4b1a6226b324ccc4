"""TR resampling and windows of (R, T) series.

Multiband data (TR 0.72-0.8 s) is brought to a target TR (about 2 s in the paper). The
authors keep every third frame, which aliases everything between the new Nyquist frequency
and the old one and only fits TR ratios near 3. Here the series is evaluated at the new
sampling times ``k * tr_out`` with a band-limited interpolator: a Kaiser-windowed sinc whose
cut-off is the lower of the two Nyquist frequencies (an anti-aliasing low-pass when
downsampling), each output's weights normalised to unit DC gain, series ends mirror-padded.
Any TR ratio works and each file's own TR is used. Because the weights for "n outputs
starting on an input frame" do not depend on where the window starts, a window costs one
small matrix product (:class:`WindowResampler`), which keeps the streaming loader fast.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ..errors import ConfigError, DataError

# half-width of the interpolation kernel, in output samples: wide enough for a sharp anti-alias
# cut-off, small enough that a 160-point window needs only ~8 extra output periods each side
KERNEL_HALF_WIDTH = 8
KAISER_BETA = 6.0


@contextmanager
def single_threaded():
    """Run torch ops in the block on one thread, then restore the caller's setting.

    For the small matrix products of resampling and simulation, intra-op threads never pay off,
    and when other processes share the cores (DataLoader workers, other jobs) a threaded BLAS
    waits on descheduled threads: 10-20x slower, measured on a shared 2-core machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _positive(value, name: str) -> float:
    if value is None or not np.isfinite(value) or value <= 0:
        raise DataError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def same_tr(tr_in: float, tr_out: float) -> bool:
    """Whether two repetition times are equal up to a relative 1e-6 (no resampling needed).

    Args:
        tr_in: the series' TR in seconds.
        tr_out: the target TR in seconds.

    Returns:
        True when ``|tr_in - tr_out| <= 1e-6 * tr_out``.
    """
    return abs(tr_in - tr_out) <= 1e-6 * tr_out


def resampled_length(n_frames: int, tr_in: float, tr_out: float) -> int:
    """The number of samples at ``tr_out`` that fit in the time span of ``n_frames`` at ``tr_in``.

    Args:
        n_frames: the number of input frames T.
        tr_in: the input TR in seconds.
        tr_out: the output TR in seconds.

    Returns:
        ``floor((T - 1) * tr_in / tr_out) + 1``, or T when the TRs are the same (:func:`same_tr`).
    """
    if same_tr(tr_in, tr_out):
        return n_frames
    return int(np.floor((n_frames - 1) * tr_in / tr_out + 1e-9)) + 1


def _weights(positions: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation taps for outputs at fractional input ``positions``.

    Returns first (n,) int: index of each output's first tap, and w (n, W) float64 weights over
    input frames first .. first + W - 1, summing to 1 per row.
    """
    scale = max(step, 1.0)
    half = KERNEL_HALF_WIDTH * scale
    reach = int(np.ceil(half))
    first = np.floor(positions).astype(np.int64) - reach + 1
    frames = first[:, None] + np.arange(2 * reach)[None, :]
    offsets = frames - positions[:, None]
    fc = 0.5 / scale  # cut-off in cycles per input frame
    inside = np.clip(1.0 - (offsets / half) ** 2, 0.0, None)
    w = np.sinc(2 * fc * offsets) * np.i0(KAISER_BETA * np.sqrt(inside)) * (np.abs(offsets) < half)
    w /= w.sum(axis=1, keepdims=True)
    return first, w


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Frame indices ``start .. stop - 1`` of an n-frame series, mirrored outside ``0 .. n - 1``.

    The mirror does not repeat the edge frame (-1 maps to 1, n maps to n - 2); a one-frame series
    maps everything to 0.

    Args:
        start: the first index (may be negative).
        stop: one past the last index (may exceed n).
        n: the number of frames of the series.

    Returns:
        (stop - start,) int array of indices in ``0 .. n - 1``.
    """
    idx = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def _reflect_take(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Columns start..stop-1 of (..., T) ``x``, mirror-padded outside 0..T-1."""
    n = x.shape[-1]
    if start >= 0 and stop <= n:
        return x[..., start:stop]
    return x[..., reflect_indices(start, stop, n)]


def resample_tr(x: np.ndarray, tr_in: float, tr_out: float) -> np.ndarray:
    """Resample a series from one TR to another with a band-limited interpolator.

    Output k is the band-limited value at time k * tr_out (see the module docstring). The same TR
    returns ``x`` as float32 unchanged.

    Args:
        x: (R, T) series (any leading axes work; time is last), sampled every ``tr_in`` seconds.
        tr_in: the input TR in seconds.
        tr_out: the output TR in seconds.

    Returns:
        (R, T') float32 with T' = floor((T - 1) * tr_in / tr_out) + 1 (:func:`resampled_length`).

    Raises:
        DataError: a TR is not a positive number.
    """
    tr_in, tr_out = _positive(tr_in, "tr_in"), _positive(tr_out, "tr_out")
    x = np.asarray(x, dtype=np.float32)
    if same_tr(tr_in, tr_out):
        return x
    step = tr_out / tr_in
    n_out = resampled_length(x.shape[-1], tr_in, tr_out)
    out = np.empty(x.shape[:-1] + (n_out,), dtype=np.float32)
    for k0 in range(0, n_out, 256):  # chunks bound the gather's memory on long series
        k = np.arange(k0, min(k0 + 256, n_out))
        first, w = _weights(k * step, step)
        seg = _reflect_take(x, int(first[0]), int(first[-1]) + w.shape[1])
        taps = (first - first[0])[:, None] + np.arange(w.shape[1])[None, :]
        out[..., k] = np.einsum("...kw,kw->...k", seg[..., taps], w.astype(np.float32))
    return out


class WindowResampler:
    """Resample a window of ``n`` outputs at ``tr_out`` whose first output sits on an input frame.

    The (S, n) weights are computed once; ``apply(seg)`` maps input frames (R, S) -> (R, n) and
    ``__call__(x, start)`` reads frames start - margin .. start - margin + S - 1 of (R, T) ``x``
    (mirror-padded at the ends) first. Equals ``resample_tr(x, ...)[:, k0:k0 + n]`` whenever
    start == k0 * step. The weight matrix is banded, so it is applied in blocks of 32 outputs,
    each touching only its ~(32 * step + 2 * margin) input frames (3-4x fewer flops than dense).

    Args:
        tr_in: the input TR in seconds.
        tr_out: the output TR in seconds.
        n: the number of outputs per window.

    Raises:
        DataError: a TR is not a positive number.
    """

    BLOCK = 32

    def __init__(self, tr_in: float, tr_out: float, n: int):
        self.tr_in, self.tr_out, self.n = _positive(tr_in, "tr_in"), _positive(tr_out, "tr_out"), int(n)
        self.step = self.tr_out / self.tr_in
        first, w = _weights(np.arange(self.n) * self.step, self.step)
        self.margin = int(-first[0])
        self.span = int(first[-1] - first[0]) + w.shape[1]  # S input frames read per window
        self.weights = np.zeros((self.span, self.n), dtype=np.float32)  # (S, n): out = seg @ weights
        for k in range(self.n):
            lo = first[k] - first[0]
            self.weights[lo : lo + w.shape[1], k] = w[k]
        self._blocks = []  # (first input frame, last + 1, first output, (frames, outputs) weights)
        for k0 in range(0, self.n, self.BLOCK):
            cols = self.weights[:, k0 : k0 + self.BLOCK]
            rows = np.flatnonzero(np.any(cols != 0, axis=1))
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            self._blocks.append((lo, hi, k0, torch.from_numpy(np.ascontiguousarray(cols[lo:hi]))))

    def raw_extent(self) -> int:
        """The input frames spanned by the n outputs themselves (excluding the filter margins).

        Returns:
            ``floor((n - 1) * step) + 1`` frames, step = tr_out / tr_in.
        """
        return int(np.floor((self.n - 1) * self.step + 1e-9)) + 1

    def apply(self, seg: np.ndarray) -> np.ndarray:
        """Resample S input frames to the window's n outputs.

        Args:
            seg: (R, S) input frames, the ``margin`` frames before the window's first output
                frame first.

        Returns:
            (R, n) float32.
        """
        # torch rather than numpy for the products: its thread count can be limited per call,
        # numpy's BLAS threads cannot (and would oversubscribe the CPU in every DataLoader worker)
        seg_t = torch.from_numpy(np.asarray(seg, dtype=np.float32))
        out = torch.empty(seg_t.shape[0], self.n)
        with single_threaded():
            for lo, hi, k0, w in self._blocks:
                torch.mm(seg_t[:, lo:hi], w, out=out[:, k0 : k0 + w.shape[1]])
        return out.numpy()

    def __call__(self, x: np.ndarray, start: int) -> np.ndarray:
        """Resample the window whose first output sits on input frame ``start``.

        Args:
            x: (R, T) series at ``tr_in``; frames outside 0 .. T - 1 are mirror-padded.
            start: the input frame of the first output.

        Returns:
            (R, n) float32, equal to ``resample_tr(x, ...)[:, k0:k0 + n]`` when start == k0 * step.
        """
        return self.apply(_reflect_take(x, start - self.margin, start - self.margin + self.span))


def _check_window(n_frames: int, length: int) -> None:
    if length <= 0:
        raise ConfigError(f"window length must be positive, got {length}")
    if n_frames < length:
        raise DataError(f"series has {n_frames} time points, shorter than the window of {length}")


def center_window(x: np.ndarray, length: int) -> np.ndarray:
    """The centred window of a series (deterministic, for evaluation).

    Args:
        x: (R, T) series (any leading axes; time is last).
        length: the window length in time points; when T - length is odd, the end loses one
            frame more than the start.


    Returns:
        (R, length) view of ``x``.

    Raises:
        ConfigError: ``length`` is not positive.
        DataError: the series is shorter than ``length``.
    """
    _check_window(x.shape[-1], length)
    start = (x.shape[-1] - length) // 2
    return x[..., start : start + length]
