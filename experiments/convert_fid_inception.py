"""One-time conversion of the FID Inception weights from PyTorch to the ``.npz`` that dsm_jax reads.

Usage (in an environment with torch; dsm_jax itself never needs it)::

    python experiments/convert_fid_inception.py pt_inception-2015-12-05-6726825d.pth fid_inception.npz

The input is pytorch-fid's port of the TensorFlow FID Inception (the file its
``FID_WEIGHTS_URL`` names, ``pt_inception-2015-12-05-6726825d.pth``; download
it yourself once). It is read with ``torch.load(..., weights_only=True)``:
tensors only, no pickled code is run. Every tensor is written unchanged
(same names, PyTorch layouts) except the ``num_batches_tracked`` counters;
:func:`dsm_jax.inception.load_fid_weights` does the layout mapping. The
script then loads the result back through dsm_jax to check every expected
array is present with its shape, and prints the file's sha256 (it is part of
the settings hashed into every reference-statistics file).

Then, once per data set and split, the reference statistics::

    python -m dsm_jax.inception --weights fid_inception.npz --dataset data/cifar-10-batches-bin \\
        --split train --out cifar10_train_fid.npz

and ``dsm-jax evaluate --workdir RUN --num 50000 --fid-weights fid_inception.npz --fid-ref cifar10_train_fid.npz``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def convert(source: str, target: str) -> dict:
    """Writes the tensors of the state dict ``source`` to the ``.npz`` ``target``; returns the arrays."""
    import torch

    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{source!r} does not hold a state dict (got {type(state).__name__}).")
    arrays = {
        name: tensor.detach().cpu().numpy()
        for name, tensor in state.items()
        if not name.endswith("num_batches_tracked")
    }
    with open(target, "wb") as f:
        np.savez(f, **arrays)
    return arrays


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("target", help="the .npz to write")
    args = parser.parse_args(argv)
    arrays = convert(args.source, args.target)
    from dsm_jax import inception

    network = inception.FIDNetwork.load(args.target)  # checks every array and its shape
    print(f"wrote {args.target}: {len(arrays)} arrays; sha256 {network.weights_digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
