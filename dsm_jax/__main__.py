"""``python -m dsm_jax``: the ``dsm-jax`` command (:func:`dsm_jax.cli.main`)."""

import sys

from dsm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
