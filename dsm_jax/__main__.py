from dsm_jax.cli import main
import sys

sys.exit(main())
