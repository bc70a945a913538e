"""The tiny run settings the command-line tests share: seconds per run, every code path exercised."""

TINY_SETTINGS = dict(
    num_train=512,
    num_test=256,
    width=32,
    depth=1,
    num_sigmas=4,
    batch_size=64,
    steps_per_call=10,
    save_every=20,
    log_every=10,
    num_samples=256,
    steps_per_sigma=10,
    fisher_samples=256,
    sde_steps=20,
    warmup_steps=5,
)


def tiny_sets(**overrides) -> list:
    """``["--set", "key=value", ...]`` for :data:`TINY_SETTINGS` updated with ``overrides``."""
    return [arg for key, value in {**TINY_SETTINGS, **overrides}.items() for arg in ("--set", f"{key}={value}")]
