"""Brain gradient positioning: diffusion-map gradients of functional connectivity.

Brain-JEPA places every ROI in a space of connectivity gradients (docs/method.md): the group
functional connectivity matrix (R x R) is sparsified row by row, turned into an affinity between
ROIs, and embedded with diffusion maps. The resulting gradient matrix G (R x m, m = 30 in the
paper) is what the model's positional embedding projects. The package computes G for any
parcellation, reproducing BrainSpace's ``GradientMaps(kernel="normalized_angle", approach="dm",
alpha=0.5)`` step by step, and aligns gradient sets with orthogonal Procrustes.

One deliberate difference from BrainSpace: it hands the (non-symmetric) random-walk matrix to
``scipy.sparse.linalg.eigsh``, a solver for *symmetric* matrices, so its output is only
approximate and changes with ``random_state`` (by up to 2e-3, and 1e-2 for nearly tied
eigenvalues, on its own Schaefer matrices whose gradient values reach 0.19). Here
the random-walk matrix is eigendecomposed exactly and deterministically through the symmetric
matrix it is similar to. Everything else (thresholding, kernel, normalisations, eigenvalue
selection, scaling, sign convention) follows BrainSpace; with BrainSpace's solver swapped for an
exact one, the two agree to about 1e-12 (see tests/test_gradients.py).

- :mod:`~brainjepa.gradients.maps`: group FC, affinity, diffusion maps, :class:`BrainGradients`,
  Procrustes alignment.
- :mod:`~brainjepa.gradients.files`: gradient CSV files, connectivity files, the gradient plot.
"""

from .files import load_connectivity, load_gradients_csv, plot_gradients, save_gradients_csv
from .maps import KERNELS, BrainGradients, affinity, compute_gradients, connectivity, diffusion_map, procrustes_align

__all__ = [
    "BrainGradients",
    "KERNELS",
    "affinity",
    "compute_gradients",
    "connectivity",
    "diffusion_map",
    "load_connectivity",
    "load_gradients_csv",
    "plot_gradients",
    "procrustes_align",
    "save_gradients_csv",
]
