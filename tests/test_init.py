"""The package's top level: every public name importable, and ``import dsm_jax`` light."""

import subprocess
import sys

import dsm_jax


def test_every_public_name_resolves():
    missing = [name for name in dsm_jax.__all__ if getattr(dsm_jax, name, None) is None]
    assert missing == []
    assert set(dsm_jax.__all__) <= set(dir(dsm_jax))
    from dsm_jax import VESDE, log_likelihood, probability_flow_ode  # lazy names, the import form

    assert VESDE is dsm_jax.sde.VESDE
    assert log_likelihood is dsm_jax.likelihood.log_likelihood
    assert probability_flow_ode is dsm_jax.samplers.probability_flow_ode


def test_unknown_name_is_an_attribute_error():
    try:
        dsm_jax.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("dsm_jax.no_such_name did not raise")


def test_import_loads_neither_flax_nor_diffrax_until_used():
    code = (
        "import sys, dsm_jax\n"
        "heavy = ('flax', 'diffrax', 'optax', 'orbax', 'sklearn', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "dsm_jax.VESDE\n"
        "print('dsm_jax.sde' in sys.modules, 'flax' in sys.modules or 'diffrax' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    # The SDEs load on first use, and they need neither flax nor diffrax (diffrax loads on the first ODE solve).
    assert out == ["[]", "True", "False"], out
